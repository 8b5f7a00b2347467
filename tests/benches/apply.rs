//! sluice versus `kubectl apply --server-side`, on the same API server, in one run.
//!
//! `cargo bench -p sluice-testenv --bench apply` starts the test control plane, writes N
//! Deployments + N ConfigMaps, and times, for each tool, a first apply (everything created)
//! and a second apply of the same manifests (nothing changes). sluice's time is a whole sync:
//! fetch, select, decode, discovery, server-side dry-run of the set, apply, inventory, and the
//! health wait; kubectl's is `kubectl apply --server-side -f DIR` alone, with no wait.
//!
//! Requests are counted from the API server's audit log, per client (`User-Agent`: kubectl's
//! own, and `sluice-bench` for sluice's client): all of them, and the writes among them
//! (create, update, patch, delete; dry runs excluded).

use std::time::{Duration, Instant};

use sluice_testenv::cluster::Request;
use sluice_testenv::{cluster, git};

/// Requests since `mark` by clients whose User-Agent starts with `agent`: (all, writes).
fn count(mark: u64, agent: &str) -> (usize, usize) {
    let requests: Vec<Request> = cluster::shared()
        .requests_since(mark)
        .into_iter()
        .filter(|r| r.user_agent.starts_with(agent))
        .collect();
    (
        requests.len(),
        requests.iter().filter(|r| r.is_write()).count(),
    )
}

const N: usize = 200;

fn manifests() -> Vec<(String, String)> {
    (0..N)
        .flat_map(|i| {
            [
                (format!("apps/web-{i}.yaml"), format!(
                    "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web-{i}\nspec:\n  replicas: 1\n  selector:\n    matchLabels: {{app: web-{i}}}\n  template:\n    metadata:\n      labels: {{app: web-{i}}}\n    spec:\n      containers:\n      - name: web\n        image: nginx:1.27\n"
                )),
                (format!("config/cfg-{i}.yaml"), format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cfg-{i}\ndata:\n  value: \"{i}\"\n")),
            ]
        })
        .collect()
}

fn kubectl_apply(
    kubectl: &std::path::Path,
    kubeconfig: &std::path::Path,
    dir: &std::path::Path,
    ns: &str,
) -> Duration {
    let t = Instant::now();
    let out = std::process::Command::new(kubectl)
        .args([
            "apply",
            "--server-side",
            "--force-conflicts",
            "-R",
            "-n",
            ns,
            "-f",
        ])
        .arg(dir)
        .env("KUBECONFIG", kubeconfig)
        .output()
        .expect("run kubectl");
    assert!(
        out.status.success(),
        "kubectl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    t.elapsed()
}

#[tokio::main]
async fn main() {
    let client = cluster::client().await;
    let kubeconfig = cluster::shared().kubeconfig.clone();
    let kubectl = cluster::build()
        .expect("control plane binaries")
        .join("kubectl");
    let files = manifests();

    // kubectl: the same files in a directory.
    let dir = tempfile::tempdir().expect("dir");
    for (path, text) in &files {
        let p = dir.path().join(path);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, text).expect("write");
    }
    let kns = cluster::namespace(&client, "bench-kubectl").await;
    let cp = cluster::shared();
    let mark = cp.audit_mark();
    let k1 = kubectl_apply(&kubectl, &kubeconfig, dir.path(), &kns);
    let k1_requests = count(mark, "kubectl/");
    let mark = cp.audit_mark();
    // sluice waits for health; so does this, to compare like with like.
    let t = Instant::now();
    let out = std::process::Command::new(&kubectl)
        .args([
            "wait",
            "--for=condition=Available",
            "--timeout=600s",
            "deployment",
            "--all",
            "-n",
            &kns,
        ])
        .env("KUBECONFIG", &kubeconfig)
        .output()
        .expect("run kubectl wait");
    assert!(
        out.status.success(),
        "kubectl wait failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let kwait = t.elapsed();
    let kwait_requests = count(mark, "kubectl/");
    let mark = cp.audit_mark();
    let k2 = kubectl_apply(&kubectl, &kubeconfig, dir.path(), &kns);
    let k2_requests = count(mark, "kubectl/");

    // sluice: the same files in a git repository, one sync each.
    let sns = cluster::namespace(&client, "bench-sluice").await;
    let repo = git::shared().create_repo(&format!("bench/{sns}"));
    let entries: Vec<git::Entry> = files.iter().map(|(p, t)| git::file(p, t)).collect();
    repo.commit("main", &entries, "bench");
    let cache = tempfile::tempdir().expect("cache");
    let source = sluice::source::Source::new(repo.http_url(), cache.path(), None);
    let yaml = format!(
        "gitops:\n  manifest_projects:\n  - id: bench\n    default_namespace: {sns}\n    reconcile_timeout: 300s\n"
    );
    let project = sluice::config::parse(&yaml, "bench")
        .expect("config")
        .manifest_projects
        .remove(0);
    let settings = sluice::sync::Settings {
        inventory_id: format!("bench-{sns}"),
        field_manager: "sluice".into(),
        cleanup_managers: Vec::new(),
        concurrency: 8,
        limits: Default::default(),
        allow_empty_prune: false,
        agent: "bench".into(),
        plugins: Ok(Vec::new()),
        others: Vec::new(),
        takeover: sluice::sync::Takeover::Off,
    };
    let mut c = sluice::cluster::Cluster::connect(cluster::client_as("sluice-bench").await)
        .await
        .expect("discovery");
    let commit = {
        let s = source.clone();
        tokio::task::spawn_blocking(move || s.resolve(&sluice::config::GitRef::DefaultBranch))
            .await
            .expect("task")
            .expect("resolve")
    };
    let mark = cp.audit_mark();
    let t = Instant::now();
    sluice::sync::sync(&mut c, &source, &project, &commit, &settings)
        .await
        .expect("first sync");
    let s1 = t.elapsed();
    let s1_requests = count(mark, "sluice-bench");
    let mark = cp.audit_mark();
    let t = Instant::now();
    let report = sluice::sync::sync(&mut c, &source, &project, &commit, &settings)
        .await
        .expect("second sync");
    let s2 = t.elapsed();
    let s2_requests = count(mark, "sluice-bench");
    assert!(
        report
            .results
            .iter()
            .all(|r| r.action == sluice::apply::Action::Unchanged)
    );

    // Discovery: sluice probes every group-version, then runs kube's discovery without the
    // groups that failed (2V+4 requests for V group-versions); kubectl uses aggregated
    // discovery (cache disabled here so both start cold).
    let groups = client.list_api_groups().await.expect("groups");
    let versions: usize = groups.groups.iter().map(|g| g.versions.len()).sum();
    let mut sluice_discovery = Vec::new();
    let mut kubectl_discovery = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        sluice::cluster::Cluster::connect(client.clone())
            .await
            .expect("discovery");
        sluice_discovery.push(t.elapsed());
        let cache = tempfile::tempdir().expect("cache");
        let t = Instant::now();
        let out = std::process::Command::new(&kubectl)
            .args(["api-resources", "--cache-dir"])
            .arg(cache.path())
            .env("KUBECONFIG", &kubeconfig)
            .output()
            .expect("kubectl api-resources");
        assert!(out.status.success());
        kubectl_discovery.push(t.elapsed());
    }
    sluice_discovery.sort();
    kubectl_discovery.sort();
    println!(
        "| discovery, cold (median of 5; {} groups, {} group-versions, core included) | {:.0} ms (`kubectl api-resources`, aggregated discovery) | {:.0} ms ({} requests: probe each group-version, then discover the answering ones) |",
        groups.groups.len() + 1,
        versions + 1,
        kubectl_discovery[2].as_secs_f64() * 1000.0,
        sluice_discovery[2].as_secs_f64() * 1000.0,
        2 * (versions + 1) + 2
    );
    println!();
    println!(
        "| {} objects ({N} Deployments + {N} ConfigMaps) | kubectl apply --server-side | sluice sync |",
        2 * N
    );
    println!("|---|---|---|");
    println!(
        "| first apply (all created), until every Deployment is Available | {:.2} s apply + {:.2} s `kubectl wait` = {:.2} s | {:.2} s (fetch, dry-run of the set, apply, inventory, health wait) |",
        k1.as_secs_f64(),
        kwait.as_secs_f64(),
        (k1 + kwait).as_secs_f64(),
        s1.as_secs_f64()
    );
    println!(
        "| requests (writes), first apply | {} ({}) apply + {} ({}) wait = {} | {} ({}) |",
        k1_requests.0,
        k1_requests.1,
        kwait_requests.0,
        kwait_requests.1,
        k1_requests.0 + kwait_requests.0,
        s1_requests.0,
        s1_requests.1
    );
    println!(
        "| second apply (nothing changed) | {:.2} s | {:.2} s (dry-run only, nothing written) |",
        k2.as_secs_f64(),
        s2.as_secs_f64()
    );
    println!(
        "| requests (writes), second apply | {} ({}) | {} ({}) |",
        k2_requests.0, k2_requests.1, s2_requests.0, s2_requests.1
    );
}
