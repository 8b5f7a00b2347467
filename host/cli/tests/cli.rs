//! The `sluice` binary's offline commands: output, exit codes and error text.

use std::process::{Command, Output};

fn sluice(args: &[&str], dir: &std::path::Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run sluice")
}

fn write(dir: &std::path::Path, path: &str, text: &str) {
    let p = dir.join(path);
    std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
    std::fs::write(p, text).expect("write");
}

#[test]
fn render_prints_objects_with_the_default_namespace_as_yaml_or_json() {
    let dir = tempfile::tempdir().expect("dir");
    write(
        dir.path(),
        "m/cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\n---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: n\n",
    );
    write(
        dir.path(),
        "m/.hidden/x.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: hidden\n",
    );
    write(
        dir.path(),
        "config.yaml",
        "gitops:\n  manifest_projects:\n  - id: local\n    default_namespace: apps\n",
    );
    let out = sluice(
        &["render", "m", "--config", "config.yaml", "-o", "json"],
        dir.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let items = list["items"].as_array().expect("items");
    assert_eq!(items.len(), 2, "the hidden directory is skipped");
    assert_eq!(items[0]["metadata"]["namespace"], "apps");
    assert!(
        items[1]["metadata"]["namespace"].is_null(),
        "cluster-scoped objects get no namespace"
    );
    let yaml = sluice(&["render", "m"], dir.path());
    assert!(String::from_utf8_lossy(&yaml.stdout).contains("namespace: default"));
}

#[test]
fn validate_exits_1_naming_file_and_line_on_bad_input() {
    let dir = tempfile::tempdir().expect("dir");
    write(
        dir.path(),
        "m/ok.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\n",
    );
    write(
        dir.path(),
        "m/bad.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: [x\n",
    );
    let out = sluice(&["validate", "m"], dir.path());
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("failed to decode manifest objects: bad.yaml:"),
        "{err}"
    );
}

#[test]
fn validate_exits_0_on_good_input_and_2_on_a_missing_directory() {
    let dir = tempfile::tempdir().expect("dir");
    write(
        dir.path(),
        "m/ok.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\n",
    );
    assert_eq!(
        sluice(&["validate", "m"], dir.path()).status.code(),
        Some(0)
    );
    assert_eq!(
        sluice(&["validate", "nope"], dir.path()).status.code(),
        Some(2)
    );
}

#[test]
fn plugin_inspect_rejects_what_is_not_a_component() {
    let dir = tempfile::tempdir().expect("dir");
    write(dir.path(), "x.wasm", "not wasm");
    let out = sluice(&["plugin", "inspect", "x.wasm"], dir.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("failed to compile"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
