//! Taking over a cluster that agentk synced: the state is made by agentk's own engine
//! (kapply, sigs.k8s.io/cli-utils v0.37.2, built from the Go module proxy) with agentk's
//! field manager and inventory naming, then sluice is pointed at the same repository.

use std::collections::BTreeMap;
use std::process::Command;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use sluice_agent::history::History;
use sluice_engine::apply::Action;
use sluice_testenv::cluster;
use sluice_testenv::git::file;

use crate::support::*;

fn web(ns: &str, with_label: bool) -> String {
    let label = if with_label { "\n    team: a" } else { "" };
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n  namespace: {ns}\n  labels:\n    app: web{label}\nspec:\n  replicas: 1\n  selector:\n    matchLabels: {{app: web}}\n  template:\n    metadata:\n      labels: {{app: web}}\n    spec:\n      containers:\n      - name: app\n        image: nginx:1.27\n"
    )
}

fn cm(ns: &str, name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: {ns}\ndata:\n  k: v\n"
    )
}

/// Runs `kapply apply` as agentk did: server-side, forced, field manager `agentk`, the
/// inventory `inventory-<agentId>-<projectId>` in the project's namespace.
fn kapply(
    dir: &std::path::Path,
    ns: &str,
    agent_id: u32,
    project_id: u32,
    files: &[(&str, String)],
) {
    for entry in std::fs::read_dir(dir).expect("dir") {
        std::fs::remove_file(entry.expect("entry").path()).expect("clean");
    }
    let id = format!("{agent_id}-{project_id}");
    std::fs::write(
        dir.join("inventory-template.yaml"),
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: inventory-{id}\n  namespace: {ns}\n  labels:\n    cli-utils.sigs.k8s.io/inventory-id: \"{id}\"\n"
        ),
    )
    .expect("inventory template");
    for (name, text) in files {
        std::fs::write(dir.join(name), text).expect("manifest");
    }
    let out = Command::new(cluster::kapply())
        .arg("apply")
        .arg(dir)
        .args([
            "--server-side",
            "--force-conflicts",
            "--field-manager",
            "agentk",
            "--reconcile-timeout",
            "60s",
            "--inventory-policy",
            "strict",
            "--output",
            "events",
        ])
        .arg("--kubeconfig")
        .arg(&cluster::shared().kubeconfig)
        .output()
        .expect("run kapply");
    assert!(
        out.status.success(),
        "kapply failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn uids(client: &kube::Client, ns: &str) -> BTreeMap<String, String> {
    let mut uids = BTreeMap::new();
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), ns);
    for d in deploys.list(&Default::default()).await.expect("list").items {
        uids.insert(
            format!("Deployment/{}", d.metadata.name.unwrap_or_default()),
            d.metadata.uid.unwrap_or_default(),
        );
    }
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    for c in cms.list(&Default::default()).await.expect("list").items {
        let name = c.metadata.name.unwrap_or_default();
        if name != "kube-root-ca.crt" && !name.starts_with("inventory-") {
            uids.insert(
                format!("ConfigMap/{name}"),
                c.metadata.uid.unwrap_or_default(),
            );
        }
    }
    uids
}

#[tokio::test]
async fn an_agentk_cluster_is_taken_over_with_nothing_recreated_and_nothing_left_behind() {
    let Fixture {
        client,
        ns,
        repo,
        src,
        cluster: mut c,
        cache: _cache,
    } = Fixture::new("agentk").await;
    let dir = tempfile::tempdir().expect("dir");
    let manifests = [
        ("web.yaml", web(&ns, true)),
        ("keep.yaml", cm(&ns, "keep")),
        ("leaves.yaml", cm(&ns, "leaves")),
    ];
    kapply(dir.path(), &ns, 17, 42, &manifests);
    let before = uids(&client, &ns).await;
    assert_eq!(before.len(), 3, "{before:?}");
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let managers = |d: &Deployment| -> Vec<String> {
        d.metadata
            .managed_fields
            .iter()
            .flatten()
            .filter(|f| f.operation.as_deref() == Some("Apply"))
            .filter_map(|f| f.manager.clone())
            .collect()
    };
    assert_eq!(
        managers(&deploys.get("web").await.expect("web")),
        ["agentk"]
    );

    // sluice on the same repository, with its own inventory id and no hint about agentk's.
    repo.commit(
        "main",
        &manifests
            .iter()
            .map(|(n, t)| file(n, t.clone()))
            .collect::<Vec<_>>(),
        "what agentk applied",
    );
    let p = project(&ns, "    reconcile_timeout: 60s\n");
    let s = settings(&format!("t-{ns}"));
    let report = sync_once(&mut c, &src, &p, &s).await.expect("takeover");
    assert_eq!(report.adopted.as_deref(), Some("17-42"));
    let mut history = History::new(client.clone(), None);
    record(&mut history, &p, &s, &report).await;
    assert_eq!(uids(&client, &ns).await, before, "nothing recreated");
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    assert!(
        cms.get_opt("inventory-17-42").await.expect("get").is_none(),
        "agentk's inventory is retired"
    );
    assert_eq!(
        inventory_keys(&client, &ns, &format!("inventory-t-{ns}")).await,
        [
            format!("{ns}_keep__ConfigMap"),
            format!("{ns}_leaves__ConfigMap"),
            format!("{ns}_web_apps_Deployment"),
        ]
    );
    assert_eq!(
        managers(&deploys.get("web").await.expect("web")),
        ["sluice"],
        "agentk no longer owns any field"
    );

    // A field and an object leave git: both leave the cluster.
    repo.commit(
        "main",
        &[
            file("web.yaml", web(&ns, false)),
            file("keep.yaml", cm(&ns, "keep")),
        ],
        "drop a label and a ConfigMap",
    );
    let report = sync_once(&mut c, &src, &p, &s)
        .await
        .expect("after takeover");
    let leaves = report
        .results
        .iter()
        .find(|r| r.obj.name == "leaves")
        .expect("leaves reported");
    assert_eq!(leaves.action, Action::Pruned);
    assert!(cms.get_opt("leaves").await.expect("get").is_none());
    record(&mut history, &p, &s, &report).await;
    // The history on sluice's inventory tells the takeover and the prune.
    let reasons: Vec<(String, String)> = sluice_events(&client, &ns, &format!("inventory-t-{ns}"))
        .await
        .into_iter()
        .map(|(_, reason, message)| (reason, message))
        .collect();
    for (reason, start) in [
        (
            "InventoryTakenOver",
            "took over agentk inventory 17-42: its objects now belong to project test/project"
                .to_string(),
        ),
        (
            "Pruned",
            format!(
                "commit {}: pruned 1 objects that left git: ConfigMap/{ns}/leaves",
                &report.commit[..12]
            ),
        ),
    ] {
        assert!(
            reasons
                .iter()
                .any(|(r, m)| r == reason && m.starts_with(&start)),
            "{reason}: {reasons:?}"
        );
    }
    let labels = deploys
        .get("web")
        .await
        .expect("web")
        .metadata
        .labels
        .unwrap_or_default();
    assert_eq!(
        labels.get("team"),
        None,
        "the removed label is gone: {labels:?}"
    );
    assert_eq!(labels.get("app").map(String::as_str), Some("web"));
    let after = uids(&client, &ns).await;
    assert_eq!(after.get("Deployment/web"), before.get("Deployment/web"));
}
