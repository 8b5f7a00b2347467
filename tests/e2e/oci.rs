//! OCI artifacts as sources: pushed by `flux push artifact`'s own code (GitLab's CI
//! tutorial) to a real registry (CNCF distribution, TLS and htpasswd), synced by digest.

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use sluice_agent::source::{Credentials, Source};
use sluice_engine::apply::Action;
use sluice_testenv::registry::{self, Registry};

use crate::support::*;

/// A directory holding `files` (path, content).
fn tree(files: &[(&str, String)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("dir");
    for (path, body) in files {
        let path = dir.path().join(path);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, body).expect("write");
    }
    dir
}

/// How the agent reaches the test registry: its Docker config and its CA.
fn registries(reg: &Registry) -> sluice_agent::oci::Registries {
    sluice_agent::oci::Registries {
        config_file: Some(reg.docker_config()),
        ca: [(reg.host.clone(), reg.ca_pem.clone().into_bytes())].into(),
        ..Default::default()
    }
}

/// `sluice sync` of `config`'s one project: its report, or why it failed.
async fn once(
    client: &kube::Client,
    config: &std::path::Path,
    opts: sluice_agent::agent::Options,
) -> Result<sluice_agent::sync::Report, String> {
    sluice_agent::agent::run_once(
        client.clone(),
        sluice_agent::agent::ConfigSource::File(config.to_path_buf()),
        opts,
    )
    .await
    .expect("run once")
    .remove(0)
    .result
}

fn source_for(reg: &Registry, repository: &str, cache: &std::path::Path, creds: bool) -> Source {
    let credentials = creds.then(|| Credentials {
        username: registry::USER.into(),
        password: registry::PASSWORD.into(),
    });
    Source::new(&reg.url(repository), cache, credentials).with_ca(reg.ca_pem.clone().into_bytes())
}

/// The path of GitLab's tutorial: CI pushes the manifests as an artifact with
/// `flux push artifact --source --revision`; sluice syncs the tag, follows it when CI pushes
/// again (a prune when a file left), goes back to an older digest, picks the highest tag a
/// semver range accepts, and keeps syncing a digest it holds while the registry is down.
#[tokio::test]
async fn an_artifact_pushed_by_flux_is_synced_followed_rolled_back_and_kept_without_the_registry() {
    let client = sluice_testenv::cluster::client().await;
    let ns = sluice_testenv::cluster::namespace(&client, "oci").await;
    let mut reg = Registry::start_new("sync").await.expect("registry");
    let mut c = cluster().await;
    let cache = tempfile::tempdir().expect("cache");
    let src = source_for(&reg, "group/app/manifests", cache.path(), true);
    let url = reg.url("group/app/manifests");
    let git = "https://gitlab.example/group/app.git";

    let v1 = tree(&[
        ("deploy/a.yaml", configmap("a", "1")),
        ("deploy/b.yaml", configmap("b", "1")),
        ("README.md", "not a manifest".into()),
    ]);
    let d1 = reg.flux_push(
        "group/app/manifests",
        "latest",
        v1.path(),
        git,
        "main@sha1:1111111111111111111111111111111111111111",
    );
    let p = project_with_id(&url, &ns, "    paths: [{glob: 'deploy/*.yaml'}]\n");
    let s = settings(&format!("oci-{ns}"));
    let r = sync_once(&mut c, &src, &p, &s).await.expect("first sync");
    assert_eq!(r.commit, d1, "the digest plays the commit's role");
    assert_eq!(
        r.revision.as_deref(),
        Some("main@sha1:1111111111111111111111111111111111111111")
    );
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let value = |cm: ConfigMap| cm.data.unwrap_or_default().get("value").cloned();
    assert_eq!(value(cms.get("a").await.expect("a")), Some("1".into()));
    let b_uid = cms.get("b").await.expect("b").metadata.uid;
    let inventory = format!("inventory-oci-{ns}");
    assert_eq!(
        inventory_keys(&client, &ns, &inventory).await,
        [format!("{ns}_a__ConfigMap"), format!("{ns}_b__ConfigMap")]
    );

    // CI pushes again to the same tag: a changed, b gone, c new.
    let v2 = tree(&[
        ("deploy/a.yaml", configmap("a", "2")),
        ("deploy/c.yaml", configmap("c", "2")),
    ]);
    let d2 = reg.flux_push(
        "group/app/manifests",
        "latest",
        v2.path(),
        git,
        "main@sha1:2222222222222222222222222222222222222222",
    );
    assert_ne!(d1, d2);
    let r = sync_once(&mut c, &src, &p, &s).await.expect("second sync");
    assert_eq!(r.commit, d2);
    let action = |r: &sluice_agent::sync::Report, name: &str| {
        r.results
            .iter()
            .find(|o| o.obj.name.as_str() == name)
            .map(|o| o.action)
    };
    assert_eq!(action(&r, "a"), Some(Action::Configured));
    assert_eq!(action(&r, "b"), Some(Action::Pruned));
    assert_eq!(action(&r, "c"), Some(Action::Created));
    assert!(cms.get_opt("b").await.expect("get b").is_none());

    // Roll back by digest: the older artifact, exactly.
    let pinned = project_with_id(
        &url,
        &ns,
        &format!("    paths: [{{glob: 'deploy/*.yaml'}}]\n    ref: {{digest: '{d1}'}}\n"),
    );
    let r = sync_once(&mut c, &src, &pinned, &s)
        .await
        .expect("rollback");
    assert_eq!(r.commit, d1);
    assert_eq!(value(cms.get("a").await.expect("a")), Some("1".into()));
    assert!(cms.get_opt("c").await.expect("get c").is_none(), "c pruned");
    assert_ne!(cms.get("b").await.expect("b back").metadata.uid, b_uid);

    // A semver range follows the highest release tag it accepts.
    reg.flux_push(
        "group/app/manifests",
        "v1.0.0",
        v1.path(),
        git,
        "v1.0.0@sha1:1111111111111111111111111111111111111111",
    );
    let d110 = reg.flux_push(
        "group/app/manifests",
        "v1.1.0",
        v2.path(),
        git,
        "v1.1.0@sha1:2222222222222222222222222222222222222222",
    );
    reg.flux_push(
        "group/app/manifests",
        "v2.0.0",
        v1.path(),
        git,
        "v2.0.0@sha1:1111111111111111111111111111111111111111",
    );
    let ranged = project_with_id(
        &url,
        &ns,
        "    paths: [{glob: 'deploy/*.yaml'}]\n    ref: {semver: '>=1.0.0 <2.0.0'}\n",
    );
    let r = sync_once(&mut c, &src, &ranged, &s).await.expect("semver");
    assert_eq!(r.commit, d110);
    assert_eq!(value(cms.get("a").await.expect("a")), Some("2".into()));

    // The registry goes away: the digest held in the cache still syncs; following a tag
    // fails with the registry's address and nothing else.
    reg.stop();
    let r = sync_once(&mut c, &src, &pinned, &s)
        .await
        .expect("a cached digest needs no registry");
    assert_eq!(r.commit, d1);
    assert_eq!(value(cms.get("a").await.expect("a")), Some("1".into()));
    let e = sync_once(&mut c, &src, &p, &s)
        .await
        .expect_err("a tag cannot be resolved without the registry");
    let text = e.to_string();
    assert!(text.contains(&url), "{text}");
    assert!(!text.contains(registry::PASSWORD), "{text}");
    reg.start().await.expect("registry back");

    // Wrong credentials: refused, nothing changes, the password appears nowhere.
    let wrong = Source::new(
        &url,
        cache.path(),
        Some(Credentials {
            username: registry::USER.into(),
            password: "not-the-password".into(),
        }),
    )
    .with_ca(reg.ca_pem.clone().into_bytes());
    let e = sync_once(&mut c, &wrong, &p, &s)
        .await
        .expect_err("wrong credentials");
    assert!(!e.to_string().contains("not-the-password"), "{e}");
    assert_eq!(value(cms.get("a").await.expect("a")), Some("1".into()));
}

/// The agent as it runs: an `oci://` project following `latest`, credentials from a Docker
/// config (a dockerconfigjson Secret's), the registry's CA by host, polling off. The
/// registry's own push notification makes it sync CI's next push within seconds.
#[tokio::test]
async fn the_agent_syncs_an_artifact_when_the_registry_announces_the_push() {
    use sluice_agent::agent::{self, ConfigSource};
    let client = sluice_testenv::cluster::client().await;
    let ns = sluice_testenv::cluster::namespace(&client, "ocihook").await;
    let secret = "registry-hook-secret";
    let hooks = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let hook_url = format!(
        "http://{}/hooks/registry",
        hooks.local_addr().expect("addr")
    );
    let reg = Registry::start_notifying("hook", Some((&hook_url, secret)))
        .await
        .expect("registry");
    let git = "https://gitlab.example/group/app.git";
    let v1 = tree(&[("a.yaml", configmap("a", "1"))]);
    reg.flux_push("group/app", "latest", v1.path(), git, "main@sha1:1");

    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "gitops:\n  manifest_projects:\n  - id: {}\n    default_namespace: {ns}\n",
            reg.url("group/app")
        ),
    )
    .expect("config");
    let opts = agent::Options {
        poll_interval: std::time::Duration::from_secs(3600),
        registries: registries(&reg),
        ..options("ocihook", dir.path())
    };
    let receiver = std::sync::Arc::new(sluice_agent::webhook::Receiver::new(
        secret.to_string().into(),
        opts.triggers.clone(),
        opts.metrics.clone(),
    ));
    tokio::spawn(sluice_agent::webhook::serve(hooks, receiver));
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(agent::run(
        client.clone(),
        ConfigSource::File(config),
        opts,
        None,
        async {
            let _ = rx.await;
        },
    ));
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let value = |name: &'static str| {
        let cms = cms.clone();
        async move {
            cms.get_opt(name)
                .await
                .ok()
                .flatten()
                .and_then(|cm| cm.data?.get("value").cloned())
        }
    };
    eventually(
        "the artifact at start",
        std::time::Duration::from_secs(60),
        || async { (value("a").await.as_deref() == Some("1")).then_some(()) },
    )
    .await;

    let v2 = tree(&[
        ("a.yaml", configmap("a", "2")),
        ("b.yaml", configmap("b", "2")),
    ]);
    let pushed = std::time::Instant::now();
    reg.flux_push("group/app", "latest", v2.path(), git, "main@sha1:2");
    eventually(
        "the push the registry announced",
        std::time::Duration::from_secs(30),
        || async { (value("b").await.as_deref() == Some("2")).then_some(()) },
    )
    .await;
    eprintln!("registry push to applied: {:?}", pushed.elapsed());
    assert_eq!(value("a").await.as_deref(), Some("2"));
    drop(stop);
    let _ = agent.await;
}

/// Plugins by OCI reference: `sluice plugin push` publishes a module (annotated with its
/// world and WIT version), `sluice plugin inspect` reads it back without running it, and an
/// agent uses it pinned by digest. The module is pulled once per digest: with the registry
/// down, a pinned module and a tag whose digest was seen still load; a digest the
/// registry does not have fails naming the reference, and nothing is applied.
#[tokio::test]
async fn a_plugin_pushed_to_a_registry_is_pulled_once_by_digest_and_used() {
    use std::process::Command;
    let client = sluice_testenv::cluster::client().await;
    let ns = sluice_testenv::cluster::namespace(&client, "ocimod").await;
    let mut reg = Registry::start_new("modules").await.expect("registry");
    let module = sluice_testenv::wasm::component("set-labels");
    let sluice = sluice_testenv::wasm::sluice_binary();
    let registry_args = [
        format!("--creds={}:{}", registry::USER, registry::PASSWORD),
        format!("--registry-ca={}", reg.ca_file.display()),
    ];
    let reference = format!("{}:v1", reg.url("plugins/set-labels"));
    let out = Command::new(&sluice)
        .args(["plugin", "push"])
        .arg(&module)
        .arg(&reference)
        .args([
            "--source=https://gitlab.example/platform/plugins.git",
            "--revision=main@sha1:3",
        ])
        .args(&registry_args)
        .output()
        .expect("sluice plugin push");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let digest = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(digest.starts_with("sha256:"), "{digest}");

    let out = Command::new(&sluice)
        .args(["plugin", "inspect", "-o", "json", &reference])
        .args(&registry_args)
        .output()
        .expect("sluice plugin inspect");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(info["digest"], digest.as_str());
    assert_eq!(info["world"], "transformer");
    assert_eq!(
        info["annotations"]["dev.sluice.plugin.world"],
        "transformer"
    );
    assert_eq!(
        info["annotations"]["org.opencontainers.image.revision"],
        "main@sha1:3"
    );
    assert!(
        info["annotations"]["dev.sluice.plugin.wit-version"]
            .as_str()
            .is_some_and(|v| v.starts_with("0.")),
        "{info}"
    );

    // The agent, with the module pinned by tag and digest.
    let repo = sluice_testenv::git::shared().create_repo(&format!("group/{ns}"));
    repo.commit(
        "main",
        &[sluice_testenv::git::file("a.yaml", configmap("a", "1"))],
        "a",
    );
    let dir = tempfile::tempdir().expect("dir");
    let cache = dir.path().join("cache");
    let config = dir.path().join("config.yaml");
    let write_config = |module: &str| {
        std::fs::write(
            &config,
            format!(
                "plugins:\n- name: labels\n  module: {module}\n  config: {{labels: {{pushed-by: registry}}}}\n\
                 gitops:\n  manifest_projects:\n  - id: group/{ns}\n    default_namespace: {ns}\n"
            ),
        )
        .expect("config");
    };
    let registries = registries(&reg);
    let opts = || sluice_agent::agent::Options {
        config_project: String::new(),
        takeover: sluice_agent::sync::Takeover::Off,
        registries: registries.clone(),
        ..options("ocimod", &cache)
    };
    let once = |opts| once(&client, &config, opts);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let label = |cm: ConfigMap| {
        cm.metadata
            .labels
            .unwrap_or_default()
            .get("pushed-by")
            .cloned()
    };
    write_config(&format!("{reference}@{digest}"));
    once(opts()).await.expect("synced with the pulled plugin");
    assert_eq!(
        label(cms.get("a").await.expect("a")),
        Some("registry".into())
    );

    // By tag alone: resolved (and the digest it had recorded).
    write_config(&reference);
    once(opts()).await.expect("synced with the tag's module");
    write_config(&format!("{reference}@{digest}"));

    // Registry down: the pinned module and the tag seen before still load.
    reg.stop();
    repo.commit(
        "main",
        &[
            sluice_testenv::git::file("a.yaml", configmap("a", "1")),
            sluice_testenv::git::file("b.yaml", configmap("b", "1")),
        ],
        "b",
    );
    once(opts()).await.expect("pinned: no registry needed");
    assert_eq!(
        label(cms.get("b").await.expect("b")),
        Some("registry".into())
    );
    write_config(&reference);
    once(opts()).await.expect("the tag's last digest is held");

    // A digest the registry does not hold: refused, naming the reference; nothing applied.
    reg.start().await.expect("registry back");
    let unknown = format!("sha256:{}", "0".repeat(64));
    write_config(&format!("{reference}@{unknown}"));
    repo.commit(
        "main",
        &[
            sluice_testenv::git::file("a.yaml", configmap("a", "1")),
            sluice_testenv::git::file("b.yaml", configmap("b", "1")),
            sluice_testenv::git::file("c.yaml", configmap("c", "1")),
        ],
        "c",
    );
    let e = once(opts()).await.expect_err("an unknown digest");
    assert!(e.contains("plugins/set-labels"), "{e}");
    assert!(!e.contains(registry::PASSWORD), "{e}");
    assert!(
        cms.get_opt("c").await.expect("get c").is_none(),
        "nothing applied"
    );
}

/// Signatures, verified offline with the team's public key (a Secret's `*.pub`, Flux's
/// convention): a project with `verify` syncs an artifact cosign signed (its sigstore
/// bundle, cosign v3's default, and its legacy `.sig` tag alike), and refuses an unsigned
/// one or one signed by another key, naming the reference and the key, applying nothing.
/// A plugin from a registry is verified the same way.
#[tokio::test]
async fn only_artifacts_and_plugins_signed_with_the_teams_key_are_used() {
    use k8s_openapi::api::core::v1::Secret;
    use sluice_testenv::registry::SignatureFormat;
    let client = sluice_testenv::cluster::client().await;
    let ns = sluice_testenv::cluster::namespace(&client, "ocisig").await;
    let reg = Registry::start_new("signed").await.expect("registry");
    let keys = tempfile::tempdir().expect("keys");
    let (team_key, team_pub) = reg.cosign_key_pair(keys.path(), "team");
    let (other_key, _) = reg.cosign_key_pair(keys.path(), "other");
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "cosign-keys", "namespace": ns},
        "stringData": {"team.pub": std::fs::read_to_string(&team_pub).expect("pub")}
    }))
    .expect("secret");
    Api::<Secret>::namespaced(client.clone(), &ns)
        .create(&Default::default(), &secret)
        .await
        .expect("create the keys Secret");

    let mut c = cluster().await;
    let cache = tempfile::tempdir().expect("cache");
    let src = source_for(&reg, "group/signed", cache.path(), true);
    let url = reg.url("group/signed");
    let git = "https://gitlab.example/group/signed.git";
    let p = project_with_id(
        &url,
        &ns,
        "    verify: {provider: cosign, secret: cosign-keys}\n",
    );
    let s = settings(&format!("sig-{ns}"));
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);

    let v1 = tree(&[("a.yaml", configmap("a", "1"))]);
    let d1 = reg.flux_push("group/signed", "latest", v1.path(), git, "main@sha1:1");
    reg.cosign_sign("group/signed", &d1, &team_key, SignatureFormat::Bundle);
    sync_once(&mut c, &src, &p, &s)
        .await
        .expect("signed with the team's key (bundle)");
    assert!(cms.get_opt("a").await.expect("get a").is_some());

    // Unsigned: refused, naming the reference and the key; nothing applied.
    let v2 = tree(&[
        ("a.yaml", configmap("a", "1")),
        ("b.yaml", configmap("b", "2")),
    ]);
    let d2 = reg.flux_push("group/signed", "latest", v2.path(), git, "main@sha1:2");
    let e = sync_once(&mut c, &src, &p, &s)
        .await
        .expect_err("unsigned")
        .to_string();
    assert!(e.contains(&format!("{url}@{d2}")), "{e}");
    assert!(e.contains("no cosign signature by team.pub"), "{e}");
    assert!(
        cms.get_opt("b").await.expect("get b").is_none(),
        "nothing applied"
    );

    // Signed by another key: still refused, and the message says what it found.
    reg.cosign_sign("group/signed", &d2, &other_key, SignatureFormat::Legacy);
    let e = sync_once(&mut c, &src, &p, &s)
        .await
        .expect_err("another key")
        .to_string();
    assert!(e.contains("signed by another key"), "{e}");
    assert!(
        cms.get_opt("b").await.expect("get b").is_none(),
        "nothing applied"
    );

    // The team signs it too (legacy .sig format): applied.
    reg.cosign_sign("group/signed", &d2, &team_key, SignatureFormat::Legacy);
    let r = sync_once(&mut c, &src, &p, &s)
        .await
        .expect("signed with the team's key (.sig)");
    assert_eq!(r.commit, d2);
    assert!(cms.get_opt("b").await.expect("get b").is_some());

    // A plugin module: signed and used; an unsigned tag of it refused.
    let module = sluice_testenv::wasm::component("set-labels");
    let bytes = std::fs::read(&module).expect("module");
    let modules = source_for(&reg, "plugins/labels", cache.path(), true);
    let signed = sluice_agent::oci::push_module(
        &modules,
        "signed",
        bytes.clone(),
        "wasip2",
        Default::default(),
    )
    .await
    .expect("push the module");
    reg.cosign_sign(
        "plugins/labels",
        &signed,
        &team_key,
        SignatureFormat::Bundle,
    );
    // The same module under another manifest (another annotation): another digest, unsigned.
    let unsigned = sluice_agent::oci::push_module(
        &modules,
        "unsigned",
        bytes.clone(),
        "wasip2",
        [("note".to_string(), "unsigned".to_string())].into(),
    )
    .await
    .expect("push");
    assert_ne!(signed, unsigned);
    let dir = tempfile::tempdir().expect("dir");
    std::fs::copy(&team_pub, dir.path().join("team.pub")).expect("key");
    let repo = sluice_testenv::git::shared().create_repo(&format!("group/{ns}"));
    repo.commit(
        "main",
        &[sluice_testenv::git::file("p.yaml", configmap("p", "1"))],
        "p",
    );
    let config = dir.path().join("config.yaml");
    let registries = registries(&reg);
    let run = |tag: &str| {
        std::fs::write(
            &config,
            format!(
                "plugins:\n- name: labels\n  module: {}:{tag}\n  verify: {{key: team.pub}}\n  config: {{labels: {{signed: \"yes\"}}}}\n\
                 gitops:\n  manifest_projects:\n  - id: group/{ns}\n    default_namespace: {ns}\n",
                reg.url("plugins/labels")
            ),
        )
        .expect("config");
        let opts = sluice_agent::agent::Options {
            config_project: String::new(),
            takeover: sluice_agent::sync::Takeover::Off,
            registries: registries.clone(),
            ..options("ocisig", &dir.path().join("cache"))
        };
        once(&client, &config, opts)
    };
    run("signed").await.expect("a signed module");
    let p_labels = cms
        .get("p")
        .await
        .expect("p")
        .metadata
        .labels
        .unwrap_or_default();
    assert_eq!(p_labels.get("signed").map(String::as_str), Some("yes"));
    let e = run("unsigned").await.expect_err("an unsigned module");
    assert!(e.contains("no cosign signature by team.pub"), "{e}");
    assert!(e.contains(&unsigned), "{e}");
}
