//! The soak run (not part of CI): a local control plane and git server, several manifest
//! projects, `sluice run`, and a commit every few seconds, round robin across the projects,
//! for as long as asked. Every commit must be applied, in order; the agent's memory is
//! sampled every minute and its growth reported.
//!
//! Run it with `scripts/soak.sh [MINUTES] [PROJECTS] [SECONDS_BETWEEN_COMMITS]` (defaults
//! 30, 4, 10), which builds the release `sluice` first and passes its path in `SLUICE_BIN`.
//! It exits non-zero when a commit was not applied, was applied out of order, or the last
//! commits were not all in the cluster at the end.
//!
//! Each commit of project `p` is its version `v`: ten ConfigMaps `cm{2v}` … `cm{2v+9}` (so
//! every commit creates two, prunes two and changes eight) and the ConfigMap `version`
//! holding `v`, which the run watches.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::Api;
use sluice_testenv::{cluster, git};

fn arg(n: usize, default: u64) -> u64 {
    std::env::args()
        .nth(n)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

fn files(version: u64) -> Vec<git::Entry> {
    let cm = |name: &str, value: &str| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\ndata:\n  value: \"{value}\"\n"
        )
    };
    let mut files: Vec<git::Entry> = (2 * version..2 * version + 10)
        .map(|i| {
            git::file(
                &format!("cm{i}.yaml"),
                cm(&format!("cm{i}"), &version.to_string()),
            )
        })
        .collect();
    files.push(git::file(
        "version.yaml",
        cm("version", &version.to_string()),
    ));
    files
}

/// What the run has seen of the commits.
#[derive(Default)]
struct Tally {
    /// (project, version) → when it was committed; removed once seen.
    pending: BTreeMap<(usize, u64), Instant>,
    /// The last version seen per project.
    seen: Vec<u64>,
    /// Commit to seen, per version seen.
    latencies: Vec<Duration>,
    /// Versions never seen because a newer one was applied first.
    skipped: u64,
    /// Times a project's version went down.
    backwards: u64,
}

impl Tally {
    fn observe(&mut self, p: usize, now: u64) {
        let last = self.seen[p];
        if now < last {
            self.backwards += 1;
            eprintln!("soak: project {p} went back from version {last} to {now}");
        }
        if now > last {
            self.skipped += now - last - 1;
            for v in last + 1..=now {
                if let Some(at) = self.pending.remove(&(p, v))
                    && v == now
                {
                    self.latencies.push(at.elapsed());
                }
            }
            self.seen[p] = now;
        }
    }
}

/// VmRSS of `pid` in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let minutes = arg(1, 30);
    let projects = arg(2, 4) as usize;
    let every = Duration::from_secs(arg(3, 10));
    let bin = std::env::var("SLUICE_BIN")
        .expect("SLUICE_BIN: path of the sluice binary (scripts/soak.sh sets it)");

    eprintln!("soak: {minutes} min, {projects} projects, a commit every {every:?}");
    let client = cluster::client().await;
    let kubeconfig = &cluster::shared().kubeconfig;
    let server = git::shared();
    let run = std::process::id();
    let mut config = String::from("gitops:\n  manifest_projects:\n");
    let mut repos = Vec::new();
    for p in 0..projects {
        let ns = format!("soak-{run}-{p}");
        let namespace: Namespace =
            serde_json::from_value(serde_json::json!({"metadata": {"name": ns}}))
                .expect("namespace");
        Api::<Namespace>::all(client.clone())
            .create(&Default::default(), &namespace)
            .await
            .expect("create namespace");
        let repo = server.create_repo(&format!("soak/{ns}"));
        repo.commit("main", &files(0), "version 0");
        config.push_str(&format!("  - id: soak/{ns}\n    default_namespace: {ns}\n"));
        repos.push((repo, Api::<ConfigMap>::namespaced(client.clone(), &ns)));
    }
    let dir = std::env::temp_dir().join(format!("sluice-soak-{run}"));
    std::fs::create_dir_all(&dir).expect("run directory");
    eprintln!("soak: agent log and cache in {}", dir.display());
    let config_file = dir.join("config.yaml");
    std::fs::write(&config_file, config).expect("config");
    let log = dir.join("agent.log");
    let mut agent = Command::new(&bin)
        .args(["run", "--config"])
        .arg(&config_file)
        .args(["--git-base-url", server.base_url(), "--agent-name", "soak"])
        .args(["--poll-interval", "1s"])
        .args([
            "--observability-listen-address",
            "127.0.0.1:0",
            "--cache-dir",
        ])
        .arg(&dir)
        .env("KUBECONFIG", kubeconfig)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("start sluice");
    let pid = agent.id();

    // What each project's `version` ConfigMap says.
    let read = |cms: &Api<ConfigMap>| {
        let cms = cms.clone();
        async move {
            cms.get_opt("version")
                .await
                .ok()
                .flatten()
                .and_then(|c| c.data?.get("value")?.parse::<u64>().ok())
        }
    };

    let start = Instant::now();
    let end = start + Duration::from_secs(minutes * 60);
    let mut committed: Vec<u64> = vec![0; projects];
    let mut tally = Tally {
        seen: vec![0; projects],
        ..Tally::default()
    };
    // Sampled every minute from the first on (at spawn the process has not started yet).
    let mut rss: Vec<(u64, u64)> = Vec::new();
    let mut next_commit = Instant::now() + every;
    let mut next_sample = Instant::now() + Duration::from_secs(60);
    let mut turn = 0usize;
    while Instant::now() < end {
        if let Ok(Some(status)) = agent.try_wait() {
            eprintln!(
                "soak: the agent exited ({status}); its log ends with:\n{}",
                sluice_testenv::log_tail(&log, 30)
            );
            std::process::exit(2);
        }
        if Instant::now() >= next_commit {
            let p = turn % projects;
            turn += 1;
            committed[p] += 1;
            let v = committed[p];
            repos[p]
                .0
                .commit("main", &files(v), &format!("version {v}"));
            tally.pending.insert((p, v), Instant::now());
            next_commit += every;
        }
        for (p, (_, cms)) in repos.iter().enumerate() {
            if let Some(now) = read(cms).await {
                tally.observe(p, now);
            }
        }
        if Instant::now() >= next_sample {
            let minute = start.elapsed().as_secs() / 60;
            let kib = rss_kib(pid).unwrap_or(0);
            rss.push((minute, kib));
            eprintln!(
                "soak: minute {minute}: {} commits, {} applied, agent RSS {:.1} MiB",
                committed.iter().sum::<u64>(),
                tally.latencies.len(),
                kib as f64 / 1024.0
            );
            next_sample += Duration::from_secs(60);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // The last commits get a minute to land.
    let settle = Instant::now();
    while tally.seen.iter().zip(&committed).any(|(s, c)| s < c)
        && settle.elapsed() < Duration::from_secs(60)
    {
        for (p, (_, cms)) in repos.iter().enumerate() {
            if let Some(now) = read(cms).await {
                tally.observe(p, now);
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let _ = agent.kill();
    let _ = agent.wait();

    let Tally {
        seen,
        mut latencies,
        skipped,
        backwards,
        ..
    } = tally;
    latencies.sort();
    let commits: u64 = committed.iter().sum();
    let (first, last) = (
        rss.first().map_or(0, |r| r.1),
        rss.last().map_or(0, |r| r.1),
    );
    let peak = rss.iter().map(|r| r.1).max().unwrap_or(0);
    let behind: Vec<String> = seen
        .iter()
        .zip(&committed)
        .enumerate()
        .filter(|(_, (s, c))| s < c)
        .map(|(p, (s, c))| format!("project {p} at {s} of {c}"))
        .collect();
    println!(
        "soak: {minutes} min, {projects} projects, a commit every {every:?}: {commits} commits, \
         {} applied and seen, {skipped} never seen (a newer one came first), {backwards} out of order; \
         commit to applied p50 {:?}, p99 {:?}, max {:?}; agent RSS {:.1} MiB after the first minute, \
         {:.1} at the end, peak {:.1} (growth {:+.1} MiB); {}",
        latencies.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or_default(),
        first as f64 / 1024.0,
        last as f64 / 1024.0,
        peak as f64 / 1024.0,
        (last as f64 - first as f64) / 1024.0,
        if behind.is_empty() {
            "every project at its last commit".to_string()
        } else {
            format!("BEHIND: {}", behind.join(", "))
        }
    );
    if backwards > 0 || skipped > 0 || !behind.is_empty() {
        std::process::exit(1);
    }
}
