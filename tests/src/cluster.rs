//! One real Kubernetes control plane per test run.
//!
//! [`shared`] builds the binaries if they are not cached (`tests/cluster/build.sh`), then
//! starts, on loopback and free ports: etcd → kube-apiserver → kube-controller-manager →
//! kube-scheduler → kwok (with its stage configs) and creates one fake Node. It returns when
//! the API is ready, the Node is `Ready` and the controller-manager has created the `default`
//! ServiceAccount. All tests in the process share it; each test makes its own client
//! ([`client`]) and namespace ([`namespace`]), because a kube client is bound to the tokio
//! runtime that created it and every `#[tokio::test]` has its own.
//!
//! Nothing here is mocked. If a binary cannot be built or a process does not become ready,
//! [`shared`] panics with the reason and the tail of that process's log: tests fail, they
//! never skip.
//!
//! Set `SLUICE_E2E_KUBECONFIG` to run the tests against a cluster you already have (local
//! work only; CI never sets it).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Node, ServiceAccount};
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use crate::pki;
use crate::procs::{fresh_run_dir, log_tail, spawn_tied};

/// Name of the fake Node that kwok keeps Ready.
pub const NODE_NAME: &str = "kwok-node-0";

/// A running control plane.
#[derive(Debug, Clone)]
pub struct ControlPlane {
    /// Admin kubeconfig (`O=system:masters`).
    pub kubeconfig: PathBuf,
    /// Directory with the PKI, etcd data and one log file per process.
    pub dir: PathBuf,
}

/// One request, as the API server's audit log records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `get`, `list`, `watch`, `create`, `patch`, `update`, `delete`, …
    pub verb: String,
    /// The client's `User-Agent` (`kubectl/v1.36.3 …`, `kapply/…`, `kube-rs/…`).
    pub user_agent: String,
    /// The request path.
    pub uri: String,
    /// Who sent it (`user.username`).
    pub user: String,
    /// Whom it impersonated, if anyone (`impersonatedUser.username`).
    pub impersonated: Option<String>,
    /// When the API server received it (`requestReceivedTimestamp`, RFC 3339 with
    /// microseconds: compares as text).
    pub received: String,
}

impl Request {
    /// Whether it changed something (`create`, `update`, `patch`, `delete`), dry runs aside.
    pub fn is_write(&self) -> bool {
        matches!(
            self.verb.as_str(),
            "create" | "update" | "patch" | "delete" | "deletecollection"
        ) && !self.uri.contains("dryRun=All")
    }
}

impl ControlPlane {
    /// A position in the audit log: [`Self::requests_since`] returns what came after it.
    pub fn audit_mark(&self) -> u64 {
        std::fs::metadata(self.dir.join("audit.log")).map_or(0, |m| m.len())
    }

    /// The requests the API server received since `mark` (its audit log, every request at
    /// Metadata level, written before the response is sent).
    ///
    /// # Panics
    /// When the audit log cannot be read (a control plane not started by this harness).
    pub fn requests_since(&self, mark: u64) -> Vec<Request> {
        use std::io::{Read, Seek};
        let mut file = std::fs::File::open(self.dir.join("audit.log")).expect("audit log");
        file.seek(std::io::SeekFrom::Start(mark)).expect("seek");
        let mut text = String::new();
        file.read_to_string(&mut text).expect("read audit log");
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["stage"] == "ResponseComplete" || e["stage"] == "ResponseStarted")
            // A watch is logged when it starts and when it ends: count it once.
            .filter(|e| !(e["verb"] == "watch" && e["stage"] == "ResponseComplete"))
            .map(|e| Request {
                verb: e["verb"].as_str().unwrap_or_default().into(),
                user_agent: e["userAgent"].as_str().unwrap_or_default().into(),
                uri: e["requestURI"].as_str().unwrap_or_default().into(),
                user: e["user"]["username"].as_str().unwrap_or_default().into(),
                impersonated: e["impersonatedUser"]["username"].as_str().map(String::from),
                received: e["requestReceivedTimestamp"]
                    .as_str()
                    .unwrap_or_default()
                    .into(),
            })
            .collect()
    }
}

static SHARED: OnceLock<Result<ControlPlane, String>> = OnceLock::new();

/// The control plane of this test run, started on first use.
///
/// # Panics
/// When the control plane cannot be built or started; the message says which process failed
/// and quotes its log.
pub fn shared() -> &'static ControlPlane {
    match SHARED.get_or_init(start_supervised) {
        Ok(cp) => cp,
        Err(e) => panic!("the test control plane could not start: {e}"),
    }
}

/// A new admin client for the shared control plane, bound to the caller's runtime.
pub async fn client() -> Client {
    let cp = shared();
    client_for(&cp.kubeconfig).await.unwrap_or_else(|e| {
        panic!(
            "failed to build a client from {}: {e}",
            cp.kubeconfig.display()
        )
    })
}

/// Creates a namespace named `<prefix>-<n>` unique in this run and returns its name.
pub async fn namespace(client: &Client, prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let name = format!(
        "{prefix}-{}-{}",
        std::process::id() % 10_000,
        N.fetch_add(1, Ordering::Relaxed)
    );
    let ns: Namespace = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}
    }))
    .expect("static namespace manifest is valid");
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap_or_else(|e| panic!("failed to create namespace {name}: {e}"));
    name
}

/// Builds a client from a kubeconfig file.
pub async fn client_for(kubeconfig: &Path) -> Result<Client, String> {
    client_with(kubeconfig, None).await
}

/// A new admin client that sends `user_agent`, so that its requests can be told apart in
/// the audit log ([`ControlPlane::requests_since`]).
pub async fn client_as(user_agent: &str) -> Client {
    client_with(&shared().kubeconfig, Some(user_agent))
        .await
        .unwrap_or_else(|e| panic!("client for the test control plane: {e}"))
}

/// The API server's address (loopback), for a proxy in front of it
/// ([`crate::proxy::Proxy`]).
///
/// # Panics
/// When the kubeconfig names no `https://127.0.0.1:<port>` server.
pub fn api_addr() -> std::net::SocketAddr {
    let kc = Kubeconfig::read_from(&shared().kubeconfig).expect("kubeconfig");
    let server = kc.clusters[0]
        .cluster
        .as_ref()
        .and_then(|c| c.server.clone())
        .expect("server");
    server
        .trim_start_matches("https://")
        .parse()
        .unwrap_or_else(|e| panic!("API server address {server}: {e}"))
}

/// [`client_as`], through `via` (a proxy in front of the API server) instead of directly.
pub async fn client_through(via: std::net::SocketAddr, user_agent: &str) -> Client {
    client_at(&shared().kubeconfig, Some(user_agent), Some(via))
        .await
        .unwrap_or_else(|e| panic!("client through {via}: {e}"))
}

async fn client_with(kubeconfig: &Path, user_agent: Option<&str>) -> Result<Client, String> {
    client_at(kubeconfig, user_agent, None).await
}

async fn client_at(
    kubeconfig: &Path,
    user_agent: Option<&str>,
    via: Option<std::net::SocketAddr>,
) -> Result<Client, String> {
    // Test binaries may link two rustls providers (see sluice_engine::install_crypto_provider).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut kc = Kubeconfig::read_from(kubeconfig).map_err(|e| e.to_string())?;
    if let Some(via) = via {
        for c in &mut kc.clusters {
            if let Some(cluster) = c.cluster.as_mut() {
                cluster.server = Some(format!("https://{via}"));
            }
        }
    }
    let mut config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    if let Some(ua) = user_agent {
        config.headers.push((
            http::header::USER_AGENT,
            http::HeaderValue::from_str(ua).map_err(|e| e.to_string())?,
        ));
    }
    Client::try_from(config).map_err(|e| e.to_string())
}

/// Starts the control plane from a thread that never exits. Children are tied to that
/// thread (see `procs.rs`), so they live exactly as long as the test process.
fn start_supervised() -> Result<ControlPlane, String> {
    if let Ok(kubeconfig) = std::env::var("SLUICE_E2E_KUBECONFIG") {
        return Ok(ControlPlane {
            dir: PathBuf::from(&kubeconfig),
            kubeconfig: kubeconfig.into(),
        });
    }
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("control-plane".into())
        .spawn(move || {
            let mut children = Vec::new();
            let result = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("failed to build a runtime: {e}"))
                .and_then(|rt| rt.block_on(start(&mut children)));
            let ok = result.is_ok();
            let _ = tx.send(result);
            if ok {
                loop {
                    std::thread::park();
                }
            }
            // On failure this thread returns, and the kernel kills what it started.
        })
        .map_err(|e| format!("failed to spawn the control-plane thread: {e}"))?;
    rx.recv()
        .map_err(|_| "the control-plane thread died while starting".to_string())?
}

async fn start(children: &mut Vec<(String, Child, PathBuf)>) -> Result<ControlPlane, String> {
    let bin = build()?;
    let dir = fresh_run_dir("sluice-cp")?;
    let pki = pki::write(&dir)?;
    let [etcd_port, peer_port, api_port, cm_port, sched_port] = free_ports()?;
    let kubeconfig = dir.join("kubeconfig");
    write_kubeconfig(&kubeconfig, api_port, &pki)?;
    let kc = kubeconfig.to_str().ok_or("non-UTF-8 temp dir")?.to_string();
    let p = |p: &Path| p.display().to_string();

    let mut etcd = Command::new(bin.join("etcd"));
    etcd.args(etcd_args(&dir, etcd_port, peer_port));
    launch(children, "etcd", etcd, &dir)?;
    wait_until(
        children,
        "etcd /health",
        Duration::from_secs(30),
        || async { etcd_healthy(etcd_port) },
    )
    .await?;

    let mut api = Command::new(bin.join("kube-apiserver"));
    api.args(apiserver_args(&dir, &pki, etcd_port, api_port)?);
    launch(children, "kube-apiserver", api, &dir)?;
    let client = client_for(&kubeconfig).await?;
    wait_until(
        children,
        "kube-apiserver /readyz",
        Duration::from_secs(90),
        || async { apiserver_ready(&client).await },
    )
    .await?;

    let component = |name: &str, port: u16| {
        let mut c = Command::new(bin.join(name));
        c.args([
            format!("--kubeconfig={kc}"),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={port}"),
            "--authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics".into(),
        ]);
        c
    };
    let mut cm = component("kube-controller-manager", cm_port);
    cm.args([
        format!("--service-account-private-key-file={}", p(&pki.sa_private)),
        format!("--root-ca-file={}", p(&pki.ca_cert)),
        // No metrics API here: the HPA controller would only log errors.
        "--controllers=*,-horizontal-pod-autoscaler-controller".into(),
        "--use-service-account-credentials=false".into(),
        // The default 20 requests/s (burst 30) makes rolling out thousands of
        // Deployments take minutes per thousand whatever the client did: the apply bench
        // would measure this limit, not the tools.
        "--kube-api-qps=200".into(),
        "--kube-api-burst=400".into(),
    ]);
    launch(children, "kube-controller-manager", cm, &dir)?;
    launch(
        children,
        "kube-scheduler",
        component("kube-scheduler", sched_port),
        &dir,
    )?;
    let mut kwok = Command::new(bin.join("kwok"));
    kwok.args([
        format!("--kubeconfig={kc}"),
        format!("--config={}", p(&bin.join("kwok-stages.yaml"))),
        "--manage-all-nodes=true".into(),
        "--cidr=10.244.0.0/16".into(),
        "--node-ip=10.0.0.1".into(),
        "--node-lease-duration-seconds=40".into(),
    ]);
    launch(children, "kwok", kwok, &dir)?;

    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {
            "name": NODE_NAME,
            "labels": {"kubernetes.io/hostname": NODE_NAME, "kubernetes.io/os": "linux",
                       "kubernetes.io/arch": "amd64", "type": "kwok"},
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"}
        }
    }))
    .expect("static node manifest is valid");
    nodes
        .create(&PostParams::default(), &node)
        .await
        .map_err(|e| format!("failed to create node {NODE_NAME}: {e}"))?;
    wait_until(
        children,
        "node Ready (kwok)",
        Duration::from_secs(60),
        || async {
            nodes.get(NODE_NAME).await.is_ok_and(|n| {
                n.status
                    .and_then(|s| s.conditions)
                    .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            })
        },
    )
    .await?;
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
    wait_until(
        children,
        "default ServiceAccount (controller-manager)",
        Duration::from_secs(60),
        || async { sas.get("default").await.is_ok() },
    )
    .await?;
    Ok(ControlPlane { kubeconfig, dir })
}

/// Runs the build script (a no-op when the binaries are cached) and returns the binary
/// directory (etcd, kube-apiserver, …, kubectl, kwok). Its progress goes straight to stderr.
///
/// # Errors
/// When the script fails; its output explains why.
pub fn build() -> Result<PathBuf, String> {
    run_script("cluster/build.sh")
}

/// kapply, cli-utils' reference CLI (agentk's engine), built by `cluster/build-kapply.sh`
/// (a no-op when cached): the path of the binary.
///
/// # Panics
/// When the build fails; its output is on stderr.
pub fn kapply() -> PathBuf {
    static KAPPLY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    KAPPLY
        .get_or_init(|| run_script("cluster/build-kapply.sh"))
        .clone()
        .unwrap_or_else(|e| panic!("kapply could not be built: {e}"))
}

/// A native reference CLI built by `cluster/build-cli.sh` at the version
/// `cluster/versions.env` pins (a no-op when cached): `kustomize` or `helm`, whose output
/// the renderer tests compare sluice's with.
///
/// # Panics
/// When the build fails; its output is on stderr.
pub fn reference_cli(name: &str) -> PathBuf {
    static CLIS: std::sync::Mutex<Vec<(String, PathBuf)>> = std::sync::Mutex::new(Vec::new());
    let mut clis = CLIS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, path)) = clis.iter().find(|(n, _)| n == name) {
        return path.clone();
    }
    let path = run_script_with("cluster/build-cli.sh", &[name])
        .unwrap_or_else(|e| panic!("{name} could not be built: {e}"));
    clis.push((name.to_string(), path.clone()));
    path
}

/// sluice's renderers (Kustomize and Helm as WebAssembly), built by `renderers/build.sh`
/// (a no-op when cached): the directory holding `kustomize.wasm` and `helm.wasm`.
///
/// # Panics
/// When the build fails; its output is on stderr.
pub fn renderers_dir() -> PathBuf {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| run_script("../renderers/build.sh"))
        .clone()
        .unwrap_or_else(|e| panic!("the renderers could not be built: {e}"))
}

/// flux-ssa (`cluster/fluxssa`): one kustomize-controller reconcile with Flux's apply engine,
/// for the apply bench; built on first use (`cluster/build-fluxssa.sh`).
pub fn flux_ssa() -> PathBuf {
    static FLUX: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    FLUX.get_or_init(|| run_script("cluster/build-fluxssa.sh"))
        .clone()
        .unwrap_or_else(|e| panic!("flux-ssa could not be built: {e}"))
}

/// The path a script (relative to this crate) prints on its last line; its progress goes to
/// stderr.
pub(crate) fn run_script(name: &str) -> Result<PathBuf, String> {
    run_script_with(name, &[])
}

fn run_script_with(name: &str, args: &[&str]) -> Result<PathBuf, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join(name);
    let out = Command::new("bash")
        .arg(&script)
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("failed to run {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} failed ({}); its output is above",
            script.display(),
            out.status
        ));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = stdout.lines().last().unwrap_or_default().trim();
    Ok(PathBuf::from(dir))
}

fn free_ports<const N: usize>() -> Result<[u16; N], String> {
    // Hold all listeners until every port is chosen so no two are the same.
    let listeners: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("failed to find a free port: {e}"))?;
    let ports: Vec<u16> = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()).unwrap_or(0))
        .collect();
    ports
        .try_into()
        .map_err(|_| "port count mismatch".to_string())
}

fn write_kubeconfig(path: &Path, api_port: u16, pki: &pki::Pki) -> Result<(), String> {
    let text = format!(
        "apiVersion: v1\nkind: Config\n\
         clusters:\n- name: sluice-test\n  cluster:\n    server: https://127.0.0.1:{api_port}\n    certificate-authority: {}\n\
         users:\n- name: admin\n  user:\n    client-certificate: {}\n    client-key: {}\n\
         contexts:\n- name: sluice-test\n  context:\n    cluster: sluice-test\n    user: admin\n\
         current-context: sluice-test\n",
        pki.ca_cert.display(),
        pki.admin_cert.display(),
        pki.admin_key.display()
    );
    std::fs::write(path, text).map_err(|e| format!("failed to write {}: {e}", path.display()))
}

fn launch(
    children: &mut Vec<(String, Child, PathBuf)>,
    name: &str,
    cmd: Command,
    dir: &Path,
) -> Result<(), String> {
    let log = dir.join(format!("{name}.log"));
    let child = spawn_tied(cmd, &log).map_err(|e| format!("failed to start {name}: {e}"))?;
    children.push((name.to_string(), child, log));
    Ok(())
}

/// Polls `ready` every 200 ms until it holds. Fails early, quoting the log, when one of the
/// started processes exits, and on timeout, quoting the log of the newest process.
async fn wait_until<F, Fut>(
    children: &mut [(String, Child, PathBuf)],
    what: &str,
    timeout: Duration,
    ready: F,
) -> Result<(), String>
where
    F: Fn() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if ready().await {
            return Ok(());
        }
        for (name, child, log) in children.iter_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "{name} exited ({status}) while waiting for {what}; last lines of {}:\n{}",
                    log.display(),
                    log_tail(log, 30)
                ));
            }
        }
        if start.elapsed() > timeout {
            let (name, _, log) = children.last().expect("wait_until runs after a launch");
            return Err(format!(
                "timed out after {timeout:?} waiting for {what}; last lines of the {name} log {}:\n{}",
                log.display(),
                log_tail(log, 30)
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// etcd's flags: one member on loopback, its data under `dir/etcd`.
fn etcd_args(dir: &Path, etcd_port: u16, peer_port: u16) -> Vec<String> {
    let p = |p: &Path| p.display().to_string();
    let etcd_url = format!("http://127.0.0.1:{etcd_port}");
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    vec![
        "--name=n0".to_string(),
        format!("--data-dir={}", p(&dir.join("etcd"))),
        "--unsafe-no-fsync=true".into(),
        format!("--listen-client-urls={etcd_url}"),
        format!("--advertise-client-urls={etcd_url}"),
        format!("--listen-peer-urls={peer_url}"),
        format!("--initial-advertise-peer-urls={peer_url}"),
        format!("--initial-cluster=n0={peer_url}"),
        "--log-level=warn".into(),
    ]
}

fn etcd_healthy(etcd_port: u16) -> bool {
    plain_http_get(etcd_port, "/health").is_ok_and(|b| b.contains("\"health\":\"true\""))
}

/// kube-apiserver's flags (and its audit policy, written into `dir`).
fn apiserver_args(
    dir: &Path,
    pki: &pki::Pki,
    etcd_port: u16,
    api_port: u16,
) -> Result<Vec<String>, String> {
    let p = |p: &Path| p.display().to_string();
    let audit_policy = dir.join("audit-policy.yaml");
    std::fs::write(
        &audit_policy,
        "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n- level: Metadata\n",
    )
    .map_err(|e| format!("failed to write the audit policy: {e}"))?;
    Ok(vec![
        format!("--etcd-servers=http://127.0.0.1:{etcd_port}"),
        "--bind-address=127.0.0.1".into(),
        format!("--secure-port={api_port}"),
        "--advertise-address=127.0.0.1".into(),
        "--endpoint-reconciler-type=none".into(),
        format!("--cert-dir={}", p(dir)),
        format!("--tls-cert-file={}", p(&pki.serving_cert)),
        format!("--tls-private-key-file={}", p(&pki.serving_key)),
        format!("--client-ca-file={}", p(&pki.ca_cert)),
        "--authorization-mode=RBAC".into(),
        // Room for the apply bench's Services (2,500 at 10,000 objects).
        "--service-cluster-ip-range=10.96.0.0/16".into(),
        "--allow-privileged=true".into(),
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
        format!("--service-account-key-file={}", p(&pki.sa_public)),
        format!("--service-account-signing-key-file={}", p(&pki.sa_private)),
        // Every request at Metadata level, so benchmarks count requests per client
        // (`requests_by`).
        format!("--audit-policy-file={}", p(&audit_policy)),
        format!("--audit-log-path={}", p(&dir.join("audit.log"))),
        "--audit-log-format=json".into(),
        "--audit-log-maxsize=0".into(),
    ])
}

async fn apiserver_ready(client: &Client) -> bool {
    let req = http::Request::get("/readyz")
        .body(Vec::new())
        .expect("static request is valid");
    client.request_text(req).await.is_ok_and(|t| t == "ok")
}

/// A minimal HTTP/1.0 GET for etcd's plain-HTTP health endpoint.
fn plain_http_get(port: u16, path: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body)
}

/// A part of a [`Private`] control plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// etcd.
    Etcd,
    /// kube-apiserver.
    ApiServer,
    /// kube-controller-manager, with only the garbage collector and the namespace
    /// controller (foreground deletion and namespace deletion need them).
    ControllerManager,
}

/// An etcd, a kube-apiserver and a kube-controller-manager of one test's own (no
/// scheduler, no nodes: enough for ConfigMaps, Namespaces and their deletion), which the
/// test may kill and start again. Fault tests use it so as not to take the shared control
/// plane away from the other tests. Its processes are tied to the thread that started them
/// (the test's), so they end with the test.
pub struct Private {
    /// Admin kubeconfig.
    pub kubeconfig: PathBuf,
    dir: PathBuf,
    bin: PathBuf,
    etcd_port: u16,
    parts: Vec<(Part, Vec<String>, Option<Child>)>,
}

impl Private {
    /// Starts etcd and kube-apiserver on free ports; `name` names the run directory.
    ///
    /// # Errors
    /// When a binary cannot be built or a process does not become ready; the message
    /// quotes its log.
    pub async fn start(name: &str) -> Result<Private, String> {
        let bin = build()?;
        let dir = fresh_run_dir(&format!("sluice-private-{name}"))?;
        let pki = pki::write(&dir)?;
        let [etcd_port, peer_port, api_port, cm_port] = free_ports()?;
        let kubeconfig = dir.join("kubeconfig");
        write_kubeconfig(&kubeconfig, api_port, &pki)?;
        let p = |p: &Path| p.display().to_string();
        let controller_manager = vec![
            format!("--kubeconfig={}", p(&kubeconfig)),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={cm_port}"),
            format!("--service-account-private-key-file={}", p(&pki.sa_private)),
            format!("--root-ca-file={}", p(&pki.ca_cert)),
            "--controllers=garbage-collector-controller,namespace-controller".into(),
            "--use-service-account-credentials=false".into(),
        ];
        let mut plane = Private {
            kubeconfig,
            etcd_port,
            parts: vec![
                (Part::Etcd, etcd_args(&dir, etcd_port, peer_port), None),
                (
                    Part::ApiServer,
                    apiserver_args(&dir, &pki, etcd_port, api_port)?,
                    None,
                ),
                (Part::ControllerManager, controller_manager, None),
            ],
            dir,
            bin,
        };
        plane.start_part(Part::Etcd).await?;
        plane.start_part(Part::ApiServer).await?;
        plane.start_part(Part::ControllerManager).await?;
        Ok(plane)
    }

    /// Kills `part` (SIGKILL: no graceful shutdown) and reaps it.
    pub fn kill(&mut self, part: Part) {
        let running = self
            .parts
            .iter_mut()
            .find(|p| p.0 == part)
            .and_then(|p| p.2.take());
        if let Some(mut child) = running {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again every part that has exited, as the kubelet restarts a control plane's
    /// static pods (kube-controller-manager exits when it loses the API server for long).
    /// Returns the parts restarted.
    ///
    /// # Errors
    /// As [`Private::start_part`].
    pub async fn revive(&mut self) -> Result<Vec<Part>, String> {
        let mut revived = Vec::new();
        for part in [Part::Etcd, Part::ApiServer, Part::ControllerManager] {
            if matches!(slot_status(&mut self.parts, part), Some(Ok(Some(_)))) {
                self.start_part(part).await?;
                revived.push(part);
            }
        }
        Ok(revived)
    }

    /// Starts `part` again (with the same flags and data) and waits until it is ready.
    ///
    /// # Errors
    /// When it does not become ready within 90 s; the message quotes its log.
    pub async fn start_part(&mut self, part: Part) -> Result<(), String> {
        let name = match part {
            Part::Etcd => "etcd",
            Part::ApiServer => "kube-apiserver",
            Part::ControllerManager => "kube-controller-manager",
        };
        let client = client_for(&self.kubeconfig).await?;
        let etcd_port = self.etcd_port;
        let Some(slot) = self.parts.iter_mut().find(|p| p.0 == part) else {
            return Err(format!("no {name} in this plane"));
        };
        let mut cmd = Command::new(self.bin.join(name));
        cmd.args(&slot.1);
        // Each start gets its own log, so a failure quotes this start's.
        let n = std::fs::read_dir(&self.dir).map(|d| d.count()).unwrap_or(0);
        let mut started = Vec::new();
        launch(&mut started, &format!("{name}-{n}"), cmd, &self.dir)?;
        let since = Instant::now();
        let ready = wait_until(
            &mut started,
            &format!("{name} ready"),
            Duration::from_secs(90),
            || async {
                match part {
                    Part::Etcd => etcd_healthy(etcd_port),
                    Part::ApiServer => apiserver_ready(&client).await,
                    // It serves /healthz over TLS with its own certificate; running is
                    // enough (the garbage collector catches up when it has synced).
                    Part::ControllerManager => since.elapsed() > Duration::from_secs(1),
                }
            },
        )
        .await;
        slot.2 = started.pop().map(|(_, child, _)| child);
        ready
    }
}

fn slot_status(
    parts: &mut [(Part, Vec<String>, Option<Child>)],
    part: Part,
) -> Option<std::io::Result<Option<std::process::ExitStatus>>> {
    let child = parts.iter_mut().find(|p| p.0 == part)?.2.as_mut()?;
    Some(child.try_wait())
}
