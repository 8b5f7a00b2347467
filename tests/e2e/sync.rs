//! One sync at a time against the real cluster and git server: what lands, what is pruned,
//! what a bad commit leaves untouched, and the inventory afterwards.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, PostParams};
use sluice_agent::source::Credentials;
use sluice_engine::apply::Action;
use sluice_testenv::cluster;
use sluice_testenv::git::{self, Entry, file};

use crate::support::*;

#[tokio::test]
async fn commit_is_applied_updated_and_pruned_with_an_exact_inventory() {
    let Fixture {
        client,
        ns,
        repo,
        src,
        cluster: mut c,
        cache: _cache,
    } = Fixture::new("sync").await;
    repo.commit(
        "main",
        &[
            file("app/web.yaml", deployment("web", 1)),
            file("app/cfg.yaml", configmap("cfg", "a")),
        ],
        "seed",
    );
    let p = project(&ns, "    reconcile_timeout: 60s\n");
    let s = settings(&format!("t-{ns}"));

    let report = sync_once(&mut c, &src, &p, &s).await.expect("first sync");
    let actions: Vec<Action> = report.results.iter().map(|r| r.action).collect();
    assert_eq!(actions, [Action::Created, Action::Created]);
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let web = deploys.get("web").await.expect("web applied");
    assert_eq!(web.spec.as_ref().and_then(|s| s.replicas), Some(1));
    let annotations = web.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(
        annotations.get("config.k8s.io/owning-inventory"),
        Some(&format!("t-{ns}"))
    );
    let inv = format!("inventory-t-{ns}");
    assert_eq!(
        inventory_keys(&client, &ns, &inv).await,
        [
            format!("{ns}_cfg__ConfigMap"),
            format!("{ns}_web_apps_Deployment")
        ]
    );

    // The same commit again writes nothing.
    let again = sync_once(&mut c, &src, &p, &s).await.expect("re-apply");
    assert!(
        again.results.iter().all(|r| r.action == Action::Unchanged),
        "{:?}",
        again.results
    );

    // Update and delete a file: the Deployment follows, the ConfigMap is pruned.
    repo.commit(
        "main",
        &[file("app/web.yaml", deployment("web", 2))],
        "scale, drop cfg",
    );
    let report = sync_once(&mut c, &src, &p, &s).await.expect("second sync");
    let by_kind: Vec<(String, Action)> = report
        .results
        .iter()
        .map(|r| (r.obj.kind.to_string(), r.action))
        .collect();
    assert_eq!(
        by_kind,
        [
            ("Deployment".into(), Action::Configured),
            ("ConfigMap".into(), Action::Pruned)
        ]
    );
    assert_eq!(
        deploys
            .get("web")
            .await
            .expect("web")
            .spec
            .and_then(|s| s.replicas),
        Some(2)
    );
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    assert!(
        cms.get_opt("cfg").await.expect("get cfg").is_none(),
        "cfg was pruned"
    );
    assert_eq!(
        inventory_keys(&client, &ns, &inv).await,
        [format!("{ns}_web_apps_Deployment")]
    );
    assert_eq!(
        web.metadata.uid,
        deploys.get("web").await.expect("web").metadata.uid,
        "updated in place, not recreated"
    );
}

#[tokio::test]
async fn prune_false_keeps_objects_that_left_git() {
    let Fixture {
        client,
        ns,
        repo,
        src,
        cluster: mut c,
        cache: _cache,
    } = Fixture::new("noprune").await;
    repo.commit(
        "main",
        &[
            file("a.yaml", configmap("a", "1")),
            file("b.yaml", configmap("b", "1")),
        ],
        "two",
    );
    let p = project(&ns, "    prune: false\n");
    let s = settings(&format!("t-{ns}"));
    sync_once(&mut c, &src, &p, &s).await.expect("first sync");
    repo.commit("main", &[file("a.yaml", configmap("a", "1"))], "drop b");
    let report = sync_once(&mut c, &src, &p, &s).await.expect("second sync");
    assert!(report.results.iter().all(|r| r.action != Action::Pruned));
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    assert!(
        cms.get_opt("b").await.expect("get b").is_some(),
        "b stays with prune: false"
    );
    let keys = inventory_keys(&client, &ns, &format!("inventory-t-{ns}")).await;
    assert_eq!(
        keys,
        [format!("{ns}_a__ConfigMap"), format!("{ns}_b__ConfigMap")],
        "still tracked"
    );
}

#[tokio::test]
async fn bad_yaml_applies_nothing_and_names_file_and_line() {
    let Fixture {
        client,
        ns,
        repo,
        src,
        cluster: mut c,
        cache: _cache,
    } = Fixture::new("badyaml").await;
    repo.commit("main", &[file("a.yaml", configmap("a", "good"))], "good");
    let p = project(&ns, "");
    let s = settings(&format!("t-{ns}"));
    sync_once(&mut c, &src, &p, &s).await.expect("good sync");

    repo.commit(
        "main",
        &[
            file("a.yaml", configmap("a", "changed")),
            file("new.yaml", configmap("new", "x")),
            file(
                "broken/bad.yaml",
                "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: [oops\n",
            ),
        ],
        "bad",
    );
    let err = sync_once(&mut c, &src, &p, &s)
        .await
        .expect_err("bad commit fails");
    let text = err.to_string();
    assert!(
        text.starts_with("failed to decode manifest objects: broken/bad.yaml:"),
        "{text}"
    );
    assert!(err.is_user_error());
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let a = cms.get("a").await.expect("a");
    assert_eq!(
        a.data.and_then(|d| d.get("value").cloned()).as_deref(),
        Some("good"),
        "previous state intact"
    );
    assert!(
        cms.get_opt("new").await.expect("get new").is_none(),
        "nothing applied"
    );
}

#[tokio::test]
async fn cluster_scoped_object_with_namespace_is_an_error() {
    let Fixture {
        client,
        ns,
        repo,
        src,
        cluster: mut c,
        cache: _cache,
    } = Fixture::new("scope").await;
    let bad =
        format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}-x\n  namespace: {ns}\n");
    repo.commit(
        "main",
        &[file("cm.yaml", configmap("a", "1")), file("ns.yaml", bad)],
        "bad scope",
    );
    let err = sync_once(
        &mut c,
        &src,
        &project(&ns, ""),
        &settings(&format!("t-{ns}")),
    )
    .await
    .expect_err("must fail");
    assert_eq!(
        err.to_string(),
        format!(
            "failed to decode manifest objects: ns.yaml:1: Namespace/{ns}/{ns}-x: resource is cluster-scoped but has a non-empty namespace"
        )
    );
    let cms: Api<ConfigMap> = Api::namespaced(client, &ns);
    assert!(
        cms.get_opt("a").await.expect("get").is_none(),
        "nothing applied"
    );
}

#[tokio::test]
async fn server_rejection_lists_every_failing_object_and_changes_nothing() {
    let Fixture {
        client,
        ns,
        repo,
        src,
        cluster: mut c,
        cache: _cache,
    } = Fixture::new("reject").await;
    let invalid = |name: &str| {
        format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\ndata: [not, a, map]\n")
    };
    repo.commit(
        "main",
        &[
            file("ok.yaml", configmap("ok", "1")),
            file("x.yaml", invalid("bad1")),
            file("y.yaml", invalid("bad2")),
        ],
        "two invalid",
    );
    let err = sync_once(
        &mut c,
        &src,
        &project(&ns, ""),
        &settings(&format!("t-{ns}")),
    )
    .await
    .expect_err("rejected");
    let text = err.to_string();
    assert!(
        text.starts_with("2 of 3 objects failed server-side dry-run, nothing was applied"),
        "{text}"
    );
    assert!(
        text.contains(&format!("x.yaml:1: ConfigMap/{ns}/bad1"))
            && text.contains(&format!("y.yaml:1: ConfigMap/{ns}/bad2")),
        "{text}"
    );
    let cms: Api<ConfigMap> = Api::namespaced(client, &ns);
    assert!(
        cms.get_opt("ok").await.expect("get").is_none(),
        "the valid object was not applied either"
    );
}

#[tokio::test]
async fn refs_branch_tag_and_commit_are_followed() {
    let Fixture {
        client,
        ns,
        repo,
        src,
        cluster: mut c,
        cache: _cache,
    } = Fixture::new("refs").await;
    let v0 = repo.commit("main", &[file("a.yaml", configmap("a", "v0"))], "v0");
    let v1 = repo.commit("main", &[file("a.yaml", configmap("a", "v1"))], "v1");
    repo.tag("v1.0.0", &v1);
    let _v2 = repo.commit("main", &[file("a.yaml", configmap("a", "v2"))], "v2");
    let release = repo.commit(
        "release",
        &[file("a.yaml", configmap("a", "release"))],
        "release",
    );
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let value = || async {
        cms.get("a")
            .await
            .expect("a")
            .data
            .and_then(|d| d.get("value").cloned())
            .unwrap_or_default()
    };
    let s = settings(&format!("t-{ns}"));

    let first = sync_once(&mut c, &src, &project(&ns, ""), &s)
        .await
        .expect("default branch");
    assert_eq!(value().await, "v2");
    // The first fetch into an empty cache is shallow: only the tips came.
    let shallow = std::fs::read_dir(_cache.path())
        .expect("cache")
        .flatten()
        .any(|d| d.path().join("shallow").exists());
    assert!(shallow, "the cache of {} is not shallow", first.commit);

    for (extra, want) in [
        // Older than every tip: found only after unshallowing.
        (&format!("    ref: {{commit: {v0}}}\n") as &str, "v0"),
        ("    ref: {branch: release}\n", "release"),
        ("    ref: {tag: v1.0.0}\n", "v1"),
        (
            &format!("    ref: {{commit: {release}}}\n") as &str,
            "release",
        ),
    ] {
        let report = sync_once(&mut c, &src, &project(&ns, extra), &s)
            .await
            .unwrap_or_else(|e| panic!("sync {extra:?}: {e}"));
        assert!(!report.commit.is_empty());
        assert_eq!(value().await, want, "ref {extra:?}");
    }
}

#[tokio::test]
async fn private_repository_needs_the_token_and_a_wrong_one_changes_nothing() {
    let client = cluster::client().await;
    let ns = cluster::namespace(&client, "private").await;
    let server = git::shared();
    let repo = server.create_repo(&format!("private/{ns}"));
    repo.commit("main", &[file("a.yaml", configmap("a", "1"))], "first");
    let mut c = cluster().await;
    let p = project(&ns, "");
    let s = settings(&format!("t-{ns}"));

    let https = |creds| {
        let cache = tempfile::tempdir().expect("cache");
        let src = sluice_agent::source::Source::new(repo.https_url(), cache.path(), creds)
            .with_ca(server.ca_pem().as_bytes().to_vec());
        (src, cache)
    };
    let wrong = Credentials {
        username: "oauth2".into(),
        password: "wrong-token-1234".into(),
    };
    let (src, _cache) = https(Some(wrong));
    let err = sync_once(&mut c, &src, &p, &s)
        .await
        .expect_err("wrong token refused");
    let text = err.to_string();
    assert!(
        text.starts_with(&format!("failed to list refs of {}", repo.https_url())),
        "{text}"
    );
    assert!(
        !text.contains("wrong-token-1234"),
        "credentials leaked into the error: {text}"
    );
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    assert!(cms.get_opt("a").await.expect("get").is_none());

    let right = Credentials {
        username: "oauth2".into(),
        password: server.token().into(),
    };
    let (src, _cache) = https(Some(right));
    assert!(
        !format!("{src:?}").contains(server.token()),
        "Debug must redact the token"
    );
    sync_once(&mut c, &src, &p, &s)
        .await
        .expect("token accepted");
    assert!(cms.get_opt("a").await.expect("get").is_some());
}

#[tokio::test]
async fn crd_with_its_cr_and_namespace_with_its_objects_in_one_commit() {
    let Fixture {
        client,
        ns,
        repo,
        src,
        cluster: mut c,
        cache: _cache,
    } = Fixture::new("crd").await;
    let group = format!("{ns}.example.com");
    let crd = format!(
        "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata:\n  name: widgets.{group}\nspec:\n  group: {group}\n  scope: Namespaced\n  names: {{plural: widgets, singular: widget, kind: Widget}}\n  versions:\n  - name: v1\n    served: true\n    storage: true\n    schema:\n      openAPIV3Schema:\n        type: object\n        x-kubernetes-preserve-unknown-fields: true\n"
    );
    let cr =
        format!("apiVersion: {group}/v1\nkind: Widget\nmetadata:\n  name: w1\nspec:\n  size: 3\n");
    let new_ns = format!("{ns}-apps");
    let namespace = format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {new_ns}\n");
    let in_new_ns = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: inside\n  namespace: {new_ns}\n"
    );
    repo.commit(
        "main",
        &[
            file("crd.yaml", crd),
            file("cr.yaml", cr),
            file("ns.yaml", namespace),
            file("cm.yaml", in_new_ns),
        ],
        "all at once",
    );
    let report = sync_once(
        &mut c,
        &src,
        &project(&ns, "    reconcile_timeout: 60s\n"),
        &settings(&format!("t-{ns}")),
    )
    .await
    .expect("sync");
    assert!(
        report.results.iter().all(|r| r.action == Action::Created),
        "{:?}",
        report.results
    );
    let widgets = api(&client, &ns, &format!("{group}/v1"), "Widget", "widgets");
    let w = widgets
        .get("w1")
        .await
        .expect("CR applied in the default namespace");
    assert_eq!(w.data["spec"]["size"], 3);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &new_ns);
    assert!(cms.get_opt("inside").await.expect("get").is_some());
}

#[tokio::test]
async fn inventory_policies_refuse_or_adopt_unowned_objects() {
    let Fixture {
        client,
        ns,
        repo,
        src,
        cluster: mut c,
        cache: _cache,
    } = Fixture::new("policy").await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let existing: ConfigMap = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "pre"}, "data": {"value": "by hand"}
    }))
    .expect("configmap");
    let uid = cms
        .create(&PostParams::default(), &existing)
        .await
        .expect("create")
        .metadata
        .uid;
    repo.commit(
        "main",
        &[file("pre.yaml", configmap("pre", "from git"))],
        "take it",
    );
    let s = settings(&format!("t-{ns}"));

    let err = sync_once(&mut c, &src, &project(&ns, ""), &s)
        .await
        .expect_err("must_match refuses");
    assert!(
        err.to_string().contains(
            "can't adopt an object without the annotation config.k8s.io/owning-inventory"
        ),
        "{err}"
    );
    assert_eq!(
        cms.get("pre")
            .await
            .expect("pre")
            .data
            .and_then(|d| d.get("value").cloned())
            .as_deref(),
        Some("by hand")
    );

    sync_once(
        &mut c,
        &src,
        &project(&ns, "    inventory_policy: adopt_if_no_inventory\n"),
        &s,
    )
    .await
    .expect("adopted");
    let pre = cms.get("pre").await.expect("pre");
    assert_eq!(pre.metadata.uid, uid, "adopted, not recreated");
    assert_eq!(
        pre.data.and_then(|d| d.get("value").cloned()).as_deref(),
        Some("from git")
    );
}

#[tokio::test]
async fn agentk_inventory_is_taken_over_without_recreating_objects() {
    let Fixture {
        client,
        ns,
        repo,
        src,
        cluster: mut c,
        cache: _cache,
    } = Fixture::new("takeover").await;
    // What agentk left behind: objects applied with field manager `agentk`, annotated with
    // the inventory id, and its inventory ConfigMap.
    let id = "42-1234";
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let mut uids = Vec::new();
    for name in ["kept", "gone"] {
        let cm = serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "annotations": {"config.k8s.io/owning-inventory": id}}, "data": {"value": "agentk"}});
        let pp = kube::api::PatchParams::apply("agentk").force();
        let created = cms
            .patch(name, &pp, &kube::api::Patch::Apply(&cm))
            .await
            .expect("agentk apply");
        uids.push(created.metadata.uid);
    }
    let inv: ConfigMap = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": format!("inventory-{id}"), "labels": {"cli-utils.sigs.k8s.io/inventory-id": id}},
        "data": {format!("{ns}_kept__ConfigMap"): "", format!("{ns}_gone__ConfigMap"): ""}
    }))
    .expect("inventory");
    cms.create(&PostParams::default(), &inv)
        .await
        .expect("inventory");

    repo.commit(
        "main",
        &[file("kept.yaml", configmap("kept", "sluice"))],
        "only kept",
    );
    sync_once(&mut c, &src, &project(&ns, ""), &settings(id))
        .await
        .expect("takeover under must_match");
    let kept = cms.get("kept").await.expect("kept");
    assert_eq!(kept.metadata.uid, uids[0], "not recreated");
    assert_eq!(
        kept.data.and_then(|d| d.get("value").cloned()).as_deref(),
        Some("sluice")
    );
    assert!(
        cms.get_opt("gone").await.expect("get").is_none(),
        "pruned from the agentk inventory"
    );
    assert_eq!(
        inventory_keys(&client, &ns, &format!("inventory-{id}")).await,
        [format!("{ns}_kept__ConfigMap")]
    );
}

#[tokio::test]
async fn empty_file_set_never_prunes_everything() {
    let Fixture {
        client,
        ns,
        repo,
        src,
        cluster: mut c,
        cache: _cache,
    } = Fixture::new("empty").await;
    repo.commit("main", &[file("a.yaml", configmap("a", "1"))], "one");
    let (p, s) = (project(&ns, ""), settings(&format!("t-{ns}")));
    sync_once(&mut c, &src, &p, &s).await.expect("sync");
    repo.commit(
        "main",
        &[
            file("README.md", "no manifests"),
            Entry::Symlink("docs/link.md".into(), "README.md".into()),
        ],
        "oops",
    );
    let err = sync_once(&mut c, &src, &p, &s).await.expect_err("guard");
    assert!(
        err.to_string()
            .starts_with("refusing to prune every object"),
        "{err}"
    );
    let cms: Api<ConfigMap> = Api::namespaced(client, &ns);
    assert!(cms.get_opt("a").await.expect("get").is_some());
}

#[tokio::test]
async fn symlinked_manifest_is_refused() {
    let Fixture {
        ns,
        repo,
        src,
        cluster: mut c,
        cache: _cache,
        ..
    } = Fixture::new("symlink").await;
    repo.commit(
        "main",
        &[
            file("a.yaml", configmap("a", "1")),
            Entry::Symlink("b.yaml".into(), "/etc/passwd".into()),
        ],
        "link",
    );
    let err = sync_once(
        &mut c,
        &src,
        &project(&ns, ""),
        &settings(&format!("t-{ns}")),
    )
    .await
    .expect_err("symlink");
    assert_eq!(
        err.to_string(),
        "b.yaml: is a symbolic link; sluice never follows symlinks, commit the file itself"
    );
}

#[tokio::test]
async fn a_force_push_onto_a_shallow_cache_is_followed() {
    let Fixture {
        client,
        ns,
        repo,
        src,
        cluster: mut c,
        cache: _cache,
    } = Fixture::new("force").await;
    let a = repo.commit("main", &[file("a.yaml", configmap("a", "a"))], "a");
    repo.commit("main", &[file("a.yaml", configmap("a", "b"))], "b");
    let s = settings(&format!("t-{ns}"));
    sync_once(&mut c, &src, &project(&ns, ""), &s)
        .await
        .expect("sync b");
    // Rewrite history: main now points at a sibling of b.
    let rewritten = repo.commit_tree(
        &[file("a.yaml", configmap("a", "rewritten"))],
        Some(&a),
        "rewritten",
    );
    repo.set_ref("refs/heads/main", &rewritten);
    let report = sync_once(&mut c, &src, &project(&ns, ""), &s)
        .await
        .expect("sync after force-push");
    assert_eq!(report.commit, rewritten);
    let cms: Api<ConfigMap> = Api::namespaced(client, &ns);
    let value = cms
        .get("a")
        .await
        .expect("a")
        .data
        .and_then(|d| d.get("value").cloned());
    assert_eq!(value.as_deref(), Some("rewritten"));
}

/// A sync returns once its Deployments are Available (kstatus Current), watched rather than
/// polled; one that cannot become Available (no node matches its selector) fails at the
/// reconcile timeout, naming the object and its status.
#[tokio::test]
async fn a_sync_waits_until_its_deployments_are_available() {
    let Fixture {
        client,
        ns,
        repo,
        src,
        cluster: mut c,
        cache: _cache,
    } = Fixture::new("health").await;
    repo.commit(
        "main",
        &[file("web.yaml", deployment("web", 3))],
        "three replicas",
    );
    let p = project(&ns, "    reconcile_timeout: 120s\n");
    let s = settings(&format!("t-{ns}"));
    let report = sync_once(&mut c, &src, &p, &s).await.expect("sync");
    assert_eq!(
        report.health[0].status,
        sluice_engine::wait::Status::Current
    );
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let web = deploys.get("web").await.expect("web");
    let status = web.status.expect("status");
    assert_eq!(status.available_replicas, Some(3), "{status:?}");
    assert_eq!(status.observed_generation, web.metadata.generation);

    // A Deployment no node can run: never Available.
    let unschedulable = |name: &str| {
        deployment(name, 1).replace(
            "    spec:\n      containers:",
            "    spec:\n      nodeSelector: {no-such-node: \"true\"}\n      containers:",
        )
    };
    repo.commit(
        "main",
        &[
            file("web.yaml", deployment("web", 3)),
            file("stuck.yaml", unschedulable("stuck")),
        ],
        "a Deployment no node can run",
    );
    let p = project(&ns, "    reconcile_timeout: 5s\n");
    let e = sync_once(&mut c, &src, &p, &s)
        .await
        .expect_err("never Available");
    let problems = e.problems();
    assert_eq!(problems.len(), 1, "{e}");
    assert_eq!(problems[0].obj.name, "stuck");
    assert!(
        problems[0].message.starts_with("is InProgress"),
        "{}",
        problems[0].message
    );

    // A Deployment deleted by someone else as soon as it is created fails the sync at once
    // rather than at the deadline, whether the deletion lands before the wait's first list
    // (it usually does: the deleter acts on the creation's watch event) or during the wait.
    repo.commit(
        "main",
        &[
            file("web.yaml", deployment("web", 3)),
            file("orphan.yaml", unschedulable("orphan")),
        ],
        "a Deployment someone deletes at once",
    );
    let deleter = {
        use futures::StreamExt;
        use kube::runtime::{WatchStreamExt, watcher};
        let deploys = deploys.clone();
        let config = watcher::Config::default().fields("metadata.name=orphan");
        tokio::spawn(async move {
            let mut created = watcher(deploys.clone(), config).applied_objects().boxed();
            while let Some(d) = created.next().await {
                if d.is_ok() {
                    deploys
                        .delete("orphan", &Default::default())
                        .await
                        .expect("delete");
                    return;
                }
            }
        })
    };
    let p = project(&ns, "    reconcile_timeout: 600s\n");
    let e = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        sync_once(&mut c, &src, &p, &s),
    )
    .await
    .expect("a deleted object is not awaited until the deadline")
    .expect_err("deleted");
    let problems = e.problems();
    assert_eq!(problems.len(), 1, "{e}");
    assert_eq!(problems[0].obj.name, "orphan");
    deleter.await.expect("the deleter ran");
    assert!(
        problems[0]
            .message
            .contains(sluice_engine::wait::DELETED_DURING_WAIT),
        "{}",
        problems[0].message
    );

    // A change to a Deployment that was Available: its wait reads the agent's watches
    // (`settings.live`), which held the Available state from before the write. That state
    // must not count: the new template runs nowhere, so "web" is InProgress, not Current.
    repo.commit(
        "main",
        &[file(
            "web.yaml",
            unschedulable("web").replace("replicas: 1", "replicas: 3"),
        )],
        "web moves to no node",
    );
    let p = project(&ns, "    reconcile_timeout: 5s\n");
    let e = sync_once(&mut c, &src, &p, &s)
        .await
        .expect_err("the new template never becomes available");
    let problems = e.problems();
    assert_eq!(problems.len(), 1, "{e}");
    assert_eq!(problems[0].obj.name, "web");
    assert!(
        problems[0].message.starts_with("is InProgress"),
        "{}",
        problems[0].message
    );
}

/// Two projects of one agent with objects of one kind in one namespace share one watch
/// (`settings.live`): the second project's sync lists nothing, its health wait reads the
/// watch the first one started, and the watch stays while either project uses it.
#[tokio::test]
async fn projects_share_the_watches_of_a_namespace() {
    let Fixture {
        ns,
        repo,
        src,
        cache: _cache,
        ..
    } = Fixture::new("shared").await;
    let agent = format!("sluice-e2e-{ns}");
    let mut c = sluice_engine::cluster::Cluster::connect(cluster::client_as(&agent).await)
        .await
        .expect("discovery");
    let (other_repo, other_src, _other_cache) = {
        let repo = git::shared().create_repo(&format!("group/{ns}-other"));
        let (src, cache) = source(&repo, None);
        (repo, src, cache)
    };
    repo.commit(
        "main",
        &[
            file("a.yaml", configmap("a-1", "1")),
            file("b.yaml", configmap("a-2", "2")),
        ],
        "project a",
    );
    other_repo.commit(
        "main",
        &[
            file("a.yaml", configmap("b-1", "1")),
            file("b.yaml", configmap("b-2", "2")),
        ],
        "project b",
    );
    let named = |id: &str| project_with_id(id, &ns, "    reconcile_timeout: 60s\n");
    let (pa, pb) = (named("test/a"), named("test/b"));
    let live = sluice_engine::live::Live::new();
    // (No agentk takeover: looking for an agentk inventory lists ConfigMaps.)
    let sharing = |inventory: String| sluice_agent::sync::Settings {
        live: Some(live.clone()),
        takeover: sluice_agent::sync::Takeover::Off,
        ..settings(&inventory)
    };
    let (sa, sb) = (sharing(format!("a-{ns}")), sharing(format!("b-{ns}")));
    sync_once(&mut c, &src, &pa, &sa).await.expect("project a");
    assert_eq!(live.watches(), 1, "project a: the ConfigMaps of {ns}");

    let cp = cluster::shared();
    let mark = cp.audit_mark();
    let b = sync_once(&mut c, &other_src, &pb, &sb)
        .await
        .expect("project b");
    assert!(
        b.health
            .iter()
            .all(|h| h.status == sluice_engine::wait::Status::Current)
    );
    // (A watch of its own would list first. The WATCH request of project a's watch may
    // come now: its list ended project a's wait before the watch began.)
    let lists: Vec<_> = cp
        .requests_since(mark)
        .into_iter()
        .filter(|r| r.user_agent == agent && r.verb == "list")
        .map(|r| r.uri)
        .collect();
    assert_eq!(
        lists,
        Vec::<String>::new(),
        "project b reads project a's watch"
    );
    assert_eq!(live.watches(), 1);

    // Project b stops being tracked: project a still uses the watch.
    live.forget(&pb.id);
    assert_eq!(live.watches(), 1);
    live.forget(&pa.id);
    assert_eq!(live.watches(), 0);
}

/// With the last sync's digests as `known` (what the agent passes while its watches see no
/// drift), objects that did not change in git cost no request; a changed one is applied as
/// usual, and an object changed in the cluster behind a stale `known` is not the sync's to
/// see (that is the drift watch's job, tested in agent.rs).
#[tokio::test]
async fn known_objects_cost_no_request_and_changed_ones_are_applied() {
    let Fixture {
        client,
        ns,
        repo,
        src,
        cache: _cache,
        ..
    } = Fixture::new("known").await;
    let agent = format!("sluice-e2e-{ns}");
    let mut c = sluice_engine::cluster::Cluster::connect(cluster::client_as(&agent).await)
        .await
        .expect("discovery");
    let files = |changed: &str| -> Vec<Entry> {
        (0..20)
            .map(|i| {
                let name = format!("cm-{i}");
                let value = if name == changed { "new" } else { "old" };
                file(&format!("{name}.yaml"), configmap(&name, value))
            })
            .collect()
    };
    repo.commit("main", &files(""), "twenty");
    let p = project(&ns, "    reconcile_timeout: 60s\n");
    let s = settings(&format!("t-{ns}"));
    let first = sync_once(&mut c, &src, &p, &s).await.expect("first sync");
    assert_eq!(first.applied.len(), 20);

    repo.commit("main", &files("cm-7"), "one changed");
    let known = sluice_agent::sync::Settings {
        known: first.applied.clone(),
        ..s.clone()
    };
    let cp = cluster::shared();
    let mark = cp.audit_mark();
    let second = sync_once(&mut c, &src, &p, &known)
        .await
        .expect("second sync");
    let requests: Vec<_> = cp
        .requests_since(mark)
        .into_iter()
        .filter(|r| r.user_agent == agent)
        .collect();
    let changed: Vec<_> = second
        .results
        .iter()
        .filter(|r| r.action != Action::Unchanged)
        .map(|r| (r.obj.name.as_str(), r.action))
        .collect();
    assert_eq!(changed, [("cm-7", Action::Configured)]);
    // cm-7: read, dry-run, apply; the other 19 nothing. Plus the inventory. The health
    // wait reads the watch the first sync started: nothing is listed or watched again.
    let lists: Vec<_> = requests
        .iter()
        .filter(|r| matches!(r.verb.as_str(), "list" | "watch"))
        .map(|r| format!("{} {}", r.verb, r.uri))
        .collect();
    assert_eq!(lists, Vec::<String>::new());
    let per_object: Vec<_> = requests
        .iter()
        .filter(|r| r.uri.contains("/configmaps/cm-"))
        .map(|r| format!("{} {}", r.verb, r.uri))
        .collect();
    assert!(
        per_object.iter().all(|r| r.contains("/configmaps/cm-7")),
        "{per_object:#?}"
    );
    assert!(requests.len() < 15, "{requests:#?}");
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let cm7 = cms.get("cm-7").await.expect("cm-7");
    assert_eq!(
        cm7.data
            .unwrap_or_default()
            .get("value")
            .map(String::as_str),
        Some("new")
    );

    // The full re-apply (nothing known) after someone else edited cm-3: the 20 live
    // ConfigMaps are read with one LIST, not a GET each, and only cm-3 is written back.
    cms.patch(
        "cm-3",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(serde_json::json!({"data": {"value": "edited"}})),
    )
    .await
    .expect("edit cm-3");
    let mark = cp.audit_mark();
    let full = sync_once(&mut c, &src, &p, &s).await.expect("full sync");
    let requests: Vec<_> = cp
        .requests_since(mark)
        .into_iter()
        .filter(|r| r.user_agent == agent && r.uri.contains("/configmaps"))
        .collect();
    let reads: Vec<_> = requests
        .iter()
        .filter(|r| r.verb == "get" && r.uri.contains("/configmaps/cm-"))
        .map(|r| r.uri.as_str())
        .collect();
    assert_eq!(reads, Vec::<&str>::new(), "no GET per object");
    let writes: Vec<_> = requests
        .iter()
        .filter(|r| r.is_write() && r.uri.contains("/configmaps/cm-"))
        .map(|r| r.uri.split('?').next().unwrap_or_default())
        .collect();
    assert_eq!(
        writes,
        [format!("/api/v1/namespaces/{ns}/configmaps/cm-3")],
        "only the edited object is written"
    );
    let configured: Vec<_> = full
        .results
        .iter()
        .filter(|r| r.action != Action::Unchanged)
        .map(|r| (r.obj.name.as_str(), r.action))
        .collect();
    assert_eq!(configured, [("cm-3", Action::Configured)]);
}

/// A poll lists only the configured ref (protocol v2's `ls-refs` with that ref as its
/// prefix): against a repository with 100,000 tags it costs what it costs against one
/// with a single tag, for a branch, the default branch and a tag alike.
#[tokio::test]
async fn a_poll_lists_only_the_configured_ref_whatever_the_tags() {
    use sluice_agent::config::GitRef;
    use sluice_agent::source::Source;
    let client = cluster::client().await;
    let ns = cluster::namespace(&client, "tags").await;
    let server = git::shared();
    let few = server.create_repo(&format!("tags/{ns}-few"));
    let many = server.create_repo(&format!("tags/{ns}-many"));
    let few_head = few.commit("main", &[file("a.yaml", configmap("a", "1"))], "first");
    let many_head = many.commit("main", &[file("a.yaml", configmap("a", "1"))], "first");
    few.tag("t0", &few_head);
    many.pack_tags(100_000, &many_head);

    // Bytes the server sends for one poll of `git_ref` (the second: the first may set
    // up the cache), and the commit it resolved to.
    let poll = |repo: git::Repo, git_ref: GitRef| async move {
        tokio::task::spawn_blocking(move || {
            let cache = tempfile::tempdir().expect("cache");
            let source = Source::new(repo.http_url(), cache.path(), None);
            source.resolve(&git_ref).expect("first poll");
            let before = repo.bytes_served();
            let commit = source.resolve(&git_ref).expect("poll");
            (repo.bytes_served() - before, commit)
        })
        .await
        .expect("poll task")
    };
    for git_ref in [
        GitRef::Branch("main".into()),
        GitRef::DefaultBranch,
        GitRef::Tag("t0".into()),
    ] {
        let (few_bytes, few_commit) = poll(few.clone(), git_ref.clone()).await;
        let (many_bytes, many_commit) = poll(many.clone(), git_ref.clone()).await;
        eprintln!("poll of {git_ref}: {few_bytes} bytes with 1 tag, {many_bytes} with 100,000");
        assert_eq!(
            (few_commit, many_commit),
            (few_head.clone(), many_head.clone())
        );
        // The same listing but for the repository's name and ids: a few bytes apart, where
        // listing every tag would be about 5 MB.
        assert!(
            many_bytes <= few_bytes + 512,
            "{git_ref}: {many_bytes} bytes with 100,000 tags against {few_bytes} with one"
        );
    }
}

/// Past 4 namespaces of one resource, the projects' objects of it are watched in every
/// namespace at once: one watch (one connection) instead of one per namespace, and the
/// health waits and syncs read it as they read the per-namespace ones.
#[tokio::test]
async fn a_resource_in_many_namespaces_is_watched_once() {
    let client = cluster::client().await;
    let mut c = crate::support::cluster().await;
    let live = sluice_engine::live::Live::new();
    let mut projects = Vec::new();
    for k in 0..6 {
        let ns = cluster::namespace(&client, &format!("wide{k}")).await;
        let repo = git::shared().create_repo(&format!("group/{ns}"));
        repo.commit(
            "main",
            &[file("cm.yaml", configmap("one", &k.to_string()))],
            "one",
        );
        let (src, cache) = source(&repo, None);
        let settings = sluice_agent::sync::Settings {
            live: Some(live.clone()),
            takeover: sluice_agent::sync::Takeover::Off,
            ..settings(&format!("wide-{ns}"))
        };
        let project = project_with_id(&format!("wide/{ns}"), &ns, "    reconcile_timeout: 60s\n");
        projects.push((project, src, cache, settings));
    }
    for (round, want) in [(0, 5), (1, 1)] {
        for (project, src, _, settings) in &projects {
            let report = sync_once(&mut c, src, project, settings)
                .await
                .unwrap_or_else(|e| panic!("round {round}, {}: {e}", project.id));
            assert!(
                report
                    .health
                    .iter()
                    .all(|h| h.status == sluice_engine::wait::Status::Current),
                "{:?}",
                report.health
            );
        }
        // First round: four watches by name, then the fifth namespace makes the resource
        // wide; once every project synced again, the one wide watch is all there is.
        assert_eq!(live.watches(), want, "round {round}");
    }
}

/// An object moved from one project to another of the same repository in one commit is
/// handed over: it keeps its uid (so it was never deleted, never absent), whichever of the
/// two syncs first, and ends up in the gaining project's inventory only. Two projects that
/// both have it are still refused.
#[tokio::test]
async fn an_object_moved_between_projects_of_one_repository_is_handed_over_whichever_syncs_first() {
    let Fixture {
        client,
        ns,
        repo,
        src,
        cluster: mut c,
        cache: _cache,
    } = Fixture::new("move").await;
    let tree = |a: &[&str], b: &[&str]| -> Vec<Entry> {
        a.iter()
            .map(|n| file(&format!("a/{n}.yaml"), configmap(n, "v")))
            .chain(
                b.iter()
                    .map(|n| file(&format!("b/{n}.yaml"), configmap(n, "v"))),
            )
            .collect()
    };
    repo.commit("main", &tree(&["x", "a1"], &["b1"]), "seed");
    let a = project_with_id("mono/a", &ns, "    paths: [{glob: 'a/*.yaml'}]\n");
    let b = project_with_id("mono/b", &ns, "    paths: [{glob: 'b/*.yaml'}]\n");
    let (inv_a, inv_b) = (format!("a-{ns}"), format!("b-{ns}"));
    let sibling = |p: &sluice_agent::config::ManifestProject, inventory_id: &str| {
        sluice_agent::moves::Sibling {
            project: p.clone(),
            inventory_id: inventory_id.to_string(),
            source: src.clone(),
        }
    };
    let sa = sluice_agent::sync::Settings {
        siblings: vec![sibling(&b, &inv_b)],
        ..settings(&inv_a)
    };
    let sb = sluice_agent::sync::Settings {
        siblings: vec![sibling(&a, &inv_a)],
        ..settings(&inv_b)
    };
    sync_once(&mut c, &src, &a, &sa).await.expect("a seeds");
    sync_once(&mut c, &src, &b, &sb).await.expect("b seeds");
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let uid = cms.get("x").await.expect("x").metadata.uid;
    let owner = |cm: ConfigMap| {
        cm.metadata
            .annotations
            .unwrap_or_default()
            .get("config.k8s.io/owning-inventory")
            .cloned()
    };
    let keys = |inv: &str| {
        let (client, ns, name) = (client.clone(), ns.clone(), format!("inventory-{inv}"));
        async move { inventory_keys(&client, &ns, &name).await }
    };
    let x = format!("{ns}_x__ConfigMap");
    let action = |r: &sluice_agent::sync::Report, name: &str| {
        r.results
            .iter()
            .find(|o| o.obj.name.as_str() == name)
            .map(|o| (o.action, o.message.clone().unwrap_or_default()))
    };

    // x moves from a to b; the losing project syncs first: it keeps x for b.
    repo.commit("main", &tree(&["a1"], &["x", "b1"]), "move x to b");
    let r = sync_once(&mut c, &src, &a, &sa)
        .await
        .expect("a, losing, first");
    let (act, why) = action(&r, "x").expect("x in a's results");
    assert_eq!(act, Action::Retained, "{why}");
    assert!(why.contains("moved to project mono/b"), "{why}");
    assert_eq!(
        owner(cms.get("x").await.expect("x kept")),
        Some(inv_a.clone())
    );
    assert!(
        keys(&inv_a).await.contains(&x),
        "a still records x until b has it"
    );
    let r = sync_once(&mut c, &src, &b, &sb)
        .await
        .expect("b takes x over");
    assert_eq!(action(&r, "x").map(|a| a.0), Some(Action::Configured));
    let live = cms.get("x").await.expect("x");
    assert_eq!(live.metadata.uid, uid, "x was never deleted");
    assert_eq!(owner(live), Some(inv_b.clone()));
    let r = sync_once(&mut c, &src, &a, &sa).await.expect("a lets x go");
    assert_eq!(action(&r, "x").map(|a| a.0), Some(Action::Skipped));
    assert!(!keys(&inv_a).await.contains(&x));
    assert!(keys(&inv_b).await.contains(&x));

    // x moves back to a; the gaining project syncs first: it takes x over at once.
    repo.commit("main", &tree(&["x", "a1"], &["b1"]), "move x back to a");
    let r = sync_once(&mut c, &src, &a, &sa)
        .await
        .expect("a, gaining, first");
    assert_eq!(action(&r, "x").map(|a| a.0), Some(Action::Configured));
    assert_eq!(owner(cms.get("x").await.expect("x")), Some(inv_a.clone()));
    let r = sync_once(&mut c, &src, &b, &sb).await.expect("b lets x go");
    assert_eq!(action(&r, "x").map(|a| a.0), Some(Action::Skipped));
    let live = cms.get("x").await.expect("x");
    assert_eq!(live.metadata.uid, uid, "x was never deleted");
    assert_eq!(owner(live), Some(inv_a.clone()));
    assert!(keys(&inv_a).await.contains(&x));
    assert!(!keys(&inv_b).await.contains(&x));

    // Both have x: a conflict, refused whole, not a move.
    repo.commit("main", &tree(&["x", "a1"], &["x", "b1", "b2"]), "x twice");
    let e = sync_once(&mut c, &src, &b, &sb)
        .await
        .expect_err("b may not take what a still has");
    assert!(
        e.to_string()
            .contains("inventory policy prevented actuation"),
        "{e}"
    );
    assert!(
        cms.get_opt("b2").await.expect("get b2").is_none(),
        "nothing applied"
    );
    assert_eq!(owner(cms.get("x").await.expect("x")), Some(inv_a));
}
