//! The control plane itself: what the sync tests rely on works for real.

use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams, PropagationPolicy};
use kube::runtime::wait::{await_condition, conditions};
use sluice_testenv::cluster::{self, NODE_NAME};

const TIMEOUT: Duration = Duration::from_secs(90);

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {TIMEOUT:?} waiting for {what}"))
}

fn deployment(name: &str, replicas: i32) -> Deployment {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "app", "image": "fake"}]}
            }
        }
    }))
    .expect("static deployment is valid")
}

#[tokio::test]
async fn api_is_healthy_and_reports_the_pinned_version() {
    let client = cluster::client().await;
    let req = http::Request::get("/readyz")
        .body(Vec::new())
        .expect("request");
    assert_eq!(client.request_text(req).await.expect("GET /readyz"), "ok");

    let version = client.apiserver_version().await.expect("GET /version");
    let pinned = include_str!("../cluster/versions.env")
        .lines()
        .find_map(|l| l.strip_prefix("K8S_VERSION="))
        .expect("versions.env pins K8S_VERSION");
    assert_eq!(version.git_version, format!("v{pinned}"));
}

#[tokio::test]
async fn deployment_becomes_available_on_the_kwok_node() {
    let client = cluster::client().await;
    let ns = cluster::namespace(&client, "deploy").await;
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    deploys
        .create(&PostParams::default(), &deployment("web", 2))
        .await
        .expect("create deployment");

    within(
        "Deployment web to become Available",
        await_condition(deploys, "web", conditions::is_deployment_completed()),
    )
    .await
    .expect("watch deployment");

    let pods: Api<Pod> = Api::namespaced(client, &ns);
    let list = pods
        .list(&ListParams::default().labels("app=web"))
        .await
        .expect("list pods");
    assert_eq!(list.items.len(), 2);
    for pod in list.items {
        let spec = pod.spec.expect("pod spec");
        assert_eq!(
            spec.node_name.as_deref(),
            Some(NODE_NAME),
            "scheduled onto the kwok node"
        );
        let phase = pod.status.and_then(|s| s.phase);
        assert_eq!(
            phase.as_deref(),
            Some("Running"),
            "kwok made the pod Running"
        );
    }
}

#[tokio::test]
async fn foreground_deletion_cascades_to_replicasets_and_pods() {
    // Controllers stall while an APIService is unavailable; see support::DISCOVERY.
    let _turn = crate::support::DISCOVERY.lock().await;
    let client = cluster::client().await;
    let ns = cluster::namespace(&client, "cascade").await;
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let created = deploys
        .create(&PostParams::default(), &deployment("gc", 1))
        .await
        .expect("create");
    within(
        "Deployment gc to become Available",
        await_condition(deploys.clone(), "gc", conditions::is_deployment_completed()),
    )
    .await
    .expect("watch deployment");

    let rs: Api<ReplicaSet> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    assert_eq!(
        rs.list(&ListParams::default())
            .await
            .expect("list rs")
            .items
            .len(),
        1
    );

    let dp = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Foreground),
        ..Default::default()
    };
    deploys.delete("gc", &dp).await.expect("delete deployment");
    let uid = created.metadata.uid.expect("uid");
    within(
        "Deployment gc to be deleted",
        await_condition(deploys, "gc", conditions::is_deleted(&uid)),
    )
    .await
    .expect("watch deletion");
    // Foreground deletion removes the owner last, so its dependents are already gone.
    assert!(
        rs.list(&ListParams::default())
            .await
            .expect("list rs")
            .items
            .is_empty()
    );
    within("pods of gc to disappear", async {
        while !pods
            .list(&ListParams::default())
            .await
            .expect("list pods")
            .items
            .is_empty()
        {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn namespace_deletion_completes() {
    // Controllers stall while an APIService is unavailable; see support::DISCOVERY.
    let _turn = crate::support::DISCOVERY.lock().await;
    let client = cluster::client().await;
    let ns = cluster::namespace(&client, "nsdel").await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let cm: ConfigMap = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"a": "b"}
    }))
    .expect("static configmap");
    cms.create(&PostParams::default(), &cm)
        .await
        .expect("create configmap");

    let namespaces: Api<Namespace> = Api::all(client);
    let uid = namespaces
        .get(&ns)
        .await
        .expect("get ns")
        .metadata
        .uid
        .expect("uid");
    namespaces
        .delete(&ns, &DeleteParams::default())
        .await
        .expect("delete ns");
    within(
        "the namespace to be gone",
        await_condition(namespaces, &ns, conditions::is_deleted(&uid)),
    )
    .await
    .expect("watch namespace");
}
