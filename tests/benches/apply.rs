//! sluice versus `kubectl apply --server-side` and agentk's engine (cli-utils' `kapply`), on
//! the same API server, in one run.
//!
//! `cargo bench -p sluice-testenv --bench apply` starts the test control plane, writes N
//! Deployments + N ConfigMaps (N = `SLUICE_BENCH_N`, default 200), and times, for each tool,
//! a first apply (everything created, until every Deployment is Available) and a second
//! apply of the same manifests (nothing changes). sluice's time is a whole sync: fetch,
//! select, decode, discovery, server-side dry-run of the set, apply, inventory, and the
//! health wait; kubectl's is `kubectl apply --server-side` then `kubectl wait`; kapply's is
//! `kapply apply --server-side --reconcile-timeout` (its own inventory and status watcher).
//!
//! Then the agent (`sluice::agent::run`) on the same files: requests while it idles for 60 s
//! after its first sync (the no-op resync: drift watches instead of re-applying), and the
//! time from a push webhook to the change of one object in the cluster.
//!
//! Requests are counted from the API server's audit log, per client (`User-Agent`:
//! kubectl's, kapply's, `sluice-bench` and `sluice-agent-bench` for sluice's clients): all
//! of them, and the writes among them (create, update, patch, delete; dry runs excluded).

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

fn n() -> usize {
    std::env::var("SLUICE_BENCH_N")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(200)
}

fn manifests() -> Vec<(String, String)> {
    (0..n())
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
        known: Default::default(),
        render_cache: None,
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

    // kapply, cli-utils' reference CLI: agentk's applier, inventory and status watcher.
    let kapply_ns = cluster::namespace(&client, "bench-kapply").await;
    let kdir = tempfile::tempdir().expect("dir");
    std::fs::write(
        kdir.path().join("inventory-template.yaml"),
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: inventory-bench\n  namespace: {kapply_ns}\n  labels:\n    cli-utils.sigs.k8s.io/inventory-id: bench\n"
        ),
    )
    .expect("inventory template");
    for (path, text) in &files {
        // kapply reads one flat directory; it has no default namespace flag.
        let text = text.replacen(
            "metadata:\n",
            &format!("metadata:\n  namespace: {kapply_ns}\n"),
            1,
        );
        std::fs::write(kdir.path().join(path.replace('/', "-")), text).expect("write");
    }
    let kapply = |dir: &std::path::Path| {
        let t = Instant::now();
        let out = std::process::Command::new(cluster::kapply())
            .arg("apply")
            .arg(dir)
            .args([
                "--server-side",
                "--reconcile-timeout",
                "600s",
                "--inventory-policy",
                "strict",
                "--output",
                "events",
            ])
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .output()
            .expect("run kapply");
        assert!(
            out.status.success(),
            "kapply failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        t.elapsed()
    };
    let mark = cp.audit_mark();
    let a1 = kapply(kdir.path());
    let a1_requests = count(mark, "kapply/");
    let mark = cp.audit_mark();
    let a2 = kapply(kdir.path());
    let a2_requests = count(mark, "kapply/");

    // The agent on the same files: idle cost after its first sync, then push to applied.
    let (idle_requests, push_latency, push_requests) = agent_phase(&files).await;
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
    let n = n();
    println!(
        "| {} objects ({n} Deployments + {n} ConfigMaps) | kubectl apply --server-side | sluice sync |",
        2 * n
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
    println!();
    println!(
        "| agentk's engine, kapply (cli-utils {}) | |",
        cli_utils_version()
    );
    println!("|---|---|");
    println!(
        "| first apply until reconciled | {:.2} s, {} requests ({} writes) |",
        a1.as_secs_f64(),
        a1_requests.0,
        a1_requests.1
    );
    println!(
        "| second apply (nothing changed) | {:.2} s, {} requests ({} writes) |",
        a2.as_secs_f64(),
        a2_requests.0,
        a2_requests.1
    );
    println!();
    println!("| the agent (`sluice run`) | |");
    println!("|---|---|");
    println!(
        "| idle 60 s after the first sync (no-op: watches, no re-apply) | {} requests ({} writes) |",
        idle_requests.0, idle_requests.1
    );
    println!(
        "| push webhook to one changed ConfigMap in the cluster | {:.0} ms, {} requests ({} writes) for that sync |",
        push_latency.as_secs_f64() * 1000.0,
        push_requests.0,
        push_requests.1
    );
}

fn cli_utils_version() -> String {
    let env = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("cluster/versions.env"),
    )
    .unwrap_or_default();
    env.lines()
        .find_map(|l| l.strip_prefix("CLI_UTILS_VERSION="))
        .unwrap_or("?")
        .trim_matches('"')
        .to_string()
}

/// Runs the agent over `files` in a new repository and namespace: requests while it idles
/// 60 s after its first sync, then the time from a push webhook to one changed ConfigMap,
/// and the requests of that sync.
async fn agent_phase(files: &[(String, String)]) -> ((usize, usize), Duration, (usize, usize)) {
    let client = cluster::client().await;
    let cp = cluster::shared();
    let ns = cluster::namespace(&client, "bench-agent").await;
    let repo = git::shared().create_repo(&format!("bench/{ns}"));
    let entries: Vec<git::Entry> = files.iter().map(|(p, t)| git::file(p, t)).collect();
    repo.commit("main", &entries, "bench");
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "gitops:\n  manifest_projects:\n  - id: {}\n    default_namespace: {ns}\n    reconcile_timeout: 600s\n",
            repo.http_url()
        ),
    )
    .expect("config");
    let metrics = std::sync::Arc::new(sluice::observability::Metrics::default());
    let opts = sluice::agent::Options {
        agent_name: "bench".into(),
        git_base_url: git::shared().base_url().into(),
        config_project: String::new(),
        credentials: Default::default(),
        poll_interval: Duration::from_secs(3600),
        reapply_interval: Duration::from_secs(3600),
        cache_dir: dir.path().join("cache"),
        field_manager: "sluice".into(),
        concurrency: 8,
        inventory_ids: Default::default(),
        takeover: sluice::sync::Takeover::Off,
        cleanup_managers: Vec::new(),
        allow_empty_prune: false,
        git_ca: None,
        plugin_cache_dir: None,
        limits: Default::default(),
        metrics: metrics.clone(),
        triggers: Default::default(),
    };
    let receiver = std::sync::Arc::new(sluice::webhook::Receiver::new(
        "bench-secret".to_string().into(),
        opts.triggers.clone(),
        metrics.clone(),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(sluice::observability::serve(
        listener,
        metrics.clone(),
        Some(receiver),
    ));
    let agent_client = cluster::client_as("sluice-agent-bench").await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(sluice::agent::run(
        agent_client,
        sluice::agent::ConfigSource::File(config),
        opts,
        None,
        async {
            let _ = stopped.await;
        },
    ));
    let successes = || {
        metrics
            .encode()
            .lines()
            .filter(|l| l.starts_with("sluice_syncs_total{") && l.contains("result=\"success\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum::<u64>()
    };
    let started = Instant::now();
    while successes() == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "the agent's first sync did not finish"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Let the watches settle (the Deployments' rollouts write status meanwhile).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mark = cp.audit_mark();
    tokio::time::sleep(Duration::from_secs(60)).await;
    let idle = count(mark, "sluice-agent-bench");

    // One ConfigMap changes in git; a generic push webhook says so.
    let (path, text) = files
        .iter()
        .find(|(p, _)| p.starts_with("config/"))
        .expect("a ConfigMap");
    let changed = text.replace("value: \"", "value: \"changed-");
    // A commit is a whole tree: every file, one of them changed.
    let tree: Vec<git::Entry> = files
        .iter()
        .map(|(p, t)| git::file(p, if p == path { &changed } else { t }))
        .collect();
    repo.commit("main", &tree, "one change");
    let name = path
        .trim_start_matches("config/")
        .trim_end_matches(".yaml")
        .to_string();
    let cms: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
        kube::Api::namespaced(client.clone(), &ns);
    let mark = cp.audit_mark();
    let pushed = Instant::now();
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"POST /hooks/generic HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer bench-secret\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut response = String::new();
        s.read_to_string(&mut response).await.expect("read");
        assert!(response.starts_with("HTTP/1.1 202"), "{response}");
    }
    loop {
        let cm = cms.get(&name).await.expect("get");
        if cm
            .data
            .and_then(|d| d.get("value").cloned())
            .is_some_and(|v| v.starts_with("changed-"))
        {
            break;
        }
        assert!(
            pushed.elapsed() < Duration::from_secs(300),
            "the push was not applied"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let latency = pushed.elapsed();
    while successes() < 2 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let push = count(mark, "sluice-agent-bench");
    let _ = stop.send(());
    let _ = agent.await;
    (idle, latency, push)
}
