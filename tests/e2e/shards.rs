//! Work shared across replicas through one real Lease ([`sluice_agent::shards`]): every
//! project synced by exactly one replica, a dead replica's projects taken over, work given
//! back to a replica that joins, and fencing proven with the API server's audit log.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams};
use sluice_agent::agent::{self, ConfigSource};
use sluice_agent::history::{LAST_SYNC, LastSync};
use sluice_agent::shards::{self, Ownership, Table, shard_of};
use sluice_engine::inventory::{INVENTORY_LABEL, OWNING_PROJECT};
use sluice_testenv::cluster;
use sluice_testenv::git::{self, Repo, file};
use sluice_testenv::proxy::Proxy;

use crate::support::*;

const LEASE: &str = "sluice-sh-shards";

/// Short timings: a 3 s lease, a 2 s renew deadline, a round every 200 ms.
fn lease_config(ns: &str, identity: &str) -> shards::Config {
    shards::Config {
        lease_duration: Duration::from_secs(3),
        renew_deadline: Duration::from_secs(2),
        retry_period: Duration::from_millis(200),
        ..shards::Config::new(ns, LEASE, identity)
    }
}

/// One replica: the shard loop and the agent, as `sluice run` starts them.
struct Replica {
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    _cache: tempfile::TempDir,
}

impl Replica {
    async fn start(
        cfg: shards::Config,
        lease_client: kube::Client,
        work_client: kube::Client,
        config: &Path,
        tweak: impl FnOnce(&mut agent::Options),
    ) -> Replica {
        let cache = tempfile::tempdir().expect("cache");
        let ownership = Ownership::new(&cfg.identity);
        let mut opts = options("sh", cache.path());
        opts.ownership = Some(ownership.clone());
        tweak(&mut opts);
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let until = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let lease = tokio::spawn(shards::run(
            lease_client,
            cfg,
            ownership,
            until(stopped.clone()),
        ));
        let source = ConfigSource::File(config.to_path_buf());
        let work = tokio::spawn(async move {
            agent::run(work_client, source, opts, None, until(stopped))
                .await
                .expect("agent starts");
        });
        Replica {
            stop,
            tasks: vec![lease, work],
            _cache: cache,
        }
    }

    /// As SIGKILL: everything stops at once, nothing is given up or released.
    fn kill(self) {
        for t in &self.tasks {
            t.abort();
        }
    }

    /// As SIGTERM: the workers stop, then the replica leaves the table.
    async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

async fn table(client: &kube::Client, ns: &str) -> Table {
    let leases: Api<Lease> = Api::namespaced(client.clone(), ns);
    leases
        .get_opt(LEASE)
        .await
        .ok()
        .flatten()
        .map(|l| Table::of(&l))
        .unwrap_or_default()
}

/// Shards per member.
fn shares(t: &Table) -> BTreeMap<String, usize> {
    let mut out: BTreeMap<String, usize> = t.members.keys().map(|m| (m.clone(), 0)).collect();
    for o in t.owners.iter().filter(|o| !o.is_empty()) {
        *out.entry(o.clone()).or_default() += 1;
    }
    out
}

/// Per project (its inventory's owning-project annotation): the replica that recorded
/// its last sync and the commit synced.
async fn last_syncs(client: &kube::Client, ns: &str) -> BTreeMap<String, LastSync> {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let list = cms
        .list(&ListParams::default().labels(INVENTORY_LABEL))
        .await
        .expect("inventories");
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

async fn values(client: &kube::Client, ns: &str, n: usize) -> Vec<Option<String>> {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let mut out = Vec::new();
    for i in 0..n {
        let cm = cms.get_opt(&format!("cm-{i}")).await.ok().flatten();
        out.push(cm.and_then(|c| c.data?.get("value").cloned()));
    }
    out
}

fn projects(ns: &str, n: usize) -> (Vec<Repo>, String) {
    let mut config = String::from("gitops:\n  manifest_projects:\n");
    let repos = (0..n)
        .map(|i| {
            let id = format!("shards/{ns}-{i}");
            let repo = git::shared().create_repo(&id);
            repo.commit(
                "main",
                &[file("cm.yaml", configmap(&format!("cm-{i}"), "v1"))],
                "v1",
            );
            config.push_str(&format!("  - id: {id}\n    default_namespace: {ns}\n"));
            repo
        })
        .collect();
    (repos, config)
}

fn commit_all(repos: &[Repo], value: &str) {
    for (i, repo) in repos.iter().enumerate() {
        repo.commit(
            "main",
            &[file("cm.yaml", configmap(&format!("cm-{i}"), value))],
            value,
        );
    }
}

const WAIT: Duration = Duration::from_secs(90);

#[tokio::test]
async fn replicas_share_the_projects_take_over_a_dead_ones_and_give_back_to_a_new_one() {
    let client = cluster::client().await;
    let ns = cluster::namespace(&client, "shards").await;
    let n = 12;
    let (repos, config) = projects(&ns, n);
    let dir = tempfile::tempdir().expect("dir");
    let config_path = dir.path().join("config.yaml");
    std::fs::write(&config_path, config).expect("config");
    let mut replicas = BTreeMap::new();
    for id in ["a", "b", "c"] {
        let r = Replica::start(
            lease_config(&ns, id),
            cluster::client_as(&format!("shards-{id}-lease")).await,
            client.clone(),
            &config_path,
            |_| {},
        )
        .await;
        replicas.insert(id, r);
    }
    eventually("every project synced", WAIT, || async {
        values(&client, &ns, n)
            .await
            .iter()
            .all(|v| v.as_deref() == Some("v1"))
            .then_some(())
    })
    .await;
    let even = BTreeMap::from([("a".to_string(), 4), ("b".into(), 4), ("c".into(), 4)]);
    let t = eventually("12 shards spread 4/4/4", WAIT, || async {
        let t = table(&client, &ns).await;
        (shares(&t) == even).then_some(t)
    })
    .await;
    // Each project was synced by the replica that owns its shard, and by no other.
    let owner = |t: &Table, project: &str| t.owners[usize::from(shard_of(project, 12))].clone();
    eventually(
        "each project's last sync by its shard's owner",
        WAIT,
        || async {
            let last = last_syncs(&client, &ns).await;
            (last.len() == n
                && last
                    .iter()
                    .all(|(p, l)| l.replica.as_deref() == Some(owner(&t, p).as_str())))
            .then_some(())
        },
    )
    .await;
    let per_replica: BTreeMap<String, usize> = (0..n).fold(BTreeMap::new(), |mut m, i| {
        *m.entry(owner(&t, &format!("shards/{ns}-{i}"))).or_default() += 1;
        m
    });
    eprintln!("projects per replica: {per_replica:?}");

    // SIGKILL c: its shards go to a and b once its heartbeat is 3 s old.
    replicas.remove("c").expect("c").kill();
    let killed = Instant::now();
    commit_all(&repos, "v2");
    eventually("every project synced again without c", WAIT, || async {
        values(&client, &ns, n)
            .await
            .iter()
            .all(|v| v.as_deref() == Some("v2"))
            .then_some(())
    })
    .await;
    eprintln!(
        "after c was killed, every project synced v2 in {:?}",
        killed.elapsed()
    );
    let t = table(&client, &ns).await;
    assert_eq!(
        shares(&t),
        BTreeMap::from([("a".to_string(), 6), ("b".into(), 6)]),
        "{t:?}"
    );

    // A replica that joins gets its share back from the others.
    let d = Replica::start(
        lease_config(&ns, "d"),
        cluster::client_as("shards-d-lease").await,
        client.clone(),
        &config_path,
        |_| {},
    )
    .await;
    replicas.insert("d", d);
    let t = eventually("12 shards spread 4/4/4 over a, b, d", WAIT, || async {
        let t = table(&client, &ns).await;
        (shares(&t) == BTreeMap::from([("a".to_string(), 4), ("b".into(), 4), ("d".into(), 4)]))
            .then_some(t)
    })
    .await;
    commit_all(&repos, "v3");
    eventually("v3 synced, each project by its new owner", WAIT, || async {
        let last = last_syncs(&client, &ns).await;
        let done = values(&client, &ns, n)
            .await
            .iter()
            .all(|v| v.as_deref() == Some("v3"));
        (done
            && last
                .iter()
                .all(|(p, l)| l.replica.as_deref() == Some(owner(&t, p).as_str())))
        .then_some(())
    })
    .await;

    // SIGTERM: a replica that stops leaves the table at once.
    replicas.remove("d").expect("d").stop().await;
    let t = table(&client, &ns).await;
    assert!(!t.members.contains_key("d"), "{t:?}");
    assert!(t.owners.iter().all(|o| o != "d"), "{t:?}");
    for (_, r) in replicas {
        r.stop().await;
    }
}

#[tokio::test]
async fn a_replica_that_cannot_renew_stops_writing_before_another_starts() {
    let client = cluster::client().await;
    let ns = cluster::namespace(&client, "fence").await;
    let repo = git::shared().create_repo(&format!("fence/{ns}"));
    repo.commit(
        "main",
        &[file(
            "cms.yaml",
            format!("{}---\n{}", configmap("one", "1"), configmap("two", "2")),
        )],
        "two ConfigMaps",
    );
    let dir = tempfile::tempdir().expect("dir");
    let config_path = dir.path().join("config.yaml");
    std::fs::write(
        &config_path,
        format!("gitops:\n  manifest_projects:\n  - id: fence/{ns}\n    default_namespace: {ns}\n"),
    )
    .expect("config");
    let mark = cluster::shared().audit_mark();
    // a writes all the time (a full re-apply every 200 ms), its Lease goes through a proxy,
    // and its clock is an hour ahead; b's is an hour behind.
    let proxy = Proxy::start(cluster::api_addr()).await;
    let busy = |o: &mut agent::Options| o.reapply_interval = Duration::from_millis(200);
    let a = Replica::start(
        shards::Config {
            clock_offset: 3600,
            ..lease_config(&ns, "a")
        },
        cluster::client_through(proxy.addr, "fence-a-lease").await,
        cluster::client_as("fence-a").await,
        &config_path,
        busy,
    )
    .await;
    let writes_of = |ua: &'static str| {
        move || {
            cluster::shared()
                .requests_since(mark)
                .into_iter()
                .filter(|r| r.user_agent == ua && r.is_write())
                .collect::<Vec<_>>()
        }
    };
    eventually("a writing", WAIT, || async {
        (writes_of("fence-a")().len() >= 5).then_some(())
    })
    .await;

    // a's Lease calls hang from now on; b arrives and waits out a's lease.
    proxy.stall(true);
    let stalled = Instant::now();
    let b = Replica::start(
        shards::Config {
            clock_offset: -3600,
            ..lease_config(&ns, "b")
        },
        cluster::client_as("fence-b-lease").await,
        cluster::client_as("fence-b").await,
        &config_path,
        busy,
    )
    .await;
    eventually("b writing", WAIT, || async {
        (writes_of("fence-b")().len() >= 5).then_some(())
    })
    .await;
    eprintln!(
        "b took over {:?} after a's lease stalled",
        stalled.elapsed()
    );
    let b_writes = writes_of("fence-b")();
    let first_b = b_writes
        .iter()
        .map(|r| r.received.clone())
        .min()
        .expect("b wrote");
    let a_writes = writes_of("fence-a")();
    let late: Vec<_> = a_writes.iter().filter(|r| r.received >= first_b).collect();
    assert!(
        late.is_empty(),
        "a wrote after b's first write at {first_b}: {late:#?}"
    );
    let last_a = a_writes.iter().map(|r| r.received.clone()).max();
    eprintln!(
        "a: {} writes, the last at {last_a:?}; b's first at {first_b}",
        a_writes.len()
    );

    // a's Lease answers again: a finds itself dropped, joins again and gets its share back.
    proxy.stall(false);
    let t = eventually("a and b sharing 6/6", WAIT, || async {
        let t = table(&client, &ns).await;
        (shares(&t) == BTreeMap::from([("a".to_string(), 6), ("b".into(), 6)])).then_some(t)
    })
    .await;
    let owners: BTreeSet<&String> = t.owners.iter().collect();
    assert_eq!(owners.len(), 2, "{t:?}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_push_received_by_another_replica_reaches_the_projects_owner() {
    let client = cluster::client().await;
    let ns = cluster::namespace(&client, "shardhook").await;
    let n = 4;
    let (repos, config) = projects(&ns, n);
    let dir = tempfile::tempdir().expect("dir");
    let config_path = dir.path().join("config.yaml");
    std::fs::write(&config_path, config).expect("config");
    // Polls once an hour: only the first sync and the push can bring a commit in.
    let quiet = |o: &mut agent::Options| o.poll_interval = Duration::from_secs(3600);
    let secret = "shard-hook-secret";
    let mut triggers = None;
    let a = Replica::start(
        lease_config(&ns, "a"),
        cluster::client_as("hook-a-lease").await,
        client.clone(),
        &config_path,
        |o| {
            quiet(o);
            triggers = Some((o.triggers.clone(), o.metrics.clone()));
        },
    )
    .await;
    let b = Replica::start(
        lease_config(&ns, "b"),
        cluster::client_as("hook-b-lease").await,
        client.clone(),
        &config_path,
        quiet,
    )
    .await;
    let (triggers, metrics) = triggers.expect("a's triggers");
    let receiver = Arc::new(sluice_agent::webhook::Receiver::new(
        secret.to_string().into(),
        triggers,
        metrics,
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let hooks = listener.local_addr().expect("addr");
    tokio::spawn(sluice_agent::webhook::serve(listener, receiver));
    let t = eventually("6/6 and every project synced", WAIT, || async {
        let t = table(&client, &ns).await;
        let synced = values(&client, &ns, n)
            .await
            .iter()
            .all(|v| v.as_deref() == Some("v1"));
        (synced && shares(&t) == BTreeMap::from([("a".to_string(), 6), ("b".into(), 6)]))
            .then_some(t)
    })
    .await;
    // A project b syncs (if the hash put all four in a's shards, there is nothing to show).
    let i = (0..n)
        .find(|i| t.owners[usize::from(shard_of(&format!("shards/{ns}-{i}"), 12))] == "b")
        .expect("a project in b's shards");
    let project = format!("shards/{ns}-{i}");
    repos[i].commit(
        "main",
        &[file("cm.yaml", configmap(&format!("cm-{i}"), "pushed"))],
        "pushed",
    );
    let out = sluice_testenv::push_generic(hooks, secret, &project).await;
    assert!(out.starts_with("HTTP/1.1 202"), "{out}");
    assert!(out.contains(&project), "{out}");
    let pushed = Instant::now();
    eventually(
        "b syncs the pushed commit",
        Duration::from_secs(30),
        || async { (values(&client, &ns, n).await[i].as_deref() == Some("pushed")).then_some(()) },
    )
    .await;
    eprintln!(
        "a push received by a reached b's project in {:?}",
        pushed.elapsed()
    );
    let last = last_syncs(&client, &ns).await;
    assert_eq!(last[&project].replica.as_deref(), Some("b"));
    assert!(
        table(&client, &ns).await.wakes.is_empty(),
        "b took the wake off the table"
    );
    a.stop().await;
    b.stop().await;
}
