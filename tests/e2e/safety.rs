//! "Safe on real clusters": what a project does not own is never pruned or taken, health
//! follows kstatus, an unavailable aggregated API fails only its own objects, and the odd
//! inputs real repositories hold (RBAC names with `_`, short commit ids, credentials in a
//! URL, a namespace made by the same commit) work.

use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use sluice_agent::sync::Error;
use sluice_engine::apply::Action;
use sluice_engine::inventory::InventoryRef;
use sluice_testenv::git::{self, file};
use sluice_testenv::{cluster, wasm};

use crate::support::*;

fn service(name: &str, kind: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  type: {kind}\n  selector: {{app: {name}}}\n  ports:\n  - port: 80\n"
    )
}

#[tokio::test]
async fn a_load_balancer_service_without_a_load_balancer_is_current() {
    let Fixture {
        ns,
        repo,
        src,
        cluster: mut c,
        cache: _cache,
        ..
    } = Fixture::new("lb").await;
    repo.commit(
        "main",
        &[file("svc.yaml", service("web", "LoadBalancer"))],
        "lb",
    );
    // No load-balancer controller runs here: kstatus calls the Service Current once it has
    // a cluster IP, so the sync succeeds well within the timeout.
    let report = sync_once(
        &mut c,
        &src,
        &project(&ns, "    reconcile_timeout: 30s\n"),
        &settings(&format!("t-{ns}")),
    )
    .await
    .expect("sync succeeds");
    assert_eq!(report.health.len(), 1);
    assert_eq!(
        report.health[0].status,
        sluice_engine::wait::Status::Current
    );
}

#[tokio::test]
async fn an_unavailable_aggregated_api_fails_only_its_own_objects() {
    let _turn = DISCOVERY.lock().await;
    let Fixture {
        client,
        ns,
        repo,
        src,
        cache: _cache,
        ..
    } = Fixture::new("apisvc").await;
    let group = format!("{ns}.metrics.example.com");
    let apiservices = api_all(
        &client,
        "apiregistration.k8s.io/v1",
        "APIService",
        "apiservices",
    );
    let name = format!("v1beta1.{group}");
    let apiservice: kube::api::DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService",
        "metadata": {"name": name},
        "spec": {"group": group, "version": "v1beta1", "groupPriorityMinimum": 100,
                 "versionPriority": 100, "insecureSkipTLSVerify": true,
                 "service": {"name": "metrics-server", "namespace": ns, "port": 443}}
    }))
    .expect("apiservice");
    apiservices
        .create(&PostParams::default(), &apiservice)
        .await
        .expect("create APIService");
    let inventory = format!("t-{ns}");
    // The project's inventory already records an object of that group, as it would after
    // the API was last available.
    let recorded = sluice_model::object::ObjRef {
        group: group.as_str().into(),
        kind: "PodMetrics".into(),
        namespace: ns.as_str().into(),
        name: "old".into(),
    };
    sluice_engine::inventory::store(
        &client,
        &InventoryRef::default_for(&inventory, &ns),
        "test/project",
        &[recorded.clone()].into(),
        &[],
    )
    .await
    .expect("seed inventory");
    repo.commit(
        "main",
        &[
            file("cm.yaml", configmap("a", "1")),
            file(
                "m.yaml",
                format!("apiVersion: {group}/v1beta1\nkind: PodMetrics\nmetadata:\n  name: m\n"),
            ),
        ],
        "one object of the unavailable group",
    );

    let outcome = async {
        // Discovery succeeds, without that group.
        let mut c = eventually(
            "discovery to see the APIService",
            Duration::from_secs(30),
            || {
                let client = client.clone();
                let group = group.clone();
                async move {
                    let c = sluice_engine::cluster::Cluster::connect(client)
                        .await
                        .ok()?;
                    c.unavailable_group(&group).is_some().then_some(c)
                }
            },
        )
        .await;
        let why = c
            .unavailable_group(&group)
            .expect("unavailable")
            .to_string();
        assert!(
            why.starts_with(&format!(
                "API group {group} is unavailable (APIService {name}: "
            )),
            "{why}"
        );
        let err = sync_once(&mut c, &src, &project(&ns, ""), &settings(&inventory))
            .await
            .expect_err("the sync reports the objects it could not apply");
        (why, err)
    }
    .await;
    apiservices
        .delete(&name, &DeleteParams::default())
        .await
        .expect("delete APIService");
    let (why, err) = outcome;
    let text = err.to_string();
    assert!(
        text.starts_with(&format!(
            "1 resources not applied: PodMetrics/m: not applied: {why}"
        )),
        "{text}"
    );
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    assert!(
        cms.get_opt("a").await.expect("get").is_some(),
        "the available group's object was applied"
    );
    let keys = inventory_keys(&client, &ns, &format!("inventory-{inventory}")).await;
    assert!(
        keys.contains(&sluice_engine::inventory::encode_key(&recorded)),
        "an unavailable group's kinds are not gone: {keys:?}"
    );
}

#[tokio::test]
async fn a_manifest_cannot_claim_another_projects_inventory() {
    let Fixture {
        client,
        ns,
        repo,
        src,
        cluster: mut c,
        cache: _cache,
    } = Fixture::new("claim").await;
    // Project A owns `a`.
    let a_id = format!("a-{ns}");
    let a = InventoryRef::default_for(&a_id, &ns);
    let a_repo = git::shared().create_repo(&format!("group/{ns}-a"));
    a_repo.commit("main", &[file("a.yaml", configmap("a", "1"))], "a");
    let (a_src, _a_cache) = source(&a_repo, None);
    let p = project(&ns, "");
    sync_once(&mut c, &a_src, &p, &settings(&a_id))
        .await
        .expect("A syncs");

    // Project B commits A's inventory ConfigMap, plus an object of its own.
    let claim = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {}\n  labels:\n    cli-utils.sigs.k8s.io/inventory-id: {a_id}\n",
        a.name
    );
    repo.commit(
        "main",
        &[file("inv.yaml", claim), file("b.yaml", configmap("b", "1"))],
        "claim A's inventory",
    );
    let b_settings = sluice_agent::sync::Settings {
        others: vec![a.clone()],
        ..settings(&format!("b-{ns}"))
    };
    let mut b_project = project(&ns, "");
    b_project.id = "test/other".into();
    let err = sync_once(&mut c, &src, &b_project, &b_settings)
        .await
        .expect_err("refused");
    assert!(matches!(err, Error::InventoryClaimed(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "refusing inventory {ns}/{} (id {a_id}): it is the inventory of another project of this agent ({ns}/{}, id {a_id}); give this project an inventory of its own",
            a.name, a.name
        )
    );
    // Even without knowing A (another agent), the ConfigMap says whose it is.
    let err = sync_once(&mut c, &src, &b_project, &settings(&format!("b-{ns}")))
        .await
        .expect_err("refused by the cluster's record");
    assert_eq!(
        err.to_string(),
        format!(
            "refusing inventory {ns}/{} (id {a_id}): the ConfigMap is the inventory of project \"test/project\"",
            a.name
        )
    );
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    assert!(
        cms.get_opt("a").await.expect("get").is_some(),
        "A's object stays"
    );
    assert!(
        cms.get_opt("b").await.expect("get").is_none(),
        "B applied nothing"
    );
}

#[tokio::test]
async fn rbac_names_with_underscores_round_trip_and_a_malformed_key_is_kept() {
    let Fixture {
        client,
        ns,
        repo,
        src,
        cluster: mut c,
        cache: _cache,
    } = Fixture::new("rbac").await;
    let role = |name: &str| {
        format!(
            "apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata:\n  name: \"{name}\"\nrules: []\n"
        )
    };
    let names = ["a_b", "a__b", "system:x_y", "plain"];
    repo.commit(
        "main",
        &names
            .iter()
            .enumerate()
            .map(|(i, n)| file(&format!("r{i}.yaml"), role(n)))
            .collect::<Vec<_>>(),
        "roles",
    );
    let inventory = format!("t-{ns}");
    let p = project(&ns, "");
    sync_once(&mut c, &src, &p, &settings(&inventory))
        .await
        .expect("first sync");
    let inv_name = format!("inventory-{inventory}");
    let keys = inventory_keys(&client, &ns, &inv_name).await;
    assert_eq!(
        keys,
        [
            format!("{ns}_a_5f_5fb_rbac.authorization.k8s.io_Role"),
            format!("{ns}_a_5fb_rbac.authorization.k8s.io_Role"),
            format!("{ns}_plain_rbac.authorization.k8s.io_Role"),
            format!("{ns}_system_3ax_5fy_rbac.authorization.k8s.io_Role"),
        ]
    );
    // A key nobody can parse (written by hand, or by an older tool) is reported, not fatal.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let patch = serde_json::json!({"data": {"not-a-key": ""}});
    cms.patch(&inv_name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("add a malformed key");
    let again = sync_once(&mut c, &src, &p, &settings(&inventory))
        .await
        .expect("a malformed key does not brick the project");
    assert!(
        again.results.iter().all(|r| r.action == Action::Unchanged),
        "{:?}",
        again.results
    );

    // Removing two of them from git prunes exactly those.
    repo.commit(
        "main",
        &[
            file("r2.yaml", role("system:x_y")),
            file("r3.yaml", role("plain")),
        ],
        "drop a_b and a__b",
    );
    let report = sync_once(&mut c, &src, &p, &settings(&inventory))
        .await
        .expect("prune sync");
    let mut pruned: Vec<&str> = report
        .results
        .iter()
        .filter(|r| r.action == Action::Pruned)
        .map(|r| r.obj.name.as_str())
        .collect();
    pruned.sort();
    assert_eq!(pruned, ["a__b", "a_b"]);
    let roles = api(
        &client,
        &ns,
        "rbac.authorization.k8s.io/v1",
        "Role",
        "roles",
    );
    assert!(roles.get_opt("a_b").await.expect("get").is_none());
    assert!(roles.get_opt("system:x_y").await.expect("get").is_some());
    let keys = inventory_keys(&client, &ns, &inv_name).await;
    assert!(keys.contains(&"not-a-key".to_string()), "kept: {keys:?}");
    assert_eq!(keys.len(), 3, "{keys:?}");
}

#[tokio::test]
async fn a_namespace_still_in_use_is_not_pruned_and_the_inventory_namespace_can_come_with_the_commit()
 {
    let _turn = DISCOVERY.lock().await;
    let Fixture {
        client,
        ns,
        repo,
        src,
        cluster: mut c,
        cache: _cache,
    } = Fixture::new("nsprune").await;
    // A fresh cluster: the inventory's namespace and a namespace for apps both come with
    // the commit.
    let home = format!("{ns}-home");
    let apps = format!("{ns}-apps");
    let namespace = |n: &str| format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {n}\n");
    let in_apps = |name: &str| {
        format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: {apps}\n")
    };
    repo.commit(
        "main",
        &[
            file("home.yaml", namespace(&home)),
            file("apps.yaml", namespace(&apps)),
            file("cm.yaml", configmap("in-home", "1")),
            file("app.yaml", in_apps("app")),
        ],
        "namespaces and their objects",
    );
    let inventory = format!("t-{ns}");
    let p = project(&home, "");
    sync_once(&mut c, &src, &p, &settings(&inventory))
        .await
        .expect("the inventory's namespace comes with the commit");
    inventory_keys(&client, &home, &format!("inventory-{inventory}")).await;

    // Someone else puts an object into the apps namespace.
    let foreign: ConfigMap = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "not-ours"}
    }))
    .expect("configmap");
    let in_apps_api: Api<ConfigMap> = Api::namespaced(client.clone(), &apps);
    in_apps_api
        .create(&PostParams::default(), &foreign)
        .await
        .expect("foreign object");

    // Both namespaces leave git (with the app object); the objects of this project in
    // them go, the namespaces stay: one holds the inventory, the other a foreign object.
    repo.commit(
        "main",
        &[file("cm.yaml", configmap("in-home", "1"))],
        "drop the namespaces",
    );
    let report = sync_once(&mut c, &src, &p, &settings(&inventory))
        .await
        .expect("sync");
    let action = |name: &str| {
        report
            .results
            .iter()
            .find(|r| r.obj.name == name)
            .map(|r| (r.action, r.message.clone().unwrap_or_default()))
            .unwrap_or_else(|| panic!("{name} reported: {:?}", report.results))
    };
    assert_eq!(action("app").0, Action::Pruned);
    let (home_action, home_message) = action(&home);
    assert_eq!(home_action, Action::Retained);
    assert_eq!(
        home_message,
        format!(
            "not pruned: namespace still in use: it holds this project's inventory inventory-{inventory}"
        )
    );
    let (apps_action, apps_message) = action(&apps);
    assert_eq!(apps_action, Action::Retained);
    assert!(
        apps_message.starts_with(&format!(
            "not pruned: namespace still in use: it holds 1 objects this project does not own (ConfigMap/{apps}/not-ours)"
        )),
        "{apps_message}"
    );
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for n in [&home, &apps] {
        let live = namespaces.get(n).await.expect("still there");
        assert!(
            live.metadata.deletion_timestamp.is_none(),
            "{n} not deleted"
        );
    }
    assert!(
        in_apps_api
            .get_opt("not-ours")
            .await
            .expect("get")
            .is_some(),
        "the neighbour's object survives"
    );

    // Once the foreign object is gone, the apps namespace is pruned.
    in_apps_api
        .delete("not-ours", &DeleteParams::default())
        .await
        .expect("delete foreign");
    let report = sync_once(&mut c, &src, &p, &settings(&inventory))
        .await
        .expect("sync");
    let apps_now = report
        .results
        .iter()
        .find(|r| r.obj.name == apps)
        .expect("apps reported");
    assert_eq!(apps_now.action, Action::Pruned, "{apps_now:?}");
}

#[tokio::test]
async fn a_short_commit_id_is_synced() {
    let Fixture {
        client,
        ns,
        repo,
        src,
        cluster: mut c,
        cache: _cache,
    } = Fixture::new("short").await;
    let first = repo.commit("main", &[file("a.yaml", configmap("a", "old"))], "old");
    repo.commit("main", &[file("a.yaml", configmap("a", "new"))], "new");
    let p = project(&ns, &format!("    ref:\n      commit: {}\n", &first[..8]));
    let report = sync_once(&mut c, &src, &p, &settings(&format!("t-{ns}")))
        .await
        .expect("short id resolved");
    assert_eq!(report.commit, first, "reported by its full id");
    let cms: Api<ConfigMap> = Api::namespaced(client, &ns);
    let a = cms.get("a").await.expect("applied");
    assert_eq!(a.data.unwrap_or_default()["value"], "old");
}

#[tokio::test]
async fn client_dry_run_needs_only_read_access() {
    let Fixture {
        client,
        ns,
        repo,
        src,
        cache: _cache,
        ..
    } = Fixture::new("dryrun").await;
    repo.commit("main", &[file("a.yaml", configmap("a", "1"))], "a");
    // A user that can read ConfigMaps and nothing else: any PATCH, even a dry-run, is
    // refused with 403, so a sync passes only if it sends none.
    let reader = format!("reader-{ns}");
    let rbac = serde_json::json!([
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": "read", "namespace": ns},
         "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": "read", "namespace": ns},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read"},
         "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": reader}]}
    ]);
    for o in rbac.as_array().expect("list") {
        let obj: kube::api::DynamicObject = serde_json::from_value(o.clone()).expect("obj");
        let kind = o["kind"].as_str().expect("kind");
        let plural = if kind == "Role" {
            "roles"
        } else {
            "rolebindings"
        };
        api(&client, &ns, "rbac.authorization.k8s.io/v1", kind, plural)
            .create(&PostParams::default(), &obj)
            .await
            .expect("rbac");
    }
    let kubeconfig =
        kube::config::Kubeconfig::read_from(&cluster::shared().kubeconfig).expect("kubeconfig");
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("config");
    config.auth_info.impersonate = Some(reader.clone());
    let as_reader = kube::Client::try_from(config).expect("client");
    let mut c = sluice_engine::cluster::Cluster::connect(as_reader)
        .await
        .expect("discovery as the reader");
    let report = sync_once(
        &mut c,
        &src,
        &project(&ns, "    dry_run_strategy: client\n"),
        &settings(&format!("t-{ns}")),
    )
    .await
    .expect("client dry run with read access only");
    assert_eq!(report.results.len(), 1);
    assert_eq!(report.results[0].action, Action::Skipped);
    assert_eq!(
        report.results[0].message.as_deref(),
        Some("dry run (client): would be created")
    );
    let cms: Api<ConfigMap> = Api::namespaced(client, &ns);
    assert!(cms.get_opt("a").await.expect("get").is_none());
}

/// Credentials written into a project's URL are used to fetch it, and appear nowhere else:
/// not in the inventory's name, labels or annotations, the objects' owning-inventory
/// annotation, or the report.
#[tokio::test]
async fn credentials_in_a_project_url_stay_out_of_ids_annotations_and_reports() {
    let client = cluster::client().await;
    let ns = cluster::namespace(&client, "creds").await;
    let server = git::shared();
    let repo = server.create_repo(&format!("private/{ns}"));
    repo.commit("main", &[file("a.yaml", configmap("a", "1"))], "a");
    let token = server.token();
    let url = repo
        .https_url()
        .replacen("https://", &format!("https://oauth2:{token}@"), 1);
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!("gitops:\n  manifest_projects:\n  - id: {url}\n    default_namespace: {ns}\n"),
    )
    .expect("write config");
    let opts = sluice_agent::agent::Options {
        config_project: String::new(),
        takeover: sluice_agent::sync::Takeover::Off,
        git_ca: Some(server.ca_pem().as_bytes().to_vec()),
        ..options("creds", &dir.path().join("cache"))
    };
    let outcomes = sluice_agent::agent::run_once(
        client.clone(),
        sluice_agent::agent::ConfigSource::File(config),
        opts,
    )
    .await
    .expect("run once");
    assert_eq!(outcomes.len(), 1);
    let report = outcomes[0]
        .result
        .as_ref()
        .expect("synced with the URL's token");
    assert_eq!(outcomes[0].project, repo.https_url());
    let everything = format!(
        "{outcomes:?} {}",
        serde_json::to_string(report).expect("json")
    );
    assert!(
        !everything.contains(token),
        "token in the report: {everything}"
    );
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    for cm in cms.list(&Default::default()).await.expect("list").items {
        let text = serde_json::to_string(&cm).expect("json");
        assert!(!text.contains(token), "token in the cluster: {text}");
    }
    let a = cms.get("a").await.expect("applied");
    let owner =
        a.metadata.annotations.unwrap_or_default()["config.k8s.io/owning-inventory"].clone();
    assert_eq!(
        owner,
        sluice_agent::sync::inventory_id("creds", repo.https_url()),
        "the id is made from the URL without credentials"
    );
}

/// `sluice sync` syncs every project once and exits 0, or 1 when one failed; entries
/// without `id` are the configuration project's manifests (derived from --config-repo).
#[tokio::test]
async fn sluice_sync_runs_once_with_the_config_project_as_default_id() {
    let client = cluster::client().await;
    let ns = cluster::namespace(&client, "once").await;
    let server = git::shared();
    let config_repo = server.create_repo(&format!("group/{ns}-config"));
    let bad = server.create_repo(&format!("group/{ns}-bad"));
    bad.commit("main", &[file("bad.yaml", "kind: [unclosed\n")], "broken");
    config_repo.commit(
        "main",
        &[
            file(
                ".gitlab/agents/once/config.yaml",
                format!(
                    "gitops:\n  manifest_projects:\n  - default_namespace: {ns}\n    paths:\n    - glob: 'manifests/*.yaml'\n"
                ),
            ),
            file("manifests/a.yaml", configmap("a", "1")),
        ],
        "config with manifests beside it",
    );
    let dir = tempfile::tempdir().expect("dir");
    let run = |repo_url: &str| {
        std::process::Command::new(wasm::sluice_binary())
            .args([
                "sync",
                "--config-repo",
                repo_url,
                "--agent-name",
                "once",
                "--git-base-url",
                server.base_url(),
                "--log-format",
                "human",
                "--cache-dir",
            ])
            .arg(dir.path())
            .env("KUBECONFIG", &cluster::shared().kubeconfig)
            .output()
            .expect("run sluice sync")
    };
    let out = run(config_repo.http_url());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.starts_with("PROJECT"), "{stdout}");
    assert!(
        stdout.contains(&format!("group/{ns}-config")) && stdout.contains("created=1"),
        "{stdout}"
    );
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    assert!(cms.get_opt("a").await.expect("get").is_some());

    // A project whose commit is broken: exit 1, and the table says why.
    config_repo.commit(
        "main",
        &[file(
            ".gitlab/agents/once/config.yaml",
            format!(
                "gitops:\n  manifest_projects:\n  - id: group/{ns}-bad\n    default_namespace: {ns}\n"
            ),
        )],
        "a broken project",
    );
    let out = run(config_repo.http_url());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(&format!("group/{ns}-bad")) && stdout.contains("False"),
        "{stdout}"
    );
}

/// Two projects whose default inventory ids reduce to the same string would share one
/// inventory and prune each other's objects: neither syncs, both say why, and the other
/// projects of the agent are not affected.
#[tokio::test]
async fn projects_whose_inventory_ids_collide_are_refused_and_others_sync() {
    let client = cluster::client().await;
    let ns = cluster::namespace(&client, "collide").await;
    let server = git::shared();
    let ok = server.create_repo(&format!("group/{ns}-ok"));
    ok.commit("main", &[file("a.yaml", configmap("a", "1"))], "a");
    for path in [format!("group/{ns}/web_app"), format!("group/{ns}/web-app")] {
        server
            .create_repo(&path)
            .commit("main", &[file("b.yaml", configmap("b", "1"))], "b");
    }
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "gitops:\n  manifest_projects:\n  - id: group/{ns}/web_app\n    default_namespace: {ns}\n  - id: group/{ns}/web-app\n    default_namespace: {ns}\n  - id: group/{ns}-ok\n    default_namespace: {ns}\n"
        ),
    )
    .expect("write config");
    let opts = sluice_agent::agent::Options {
        config_project: String::new(),
        takeover: sluice_agent::sync::Takeover::Off,
        ..options("collide", &dir.path().join("cache"))
    };
    let outcomes = sluice_agent::agent::run_once(
        client.clone(),
        sluice_agent::agent::ConfigSource::File(config),
        opts,
    )
    .await
    .expect("run once");
    let id = sluice_agent::sync::inventory_id("collide", &format!("group/{ns}/web-app"));
    for o in &outcomes[..2] {
        let err = o.result.as_ref().expect_err("refused");
        let other = if o.project.ends_with("web_app") {
            format!("group/{ns}/web-app")
        } else {
            format!("group/{ns}/web_app")
        };
        assert_eq!(
            err,
            &format!(
                "inventory id {id:?} of project {:?} is also the id of {other:?}: projects sharing an inventory would prune each other's objects; give one of them its own with --inventory-id PROJECT=ID",
                o.project
            )
        );
    }
    assert!(outcomes[2].result.is_ok(), "{:?}", outcomes[2].result);
    let cms: Api<ConfigMap> = Api::namespaced(client, &ns);
    assert!(cms.get_opt("a").await.expect("get").is_some());
    assert!(
        cms.get_opt("b").await.expect("get").is_none(),
        "neither colliding project applied"
    );
}

#[tokio::test]
async fn a_project_acting_as_its_service_account_is_bounded_by_that_accounts_rbac() {
    let Fixture {
        client,
        ns,
        repo,
        src,
        cluster: mut c,
        cache: _cache,
    } = Fixture::new("actas").await;
    let other = sluice_testenv::cluster::namespace(&client, "actas-other").await;
    // The ServiceAccount may manage ConfigMaps in its own namespace, and nothing else.
    let objects = [
        json!({"apiVersion": "v1", "kind": "ServiceAccount",
               "metadata": {"name": "deployer", "namespace": ns}}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
               "metadata": {"name": "deployer", "namespace": ns},
               "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["*"]}]}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": {"name": "deployer", "namespace": ns},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "deployer"},
               "subjects": [{"kind": "ServiceAccount", "name": "deployer", "namespace": ns}]}),
    ];
    for o in objects {
        let (api_version, kind) = (
            o["apiVersion"].as_str().unwrap(),
            o["kind"].as_str().unwrap(),
        );
        let plural = match kind {
            "ServiceAccount" => "serviceaccounts",
            "Role" => "roles",
            _ => "rolebindings",
        };
        api(&client, &ns, api_version, kind, plural)
            .create(
                &Default::default(),
                &serde_json::from_value(o.clone()).expect("object"),
            )
            .await
            .expect("create RBAC");
    }
    let p = project(&ns, "    service_account: deployer\n");
    let s = settings(&format!("t-{ns}"));
    let inventory = format!("inventory-t-{ns}");
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);

    // One object outside what the ServiceAccount may write: the API server refuses it in
    // the preflight, and nothing is written, not even the inventory.
    let outside = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: b\n  namespace: {other}\ndata:\n  v: \"1\"\n"
    );
    repo.commit(
        "main",
        &[file("a.yaml", configmap("a", "1")), file("b.yaml", outside)],
        "one object elsewhere",
    );
    let err = sync_once(&mut c, &src, &p, &s)
        .await
        .expect_err("refused by RBAC");
    let text = err.to_string();
    assert!(
        text.contains(&format!("b.yaml:1: ConfigMap/{other}/b"))
            && text.contains(&format!(
                "User \"system:serviceaccount:{ns}:deployer\" cannot"
            )),
        "{text}"
    );
    assert!(
        cms.get_opt("a").await.expect("get").is_none(),
        "nothing applied"
    );
    assert!(
        cms.get_opt(&inventory).await.expect("get").is_none(),
        "no inventory written"
    );

    // Within its rights: applied as the ServiceAccount; the inventory is the agent's.
    repo.commit(
        "main",
        &[file("a.yaml", configmap("a", "1"))],
        "only its own namespace",
    );
    let plane = sluice_testenv::cluster::shared();
    let mark = plane.audit_mark();
    sync_once(&mut c, &src, &p, &s).await.expect("applies");
    assert!(cms.get_opt("a").await.expect("get").is_some());
    let writes: Vec<_> = plane
        .requests_since(mark)
        .into_iter()
        .filter(|r| r.is_write() && r.uri.contains(&format!("/namespaces/{ns}/configmaps")))
        .collect();
    let sa = format!("system:serviceaccount:{ns}:deployer");
    let of = |name: &str| {
        writes
            .iter()
            .filter(|r| {
                r.uri.contains(&format!("/configmaps/{name}?"))
                    || r.uri.ends_with(&format!("/configmaps/{name}"))
            })
            .map(|r| r.impersonated.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(of("a"), vec![Some(sa.clone())], "{writes:?}");
    // The inventory is created (POST, no name in the path) and written by the agent itself.
    let inventory_writes: Vec<_> = writes
        .iter()
        .filter(|r| r.uri.contains(&inventory) || r.verb == "create")
        .collect();
    assert!(
        !inventory_writes.is_empty() && inventory_writes.iter().all(|r| r.impersonated.is_none()),
        "{writes:?}"
    );
}

/// An HTTPS admission webhook on 127.0.0.1 that denies ConfigMaps whose name starts with
/// `denied`, with a message of its own; every other request is allowed. Returns its
/// address and the CA that signed its certificate (the `caBundle`).
/// Stop it with `handle.shutdown()`, which also closes the connections the API server keeps.
async fn admission_webhook(
    listener: std::net::TcpListener,
) -> (axum_server::Handle<std::net::SocketAddr>, String) {
    let (ca, cert, key) = sluice_testenv::pki::serving_cert_pem().expect("certificates");
    let tls = axum_server::tls_rustls::RustlsConfig::from_pem(cert.into_bytes(), key.into_bytes())
        .await
        .expect("TLS config");
    let app = axum::Router::new().route(
        "/validate",
        axum::routing::post(|axum::Json(review): axum::Json<serde_json::Value>| async move {
            let request = &review["request"];
            let name = request["name"].as_str().unwrap_or_default();
            let response = if name.starts_with("denied") {
                json!({"uid": request["uid"], "allowed": false,
                       "status": {"code": 403, "message": format!("policy-x: ConfigMap {name} is not allowed here")}})
            } else {
                json!({"uid": request["uid"], "allowed": true})
            };
            axum::Json(json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}))
        }),
    );
    listener.set_nonblocking(true).expect("nonblocking");
    let handle = axum_server::Handle::new();
    let server = axum_server::from_tcp_rustls(listener, tls)
        .expect("https listener")
        .handle(handle.clone())
        .serve(app.into_make_service());
    tokio::spawn(async move {
        let _ = server.await;
    });
    (handle, ca)
}

/// A real admission webhook (HTTPS, registered with a ValidatingWebhookConfiguration for
/// the test's namespace only) that denies one object: the commit is refused at the
/// server-side dry run with the webhook's message and the object's origin, and nothing is
/// written. With the webhook down under `failurePolicy: Fail`, the sync fails with a clear
/// error and writes nothing; once it is back, the retry applies the commit.
#[tokio::test]
async fn an_admission_webhook_that_denies_an_object_refuses_the_commit_whole() {
    use base64::Engine;
    use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
    let Fixture {
        client,
        ns,
        repo,
        src,
        cluster: mut c,
        cache: _cache,
    } = Fixture::new("admission").await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (server, ca) = admission_webhook(listener).await;
    let name = format!("sluice-e2e-{ns}");
    let webhooks: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    let configuration: ValidatingWebhookConfiguration = serde_json::from_value(json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [{
            "name": "deny.sluice.test",
            "clientConfig": {
                "url": format!("https://{addr}/validate"),
                "caBundle": base64::engine::general_purpose::STANDARD.encode(&ca),
            },
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE", "UPDATE"], "resources": ["configmaps"]}],
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
            "failurePolicy": "Fail",
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "timeoutSeconds": 5,
        }],
    }))
    .expect("configuration");
    webhooks
        .create(&PostParams::default(), &configuration)
        .await
        .expect("register the webhook");
    // The API server reads new webhook configurations from an informer: wait until it
    // calls this one (a denied server-side dry run).
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let probe: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "denied-probe"}})).expect("cm");
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let start = std::time::Instant::now();
    while cms.create(&dry, &probe).await.is_ok() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the webhook was never called"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let p = project(&ns, "");
    let s = settings(&format!("t-{ns}"));
    repo.commit(
        "main",
        &[
            file("allowed.yaml", configmap("allowed-a", "1")),
            file("denied.yaml", configmap("denied-b", "1")),
        ],
        "one denied",
    );
    let err = sync_once(&mut c, &src, &p, &s).await.expect_err("denied");
    let text = err.to_string();
    assert!(
        text.starts_with("1 of 2 objects failed server-side dry-run, nothing was applied"),
        "{text}"
    );
    assert!(
        text.contains(&format!("denied.yaml:1: ConfigMap/{ns}/denied-b"))
            && text.contains("admission webhook \"deny.sluice.test\" denied the request: policy-x: ConfigMap denied-b is not allowed here"),
        "{text}"
    );
    let written = cms.list(&Default::default()).await.expect("list");
    assert!(
        written
            .items
            .iter()
            .all(|c| c.metadata.name.as_deref() == Some("kube-root-ca.crt")),
        "nothing was written, inventory included: {:?}",
        written
            .items
            .iter()
            .map(|c| c.metadata.name.clone())
            .collect::<Vec<_>>()
    );

    // The webhook down, failurePolicy Fail: a clear error, and nothing written.
    server.shutdown();
    tokio::time::sleep(Duration::from_millis(500)).await;
    repo.commit(
        "main",
        &[file("allowed.yaml", configmap("allowed-a", "1"))],
        "only allowed",
    );
    let err = sync_once(&mut c, &src, &p, &s)
        .await
        .expect_err("webhook down");
    let text = err.to_string();
    assert!(
        text.contains(&format!("allowed.yaml:1: ConfigMap/{ns}/allowed-a"))
            && text.contains("failed calling webhook \"deny.sluice.test\""),
        "{text}"
    );
    assert!(cms.get_opt("allowed-a").await.expect("get").is_none());

    // Back on the same address (with a CA of its own, given to the configuration): the
    // retry applies the commit.
    let listener = std::net::TcpListener::bind(addr).expect("bind the same address again");
    let (server, ca) = admission_webhook(listener).await;
    let patch = json!({"webhooks": [{"name": "deny.sluice.test", "clientConfig": {
        "url": format!("https://{addr}/validate"),
        "caBundle": base64::engine::general_purpose::STANDARD.encode(&ca)}}]});
    webhooks
        .patch(&name, &PatchParams::default(), &Patch::Strategic(&patch))
        .await
        .expect("new CA");
    let start = std::time::Instant::now();
    let report = loop {
        match sync_once(&mut c, &src, &p, &s).await {
            Ok(report) => break report,
            Err(e) => {
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "never applied: {e}"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    assert!(
        report
            .results
            .iter()
            .any(|r| r.obj.name == "allowed-a" && r.action == Action::Created)
    );
    assert!(cms.get_opt("allowed-a").await.expect("get").is_some());
    server.shutdown();
    webhooks
        .delete(&name, &DeleteParams::default())
        .await
        .expect("unregister the webhook");
}
