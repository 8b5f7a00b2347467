//! sluice versus `kubectl apply --server-side`, agentk's engine (cli-utils' `kapply`) and
//! Flux's (fluxcd/pkg/ssa), on the same API server, in one run, and the agent as a process.
//!
//! `cargo bench -p sluice-testenv --bench apply` starts the test control plane and writes N
//! each of Deployments, Services, ConfigMaps and ServiceAccounts (N = `SLUICE_BENCH_N`,
//! default 50: 200 objects; 500 gives the 2,000 of issue #11), ten of each kind per file.
//! Each tool, in its own namespace, then goes through four operations:
//!
//! 1. **first apply**, until every Deployment is Available;
//! 2. **no-op**: the same manifests again;
//! 3. **one change**: one ConfigMap's data changed;
//! 4. **prune**: the last 10 % of each kind removed from the manifests.
//!
//! - kubectl: `kubectl apply --server-side` of the directory (`kubectl wait` after the
//!   first; every apply prunes with an ApplySet, `--prune --applyset=bench`, alpha behind
//!   `KUBECTL_APPLYSET=true`, since `--prune -l` refuses objects created by server-side
//!   apply; kubectl does not wait for the deletions);
//! - kapply (cli-utils, agentk's applier): `kapply apply --server-side` with its inventory
//!   and status wait (it prunes by inventory and waits for the deletions);
//! - Flux's engine (`flux-ssa`, `tests/cluster/fluxssa`): one kustomize-controller v1.9.0
//!   reconcile per operation with Flux's apply library (fluxcd/pkg/ssa): staged apply with
//!   drift detection by dry run, prune by its inventory (no wait for the deletions, as the
//!   controller), and the health check of `wait: true` (polls every 5 s). The controller
//!   itself needs source-controller's artifacts and its CRDs; what it adds (fetch,
//!   `kustomize build`, status patches, events) is a few requests per reconcile;
//! - sluice sync: `sluice_agent::sync::sync`, a whole sync each (fetch, select, decode,
//!   discovery, dry-run, apply, inventory, health wait, prune and its wait), given the last
//!   sync's applied digests as the agent does while nothing drifts;
//! - the agent: the release `sluice run` binary as its own process, with push webhooks:
//!   its first sync, 60 s idle, five one-object changes pushed (p50 and max from the push
//!   to the object changed in the cluster), and the 10 % prune pushed (until the objects
//!   are gone); its CPU seconds and peak RSS from /proc.
//!
//! `SLUICE_BENCH_TOOLS=kubectl,kapply,flux,sluice` chooses the tools (all by default).
//! `SLUICE_BENCH_AGENT_ONLY=1` runs the agent part alone (10,000 objects: every tool takes
//! close to an hour on 2 cores). `SLUICE_BENCH_AGENT_LOG=<file>` keeps the agent's log at
//! debug level, with the time each sync spent per stage (`sync stages`).
//! `SLUICE_BENCH_AGENT_WRAPPER=<program>` starts the agent under that program (e.g.
//! `heaptrack`, with a binary built without mimalloc, for a heap profile).
//! The agent runs with the binary's own allocator settings (freed memory goes back at
//! once); `MIMALLOC_PURGE_DELAY` set for the bench overrides them.
//!
//! Requests are counted from the API server's audit log, per client `User-Agent`
//! (kubectl's, kapply's, `flux-ssa/`, `sluice-bench` for the library syncs, `sluice/` for
//! the agent):
//! all of them, and the writes among them (create, update, patch, delete; dry runs
//! excluded).

use std::os::unix::process::CommandExt;
use std::path::Path;
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
        .unwrap_or(50)
}

/// One operation of one tool: wall time and the requests it sent.
#[derive(Clone, Copy, Default)]
struct Op {
    time: Duration,
    requests: usize,
    writes: usize,
}

impl Op {
    fn measured(time: Duration, (requests, writes): (usize, usize)) -> Op {
        Op {
            time,
            requests,
            writes,
        }
    }

    fn cell(&self) -> String {
        format!(
            "{:.2} s, {} ({})",
            self.time.as_secs_f64(),
            self.requests,
            self.writes
        )
    }
}

/// The manifests of a step.
#[derive(Clone, Copy, PartialEq)]
enum Step {
    First,
    OneChange,
    Pruned,
}

/// Ten `i`s per file, four objects each; `Pruned` drops the last 10 % of the `i`s (so 10 %
/// of every kind); `OneChange` and `Pruned` change `cfg-0`'s data.
fn manifests(step: Step) -> Vec<(String, String)> {
    let n = n();
    let keep = if step == Step::Pruned { n - n / 10 } else { n };
    let changed = step != Step::First;
    (0..keep)
        .collect::<Vec<_>>()
        .chunks(10)
        .map(|is| {
            let docs: Vec<String> = is.iter().map(|&i| objects(i, changed && i == 0)).collect();
            (
                format!("apps/group-{}.yaml", is[0] / 10),
                docs.join("---\n"),
            )
        })
        .collect()
}

fn objects(i: usize, changed: bool) -> String {
    let value = if changed {
        format!("changed-{i}")
    } else {
        i.to_string()
    };
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web-{i}\n  labels: {{sluice-bench: \"yes\"}}\nspec:\n  replicas: 1\n  selector:\n    matchLabels: {{app: web-{i}}}\n  template:\n    metadata:\n      labels: {{app: web-{i}}}\n    spec:\n      serviceAccountName: web-{i}\n      containers:\n      - name: web\n        image: nginx:1.27\n        ports:\n        - containerPort: 80\n---\n\
         apiVersion: v1\nkind: Service\nmetadata:\n  name: web-{i}\n  labels: {{sluice-bench: \"yes\"}}\nspec:\n  selector: {{app: web-{i}}}\n  ports:\n  - port: 80\n    targetPort: 80\n---\n\
         apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cfg-{i}\n  labels: {{sluice-bench: \"yes\"}}\ndata:\n  value: \"{value}\"\n---\n\
         apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: web-{i}\n  labels: {{sluice-bench: \"yes\"}}\n"
    )
}

/// Replaces `dir`'s files with `files` (flattened to one directory with `flat`, for kapply,
/// with every object given `namespace`, which kapply has no flag for).
fn write_dir(dir: &Path, files: &[(String, String)], flat: Option<&str>) {
    for entry in std::fs::read_dir(dir).expect("dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            std::fs::remove_dir_all(&path).expect("clear");
        } else if path
            .file_name()
            .is_some_and(|n| n != "inventory-template.yaml")
        {
            std::fs::remove_file(&path).expect("clear");
        }
    }
    for (path, text) in files {
        let (path, text) = match flat {
            Some(ns) => (
                path.replace('/', "-"),
                format!("\n{text}")
                    .replace(
                        "\nmetadata:\n",
                        &format!("\nmetadata:\n  namespace: {ns}\n"),
                    )
                    .trim_start()
                    .to_string(),
            ),
            None => (path.clone(), text.clone()),
        };
        let p = dir.join(path);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, text).expect("write");
    }
}

fn run(cmd: &mut std::process::Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// kubectl's four operations.
fn kubectl_ops(kubectl: &Path, kubeconfig: &Path, ns: &str) -> [Op; 4] {
    let cp = cluster::shared();
    let dir = tempfile::tempdir().expect("dir");
    let apply = |step: Step| {
        write_dir(dir.path(), &manifests(step), None);
        let mark = cp.audit_mark();
        let t = Instant::now();
        // Pruning with server-side apply needs an ApplySet (alpha in kubectl, behind
        // KUBECTL_APPLYSET=true): `--prune -l` refuses objects created by server-side
        // apply. Every apply uses it, as a user who prunes would.
        let mut cmd = std::process::Command::new(kubectl);
        cmd.args([
            "apply",
            "--server-side",
            "--force-conflicts",
            "--prune",
            "--applyset=bench",
            "-R",
            "-n",
            ns,
            "-f",
        ])
        .arg(dir.path())
        .env("KUBECONFIG", kubeconfig)
        .env("KUBECTL_APPLYSET", "true");
        run(&mut cmd, "kubectl apply");
        Op::measured(t.elapsed(), count(mark, "kubectl/"))
    };
    let applied = apply(Step::First);
    // sluice and kapply wait for health; so does this, to compare like with like.
    let mark = cp.audit_mark();
    let t = Instant::now();
    run(
        std::process::Command::new(kubectl)
            .args([
                "wait",
                "--for=condition=Available",
                "--timeout=1800s",
                "deployment",
                "--all",
                "-n",
                ns,
            ])
            .env("KUBECONFIG", kubeconfig),
        "kubectl wait",
    );
    let waited = Op::measured(t.elapsed(), count(mark, "kubectl/"));
    let first = Op {
        time: applied.time + waited.time,
        requests: applied.requests + waited.requests,
        writes: applied.writes + waited.writes,
    };
    [
        first,
        apply(Step::First),
        apply(Step::OneChange),
        apply(Step::Pruned),
    ]
}

/// The four operations in order: the first apply, the same again, one change, the prune.
fn four(apply: impl Fn(Step) -> Op) -> [Op; 4] {
    [
        apply(Step::First),
        apply(Step::First),
        apply(Step::OneChange),
        apply(Step::Pruned),
    ]
}

/// kapply's four operations.
fn kapply_ops(kubeconfig: &Path, ns: &str) -> [Op; 4] {
    let cp = cluster::shared();
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(
        dir.path().join("inventory-template.yaml"),
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: inventory-bench\n  namespace: {ns}\n  labels:\n    cli-utils.sigs.k8s.io/inventory-id: bench-{ns}\n"
        ),
    )
    .expect("inventory template");
    let apply = |step: Step| {
        write_dir(dir.path(), &manifests(step), Some(ns));
        let mark = cp.audit_mark();
        let t = Instant::now();
        run(
            std::process::Command::new(cluster::kapply())
                .arg("apply")
                .arg(dir.path())
                .args([
                    "--server-side",
                    "--reconcile-timeout",
                    "1800s",
                    "--inventory-policy",
                    "strict",
                    "--output",
                    "events",
                ])
                .arg("--kubeconfig")
                .arg(kubeconfig),
            "kapply apply",
        );
        Op::measured(t.elapsed(), count(mark, "kapply/"))
    };
    four(apply)
}

/// Flux's four operations: `flux-ssa`, one kustomize-controller reconcile each with Flux's
/// apply engine (`cluster/fluxssa`: apply, prune by its inventory, health wait).
fn flux_ops(kubeconfig: &Path, ns: &str) -> [Op; 4] {
    let cp = cluster::shared();
    let dir = tempfile::tempdir().expect("dir");
    let manifests_dir = dir.path().join("manifests");
    std::fs::create_dir(&manifests_dir).expect("mkdir");
    let inventory = dir.path().join("inventory");
    let apply = |step: Step| {
        write_dir(&manifests_dir, &manifests(step), None);
        let mark = cp.audit_mark();
        let t = Instant::now();
        run(
            std::process::Command::new(cluster::flux_ssa())
                .arg("-kubeconfig")
                .arg(kubeconfig)
                .arg("-dir")
                .arg(&manifests_dir)
                .arg("-inventory")
                .arg(&inventory)
                .args(["-name", "bench", "-namespace", ns, "-timeout", "1800s"]),
            "flux-ssa",
        );
        Op::measured(t.elapsed(), count(mark, "flux-ssa/"))
    };
    four(apply)
}

/// sluice's four operations, one library sync each.
async fn sluice_ops(ns: &str) -> [Op; 4] {
    let cp = cluster::shared();
    let repo = git::shared().create_repo(&format!("bench/{ns}"));
    let cache = tempfile::tempdir().expect("cache");
    let source = sluice_agent::source::Source::new(repo.http_url(), cache.path(), None);
    let yaml = format!(
        "gitops:\n  manifest_projects:\n  - id: bench\n    default_namespace: {ns}\n    reconcile_timeout: 1800s\n"
    );
    let project = sluice_agent::config::parse(&yaml, "bench")
        .expect("config")
        .manifest_projects
        .remove(0);
    let mut settings = sluice_agent::sync::Settings {
        inventory_id: format!("bench-{ns}"),
        field_manager: "sluice".into(),
        cleanup_managers: Vec::new(),
        concurrency: 8,
        limits: Default::default(),
        allow_empty_prune: false,
        agent: "bench".into(),
        plugins: Ok(Vec::new()),
        others: Vec::new(),
        takeover: sluice_agent::sync::Takeover::Off,
        known: Default::default(),
        render_cache: None,
        // As the agent: files decoded by the previous sync are not decoded again.
        decoded: Some(Default::default()),
        slots: None,
        protected: Default::default(),
        // As the agent: the health wait reads watches kept across syncs.
        live: Some(sluice_engine::live::Live::new()),
        renderers: None,
        siblings: Vec::new(),
    };
    let mut c = sluice_engine::cluster::Cluster::connect(cluster::client_as("sluice-bench").await)
        .await
        .expect("discovery");
    let mut ops = Vec::new();
    for step in [Step::First, Step::First, Step::OneChange, Step::Pruned] {
        if ops.is_empty() || step != Step::First {
            let tree: Vec<git::Entry> = manifests(step)
                .iter()
                .map(|(p, t)| git::file(p, t))
                .collect();
            repo.commit("main", &tree, "bench");
        }
        let commit = {
            let s = source.clone();
            tokio::task::spawn_blocking(move || {
                s.resolve(&sluice_agent::config::GitRef::DefaultBranch)
            })
            .await
            .expect("task")
            .expect("resolve")
        };
        let mark = cp.audit_mark();
        let t = Instant::now();
        let report = sluice_agent::sync::sync(&mut c, &source, &project, &commit, &settings)
            .await
            .expect("sync");
        ops.push(Op::measured(t.elapsed(), count(mark, "sluice-bench")));
        settings.known = report.applied.clone();
    }
    ops.try_into()
        .unwrap_or_else(|_| unreachable!("four steps"))
}

#[tokio::main]
async fn main() {
    let client = cluster::client().await;
    let kubeconfig = cluster::shared().kubeconfig.clone();
    let kubectl_bin = cluster::build()
        .expect("control plane binaries")
        .join("kubectl");
    let agent_binary = sluice_testenv::wasm::sluice_release_binary();

    let n = n();
    let objects = 4 * n;
    // SLUICE_BENCH_AGENT_ONLY=1: the agent process alone (its RSS, CPU and push latency at
    // a size where running every tool takes too long).
    if std::env::var_os("SLUICE_BENCH_AGENT_ONLY").is_none() {
        tools(&client, &kubectl_bin, &kubeconfig, n).await;
    }
    let agent = agent_phase(&agent_binary).await;
    println!("| the agent (release `sluice run` process, {objects} objects, push webhooks) | |");
    println!("|---|---|");
    println!(
        "| first sync, from start to synced | {} |",
        agent.first.cell()
    );
    println!(
        "| idle 60 s after the first sync (no-op: watches, no re-apply) | {} requests ({} writes) |",
        agent.idle.0, agent.idle.1
    );
    let mut latencies: Vec<Duration> = agent.pushes.iter().map(|o| o.time).collect();
    latencies.sort();
    println!(
        "| push → one changed ConfigMap in the cluster, {} pushes | p50 {:.0} ms, max {:.0} ms; {} requests ({} writes) per sync (median) |",
        latencies.len(),
        latencies[latencies.len() / 2].as_secs_f64() * 1000.0,
        latencies[latencies.len() - 1].as_secs_f64() * 1000.0,
        median(agent.pushes.iter().map(|o| o.requests).collect()),
        median(agent.pushes.iter().map(|o| o.writes).collect()),
    );
    println!(
        "| push → 10 % removed, pruned and gone | {} |",
        agent.prune.cell()
    );
    println!(
        "| CPU time of the agent process, all of the above | {:.2} s |",
        agent.cpu_seconds
    );
    println!(
        "| peak RSS (VmHWM) / RSS at the end | {:.1} MiB / {:.1} MiB |",
        agent.peak_rss_kib as f64 / 1024.0,
        agent.end_rss_kib as f64 / 1024.0
    );
    println!();
    // Discovery: sluice probes every group-version, then runs kube's discovery without the
    // groups that failed (2V+4 requests for V group-versions); kubectl uses aggregated
    // discovery (cache disabled here so both start cold).
    let groups = client.list_api_groups().await.expect("groups");
    let versions: usize = groups.groups.iter().map(|g| g.versions.len()).sum();
    let mut sluice_discovery = Vec::new();
    let mut kubectl_discovery = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        sluice_engine::cluster::Cluster::connect(client.clone())
            .await
            .expect("discovery");
        sluice_discovery.push(t.elapsed());
        let cache = tempfile::tempdir().expect("cache");
        let t = Instant::now();
        let out = std::process::Command::new(&kubectl_bin)
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
}

/// Whether `SLUICE_BENCH_TOOLS` (a comma-separated list of kubectl, kapply, flux and sluice;
/// all when unset) names `tool`.
fn selected(tool: &str) -> bool {
    std::env::var("SLUICE_BENCH_TOOLS")
        .map_or(true, |list| list.split(',').any(|t| t.trim() == tool))
}

/// kubectl, kapply, Flux's engine and sluice's syncs (those `SLUICE_BENCH_TOOLS` selects),
/// each in its own namespace; prints their table.
async fn tools(client: &kube::Client, kubectl_bin: &Path, kubeconfig: &Path, n: usize) {
    let objects = 4 * n;
    let kubectl = if selected("kubectl") {
        let ns = cluster::namespace(client, "bench-kubectl").await;
        Some(kubectl_ops(kubectl_bin, kubeconfig, &ns))
    } else {
        None
    };
    let kapply = if selected("kapply") {
        let ns = cluster::namespace(client, "bench-kapply").await;
        Some(kapply_ops(kubeconfig, &ns))
    } else {
        None
    };
    let flux = if selected("flux") {
        let ns = cluster::namespace(client, "bench-flux").await;
        Some(flux_ops(kubeconfig, &ns))
    } else {
        None
    };
    let sluice = if selected("sluice") {
        let ns = cluster::namespace(client, "bench-sluice").await;
        Some(sluice_ops(&ns).await)
    } else {
        None
    };
    let cell =
        |ops: &Option<[Op; 4]>, i: usize| ops.as_ref().map_or("—".to_string(), |o| o[i].cell());
    let per_object = |ops: &Option<[Op; 4]>| {
        ops.as_ref().map_or("—".to_string(), |o| {
            format!("{:.2}", o[0].requests as f64 / objects as f64)
        })
    };
    println!(
        "| {objects} objects ({n} each of Deployment, Service, ConfigMap, ServiceAccount): time, requests (writes) | `kubectl apply --server-side --prune --applyset` | kapply (cli-utils {}) | Flux's engine (`flux-ssa`: fluxcd/pkg/ssa as kustomize-controller v1.9.0 drives it) | sluice sync |",
        cli_utils_version()
    );
    println!("|---|---|---|---|---|");
    let rows = [
        "first apply, until every Deployment is Available (kubectl: + `kubectl wait`)".to_string(),
        "no-op (the same manifests again)".to_string(),
        "one ConfigMap changed".to_string(),
        format!(
            "{} objects removed (10 %), pruned (kubectl: no wait for the deletions)",
            4 * (n / 10)
        ),
    ];
    for (i, row) in rows.iter().enumerate() {
        println!(
            "| {row} | {} | {} | {} | {} |",
            cell(&kubectl, i),
            cell(&kapply, i),
            cell(&flux, i),
            cell(&sluice, i)
        );
    }
    println!(
        "| requests per object, first apply | {} | {} | {} | {} |",
        per_object(&kubectl),
        per_object(&kapply),
        per_object(&flux),
        per_object(&sluice)
    );
    println!();
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

/// What the agent process did.
struct Agent {
    first: Op,
    idle: (usize, usize),
    pushes: Vec<Op>,
    prune: Op,
    cpu_seconds: f64,
    peak_rss_kib: u64,
    end_rss_kib: u64,
}

fn median(mut v: Vec<usize>) -> usize {
    v.sort_unstable();
    v[v.len() / 2]
}

/// One HTTP/1.1 request to the agent's server; the whole response.
async fn http(addr: &str, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(request.as_bytes()).await.expect("write");
    let mut response = String::new();
    s.read_to_string(&mut response).await.expect("read");
    response
}

/// Successful syncs so far, from the agent's /metrics.
async fn successes(addr: &str) -> u64 {
    http(
        addr,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await
    .lines()
    .filter(|l| l.starts_with("sluice_syncs_total{") && l.contains("result=\"success\""))
    .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
    .sum()
}

async fn push(addr: &str) {
    let response = http(
        addr,
        "POST /hooks/generic HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer bench-secret\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 202"), "{response}");
}

async fn until(what: &str, limit: Duration, mut done: impl AsyncFnMut() -> bool) {
    let started = Instant::now();
    while !done().await {
        assert!(
            started.elapsed() < limit,
            "{what} did not happen in {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Kills the agent's process group: a wrapper's children (a profiler's agent) go with it.
#[allow(unsafe_code)] // reason: kill(2) has no safe wrapper in std; it touches no memory.
fn kill_group(pid: u32) {
    // SAFETY: a plain system call with a process group id.
    unsafe { libc::kill(-(pid as libc::pid_t), libc::SIGKILL) };
}

/// Runs the release agent over the manifests in a new repository and namespace.
async fn agent_phase(binary: &Path) -> Agent {
    let client = cluster::client().await;
    let cp = cluster::shared();
    let ns = cluster::namespace(&client, "bench-agent").await;
    let repo = git::shared().create_repo(&format!("bench/{ns}"));
    let commit = |files: Vec<(String, String)>| {
        let tree: Vec<git::Entry> = files.iter().map(|(p, t)| git::file(p, t)).collect();
        repo.commit("main", &tree, "bench");
    };
    commit(manifests(Step::First));
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "gitops:\n  manifest_projects:\n  - id: {}\n    default_namespace: {ns}\n    reconcile_timeout: 1800s\n",
            repo.http_url()
        ),
    )
    .expect("config");
    let secret = dir.path().join("webhook-secret");
    std::fs::write(&secret, "bench-secret").expect("secret");
    let free = || {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").to_string()
    };
    // Metrics and probes on one port, the push webhooks on another (as `sluice run`).
    let (addr, hooks) = (free(), free());
    // SLUICE_BENCH_AGENT_LOG=<file> keeps the agent's log, at debug level (the time each
    // sync spent per stage); by default it goes away with the bench's directory.
    let kept_log = std::env::var_os("SLUICE_BENCH_AGENT_LOG");
    let log_path = kept_log
        .clone()
        .map_or_else(|| dir.path().join("agent.log"), std::path::PathBuf::from);
    let log = std::fs::File::create(&log_path).expect("log");
    let mark = cp.audit_mark();
    let started = Instant::now();
    // SLUICE_BENCH_AGENT_WRAPPER=<program> starts the agent under it (a profiler such as
    // heaptrack; /proc's CPU and RSS figures are then the wrapper's process).
    let mut command = match std::env::var_os("SLUICE_BENCH_AGENT_WRAPPER") {
        Some(wrapper) => {
            let mut c = std::process::Command::new(wrapper);
            c.arg(binary);
            c
        }
        None => std::process::Command::new(binary),
    };
    let mut child = command
        .args([
            "run",
            "--agent-name",
            "bench",
            "--poll-interval",
            "1h",
            "--reapply-interval",
            "1h",
        ])
        .arg("--config")
        .arg(&config)
        .arg("--git-base-url")
        .arg(git::shared().base_url())
        .arg("--cache-dir")
        .arg(dir.path().join("cache"))
        .arg("--webhook-secret-file")
        .arg(&secret)
        .args(["--observability-listen-address", &addr])
        .args(["--webhook-listen-address", &hooks])
        .env("KUBECONFIG", &cp.kubeconfig)
        .env(
            "RUST_LOG",
            if kept_log.is_some() {
                "warn,sluice=debug"
            } else {
                "warn,sluice=info"
            },
        )
        .env_remove("POD_NAMESPACE")
        .env_remove("POD_NAME")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .process_group(0)
        .spawn()
        .expect("start the agent");
    let pid = child.id();
    until(
        "the agent's first sync",
        Duration::from_secs(1800),
        async || tokio::net::TcpStream::connect(&addr).await.is_ok() && successes(&addr).await >= 1,
    )
    .await;
    let first = Op::measured(started.elapsed(), count(mark, "sluice/"));

    // Let the watches settle (the Deployments' rollouts write status meanwhile).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mark = cp.audit_mark();
    tokio::time::sleep(Duration::from_secs(60)).await;
    let idle = count(mark, "sluice/");

    let cms: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
        kube::Api::namespaced(client.clone(), &ns);
    let mut pushes = Vec::new();
    for k in 0..5 {
        let value = format!("push-{k}");
        let files: Vec<(String, String)> = manifests(Step::First)
            .into_iter()
            .map(|(p, t)| {
                (
                    p,
                    t.replacen("value: \"0\"", &format!("value: \"{value}\""), 1),
                )
            })
            .collect();
        commit(files);
        let before = successes(&addr).await;
        let mark = cp.audit_mark();
        let pushed = Instant::now();
        push(&hooks).await;
        until("a pushed change", Duration::from_secs(300), async || {
            cms.get("cfg-0")
                .await
                .ok()
                .and_then(|cm| cm.data?.get("value").cloned())
                .is_some_and(|v| v == value)
        })
        .await;
        let latency = pushed.elapsed();
        until(
            "the pushed sync's end",
            Duration::from_secs(300),
            async || successes(&addr).await > before,
        )
        .await;
        pushes.push(Op::measured(latency, count(mark, "sluice/")));
    }

    let n = n();
    commit(manifests(Step::Pruned));
    let before = successes(&addr).await;
    let mark = cp.audit_mark();
    let pushed = Instant::now();
    push(&hooks).await;
    until("the pruning sync", Duration::from_secs(1800), async || {
        successes(&addr).await > before
    })
    .await;
    let prune = Op::measured(pushed.elapsed(), count(mark, "sluice/"));
    let last = format!("cfg-{}", n - 1);
    assert!(
        cms.get_opt(&last).await.expect("get").is_none(),
        "{last} was pruned"
    );

    let (cpu_seconds, peak_rss_kib, end_rss_kib) = sluice_testenv::usage(pid);
    kill_group(pid);
    let _ = child.wait();
    Agent {
        first,
        idle,
        pushes,
        prune,
        cpu_seconds,
        peak_rss_kib,
        end_rss_kib,
    }
}
