//! Faults during syncs, against real processes: the agent binary SIGKILLed at twenty points
//! of its apply and prune, and kube-apiserver, etcd and the git server failing under a
//! running agent. Every case must converge without operator action: the inventory holds
//! exactly git's objects, the cluster holds exactly those objects at git's version, and
//! nothing the project once applied is left behind.
//!
//! Each version `v` of the test repository holds the ConfigMaps `cm{5v}` … `cm{5v+29}`
//! with the value `v`: from one version to the next, five objects are pruned, five are
//! created and twenty-five change.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, PostParams};
use sluice_testenv::cluster::{self, Part, Private};
use sluice_testenv::git::{self, Repo, file};
use tokio::sync::watch;

use crate::support::*;

/// Objects per version.
const SIZE: usize = 30;

fn names(version: usize) -> BTreeSet<String> {
    (5 * version..5 * version + SIZE)
        .map(|i| format!("cm{i}"))
        .collect()
}

fn commit(repo: &Repo, version: usize) {
    let files: Vec<_> = names(version)
        .iter()
        .map(|n| file(&format!("{n}.yaml"), configmap(n, &version.to_string())))
        .collect();
    repo.commit("main", &files, &format!("version {version}"));
}

/// `Some(())` when the cluster is exactly at `version`: the inventory lists exactly its
/// objects, and the live `cm*` ConfigMaps are exactly those, at its value.
async fn at_version(cms: &Api<ConfigMap>, inventory: &str, version: usize) -> Option<()> {
    let stored = cms.get_opt(inventory).await.ok()??;
    let ns = stored.metadata.namespace?;
    let keys: BTreeSet<String> = stored.data.unwrap_or_default().into_keys().collect();
    let want = names(version);
    let want_keys: BTreeSet<String> = want
        .iter()
        .map(|n| format!("{ns}_{n}__ConfigMap"))
        .collect();
    let live: Vec<(String, Option<String>)> = cms
        .list(&Default::default())
        .await
        .ok()?
        .items
        .into_iter()
        .filter_map(|c| {
            let name = c.metadata.name?;
            name.starts_with("cm")
                .then(|| (name, c.data.and_then(|d| d.get("value").cloned())))
        })
        .collect();
    let live_names: BTreeSet<String> = live.iter().map(|(n, _)| n.clone()).collect();
    let value = version.to_string();
    (keys == want_keys
        && live_names == want
        && live
            .iter()
            .all(|(_, v)| v.as_deref() == Some(value.as_str())))
    .then_some(())
}

/// How far the cluster got towards `version`: (objects at it, objects of other versions
/// still present).
async fn progress(cms: &Api<ConfigMap>, version: usize) -> (usize, usize) {
    let want = names(version);
    let value = version.to_string();
    let live = cms
        .list(&Default::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default();
    let done = live
        .iter()
        .filter(|c| {
            c.metadata.name.as_ref().is_some_and(|n| want.contains(n))
                && c.data.as_ref().and_then(|d| d.get("value")) == Some(&value)
        })
        .count();
    let stale = live
        .iter()
        .filter(|c| {
            c.metadata
                .name
                .as_ref()
                .is_some_and(|n| n.starts_with("cm") && !want.contains(n))
        })
        .count();
    (done, stale)
}

/// Waits up to 120 s for [`at_version`]; on timeout fails quoting the agent's log.
async fn converge(
    what: &str,
    cms: &Api<ConfigMap>,
    inventory: &str,
    version: usize,
    log: &std::path::Path,
) {
    let start = Instant::now();
    while at_version(cms, inventory, version).await.is_none() {
        if start.elapsed() > Duration::from_secs(120) {
            panic!(
                "timed out after 120 s waiting for {what}; {:?} now; the agent's log ends with:\n{}",
                progress(cms, version).await,
                sluice_testenv::log_tail(log, 40)
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `sluice run` for `project`, with the given git base URL and kubeconfig.
fn agent(
    agent_name: &str,
    project: &str,
    ns: &str,
    git_base_url: &str,
    kubeconfig: &std::path::Path,
    dir: &std::path::Path,
) -> std::process::Child {
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        format!("gitops:\n  manifest_projects:\n  - id: {project}\n    default_namespace: {ns}\n"),
    )
    .expect("config");
    std::process::Command::new(sluice_testenv::wasm::sluice_binary())
        .args(["run", "--config"])
        .arg(&config)
        .args(["--git-base-url", git_base_url, "--agent-name", agent_name])
        .args(["--poll-interval", "500ms", "--concurrency", "1"])
        .args([
            "--observability-listen-address",
            "127.0.0.1:0",
            "--cache-dir",
        ])
        .arg(dir)
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "sluice=debug")
        .stdout(std::process::Stdio::null())
        .stderr(
            std::fs::File::create(dir.join(format!("{agent_name}.log")))
                .map(std::process::Stdio::from)
                .unwrap_or_else(|_| std::process::Stdio::null()),
        )
        .spawn()
        .expect("start sluice")
}

fn inventory_name(agent: &str, project: &str) -> String {
    format!(
        "inventory-{}",
        sluice_agent::sync::inventory_id(agent, project)
    )
}

/// A deterministic sequence of delays (xorshift), so a failing run can be repeated.
fn delays(n: usize, seed: u64, from: Duration, to: Duration) -> Vec<Duration> {
    let mut x = seed;
    let span = (to - from).as_millis() as u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            from + Duration::from_millis(x % span)
        })
        .collect()
}

#[tokio::test]
async fn the_agent_sigkilled_at_twenty_points_of_apply_and_prune_converges_exactly() {
    let client = cluster::client().await;
    let ns = cluster::namespace(&client, "kill20").await;
    let project = format!("group/{ns}");
    let repo = git::shared().create_repo(&project);
    let dir = tempfile::tempdir().expect("dir");
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let inventory = inventory_name("kill20", &project);
    let kubeconfig = &cluster::shared().kubeconfig;
    let base = git::shared().base_url();

    let mut landed = Vec::new();
    for (round, delay) in delays(
        20,
        0x05ee_d0f5_c1ce,
        Duration::from_millis(150),
        Duration::from_millis(1200),
    )
    .into_iter()
    .enumerate()
    {
        let version = round + 1;
        commit(&repo, version);
        let mut a = agent("kill20", &project, &ns, base, kubeconfig, dir.path());
        tokio::time::sleep(delay).await;
        a.kill().expect("SIGKILL");
        a.wait().expect("reaped");
        let (done, stale) = progress(&cms, version).await;
        landed.push(format!(
            "{delay:?}: {done}/{SIZE} applied, {stale} to prune"
        ));
    }
    let last = 21;
    commit(&repo, last);
    let started = Instant::now();
    let mut a = agent("kill20", &project, &ns, base, kubeconfig, dir.path());
    eventually(
        "the last version, exactly, after twenty kills",
        Duration::from_secs(90),
        || at_version(&cms, &inventory, last),
    )
    .await;
    let _ = a.kill();
    let _ = a.wait();
    eprintln!(
        "twenty SIGKILLs, then converged in {:?}; where the kills landed: {}",
        started.elapsed(),
        landed.join("; ")
    );
}

/// What the git server does with a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Forwards it to the real server.
    Open,
    /// Closes it at once (a server that is down).
    Closed,
    /// Accepts it and never answers (a tarpit).
    Silent,
}

/// A TCP gate in front of the shared git server that the test can close or turn into a
/// tarpit. Turning it from open to anything else also cuts the connections it forwards, as
/// a server going down would (keep-alive connections would otherwise bypass the fault).
struct Gate {
    url: String,
    mode: watch::Sender<Mode>,
}

impl Gate {
    async fn start(upstream: &str) -> Gate {
        let upstream = upstream.trim_start_matches("http://").to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let (mode, rx) = watch::channel(Mode::Open);
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut rx = rx.clone();
                let upstream = upstream.clone();
                let now = *rx.borrow();
                tokio::spawn(async move {
                    match now {
                        Mode::Closed => drop(inbound),
                        Mode::Silent => {
                            tokio::time::sleep(Duration::from_secs(3600)).await;
                            drop(inbound);
                        }
                        Mode::Open => {
                            let Ok(mut out) = tokio::net::TcpStream::connect(&upstream).await
                            else {
                                return;
                            };
                            tokio::select! {
                                _ = tokio::io::copy_bidirectional(&mut inbound, &mut out) => {}
                                _ = rx.wait_for(|m| *m != Mode::Open) => {}
                            }
                        }
                    }
                });
            }
        });
        Gate { url, mode }
    }

    fn set(&self, mode: Mode) {
        let _ = self.mode.send(mode);
    }
}

#[tokio::test]
async fn the_agent_converges_after_apiserver_etcd_and_git_faults_without_operator_action() {
    let mut plane = Private::start("faults")
        .await
        .expect("private control plane");
    let client = cluster::client_for(&plane.kubeconfig)
        .await
        .expect("client");
    let ns = "faults";
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({"metadata": {"name": ns}}))
                .expect("namespace"),
        )
        .await
        .expect("create namespace");
    let project = format!("group/faults-{}", std::process::id());
    let repo = git::shared().create_repo(&project);
    let gate = Gate::start(git::shared().base_url()).await;
    let dir = tempfile::tempdir().expect("dir");
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let inventory = inventory_name("faults", &project);

    commit(&repo, 1);
    let mut a = agent(
        "faults",
        &project,
        ns,
        &gate.url,
        &plane.kubeconfig,
        dir.path(),
    );
    eventually("version 1", Duration::from_secs(60), || {
        at_version(&cms, &inventory, 1)
    })
    .await;

    let mut figures = Vec::new();
    // kube-apiserver, then etcd, killed as soon as the agent starts on a new version, and
    // started again 5 s later.
    for (version, part) in [(2, Part::ApiServer), (3, Part::Etcd)] {
        commit(&repo, version);
        eventually(
            "the agent starts on the new version",
            Duration::from_secs(30),
            || async { (progress(&cms, version).await.0 > 0).then_some(()) },
        )
        .await;
        let at_kill = progress(&cms, version).await;
        plane.kill(part);
        tokio::time::sleep(Duration::from_secs(5)).await;
        plane.start_part(part).await.expect("restart");
        let revived = plane.revive().await.expect("revive");
        let back = Instant::now();
        converge(
            &format!("version {version} after {part:?} came back"),
            &cms,
            &inventory,
            version,
            &dir.path().join("faults.log"),
        )
        .await;
        figures.push(format!(
            "{part:?} killed at {}/{SIZE} applied and {} to prune, down 5 s: converged {:?} after its return (restarted as well: {revived:?})",
            at_kill.0,
            at_kill.1,
            back.elapsed()
        ));
    }

    // The git server closes every connection, then becomes a tarpit: the cluster stays at
    // the last good version (a failed fetch changes nothing), and the new version lands
    // once git answers again.
    for (version, mode) in [(4, Mode::Closed), (5, Mode::Silent)] {
        gate.set(mode);
        commit(&repo, version);
        tokio::time::sleep(Duration::from_secs(8)).await;
        at_version(&cms, &inventory, version - 1)
            .await
            .unwrap_or_else(|| panic!("{mode:?}: the cluster left version {}", version - 1));
        gate.set(Mode::Open);
        let back = Instant::now();
        converge(
            &format!("version {version} after the git server came back from {mode:?}"),
            &cms,
            &inventory,
            version,
            &dir.path().join("faults.log"),
        )
        .await;
        figures.push(format!(
            "git {mode:?} for 8 s: converged {:?} after it answered again",
            back.elapsed()
        ));
    }
    assert!(
        a.try_wait().expect("agent status").is_none(),
        "the agent kept running through every fault"
    );
    let _ = a.kill();
    let _ = a.wait();
    eprintln!("faults survived: {}", figures.join("; "));
}
