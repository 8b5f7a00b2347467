//! Many projects on one agent, then the same projects shared by three replicas (issue #27).
//!
//! `cargo bench -p sluice-testenv --bench projects` starts the test control plane and git
//! server and creates N repositories (N = `SLUICE_BENCH_PROJECTS`, default 1,000), each a
//! manifest project of 10 objects of mixed kinds in a namespace of its own: the Namespace,
//! 3 ConfigMaps, 2 Secrets, 2 ServiceAccounts, a Service and a Role. Then:
//!
//! 1. **one replica**: the release `sluice run` binary over all N projects (polling every
//!    `SLUICE_BENCH_POLL`, default 60 s; push webhooks on): time from its start until every
//!    project's inventory records a successful sync, the process's CPU seconds and peak RSS
//!    by then, API requests during 60 s at rest (the audit log, `sluice/` user agent), and
//!    push → applied for one project while the others are idle (20 pushes: p50, p99);
//! 2. **three replicas** (`SLUICE_BENCH_REPLICAS`, 0 skips it), each its own process with
//!    `POD_NAMESPACE` set, after a commit to every project: time until every project
//!    recorded the new commit, the spread (projects per replica: most / fewest), Lease
//!    writes per minute at rest, and after SIGKILL of one replica the time until each of
//!    its projects was synced again by another.
//!
//! Objects are ready as soon as they are stored (no Deployments: the bench measures the
//! agent, not kube-scheduler and kwok).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams};
use sluice_agent::history::{LAST_SYNC, LastSync, SyncResult};
use sluice_engine::inventory::{INVENTORY_LABEL, OWNING_PROJECT};
use sluice_testenv::cluster;
use sluice_testenv::git::{self, Repo};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The 10 objects of project `i` in namespace `ns`; `rev` goes into a ConfigMap.
fn objects(ns: &str, rev: &str) -> String {
    let mut out = format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n");
    for k in 0..3 {
        out.push_str(&format!(
            "---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cfg-{k}\n  namespace: {ns}\ndata:\n  rev: \"{rev}\"\n  settings.yaml: |\n    replicas: 2\n    mode: \"0755\"\n"
        ));
    }
    for k in 0..2 {
        out.push_str(&format!(
            "---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: secret-{k}\n  namespace: {ns}\nstringData:\n  token: bench-{k}\n"
        ));
        out.push_str(&format!(
            "---\napiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: worker-{k}\n  namespace: {ns}\n"
        ));
    }
    out.push_str(&format!(
        "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: {ns}\nspec:\n  selector: {{app: web}}\n  ports:\n  - port: 80\n    targetPort: 8080\n"
    ));
    out.push_str(&format!(
        "---\napiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata:\n  name: reader\n  namespace: {ns}\nrules:\n- apiGroups: [\"\"]\n  resources: [configmaps]\n  verbs: [get, list]\n"
    ));
    out
}

/// Per project: its last recorded sync (from the inventories' annotations, one LIST).
async fn last_syncs(client: &kube::Client) -> BTreeMap<String, LastSync> {
    let cms: Api<ConfigMap> = Api::all(client.clone());
    let Ok(list) = cms
        .list(&ListParams::default().labels(INVENTORY_LABEL))
        .await
    else {
        return BTreeMap::new();
    };
    list.items
        .into_iter()
        .filter_map(|cm| {
            let a = cm.metadata.annotations?;
            let project = a.get(OWNING_PROJECT)?.clone();
            let last = serde_json::from_str(a.get(LAST_SYNC)?).ok()?;
            Some((project, last))
        })
        .collect()
}

/// Waits until `done` holds for the recorded syncs; returns them.
async fn until_synced(
    client: &kube::Client,
    what: &str,
    limit: Duration,
    done: impl Fn(&BTreeMap<String, LastSync>) -> bool,
) -> BTreeMap<String, LastSync> {
    let started = Instant::now();
    loop {
        let last = last_syncs(client).await;
        if done(&last) {
            return last;
        }
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// (CPU seconds, peak RSS in MiB) of a process.
fn usage(pid: u32) -> (f64, f64) {
    let (cpu, hwm_kib, _) = sluice_testenv::usage(pid);
    (cpu, hwm_kib as f64 / 1024.0)
}

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").to_string()
}

/// Starts `sluice run` over `config`; `replica` = (Lease namespace, identity).
fn agent(
    binary: &Path,
    dir: &Path,
    config: &Path,
    replica: Option<(&str, &str)>,
    hooks: &str,
) -> Child {
    let cp = cluster::shared();
    let name = replica.map_or("single", |(_, id)| id);
    let secret = dir.join("webhook-secret");
    std::fs::write(&secret, "bench-secret").expect("secret");
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).expect("log");
    let poll = format!("{}s", env_or("SLUICE_BENCH_POLL", 60));
    let mut cmd = Command::new(binary);
    cmd.args(["run", "--agent-name", "many", "--poll-interval", &poll])
        .arg("--config")
        .arg(config)
        .arg("--git-base-url")
        .arg(git::shared().base_url())
        .arg("--cache-dir")
        .arg(dir.join(format!("cache-{name}")))
        .arg("--webhook-secret-file")
        .arg(&secret)
        .args(["--webhook-listen-address", hooks])
        .args(["--observability-listen-address", &free_addr()])
        .env("KUBECONFIG", &cp.kubeconfig)
        .env("RUST_LOG", "warn")
        .env_remove("POD_NAMESPACE")
        .env_remove("POD_NAME")
        .stdout(Stdio::null())
        .stderr(log);
    if let Some((ns, id)) = replica {
        cmd.env("POD_NAMESPACE", ns).env("POD_NAME", id);
    }
    cmd.spawn().expect("start the agent")
}

async fn push(hooks: &str, project: &str) {
    let out = sluice_testenv::push_generic(hooks, "bench-secret", project).await;
    assert!(out.starts_with("HTTP/1.1 202"), "{out}");
}

/// Requests from the agents (user agent `sluice/`) since `mark`: (all, Lease writes).
fn requests(mark: u64) -> (usize, usize) {
    let reqs: Vec<_> = cluster::shared()
        .requests_since(mark)
        .into_iter()
        .filter(|r| r.user_agent.starts_with("sluice/"))
        .collect();
    let lease_writes = reqs
        .iter()
        .filter(|r| r.is_write() && r.uri.contains("/leases/"))
        .count();
    (reqs.len(), lease_writes)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() {
    let client = cluster::client().await;
    let binary = sluice_testenv::wasm::sluice_release_binary();
    let n = env_or("SLUICE_BENCH_PROJECTS", 1000) as usize;
    let replicas = env_or("SLUICE_BENCH_REPLICAS", 3) as usize;
    let run = cluster::namespace(&client, "many").await;
    let dir = tempfile::tempdir().expect("dir");

    let made = Instant::now();
    let mut config = String::from("gitops:\n  manifest_projects:\n");
    let mut repos: Vec<(String, Repo, String)> = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("many/{run}-{i}");
        let ns = format!("{run}-{i}");
        let repo = git::shared().create_repo(&id);
        repo.commit("main", &[git::file("app.yaml", objects(&ns, "1"))], "first");
        config.push_str(&format!(
            "  - id: {id}\n    default_namespace: {ns}\n    reconcile_timeout: 600s\n"
        ));
        repos.push((id, repo, ns));
    }
    let config_path = dir.path().join("config.yaml");
    std::fs::write(&config_path, &config).expect("config");
    eprintln!("{n} repositories in {:?}", made.elapsed());
    let poll = env_or("SLUICE_BENCH_POLL", 60);

    // 1. One replica.
    let hooks = free_addr();
    let mark = cluster::shared().audit_mark();
    let started = Instant::now();
    let mut single = agent(&binary, dir.path(), &config_path, None, &hooks);
    until_synced(
        &client,
        "every project synced",
        Duration::from_secs(1800),
        |l| l.len() == n && l.values().all(|s| s.result == SyncResult::Succeeded),
    )
    .await;
    let all_synced = started.elapsed();
    let (cpu, peak) = usage(single.id());
    let (first_requests, _) = requests(mark);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mark = cluster::shared().audit_mark();
    tokio::time::sleep(Duration::from_secs(60)).await;
    let (idle_requests, _) = requests(mark);
    let (_, peak_idle) = usage(single.id());
    // Push → applied for project 0 while the others are idle.
    let (id0, repo0, ns0) = &repos[0];
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns0);
    let mut latencies = Vec::new();
    for k in 0..20 {
        let rev = format!("push-{k}");
        repo0.commit("main", &[git::file("app.yaml", objects(ns0, &rev))], &rev);
        let pushed = Instant::now();
        push(&hooks, id0).await;
        loop {
            let cm = cms.get_opt("cfg-0").await.ok().flatten();
            if cm.and_then(|c| c.data?.get("rev").cloned()).as_deref() == Some(rev.as_str()) {
                break;
            }
            assert!(pushed.elapsed() < Duration::from_secs(120), "push {k}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        latencies.push(pushed.elapsed());
    }
    latencies.sort();
    let (cpu_end, peak_end) = usage(single.id());
    let _ = single.kill();
    let _ = single.wait();

    println!("| {n} projects × 10 objects, one replica (release `sluice run`, poll {poll} s) | |");
    println!("|---|---|");
    println!(
        "| start → every project synced | {:.1} s ({first_requests} API requests) |",
        all_synced.as_secs_f64()
    );
    println!("| CPU time by then | {cpu:.1} s |");
    println!(
        "| peak RSS (VmHWM): at all synced / after 60 s at rest / at the end | {peak:.1} / {peak_idle:.1} / {peak_end:.1} MiB |"
    );
    println!(
        "| API requests in 60 s at rest | {idle_requests} ({:.2} per project) |",
        idle_requests as f64 / n as f64
    );
    println!(
        "| push → applied, one project, 20 pushes | p50 {:.0} ms, p99 {:.0} ms |",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99)
    );
    println!("| CPU time, all of the above | {cpu_end:.1} s |");
    println!();

    if replicas == 0 {
        return;
    }
    // 2. The same projects shared by `replicas` processes, after a commit to every one.
    let mut heads = BTreeMap::new();
    for (id, repo, ns) in &repos {
        let head = repo.commit("main", &[git::file("app.yaml", objects(ns, "2"))], "second");
        heads.insert(id.clone(), head);
    }
    let lease_ns = cluster::namespace(&client, "many-lease").await;
    let mark = cluster::shared().audit_mark();
    let started = Instant::now();
    let mut children: Vec<(String, Child)> = (0..replicas)
        .map(|r| {
            let id = format!("replica-{r}");
            let child = agent(
                &binary,
                dir.path(),
                &config_path,
                Some((&lease_ns, &id)),
                &free_addr(),
            );
            (id, child)
        })
        .collect();
    let done = |l: &BTreeMap<String, LastSync>| {
        heads.iter().all(|(id, head)| {
            l.get(id)
                .is_some_and(|s| s.result == SyncResult::Succeeded && &s.commit == head)
        })
    };
    let last = until_synced(
        &client,
        "every project synced by the replicas",
        Duration::from_secs(1800),
        done,
    )
    .await;
    let shared_synced = started.elapsed();
    let (shared_requests, _) = requests(mark);
    let mut per_replica: BTreeMap<String, usize> = BTreeMap::new();
    for s in last.values() {
        *per_replica
            .entry(s.replica.clone().unwrap_or_default())
            .or_default() += 1;
    }
    let most = per_replica.values().max().copied().unwrap_or(0);
    let fewest = per_replica.values().min().copied().unwrap_or(0);
    let usages: Vec<(f64, f64)> = children.iter().map(|(_, c)| usage(c.id())).collect();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mark = cluster::shared().audit_mark();
    tokio::time::sleep(Duration::from_secs(60)).await;
    let (idle_shared, lease_writes) = requests(mark);

    // SIGKILL the last replica: its projects go to the others.
    let (victim, mut child) = children.pop().expect("a replica");
    let theirs: Vec<String> = last
        .iter()
        .filter(|(_, s)| s.replica.as_deref() == Some(victim.as_str()))
        .map(|(p, _)| p.clone())
        .collect();
    let before: BTreeMap<String, String> = theirs
        .iter()
        .map(|p| (p.clone(), last[p].time.clone()))
        .collect();
    let _ = child.kill();
    let _ = child.wait();
    let killed = Instant::now();
    until_synced(
        &client,
        "the killed replica's projects synced elsewhere",
        Duration::from_secs(600),
        |l| {
            theirs.iter().all(|p| {
                l.get(p).is_some_and(|s| {
                    s.replica.as_deref() != Some(victim.as_str()) && Some(&s.time) != before.get(p)
                })
            })
        },
    )
    .await;
    let takeover = killed.elapsed();
    for (_, mut c) in children {
        let _ = c.kill();
        let _ = c.wait();
    }

    println!(
        "| the same, {replicas} replicas (each its own process), after a commit to every project | |"
    );
    println!("|---|---|");
    println!(
        "| start → every project synced the new commit | {:.1} s ({shared_requests} API requests) |",
        shared_synced.as_secs_f64()
    );
    println!(
        "| projects per replica | {per_replica:?}: most / fewest {:.2} |",
        most as f64 / fewest.max(1) as f64
    );
    println!(
        "| per replica by then: CPU s, peak RSS MiB | {} |",
        usages
            .iter()
            .map(|(c, r)| format!("{c:.1} s, {r:.1} MiB"))
            .collect::<Vec<_>>()
            .join("; ")
    );
    println!(
        "| at rest, 60 s, all replicas | {idle_shared} API requests, {lease_writes} Lease writes |"
    );
    println!(
        "| SIGKILL of {victim} → its {} projects synced by the others | {:.1} s (lease 15 s) |",
        theirs.len(),
        takeover.as_secs_f64()
    );
}
