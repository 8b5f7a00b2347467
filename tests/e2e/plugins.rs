//! The plugin stage: first-party plugins and hostile ones, built from source by the tests,
//! run by the real host; then plugins in real syncs against the cluster.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use serde_json::{Value, json};
use sluice_model::object::{Object, Origin};
use sluice_testenv::{cluster, git, wasm};
use sluice_wasm::{
    self as plugins, Error, FailurePolicy, Limits, Mode, Plugin, Runtime, Spec, Subject,
};

use crate::support::*;

const DIGEST: &str = "sha256:00000000000000000000000000000000000000000000000000000000000000aa";

fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| Runtime::new(None).expect("plugin runtime"))
}

pub(crate) fn spec(crate_name: &str, config: Value) -> Spec {
    Spec {
        name: crate_name.into(),
        module: format!("{crate_name}.wasm"),
        sha256: None,
        config,
        limits: Limits::default(),
        capabilities: Vec::new(),
        failure_policy: FailurePolicy::Fail,
        mode: Mode::Enforce,
        ..Spec::default()
    }
}

fn load(spec: &Spec) -> Result<Arc<Plugin>, Error> {
    let bytes = std::fs::read(wasm::component(&spec.name)).expect("built component");
    runtime().load(spec, &bytes).map(Arc::new)
}

fn objects(values: &[Value]) -> Vec<Object> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            Object::new(
                v,
                Origin {
                    project: "p".into(),
                    commit: "c".into(),
                    path: format!("f{i}.yaml").into(),
                    doc_index: 0,
                    line: 3,
                    renderer: None,
                },
            )
        })
        .collect()
}

fn subject() -> Subject {
    Subject {
        agent: "a".into(),
        project: "p".into(),
        commit: "c".into(),
    }
}

fn deployment_value(image: &str) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": "dev"},
           "spec": {"selector": {"matchLabels": {"app": "web"}}, "template": {"metadata": {"labels": {"app": "web"}},
           "spec": {"containers": [{"name": "web", "image": image}]}}}})
}

#[test]
fn wasm_plugins_give_the_same_result_as_their_native_logic() {
    let input = vec![
        deployment_value("nginx:1.27"),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "rb", "namespace": "dev"},
               "subjects": [{"kind": "ServiceAccount", "name": "sa", "namespace": "dev"}], "roleRef": {"kind": "Role", "name": "r", "apiGroup": "rbac.authorization.k8s.io"}}),
    ];
    let ns =
        load(&spec("set-namespace", json!({"namespace": "prod"}))).expect("load set-namespace");
    let pin = load(&spec(
        "pin-images",
        json!({"images": {"nginx:1.27": DIGEST}}),
    ))
    .expect("load pin-images");
    let out = plugins::run(&[ns, pin], &subject(), objects(&input)).expect("chain");

    let mut native = input.clone();
    set_namespace::transform(
        &set_namespace::Config {
            namespace: "prod".into(),
            cluster_scoped_kinds: vec![],
        },
        &mut native,
    )
    .expect("native");
    pin_images::transform(
        &pin_images::Config {
            images: [("nginx:1.27".to_string(), DIGEST.to_string())].into(),
            require_pinned: false,
        },
        &mut native,
    )
    .expect("native");
    let got: Vec<Value> = out.objects.iter().map(|o| o.value()).collect();
    assert_eq!(got, native);
    assert_eq!(got[1]["subjects"][0]["namespace"], "prod");
    assert_eq!(
        out.objects[0].origin.path, "f0.yaml",
        "origins survive the round trip"
    );
}

#[test]
fn bad_plugin_config_fails_at_load() {
    let e = load(&spec("set-namespace", Value::Null)).expect_err("namespace required");
    assert_eq!(
        e,
        Error::Config {
            plugin: "set-namespace".into(),
            message: "namespace is required".into()
        }
    );
    let e = load(&spec(
        "pin-images",
        json!({"images": {"a:1": "sha256:abc"}}),
    ))
    .expect_err("bad digest");
    assert!(
        e.to_string()
            .contains("digest must be sha256: and 64 hex digits"),
        "{e}"
    );
    let mut wrong = spec("no-latest-tag", Value::Null);
    wrong.sha256 = Some("00".repeat(32));
    let e = load(&wrong).expect_err("sha mismatch");
    assert!(
        e.to_string()
            .starts_with("plugin no-latest-tag: failed to load: sha256 mismatch"),
        "{e}"
    );
}

#[test]
fn enforce_validators_block_with_every_finding_and_audit_ones_report() {
    let bad = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "n"},
                     "spec": {"hostNetwork": true, "containers": [{"name": "c", "image": "nginx", "securityContext": {"privileged": true}}]}});
    let priv_ = load(&spec("no-privileged", Value::Null)).expect("load");
    let latest = load(&spec("no-latest-tag", Value::Null)).expect("load");
    let e = plugins::run(
        &[priv_.clone(), latest],
        &subject(),
        objects(std::slice::from_ref(&bad)),
    )
    .expect_err("denied");
    let Error::Denied(findings) = &e else {
        panic!("expected Denied, got {e}")
    };
    // Every validator runs before the commit is refused: the refusal lists all findings.
    assert_eq!(
        findings.iter().map(ToString::to_string).collect::<Vec<_>>(),
        [
            "f0.yaml:3: error: hostNetwork is not allowed at spec.hostNetwork (no-privileged, Pod/n/p)",
            "f0.yaml:3: error: container c is privileged at spec.containers[0].securityContext.privileged (no-privileged, Pod/n/p)",
            "f0.yaml:3: error: image nginx uses the latest tag; pin a version or a digest at spec.containers[0].image (no-latest-tag, Pod/n/p)",
        ],
        "{e}"
    );

    let mut audit = spec("no-privileged", Value::Null);
    audit.mode = Mode::Audit;
    let out = plugins::run(&[load(&audit).expect("load")], &subject(), objects(&[bad]))
        .expect("audit passes");
    assert_eq!(out.findings.len(), 2);
    let good = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "nginx:1",
                      "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "1Gi"}}}]}});
    let validators = ["no-privileged", "require-resources", "no-latest-tag"]
        .map(|n| load(&spec(n, Value::Null)).expect("load"));
    let reg = load(&spec(
        "allowed-registries",
        json!({"registries": ["docker.io/library/"]}),
    ))
    .expect("load");
    let out = plugins::run(
        &[
            validators[0].clone(),
            validators[1].clone(),
            validators[2].clone(),
            reg,
        ],
        &subject(),
        objects(&[good]),
    )
    .expect("clean");
    assert!(out.findings.is_empty(), "{:?}", out.findings);
}

/// The hostile plugin doing `act`, with a 300 ms deadline and 64 MiB unless `tweak` says
/// otherwise.
fn hostile_plugin(act: &str, tweak: impl FnOnce(&mut Spec)) -> Arc<Plugin> {
    let mut s = spec("hostile", json!({"act": act}));
    s.limits.timeout = Duration::from_millis(300);
    s.limits.memory_bytes = 64 << 20;
    tweak(&mut s);
    load(&s).expect("hostile plugin loads")
}

fn hostile(act: &str, tweak: impl FnOnce(&mut Spec)) -> Result<plugins::Outcome, Error> {
    let plugin = hostile_plugin(act, tweak);
    plugins::run(
        &[plugin],
        &subject(),
        objects(&[deployment_value("nginx:1.27")]),
    )
}

fn call_error(act: &str) -> String {
    match hostile(act, |_| {}) {
        Err(e @ (Error::Call { .. } | Error::InvalidOutput { .. } | Error::Denied(_))) => {
            e.to_string()
        }
        other => panic!("act {act}: expected a plugin error, got {other:?}"),
    }
}

#[test]
fn hostile_plugins_fail_with_the_documented_errors() {
    let cases: &[(&str, &str)] = &[
        (
            "loop",
            "plugin hostile failed on project p commit c: timed out after 300ms (limits.timeout)",
        ),
        (
            "alloc",
            "plugin hostile failed on project p commit c: exceeded its memory limit of 64 MiB",
        ),
        (
            "trap",
            "plugin hostile failed on project p commit c: trapped:",
        ),
        (
            "missing-name",
            "plugin hostile returned invalid output on project p commit c: object 0 (f0.yaml:3) Deployment/dev/ is missing metadata.name",
        ),
        (
            "invalid-json",
            "plugin hostile returned invalid output on project p commit c: object 0 (f0.yaml:3) /",
        ),
        ("socket", "wasi:sockets/"),
        (
            "stdout-loop",
            "plugin hostile failed on project p commit c: timed out after 300ms (limits.timeout)",
        ),
    ];
    for (act, want) in cases {
        let got = call_error(act);
        assert!(got.contains(want), "act {act}: {got}");
    }
    // No filesystem and no environment: the calls fail or see nothing, inside the plugin.
    assert!(
        call_error("open-file").contains("open: Err("),
        "{}",
        call_error("open-file")
    );
    assert!(
        call_error("read-env").contains("env: HOME=None vars=0"),
        "{}",
        call_error("read-env")
    );
    // Clocks and randomness without the capabilities: deterministic stand-ins, the same in
    // every call (the act reports what it read as a refusal).
    let clock = call_error("clock");
    assert!(
        clock.contains("clock: SystemTime") && clock.contains("1704067200"),
        "{clock}"
    );
    let random = call_error("random");
    assert!(random.contains("random: "), "{random}");
    assert_eq!(
        call_error("random"),
        random,
        "the same stream in every call"
    );
    let huge = hostile("huge", |s| s.limits.max_output_bytes = 1 << 20).expect_err("too big");
    assert!(huge.to_string().contains("the limit is 1048576"), "{huge}");

    // The same plugin still works afterwards: every call gets a fresh instance.
    let out = hostile("", |_| {}).expect("pass-through after all that");
    assert_eq!(out.objects.len(), 1);
}

#[test]
fn failure_policy_ignore_skips_a_failing_plugin_with_a_warning() {
    let out = hostile("loop", |s| s.failure_policy = FailurePolicy::Ignore).expect("ignored");
    assert_eq!(
        out.objects[0].value(),
        deployment_value("nginx:1.27"),
        "objects unchanged"
    );
    assert_eq!(out.findings.len(), 1);
    assert!(
        out.findings[0]
            .message
            .starts_with("plugin failed and was skipped (failure_policy: ignore)"),
        "{}",
        out.findings[0].message
    );
}

#[test]
fn granted_capabilities_are_available() {
    let e = hostile("clock", |s| {
        s.capabilities = vec![plugins::Capability::Clocks]
    })
    .expect_err("reports");
    assert!(
        e.to_string().contains("clock: SystemTime") && !e.to_string().contains("1704067200"),
        "the real clock: {e}"
    );
    let real = hostile("random", |s| {
        s.capabilities = vec![plugins::Capability::Random]
    })
    .expect_err("reports");
    assert_ne!(
        real.to_string(),
        call_error("random"),
        "the host's entropy, not the stand-in"
    );
}

/// Runs `act` on another thread and waits at most `within` for it: a host call that
/// blocks past the deadline fails the test instead of hanging it. The time returned is the
/// call's alone (loading and compiling the plugin come before it).
fn hostile_within(
    act: &str,
    within: Duration,
    tweak: impl FnOnce(&mut Spec),
) -> (Result<plugins::Outcome, Error>, Duration) {
    let (tx, rx) = std::sync::mpsc::channel();
    let plugin = hostile_plugin(act, tweak);
    std::thread::spawn(move || {
        let started = std::time::Instant::now();
        let out = plugins::run(
            &[plugin],
            &subject(),
            objects(&[deployment_value("nginx:1.27")]),
        );
        let _ = tx.send((out, started.elapsed()));
    });
    rx.recv_timeout(within)
        .unwrap_or_else(|_| panic!("the call was not ended within {within:?}"))
}

/// The call failed with the 500 ms deadline's error, and ended at it.
fn cut_off_at_500ms(out: Result<plugins::Outcome, Error>, took: Duration) {
    let e = out.expect_err("cut off");
    assert_eq!(
        e.to_string(),
        "plugin hostile failed on project p commit c: timed out after 500ms (limits.timeout)"
    );
    assert!(
        took < Duration::from_secs(5),
        "ended at the deadline: {took:?}"
    );
}

#[test]
fn blocking_host_calls_end_at_the_plugins_deadline() {
    // A sleep, with the `clocks` capability: before, it parked the host thread for the
    // hour the guest asked for.
    let (out, took) = hostile_within("sleep", Duration::from_secs(20), |s| {
        s.capabilities = vec![plugins::Capability::Clocks];
        s.limits.timeout = Duration::from_millis(500);
    });
    cut_off_at_500ms(out, took);

    // A read from a socket that accepts and never writes, with `network`.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
    let addr = listener.local_addr().expect("address").to_string();
    let held = std::thread::spawn(move || listener.accept().map(|(conn, _)| conn));
    let (out, took) = hostile_within("read-silent", Duration::from_secs(20), move |s| {
        s.config = json!({"act": "read-silent", "addr": addr});
        s.capabilities = vec![plugins::Capability::Network];
        s.limits.timeout = Duration::from_millis(500);
    });
    cut_off_at_500ms(out, took);
    let _conn = held
        .join()
        .expect("accepted")
        .expect("the plugin connected");

    // Ignored failures are cut off the same way (here a sleep on the stand-in clock), and
    // the objects go through unchanged.
    let (out, _) = hostile_within("sleep", Duration::from_secs(20), |s| {
        s.limits.timeout = Duration::from_millis(300);
        s.failure_policy = FailurePolicy::Ignore;
    });
    let out = out.expect("ignored");
    assert_eq!(out.objects[0].value(), deployment_value("nginx:1.27"));
}

#[test]
fn a_validator_cannot_change_what_it_validates() {
    let v = load(&spec("hostile-validator", Value::Null)).expect("load");
    let input = vec![deployment_value("nginx:1.27")];
    let out = plugins::run(&[v], &subject(), objects(&input)).expect("warning only");
    assert_eq!(
        out.objects[0].value(),
        input[0],
        "objects are exactly what went in"
    );
    assert_eq!(
        out.findings[0].message,
        "mutated 1 objects in my own memory"
    );
}

// --- sluice:plugin@0.2.0: objects held by the host, fields through handles --------------

fn configmap_value(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": "dev"}, "data": {"k": "v"}})
}

/// The hostile 0.2.0 transformer doing `act` on a Deployment and two ConfigMaps.
fn hostile_v2(act: &str, tweak: impl FnOnce(&mut Spec)) -> Result<plugins::Outcome, Error> {
    let mut s = spec("hostile-v2", json!({ "act": act }));
    tweak(&mut s);
    let input = [
        deployment_value("nginx:1.27"),
        configmap_value("a"),
        configmap_value("b"),
    ];
    plugins::run(&[load(&s).expect("load")], &subject(), objects(&input))
}

/// The message of the one finding a refusal carries.
fn refusal(out: Result<plugins::Outcome, Error>) -> String {
    match out {
        Err(Error::Denied(found)) if found.len() == 1 => found[0].message.clone(),
        other => panic!("expected one refusal finding, got {other:?}"),
    }
}

#[test]
fn a_v2_transformer_adds_removes_and_reorders_objects_through_handles() {
    let out = hostile_v2("reshape", |_| {}).expect("reshaped");
    let got: Vec<(Value, &str)> = out
        .objects
        .iter()
        .map(|o| (o.value(), o.origin.path.as_str()))
        .collect();
    let made = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "made", "namespace": "dev"}, "data": {"from": "plugin"}});
    assert_eq!(
        got,
        [
            (configmap_value("b"), "f2.yaml"),
            (configmap_value("a"), "f1.yaml"),
            (made, "f2.yaml (made)"),
        ],
        "the first object dropped, the rest reversed, one made"
    );
    let origin = &out.objects[2].origin;
    assert_eq!(
        (origin.project.as_str(), origin.commit.as_str()),
        ("p", "c"),
        "a made object belongs to the project and commit being synced"
    );
}

#[test]
fn v2_handle_misuse_yields_the_documented_errors() {
    assert_eq!(
        hostile_v2("strip-name", |_| {}).expect_err("no names"),
        Error::InvalidOutput {
            plugin: "hostile-v2".into(),
            project: "p".into(),
            commit: "c".into(),
            message: "object 0 (f0.yaml:3) Deployment/dev/ is missing metadata.name".into(),
        }
    );
    // Only objects a write may have broken are checked; a write above the name is one.
    assert_eq!(
        hostile_v2("replace-metadata", |_| {}).expect_err("no name"),
        Error::InvalidOutput {
            plugin: "hostile-v2".into(),
            project: "p".into(),
            commit: "c".into(),
            message: "object 0 (f0.yaml:3) Deployment/x/ is missing metadata.name".into(),
        }
    );
    assert_eq!(
        refusal(hostile_v2("bad-set", |_| {})),
        r#"Err("cannot set /metadata/name/x: /metadata/name is a string")"#
    );
    assert_eq!(
        refusal(hostile_v2("bad-parse", |_| {})),
        r#"Err("ConfigMap/ is missing metadata.name")"#
    );
    // 1 MiB values under new keys: the host takes what fits in the output limit, then
    // refuses every write, so the plugin cannot grow the host's memory past it.
    let flood = refusal(hostile_v2("flood", |s| {
        s.limits.max_output_bytes = 4 << 20;
    }));
    assert_eq!(
        flood,
        "after 4 writes: the plugin wrote 5242880 bytes into its objects, more than its output limit of 4194304 bytes"
    );
}

#[test]
fn a_failing_v2_transformer_under_failure_policy_ignore_leaves_the_objects_it_was_given() {
    let out =
        hostile_v2("strip-name", |s| s.failure_policy = FailurePolicy::Ignore).expect("ignored");
    let got: Vec<Value> = out.objects.iter().map(|o| o.value()).collect();
    assert_eq!(
        got,
        [
            deployment_value("nginx:1.27"),
            configmap_value("a"),
            configmap_value("b")
        ]
    );
    assert_eq!(out.skipped, ["hostile-v2"]);
}

#[test]
fn a_v2_validator_cannot_change_or_drop_what_it_validates() {
    let v = load(&spec("hostile-validator-v2", Value::Null)).expect("load");
    let input = vec![deployment_value("nginx:1.27"), configmap_value("a")];
    let out = plugins::run(&[v], &subject(), objects(&input)).expect("warning only");
    let got: Vec<Value> = out.objects.iter().map(|o| o.value()).collect();
    assert_eq!(
        got,
        [input[0].clone(), input[1].clone()],
        "objects are exactly what went in"
    );
    let refused = r#"Err("a validator's objects are read-only")"#;
    assert_eq!(
        out.findings[0].message,
        [refused; 4].join("; "),
        "every write was refused"
    );
}

#[test]
fn a_chain_mixes_both_contract_versions_in_configuration_order() {
    // set-labels speaks 0.1.0 (objects as text), set-namespace 0.2.0 (handles), and
    // no-privileged 0.1.0 again: each sees the previous one's output.
    let labels = load(&spec("set-labels", json!({"labels": {"team": "web"}}))).expect("load");
    let ns = load(&spec("set-namespace", json!({"namespace": "prod"}))).expect("load");
    let mut audit = spec("no-privileged", Value::Null);
    audit.mode = Mode::Audit;
    let privileged = load(&audit).expect("load");
    let info = runtime()
        .inspect(&std::fs::read(wasm::component("set-namespace")).expect("built"))
        .expect("inspect");
    assert_eq!(info.wit_version, "0.2.0");
    let mut pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "dev"},
                         "spec": {"containers": [{"name": "c", "image": "nginx:1", "securityContext": {"privileged": true}}]}});
    let out = plugins::run(
        &[labels, ns, privileged],
        &subject(),
        objects(&[pod.clone()]),
    )
    .expect("audit only");
    pod["metadata"]["namespace"] = json!("prod");
    pod["metadata"]["labels"] = json!({"team": "web"});
    assert_eq!(out.objects[0].value()["metadata"], pod["metadata"]);
    assert_eq!(
        out.findings
            .iter()
            .map(|f| f.object.as_ref().map(ToString::to_string))
            .collect::<Vec<_>>(),
        [Some("Pod/prod/p".to_string())],
        "the 0.1.0 validator saw the 0.2.0 transformer's output"
    );
}

// --- in real syncs ----------------------------------------------------------------------

fn settings_with(inventory: &str, plugins: Vec<Arc<Plugin>>) -> sluice_agent::sync::Settings {
    sluice_agent::sync::Settings {
        plugins: Ok(plugins),
        ..settings(inventory)
    }
}

#[tokio::test]
async fn a_commit_lands_transformed_by_set_namespace_and_pin_images() {
    let client = cluster::client().await;
    let ns = cluster::namespace(&client, "plug").await;
    let repo = git::shared().create_repo(&format!("group/{ns}"));
    repo.commit(
        "main",
        &[git::file("web.yaml", deployment("web", 1))],
        "web",
    );
    let (src, _cache) = source(&repo, None);
    let mut c = cluster().await;
    let chain = vec![
        load(&spec("set-namespace", json!({"namespace": ns}))).expect("load"),
        load(&spec(
            "pin-images",
            json!({"images": {"nginx:1.27": DIGEST}, "require_pinned": true}),
        ))
        .expect("load"),
    ];
    sync_once(
        &mut c,
        &src,
        &project("default", "    reconcile_timeout: 60s\n"),
        &settings_with(&format!("t-{ns}"), chain),
    )
    .await
    .expect("sync");
    let deploys: Api<Deployment> = Api::namespaced(client, &ns);
    let web = deploys
        .get("web")
        .await
        .expect("landed in the plugin's namespace, not default");
    let image = web
        .spec
        .and_then(|s| s.template.spec)
        .map(|s| s.containers[0].image.clone().unwrap_or_default());
    assert_eq!(
        image.as_deref(),
        Some(format!("nginx:1.27@{DIGEST}").as_str())
    );
}

#[tokio::test]
async fn a_resync_takes_the_plugins_outcome_from_the_render_cache_until_an_input_changes() {
    let Fixture {
        client,
        ns,
        repo,
        src,
        cluster: mut c,
        cache: _cache,
    } = Fixture::new("rcache").await;
    repo.commit(
        "main",
        &[git::file("web.yaml", deployment("web", 1))],
        "web",
    );
    let dir = tempfile::tempdir().expect("render cache dir");
    let p = project("default", "    reconcile_timeout: 60s\n");
    let chain = |digest: &str| {
        vec![
            load(&spec("set-namespace", json!({"namespace": ns}))).expect("load"),
            load(&spec(
                "pin-images",
                json!({"images": {"nginx:1.27": digest}}),
            ))
            .expect("load"),
        ]
    };
    let settings = |digest: &str| sluice_agent::sync::Settings {
        // A new cache value on the same directory each time, as after a restart.
        render_cache: Some(sluice_wasm::OutcomeCache::new(dir.path())),
        ..settings_with(&format!("t-{ns}"), chain(digest))
    };
    let deploys: Api<Deployment> = Api::namespaced(client, &ns);
    let image = || async {
        deploys
            .get("web")
            .await
            .expect("in the plugin's namespace")
            .spec
            .and_then(|s| s.template.spec)
            .and_then(|s| s.containers[0].image.clone())
            .unwrap_or_default()
    };

    let mut cached = Vec::new();
    for _ in 0..2 {
        let report = sync_once(&mut c, &src, &p, &settings(DIGEST))
            .await
            .expect("sync");
        cached.push(report.plugins_cached);
        assert_eq!(image().await, format!("nginx:1.27@{DIGEST}"));
    }
    assert_eq!(cached, [false, true], "the second sync ran no plugin");

    // Another plugin configuration is another key: the plugins run, and the cluster gets
    // their new output, not the stored one.
    let other = "sha256:00000000000000000000000000000000000000000000000000000000000000bb";
    let report = sync_once(&mut c, &src, &p, &settings(other))
        .await
        .expect("sync");
    assert!(!report.plugins_cached);
    assert_eq!(image().await, format!("nginx:1.27@{other}"));
    // One entry per project: the newest.
    assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 1);
    let report = sync_once(&mut c, &src, &p, &settings(other))
        .await
        .expect("sync");
    assert!(report.plugins_cached);
}

#[tokio::test]
async fn enforce_violation_is_not_applied_and_audit_violation_is_applied_and_reported() {
    let client = cluster::client().await;
    let ns = cluster::namespace(&client, "policy").await;
    let repo = git::shared().create_repo(&format!("group/{ns}"));
    let risky = deployment("risky", 1).replace(
        "        image: nginx:1.27\n",
        "        image: nginx:1.27\n        securityContext:\n          privileged: true\n",
    );
    repo.commit(
        "main",
        &[
            git::file("ok.yaml", configmap("ok", "1")),
            git::file("apps/risky.yaml", risky),
        ],
        "risky",
    );
    let (src, _cache) = source(&repo, None);
    let mut c = cluster().await;
    let p = project(&ns, "    reconcile_timeout: 60s\n");

    let enforce = load(&spec("no-privileged", Value::Null)).expect("load");
    let err = sync_once(
        &mut c,
        &src,
        &p,
        &settings_with(&format!("t-{ns}"), vec![enforce]),
    )
    .await
    .expect_err("blocked");
    assert_eq!(
        err.to_string(),
        format!(
            "1 error findings, nothing was applied:\napps/risky.yaml:1: error: container app is privileged at spec.template.spec.containers[0].securityContext.privileged (no-privileged, Deployment/{ns}/risky)"
        )
    );
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    assert!(
        cms.get_opt("ok").await.expect("get").is_none(),
        "nothing applied"
    );
    // The refusal is an Event about the (not yet existing) inventory.
    let inventory = sluice_engine::inventory::InventoryRef::default_for(&format!("t-{ns}"), &ns);
    sluice_agent::history::History::new(client.clone(), None)
        .record(&sluice_agent::history::Outcome {
            project: &p.id,
            commit: "0123456789abcdef",
            inventory: &inventory,
            elapsed: std::time::Duration::from_secs(1),
            result: Err(&err),
        })
        .await;
    let events = sluice_events(&client, &ns, &inventory.name).await;
    assert_eq!(
        events,
        [(
            "Warning".to_string(),
            "CommitRefused".to_string(),
            format!(
                "commit 0123456789ab refused by plugins, nothing was applied: apps/risky.yaml:1: error: container app is privileged at spec.template.spec.containers[0].securityContext.privileged (no-privileged, Deployment/{ns}/risky)"
            )
        )]
    );

    let mut audit_spec = spec("no-privileged", Value::Null);
    audit_spec.mode = Mode::Audit;
    let report = sync_once(
        &mut c,
        &src,
        &p,
        &settings_with(&format!("t-{ns}"), vec![load(&audit_spec).expect("load")]),
    )
    .await
    .expect("applied");
    assert_eq!(report.findings.len(), 1);
    assert_eq!(
        report.findings[0].origin.as_ref().map(|o| o.path.as_str()),
        Some("apps/risky.yaml")
    );
    assert!(cms.get_opt("ok").await.expect("get").is_some());
}

#[tokio::test]
async fn changing_a_plugins_config_in_the_config_repository_takes_effect() {
    let client = cluster::client().await;
    let ns = cluster::namespace(&client, "plugcfg").await;
    let server = git::shared();
    let manifests = server.create_repo(&format!("group/{ns}-manifests"));
    manifests.commit(
        "main",
        &[git::file("a.yaml", configmap("a", "1"))],
        "manifests",
    );
    let config_repo = server.create_repo(&format!("group/{ns}-config"));
    let module = std::fs::read(wasm::component("set-labels")).expect("built");
    let config = |team: &str| {
        format!(
            "plugins:\n- name: labels\n  module: plugins/set_labels.wasm\n  config: {{labels: {{team: {team}}}}}\ngitops:\n  manifest_projects:\n  - id: group/{ns}-manifests\n    default_namespace: {ns}\n"
        )
    };
    let files = |team: &str| {
        vec![
            git::file(".gitlab/agents/p/config.yaml", config(team)),
            git::file("plugins/set_labels.wasm", &module),
        ]
    };
    config_repo.commit("main", &files("a"), "team a");
    let dir = tempfile::tempdir().expect("dir");
    let opts = sluice_agent::agent::Options {
        plugin_cache_dir: Some(dir.path().join("wasm")),
        ..options("p", dir.path())
    };
    let source = sluice_agent::agent::ConfigSource::Repo {
        url: config_repo.http_url().into(),
    };
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let agent_client = client.clone();
    let _agent = tokio::spawn(async move {
        let _keep = tx;
        sluice_agent::agent::run(agent_client, source, opts, None, std::future::pending())
            .await
            .expect("agent");
    });
    drop(rx);
    let cms: Api<ConfigMap> = Api::namespaced(client, &ns);
    let team = |cms: Api<ConfigMap>| async move {
        cms.get_opt("a")
            .await
            .ok()
            .flatten()?
            .metadata
            .labels?
            .get("team")
            .cloned()
    };
    eventually("label team=a", Duration::from_secs(60), || async {
        team(cms.clone()).await.filter(|t| t == "a")
    })
    .await;
    config_repo.commit("main", &files("b"), "team b");
    eventually("label team=b", Duration::from_secs(60), || async {
        team(cms.clone()).await.filter(|t| t == "b")
    })
    .await;
}

/// A sync whose plugin was skipped (`failure_policy: ignore`), or whose plugins removed
/// objects git still has, applies but prunes nothing, and says why.
#[tokio::test]
async fn a_skipped_or_dropping_transformer_never_prunes() {
    let Fixture {
        client,
        ns,
        repo,
        src,
        cluster: mut c,
        cache: _cache,
    } = Fixture::new("hold").await;
    let files = |names: &[&str]| -> Vec<git::Entry> {
        names
            .iter()
            .map(|n| git::file(&format!("{n}.yaml"), configmap(n, "1")))
            .collect()
    };
    let inventory = format!("t-{ns}");
    repo.commit("main", &files(&["a", "b", "c"]), "three");
    let p = project(&ns, "");
    sync_once(&mut c, &src, &p, &settings(&inventory))
        .await
        .expect("first sync");

    // `c` leaves git while a transformer with failure_policy: ignore times out.
    repo.commit("main", &files(&["a", "b"]), "drop c");
    let mut slow = spec("hostile", json!({"act": "loop"}));
    slow.limits.timeout = Duration::from_millis(200);
    slow.failure_policy = FailurePolicy::Ignore;
    let skipped = sync_once(
        &mut c,
        &src,
        &p,
        &settings_with(&inventory, vec![load(&slow).expect("load")]),
    )
    .await
    .expect("sync with a skipped plugin");
    assert_eq!(skipped.prune_held.len(), 1, "{skipped:#?}");
    assert!(
        skipped.prune_held[0].starts_with("plugin hostile failed and was skipped"),
        "{:?}",
        skipped.prune_held
    );
    let c_result = skipped
        .results
        .iter()
        .find(|r| r.obj.name == "c")
        .expect("c reported");
    assert_eq!(c_result.action, sluice_engine::apply::Action::Retained);
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(client.clone(), &ns);
    assert!(
        cms.get_opt("c").await.expect("get").is_some(),
        "c not pruned"
    );
    assert!(
        inventory_keys(&client, &ns, &format!("inventory-{inventory}"))
            .await
            .contains(&format!("{ns}_c__ConfigMap")),
        "c stays recorded, so a later sync prunes it"
    );

    // A transformer that drops `b` (still in git): nothing is pruned either.
    let dropper = spec("hostile", json!({"act": "drop"}));
    let dropped = sync_once(
        &mut c,
        &src,
        &p,
        &settings_with(&inventory, vec![load(&dropper).expect("load")]),
    )
    .await
    .expect("sync with a dropping plugin");
    assert!(
        dropped
            .prune_held
            .iter()
            .any(|w| w.starts_with("the plugins removed 1 objects that are still in git")),
        "{dropped:#?}"
    );
    assert!(
        cms.get_opt("b").await.expect("get").is_some(),
        "b not pruned"
    );
    assert!(
        cms.get_opt("c").await.expect("get").is_some(),
        "c not pruned"
    );

    // Without plugins the sync prunes `c` at last.
    let clean = sync_once(&mut c, &src, &p, &settings(&inventory))
        .await
        .expect("clean sync");
    assert!(clean.prune_held.is_empty());
    assert!(cms.get_opt("c").await.expect("get").is_none(), "c pruned");
    assert!(cms.get_opt("b").await.expect("get").is_some());
}

#[tokio::test]
async fn a_project_is_held_to_its_limits_in_git_and_in_plugin_output_and_never_touches_the_agent() {
    let Fixture {
        client,
        ns,
        repo,
        src,
        cluster: mut c,
        cache: _cache,
    } = Fixture::new("limits").await;
    let other = cluster::namespace(&client, "limits-other").await;
    let limited = project(
        &ns,
        &format!("    reconcile_timeout: 60s\n    limits:\n      namespaces: [{ns}]\n"),
    );
    let inventory = format!("t-{ns}");
    let stray = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: stray\n  namespace: {other}\n"
    );
    let grab = "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata:\n  name: grab\nroleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: cluster-admin}\nsubjects: [{kind: ServiceAccount, name: default, namespace: default}]\n";
    repo.commit(
        "main",
        &[
            git::file("ok.yaml", configmap("ok", "1")),
            git::file("stray.yaml", stray),
            git::file("rbac/grab.yaml", format!("# who wants admin?\n{grab}")),
        ],
        "reach out",
    );
    let err = sync_once(&mut c, &src, &limited, &settings(&inventory))
        .await
        .expect_err("outside the limits");
    assert!(err.is_user_error());
    assert_eq!(
        err.to_string(),
        format!(
            "2 objects are outside what this project may create: ClusterRoleBinding/grab (rbac/grab.yaml:2): cluster-scoped, and the project is limited to namespaces {ns}; allow its kind in limits.allowed_kinds to create it; ConfigMap/{other}/stray (stray.yaml:1): namespace {other} is not in the project's limits.namespaces ({ns})"
        )
    );
    assert_eq!(err.problems().len(), 2);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    assert!(
        cms.get_opt("ok").await.expect("get").is_none(),
        "nothing applied"
    );
    assert!(
        cms.get_opt(&format!("inventory-{inventory}"))
            .await
            .expect("get")
            .is_none(),
        "not even the inventory"
    );

    // Within the limits, the commit applies; a transformer moving it out is refused, and
    // what the last good commit applied stays.
    repo.commit(
        "main",
        &[git::file("ok.yaml", configmap("ok", "1"))],
        "stay home",
    );
    sync_once(&mut c, &src, &limited, &settings(&inventory))
        .await
        .expect("within the limits");
    let mover = vec![load(&spec("set-namespace", json!({"namespace": other}))).expect("load")];
    let err = sync_once(&mut c, &src, &limited, &settings_with(&inventory, mover))
        .await
        .expect_err("the plugin's output is outside the limits");
    assert_eq!(
        err.to_string(),
        format!(
            "1 objects are outside what this project may create: ConfigMap/{other}/ok (ok.yaml:1): namespace {other} is not in the project's limits.namespaces ({ns})"
        )
    );
    assert!(
        cms.get_opt("ok").await.expect("get").is_some(),
        "nothing pruned"
    );
    let others: Api<ConfigMap> = Api::namespaced(client.clone(), &other);
    assert!(
        others.get_opt("ok").await.expect("get").is_none(),
        "nothing moved"
    );

    // No project, limited or not, may create the agent's own objects.
    let lease = "apiVersion: coordination.k8s.io/v1\nkind: Lease\nmetadata:\n  name: sluice-t-lock\nspec:\n  holderIdentity: intruder\n  leaseDurationSeconds: 3600\n";
    repo.commit(
        "main",
        &[
            git::file("ok.yaml", configmap("ok", "1")),
            git::file("lease.yaml", lease),
        ],
        "take the lease",
    );
    let guarded = sluice_agent::sync::Settings {
        protected: sluice_agent::limits::Protected {
            namespace: Some(ns.clone()),
            lease: Some("sluice-t-lock".into()),
            prefix: "sluice-t".into(),
        },
        ..settings(&inventory)
    };
    let err = sync_once(&mut c, &src, &project(&ns, ""), &guarded)
        .await
        .expect_err("the agent's own");
    assert_eq!(
        err.to_string(),
        format!(
            "1 objects are outside what this project may create: Lease/{ns}/sluice-t-lock (lease.yaml:1): it is the agent's own: no project may create or change it"
        )
    );
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(client, &ns);
    assert!(
        leases
            .get_opt("sluice-t-lock")
            .await
            .expect("get")
            .is_none()
    );
}

#[tokio::test]
async fn a_transformer_cannot_claim_another_projects_inventory() {
    let Fixture {
        client,
        ns,
        repo,
        src,
        cluster: mut c,
        cache: _cache,
    } = Fixture::new("inject").await;
    // Project A owns its inventory and one object.
    let a_id = format!("a-{ns}");
    let a = sluice_engine::inventory::InventoryRef::default_for(&a_id, &ns);
    let a_repo = git::shared().create_repo(&format!("group/{ns}-a"));
    a_repo.commit("main", &[git::file("a.yaml", configmap("a", "1"))], "a");
    let (a_src, _a_cache) = source(&a_repo, None);
    sync_once(&mut c, &a_src, &project(&ns, ""), &settings(&a_id))
        .await
        .expect("A syncs");
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let a_inventory = cms.get(&a.name).await.expect("A's inventory");

    // Project B's commit is harmless; its transformer labels B's ConfigMap with A's
    // inventory id, which would make it an inventory of A's id (audit C1, through a plugin).
    repo.commit("main", &[git::file("b.yaml", configmap("b", "1"))], "b");
    let labels = load(&spec(
        "set-labels",
        json!({"labels": {"cli-utils.sigs.k8s.io/inventory-id": a_id}}),
    ))
    .expect("load");
    let mut b_project = project(&ns, "");
    b_project.id = "test/other".into();
    let b_settings = sluice_agent::sync::Settings {
        others: vec![a.clone()],
        ..settings_with(&format!("b-{ns}"), vec![labels])
    };
    let err = sync_once(&mut c, &src, &b_project, &b_settings)
        .await
        .expect_err("refused");
    assert!(
        matches!(err, sluice_agent::sync::Error::InventoryClaimed(_)),
        "{err:?}"
    );
    assert!(err.to_string().contains(&format!("(id {a_id})")), "{err}");
    assert!(
        cms.get_opt("b").await.expect("get").is_none(),
        "B applied nothing"
    );
    assert_eq!(
        cms.get(&a.name)
            .await
            .expect("A's inventory")
            .metadata
            .resource_version,
        a_inventory.metadata.resource_version,
        "A's inventory untouched"
    );
    assert!(
        cms.get_opt("a").await.expect("get").is_some(),
        "A's object stays"
    );
}

/// A plugin granted files that have left the disk fails its call (fail closed: a policy
/// plugin finding no policies would pass everything), naming the directory.
#[test]
fn a_plugin_whose_granted_files_are_gone_fails() {
    let mut s = spec("no-latest-tag", Value::Null);
    s.granted = Some(sluice_wasm::Granted {
        dir: "/nonexistent/sluice-plugin-files".into(),
        sha256: "gone".into(),
    });
    let e = plugins::run(
        &[load(&s).expect("load")],
        &subject(),
        objects(&[deployment_value("nginx:1.27")]),
    )
    .expect_err("fails closed")
    .to_string();
    assert!(
        e.ends_with("its granted files are gone from /nonexistent/sluice-plugin-files"),
        "{e}"
    );
}
