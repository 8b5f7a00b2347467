//! The README demo: a local control plane and git server, an example repository from
//! `examples/nginx`, `sluice run`, and the seed scenario (replicas 1 → 2).
//!
//! Run it with `scripts/demo.sh`, which builds `sluice` first and passes its path in
//! `SLUICE_BIN`. The first run builds the control plane (minutes, with progress).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::Api;
use sluice_testenv::{cluster, git};

fn step(text: &str) {
    eprintln!("\n\x1b[1m==> {text}\x1b[0m");
}

#[tokio::main]
async fn main() {
    let bin = std::env::var("SLUICE_BIN")
        .expect("SLUICE_BIN: path of the sluice binary (scripts/demo.sh sets it)");
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");

    step("starting the control plane (etcd, kube-apiserver, controller-manager, scheduler, kwok)");
    let client = cluster::client().await;
    let kubeconfig = &cluster::shared().kubeconfig;
    let ns: k8s_openapi::api::core::v1::Namespace = serde_json::from_value(
        serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo"}}),
    )
    .expect("namespace");
    let _ = Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
        .create(&Default::default(), &ns)
        .await;

    step("creating the manifest repository demo/nginx from examples/nginx");
    let server = git::shared();
    let repo = server.create_repo("demo/nginx");
    let manifest = std::fs::read_to_string(examples.join("nginx/deployment.yaml"))
        .expect("examples/nginx/deployment.yaml");
    let first = repo.commit(
        "main",
        &[git::file("deployment.yaml", &manifest)],
        "nginx, one replica",
    );
    eprintln!("    {} at {}", repo.http_url(), &first[..12]);

    step("running `sluice run --config examples/config.yaml` (logs below, human format)");
    let mut agent = Command::new(&bin)
        .args(["run", "--config"])
        .arg(examples.join("config.yaml"))
        .args([
            "--git-base-url",
            server.base_url(),
            "--agent-name",
            "demo",
            "--poll-interval",
            "1s",
            "--log-format",
            "human",
            "--observability-listen-address",
            "127.0.0.1:0",
        ])
        .env("KUBECONFIG", kubeconfig)
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start sluice");

    let deploys: Api<Deployment> = Api::namespaced(client.clone(), "demo");
    wait_available(&deploys, 1).await;
    step("nginx is Available with 1 replica; committing replicas: 2");
    let scaled = manifest.replace("replicas: 1", "replicas: 2");
    let second = repo.commit(
        "main",
        &[git::file("deployment.yaml", &scaled)],
        "scale nginx to two replicas",
    );
    eprintln!("    new commit {}", &second[..12]);
    let started = Instant::now();
    wait_available(&deploys, 2).await;
    step(&format!(
        "the cluster followed the commit in {:.1} s: nginx has 2 available replicas",
        started.elapsed().as_secs_f64()
    ));

    let _ = agent.kill();
    let _ = agent.wait();
    step("done; the control plane and git server stop with this process");
}

async fn wait_available(deploys: &Api<Deployment>, replicas: i32) {
    let start = Instant::now();
    loop {
        if let Ok(Some(d)) = deploys.get_opt("nginx").await {
            let want = d.spec.as_ref().and_then(|s| s.replicas);
            let available = d.status.as_ref().and_then(|s| s.available_replicas);
            if want == Some(replicas) && available == Some(replicas) {
                return;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "nginx did not reach {replicas} available replicas in 120 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
