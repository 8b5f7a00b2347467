//! `sluice diff` against the real cluster: kubectl's exit codes, and a diff that shows only
//! what git controls.

use std::process::{Command, Output};

use sluice_testenv::{cluster, wasm};

use crate::support::*;

fn sluice_diff(dir: &std::path::Path, inventory_id: &str) -> Output {
    Command::new(wasm::sluice_binary())
        .args([
            "diff",
            "m",
            "--config",
            "config.yaml",
            "--inventory-id",
            inventory_id,
        ])
        .current_dir(dir)
        .env("KUBECONFIG", &cluster::shared().kubeconfig)
        .output()
        .expect("run sluice diff")
}

#[tokio::test]
async fn diff_shows_what_a_sync_would_change_and_nothing_after_it() {
    let Fixture {
        ns,
        repo,
        src,
        cluster: mut c,
        cache: _cache,
        ..
    } = Fixture::new("diff").await;
    let dir = tempfile::tempdir().expect("dir");
    std::fs::create_dir_all(dir.path().join("m")).expect("mkdir");
    std::fs::write(dir.path().join("m/cm.yaml"), configmap("a", "one")).expect("write");
    std::fs::write(
        dir.path().join("config.yaml"),
        format!("gitops:\n  manifest_projects:\n  - id: local\n    default_namespace: {ns}\n"),
    )
    .expect("write");
    let id = format!("t-{ns}");

    let out = sluice_diff(dir.path(), &id);
    assert_eq!(
        out.status.code(),
        Some(1),
        "changes: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("+++ git/ConfigMap/{ns}/a (cm.yaml:1)")),
        "{text}"
    );
    assert!(text.contains("+  value: one"), "{text}");

    // Apply the same manifest with sluice, then nothing is left to change.
    repo.commit(
        "main",
        &[sluice_testenv::git::file("cm.yaml", configmap("a", "one"))],
        "one",
    );
    sync_once(&mut c, &src, &project(&ns, ""), &settings(&id))
        .await
        .expect("sync");
    let out = sluice_diff(dir.path(), &id);
    assert_eq!(
        out.status.code(),
        Some(0),
        "no change: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    std::fs::write(dir.path().join("m/cm.yaml"), configmap("a", "two")).expect("write");
    let out = sluice_diff(dir.path(), &id);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("-  value: one") && text.contains("+  value: two"),
        "{text}"
    );
    assert!(
        !text.contains("resourceVersion") && !text.contains("managedFields"),
        "server fields stay out: {text}"
    );
}

#[tokio::test]
async fn diff_never_prints_secret_values() {
    let Fixture {
        ns,
        repo,
        src,
        cluster: mut c,
        cache: _cache,
        ..
    } = Fixture::new("diffsecret").await;
    let secret = |token: &str| {
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: s\nstringData:\n  token: {token}\n  same: unchanged-value\n"
        )
    };
    repo.commit(
        "main",
        &[sluice_testenv::git::file(
            "s.yaml",
            secret("first-secret-value"),
        )],
        "secret",
    );
    let id = format!("t-{ns}");
    sync_once(&mut c, &src, &project(&ns, ""), &settings(&id))
        .await
        .expect("sync");
    let dir = tempfile::tempdir().expect("dir");
    std::fs::create_dir_all(dir.path().join("m")).expect("mkdir");
    std::fs::write(dir.path().join("m/s.yaml"), secret("second-secret-value")).expect("write");
    std::fs::write(
        dir.path().join("config.yaml"),
        format!("gitops:\n  manifest_projects:\n  - id: local\n    default_namespace: {ns}\n"),
    )
    .expect("write");
    let out = sluice_diff(dir.path(), &id);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("-  token: \"*** (old value)\"")
            && text.contains("+  token: \"*** (new value)\""),
        "{text}"
    );
    assert!(text.contains("same: \"*** (unchanged)\""), "{text}");
    assert!(!text.contains("annotations: null"), "{text}");
    for value in [
        "first-secret-value",
        "second-secret-value",
        "unchanged-value",
    ] {
        assert!(!text.contains(value), "{value} printed: {text}");
    }
    use base64::Engine;
    for value in ["first-secret-value", "unchanged-value"] {
        let b64 = base64::engine::general_purpose::STANDARD.encode(value);
        assert!(!text.contains(&b64), "{value} printed as base64: {text}");
    }
}
