//! The manifest corpus (`tests/corpus/`): every file applied with `kubectl apply
//! --server-side` into one namespace and with sluice into another must be stored the same
//! by the API server.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use sluice_testenv::cluster;
use sluice_testenv::git::file;

use crate::support::*;

fn kubectl(args: &[&str], dir: &Path, ns: &str) -> std::process::Output {
    let bin = cluster::build()
        .expect("control plane binaries")
        .join("kubectl");
    Command::new(bin)
        .arg("--kubeconfig")
        .arg(&cluster::shared().kubeconfig)
        .args(args)
        .arg("-n")
        .arg(ns)
        .arg("-f")
        .arg(dir)
        .output()
        .expect("run kubectl")
}

/// The corpus with `CORPUS` replaced by `unique`: (file name, text).
fn corpus(unique: &str) -> Vec<(String, String)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let mut files: Vec<(String, String)> = std::fs::read_dir(&dir)
        .expect("tests/corpus")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "json"))
        .map(|p| {
            let name = p.file_name().expect("name").to_string_lossy().into_owned();
            let text = std::fs::read_to_string(&p)
                .expect("read")
                .replace("CORPUS", unique);
            (name, text)
        })
        .collect();
    files.sort();
    files
}

/// What the server decides on its own (ids, times, allocated IPs and ports, status) and
/// the marks each tool leaves, removed so the rest compares.
fn normalize(mut v: Value) -> Value {
    if let Some(m) = v["metadata"].as_object_mut() {
        for k in [
            "uid",
            "resourceVersion",
            "creationTimestamp",
            "managedFields",
            "generation",
            "namespace",
        ] {
            m.remove(k);
        }
        if let Some(a) = m.get_mut("annotations").and_then(Value::as_object_mut) {
            a.remove("config.k8s.io/owning-inventory");
            a.remove("deployment.kubernetes.io/revision");
            if a.is_empty() {
                m.remove("annotations");
            }
        }
    }
    if let Some(o) = v.as_object_mut() {
        o.remove("status");
    }
    if let Some(spec) = v["spec"].as_object_mut() {
        spec.remove("clusterIP");
        spec.remove("clusterIPs");
        if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
            for p in ports {
                if let Some(p) = p.as_object_mut() {
                    p.remove("nodePort");
                }
            }
        }
    }
    v
}

fn items(out: &std::process::Output) -> Vec<Value> {
    assert!(
        out.status.success(),
        "kubectl get failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: Value = serde_json::from_slice(&out.stdout).expect("kubectl prints JSON");
    list["items"]
        .as_array()
        .expect("a List")
        .iter()
        .cloned()
        .map(normalize)
        .collect()
}

#[tokio::test]
async fn the_corpus_is_stored_as_kubectl_apply_server_side_stores_it() {
    let Fixture {
        client,
        ns,
        repo,
        src,
        cluster: mut c,
        cache: _cache,
    } = Fixture::new("corpus").await;
    let kubectl_ns = cluster::namespace(&client, "corpus-kubectl").await;
    let files = corpus(&ns);
    let dir = tempfile::tempdir().expect("dir");
    for (name, text) in &files {
        std::fs::write(dir.path().join(name), text).expect("write");
    }

    // kubectl: a CR fails until its CRD is established, so apply until everything is in
    // (as a person running kubectl would), at most a few times.
    eventually(
        "kubectl apply --server-side of the corpus",
        Duration::from_secs(60),
        || {
            let out = kubectl(
                &["apply", "--server-side", "--field-manager", "corpus"],
                dir.path(),
                &kubectl_ns,
            );
            async move { out.status.success().then_some(()) }
        },
    )
    .await;
    let by_kubectl = items(&kubectl(&["get", "-o", "json"], dir.path(), &kubectl_ns));

    // sluice, the same files from git; cluster-scoped objects kubectl created are taken
    // over (adopt_all), so what the server stores after sluice's apply is compared.
    repo.commit(
        "main",
        &files
            .iter()
            .map(|(n, t)| file(n, t.clone()))
            .collect::<Vec<_>>(),
        "corpus",
    );
    let report = sync_once(
        &mut c,
        &src,
        &project(
            &ns,
            "    inventory_policy: adopt_all\n    reconcile_timeout: 60s\n",
        ),
        &settings(&format!("t-{ns}")),
    )
    .await
    .expect("sluice applies everything kubectl applies");
    let by_sluice = items(&kubectl(&["get", "-o", "json"], dir.path(), &ns));

    assert_eq!(by_kubectl.len(), 15, "every object of the corpus");
    assert_eq!(report.results.len(), by_kubectl.len());
    let mut differences = Vec::new();
    for (k, s) in by_kubectl.iter().zip(&by_sluice) {
        // The one deliberate difference: kubectl reads the *key* `n` as the boolean false
        // (YAML 1.1) and stores `false`; a key is always a string, so sluice keeps `n`
        // (docs/configuration.md).
        if k["metadata"]["name"]
            .as_str()
            .is_some_and(|n| n.starts_with("listed-"))
        {
            assert_eq!(
                k["data"].as_object().map(|d| d.contains_key("false")),
                Some(true)
            );
            assert_eq!(
                s["data"].as_object().map(|d| d.contains_key("n")),
                Some(true)
            );
            continue;
        }
        if k != s {
            differences.push(format!(
                "{}/{}:\n  kubectl: {k}\n  sluice:  {s}",
                k["kind"], k["metadata"]["name"]
            ));
        }
    }
    assert!(differences.is_empty(), "{}", differences.join("\n"));
    // The values the issue is about, spelled out.
    let volumes = by_sluice
        .iter()
        .find(|o| o["kind"] == "Deployment")
        .expect("deployment");
    assert_eq!(
        volumes["spec"]["template"]["spec"]["volumes"][0]["secret"]["defaultMode"],
        420
    );
    assert_eq!(volumes["spec"]["replicas"], 1);
}
