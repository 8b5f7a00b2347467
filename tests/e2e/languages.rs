//! Plugins written in other languages than Rust (Python, JavaScript, C, and Go as a KRM
//! function; `examples/plugins/<language>/`), built with their own toolchains
//! (`examples/plugins/build.sh`) and run by the host with no capability granted: `sluice validate` and `sluice render` from the command line, and a
//! sync into the real cluster.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::Api;
use serde_json::{Value, json};
use sluice_testenv::{git, wasm};
use sluice_wasm::{FailurePolicy, Limits, Mode, Runtime, Spec};

use crate::support::*;

const LANGUAGES: &[&str] = &["python", "javascript", "c"];

fn deployment_with(image: &str) -> String {
    deployment("web", 1).replace("image: nginx:1.27", &format!("image: {image}"))
}

/// A directory with `m/web.yaml` and a config running `<language>`'s set-labels, then its
/// no-latest-tag.
fn workspace(language: &str, image: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("dir");
    std::fs::create_dir_all(dir.path().join("m")).expect("mkdir");
    std::fs::write(dir.path().join("m/web.yaml"), deployment_with(image)).expect("write");
    std::fs::write(
        dir.path().join("config.yaml"),
        format!(
            "plugins:\n- name: labels\n  module: {}\n  config: {{labels: {{team: {language}}}}}\n- name: no-latest-tag\n  module: {}\ngitops:\n  manifest_projects:\n  - id: local\n    default_namespace: demo\n",
            wasm::example_plugin(&format!("{language}_set_labels")).display(),
            wasm::example_plugin(&format!("{language}_no_latest_tag")).display(),
        ),
    )
    .expect("write");
    dir
}

fn sluice(dir: &Path, args: &[&str]) -> Output {
    Command::new(wasm::sluice_binary())
        .args(args)
        .current_dir(dir)
        // A fresh compilation cache per test: the first command compiles, the next loads.
        .env("XDG_CACHE_HOME", dir.join("cache"))
        .output()
        .expect("run sluice")
}

#[test]
fn python_javascript_and_c_plugins_run_without_capabilities_and_deterministically() {
    for language in LANGUAGES {
        let bad = workspace(language, "nginx:latest");
        let out = sluice(bad.path(), &["validate", "m", "--config", "config.yaml"]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{language}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            stdout.trim(),
            "web.yaml:1: error: image nginx:latest uses the latest tag; pin a version or a digest at spec.template.spec.containers[0].image (no-latest-tag, Deployment/demo/web)",
            "{language}"
        );

        let good = workspace(language, "nginx:1.27");
        let render = || {
            sluice(
                good.path(),
                &["render", "m", "--config", "config.yaml", "-o", "json"],
            )
        };
        let first = render();
        assert!(
            first.status.success(),
            "{language}: {}",
            String::from_utf8_lossy(&first.stderr)
        );
        let list: Value = serde_json::from_slice(&first.stdout).expect("JSON");
        assert_eq!(
            list["items"][0]["metadata"]["labels"],
            json!({"team": language}),
            "{language}"
        );
        // Same input, same output (the runtimes' random seeds and clocks are fixed).
        assert_eq!(render().stdout, first.stdout, "{language}");

        // A configuration the plugin rejects fails at load, with the plugin's own message.
        let config = std::fs::read_to_string(good.path().join("config.yaml")).expect("read");
        std::fs::write(
            good.path().join("bad.yaml"),
            config.replace(&format!("{{labels: {{team: {language}}}}}"), "{labels: 5}"),
        )
        .expect("write");
        let out = sluice(good.path(), &["render", "m", "--config", "bad.yaml"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{language}: {stderr}");
        assert!(
            stderr.contains(r#"set-labels needs {"labels": {"name": "value", ...}}"#),
            "{language}: {stderr}"
        );

        // The compilation cache: `plugin inspect` says where the module came from.
        let module = wasm::example_plugin(&format!("{language}_no_latest_tag"));
        let inspect = |dir: &Path| -> Value {
            let out = sluice(
                dir,
                &[
                    "plugin",
                    "inspect",
                    &module.display().to_string(),
                    "-o",
                    "json",
                ],
            );
            serde_json::from_slice(&out.stdout).expect("inspect JSON")
        };
        assert_eq!(
            inspect(good.path())["cache"],
            "hit",
            "{language}: render cached it"
        );
        let fresh = tempfile::tempdir().expect("dir");
        assert_eq!(inspect(fresh.path())["cache"], "miss", "{language}");
        assert_eq!(inspect(fresh.path())["cache"], "hit", "{language}");
    }
}

#[test]
fn every_validator_runs_and_a_refusal_lists_all_their_findings() {
    let dir = workspace("python", "nginx:latest");
    // Both languages' validators, both in enforce mode.
    let config = std::fs::read_to_string(dir.path().join("config.yaml")).expect("read");
    let config = config.replace(
        "gitops:",
        &format!(
            "- name: no-latest-tag-js\n  module: {}\ngitops:",
            wasm::example_plugin("javascript_no_latest_tag").display()
        ),
    );
    std::fs::write(dir.path().join("config.yaml"), config).expect("write");
    let out = sluice(dir.path(), &["validate", "m", "--config", "config.yaml"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let plugins: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.rsplit_once(" (")?.1.split(',').next())
        .collect();
    assert_eq!(plugins, ["no-latest-tag", "no-latest-tag-js"], "{stdout}");
}

#[tokio::test]
async fn a_python_transformer_and_a_javascript_validator_sync_a_commit() {
    let Fixture {
        client,
        ns,
        repo,
        src,
        cluster: mut c,
        cache: _cache,
    } = Fixture::new("lang").await;
    repo.commit(
        "main",
        &[git::file("web.yaml", deployment_with("nginx:1.27"))],
        "web",
    );
    let runtime = Runtime::new(None).expect("runtime");
    let load = |name: &str, module: &str, config: Value| {
        let spec = Spec {
            name: name.into(),
            module: module.into(),
            sha256: None,
            config,
            limits: Limits::default(),
            capabilities: Vec::new(),
            failure_policy: FailurePolicy::Fail,
            mode: Mode::Enforce,
            ..Spec::default()
        };
        let bytes = std::fs::read(wasm::example_plugin(module)).expect("built");
        Arc::new(
            runtime
                .load(&spec, &bytes)
                .expect("loads without capabilities"),
        )
    };
    let plugins = vec![
        load(
            "labels",
            "python_set_labels",
            json!({"labels": {"team": "py"}}),
        ),
        load("no-latest-tag", "javascript_no_latest_tag", Value::Null),
    ];
    let settings = sluice_agent::sync::Settings {
        plugins: Ok(plugins),
        ..settings(&format!("t-{ns}"))
    };
    sync_once(
        &mut c,
        &src,
        &project(&ns, "    reconcile_timeout: 60s\n"),
        &settings,
    )
    .await
    .expect("sync");
    let web = Api::<Deployment>::namespaced(client, &ns)
        .get("web")
        .await
        .expect("applied");
    assert_eq!(
        web.metadata
            .labels
            .unwrap_or_default()
            .get("team")
            .map(String::as_str),
        Some("py")
    );
}

/// A KRM function written in Go against kyaml's `fn/framework`, compiled with the standard
/// toolchain (`GOOS=wasip1 GOARCH=wasm`), runs unchanged as a plugin: its `results` are
/// findings, its `items` what is applied, with no capability granted.
#[test]
fn a_go_krm_function_runs_as_a_plugin() {
    let module = wasm::example_plugin("go_no_latest_tag");
    let dir = tempfile::tempdir().expect("dir");
    std::fs::create_dir_all(dir.path().join("m")).expect("mkdir");
    let config = format!(
        "plugins:\n- name: no-latest-tag\n  module: {}\n  limits: {{timeout: 30s}}\ngitops:\n  manifest_projects:\n  - id: local\n    default_namespace: demo\n",
        module.display()
    );
    std::fs::write(dir.path().join("config.yaml"), config).expect("write");

    std::fs::write(
        dir.path().join("m/web.yaml"),
        deployment_with("nginx:latest"),
    )
    .expect("write");
    let out = sluice(dir.path(), &["validate", "m", "--config", "config.yaml"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.trim(),
        "web.yaml:1: error: image nginx:latest uses the latest tag; pin a version or a digest at spec.template.spec.containers[0].image (no-latest-tag, Deployment/demo/web)"
    );

    // A passing commit comes back as it went in: no annotation of the round trip is left.
    std::fs::write(dir.path().join("m/web.yaml"), deployment_with("nginx:1.27")).expect("write");
    let with = sluice(
        dir.path(),
        &["render", "m", "--config", "config.yaml", "-o", "json"],
    );
    assert!(
        with.status.success(),
        "{}",
        String::from_utf8_lossy(&with.stderr)
    );
    std::fs::write(
        dir.path().join("plain.yaml"),
        "gitops:\n  manifest_projects:\n  - id: local\n    default_namespace: demo\n",
    )
    .expect("write");
    let without = sluice(
        dir.path(),
        &["render", "m", "--config", "plain.yaml", "-o", "json"],
    );
    let parse = |o: &Output| -> Value { serde_json::from_slice(&o.stdout).expect("JSON") };
    assert_eq!(parse(&with), parse(&without));

    let inspect = sluice(
        dir.path(),
        &[
            "plugin",
            "inspect",
            &module.display().to_string(),
            "-o",
            "json",
        ],
    );
    let info: Value = serde_json::from_slice(&inspect.stdout).expect("inspect JSON");
    assert_eq!(info["world"], "function");
}

/// `sluice plugin new NAME --lang L` writes, in every language, a project whose `build.sh`
/// builds (with the pinned toolchains examples/plugins/build.sh uses) and whose
/// `plugin-test.yaml` passes under `sluice plugin test`; a fixture changed under it fails
/// the run with exit 1, naming the file, the case and the unexpected finding.
#[test]
fn plugin_new_writes_projects_that_build_and_pass_their_own_test() {
    // The toolchains are installed (and cached) by the examples' build.
    wasm::example_plugin("python_no_latest_tag");
    let root = tempfile::tempdir().expect("dir");
    let run = |dir: &Path, program: &Path, args: &[&str]| -> Output {
        Command::new(program)
            .args(args)
            .current_dir(dir)
            .output()
            .expect("run")
    };
    let sluice = wasm::sluice_binary();
    for lang in ["rust", "python", "javascript", "c", "go"] {
        let name = format!("team-{lang}");
        let out = run(
            root.path(),
            &sluice,
            &["plugin", "new", &name, "--lang", lang],
        );
        assert!(out.status.success(), "{lang}: {out:?}");
        let dir = root.path().join(&name);
        let out = run(&dir, &dir.join("build.sh"), &[]);
        assert!(
            out.status.success(),
            "{lang}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = run(&dir, &sluice, &["plugin", "test", "plugin-test.yaml"]);
        assert_eq!(
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).trim()
            ),
            (Some(0), "ok in 1 files: 2 passed, 0 failed, 0 skipped"),
            "{lang}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // A fixture that no longer holds: the case fails, and says why.
    let dir = root.path().join("team-python");
    let pinned = dir.join("fixtures/pinned.yaml");
    let text = std::fs::read_to_string(&pinned).expect("read");
    std::fs::write(&pinned, text.replace("nginx:1.27", "nginx:latest")).expect("write");
    let out = run(&dir, &sluice, &["plugin", "test", "plugin-test.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "FAIL plugin-test.yaml team-python/pinned images pass: unexpected findings: \
         [error] image nginx:latest uses the latest tag; pin a version or a digest\n\
         FAIL in 1 files: 1 passed, 1 failed, 0 skipped"
    );
    // A transformer's output compared with the expected manifests.
    let dir = root.path().join("output");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::copy(
        wasm::example_plugin("python_set_labels"),
        dir.join("labels.wasm"),
    )
    .expect("copy");
    let cm = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\ndata: {k: v}\n";
    std::fs::write(dir.join("in.yaml"), cm).expect("write");
    std::fs::write(
        dir.join("labelled.yaml"),
        cm.replace("  name: a\n", "  name: a\n  labels: {team: web}\n"),
    )
    .expect("write");
    std::fs::write(
        dir.join("t.yaml"),
        "apiVersion: sluice.dev/v1alpha1\nkind: PluginTest\nmetadata: {name: labels}\n\
         plugins:\n- name: labels\n  module: labels.wasm\n  config: {labels: {team: web}}\n\
         cases:\n- name: labelled\n  objects: in.yaml\n  output: labelled.yaml\n\
         - name: unchanged\n  objects: in.yaml\n  output: in.yaml\n",
    )
    .expect("write");
    let out = run(&dir, &sluice, &["plugin", "test", "t.yaml"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.starts_with("FAIL t.yaml labels/unchanged: the output differs from in.yaml:\n--- in.yaml\n+++ output\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("+      \"labels\": {\n+        \"team\": \"web\""),
        "{stdout}"
    );
    assert!(
        stdout.ends_with("FAIL in 1 files: 1 passed, 1 failed, 0 skipped\n"),
        "{stdout}"
    );

    // A name that cannot be a module, and a directory already in use, are refused.
    let out = run(
        root.path(),
        &sluice,
        &["plugin", "new", "Team", "--lang", "c"],
    );
    assert_eq!(out.status.code(), Some(1));
    let out = run(
        root.path(),
        &sluice,
        &["plugin", "new", "team-python", "--lang", "c"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not empty"),
        "{out:?}"
    );
}
