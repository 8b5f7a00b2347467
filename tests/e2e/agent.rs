//! The agent loop (`sluice_agent::agent::run`): following commits, isolation between projects,
//! configuration from a repository, restarts.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use sluice_agent::agent::{self, ConfigSource};
use sluice_testenv::cluster;
use sluice_testenv::git::{self, file};

use crate::support::*;

const FOLLOW: Duration = Duration::from_secs(60);

/// Starts the agent on this test's runtime; it stops when the returned sender drops.
fn start(
    source: ConfigSource,
    opts: agent::Options,
    client: kube::Client,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(async move {
        agent::run(client, source, opts, None, async {
            let _ = rx.await;
        })
        .await
        .expect("agent starts");
    });
    (tx, handle)
}

/// A plain HTTP/1.1 GET returning the whole response (status line, headers, body).
async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}

async fn replicas(deploys: &Api<Deployment>, name: &str) -> Option<i32> {
    deploys
        .get_opt(name)
        .await
        .ok()
        .flatten()
        .and_then(|d| d.spec)
        .and_then(|s| s.replicas)
}

#[tokio::test]
async fn seed_scenario_the_cluster_follows_a_commit_within_seconds() {
    let client = cluster::client().await;
    let ns = cluster::namespace(&client, "seed").await;
    let repo = git::shared().create_repo(&format!("group/{ns}"));
    repo.commit(
        "main",
        &[file("nginx.yaml", deployment("nginx", 1))],
        "nginx, one replica",
    );
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, format!("gitops:\n  manifest_projects:\n  - id: group/{ns}\n    default_namespace: {ns}\n    reconcile_timeout: 60s\n")).expect("config");
    let opts = options("seed", dir.path());
    let metrics = opts.metrics.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(sluice_agent::observability::serve(listener, metrics));
    let (_stop, _agent) = start(ConfigSource::File(config), opts, client.clone());

    let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    eventually("nginx with 1 replica", FOLLOW, || async {
        (replicas(&deploys, "nginx").await == Some(1)).then_some(())
    })
    .await;
    repo.commit(
        "main",
        &[file("nginx.yaml", deployment("nginx", 2))],
        "two replicas",
    );
    let started = std::time::Instant::now();
    eventually("nginx with 2 replicas", FOLLOW, || async {
        (replicas(&deploys, "nginx").await == Some(2)).then_some(())
    })
    .await;
    eprintln!("the cluster followed the commit in {:?}", started.elapsed());
    // The first sync may have been canceled by the second commit: count successes only.
    let metrics = eventually("a successful sync in /metrics", FOLLOW, || async {
        let text = http_get(addr, "/metrics").await;
        text.contains(&format!(
            "sluice_syncs_total{{project=\"group/{ns}\",result=\"success\"}}"
        ))
        .then_some(text)
    })
    .await;
    assert!(
        metrics.contains("sluice_sync_duration_seconds_bucket"),
        "{metrics}"
    );
    assert!(
        http_get(addr, "/readiness")
            .await
            .starts_with("HTTP/1.1 200")
    );
    assert!(
        http_get(addr, "/liveness")
            .await
            .starts_with("HTTP/1.1 200")
    );
    let keys = inventory_keys(
        &client,
        &ns,
        &format!(
            "inventory-{}",
            sluice_agent::sync::inventory_id("seed", &format!("group/{ns}"))
        ),
    )
    .await;
    assert_eq!(keys, [format!("{ns}_nginx_apps_Deployment")]);
}

#[tokio::test]
async fn one_broken_project_never_stops_another() {
    let client = cluster::client().await;
    let good_ns = cluster::namespace(&client, "good").await;
    let bad_ns = cluster::namespace(&client, "bad").await;
    let good = git::shared().create_repo(&format!("group/{good_ns}"));
    let bad = git::shared().create_repo(&format!("group/{bad_ns}"));
    good.commit("main", &[file("a.yaml", configmap("a", "1"))], "good");
    bad.commit("main", &[file("a.yaml", "kind: [broken\n")], "broken");
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!("gitops:\n  manifest_projects:\n  - id: group/{bad_ns}\n    default_namespace: {bad_ns}\n  - id: group/{good_ns}\n    default_namespace: {good_ns}\n"),
    )
    .expect("config");
    let opts = options("two", dir.path());
    let metrics = opts.metrics.clone();
    let (_stop, _agent) = start(ConfigSource::File(config), opts, client.clone());

    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &good_ns);
    eventually("good project synced", FOLLOW, || async {
        cms.get_opt("a").await.ok().flatten()
    })
    .await;
    good.commit("main", &[file("a.yaml", configmap("a", "2"))], "good again");
    eventually("good project follows", FOLLOW, || async {
        let v = cms
            .get_opt("a")
            .await
            .ok()
            .flatten()?
            .data?
            .get("value")
            .cloned();
        (v.as_deref() == Some("2")).then_some(())
    })
    .await;
    // The broken project's syncs are counted as failures.
    let failed = format!("sluice_syncs_total{{project=\"group/{bad_ns}\",result=\"failure\"}}");
    eventually("the failed sync in /metrics", FOLLOW, || {
        let text = metrics.encode();
        let failed = failed.clone();
        async move { text.contains(&failed).then_some(()) }
    })
    .await;
    let bad_cms: Api<ConfigMap> = Api::namespaced(client, &bad_ns);
    assert!(
        bad_cms
            .list(&Default::default())
            .await
            .expect("list")
            .items
            .iter()
            .all(|c| !c
                .metadata
                .name
                .as_deref()
                .unwrap_or_default()
                .starts_with("inventory-"))
    );
}

/// A plain HTTP/1.1 POST with extra headers; returns the status code and the body.
async fn http_post(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    s.write_all(request.as_bytes()).await.expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string());
    (status, body.unwrap_or_default())
}

/// With polling effectively off (one poll an hour), only a push webhook can make the agent
/// see a new commit: GitLab's token and GitHub's signature are checked, a wrong one wakes
/// nothing, and every request is counted in `/metrics`.
#[tokio::test]
async fn a_push_webhook_syncs_its_project_at_once() {
    use hmac::Mac;
    let client = cluster::client().await;
    let ns = cluster::namespace(&client, "hook").await;
    let project = format!("group/{ns}");
    let repo = git::shared().create_repo(&project);
    repo.commit("main", &[file("web.yaml", deployment("web", 1))], "one");
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, format!("gitops:\n  manifest_projects:\n  - id: {project}\n    default_namespace: {ns}\n    reconcile_timeout: 60s\n")).expect("config");
    let opts = agent::Options {
        poll_interval: Duration::from_secs(3600),
        ..options("hook", dir.path())
    };
    let secret = "s3cret-token";
    let receiver = std::sync::Arc::new(sluice_agent::webhook::Receiver::new(
        secret.to_string().into(),
        opts.triggers.clone(),
        opts.metrics.clone(),
    ));
    // The receivers and the metrics on two ports, as `sluice run` serves them.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(sluice_agent::webhook::serve(listener, receiver));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let metrics_addr = listener.local_addr().expect("addr");
    tokio::spawn(sluice_agent::observability::serve(
        listener,
        opts.metrics.clone(),
    ));
    let (_stop, _agent) = start(ConfigSource::File(config), opts, client.clone());
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    eventually("the first commit", FOLLOW, || async {
        (replicas(&deploys, "web").await == Some(1)).then_some(())
    })
    .await;

    // GitLab: a wrong token is refused and wakes nothing; the right one syncs the commit.
    repo.commit("main", &[file("web.yaml", deployment("web", 2))], "two");
    let gitlab = format!(
        r#"{{"object_kind":"push","ref":"refs/heads/main","project":{{"path_with_namespace":"{project}","default_branch":"main"}}}}"#
    );
    let (status, body) = http_post(
        addr,
        "/hooks/gitlab",
        &[("X-Gitlab-Token", "wrong"), ("X-Gitlab-Event", "Push Hook")],
        &gitlab,
    )
    .await;
    assert_eq!((status, body.as_str()), (401, "missing or wrong secret\n"));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        replicas(&deploys, "web").await,
        Some(1),
        "a refused push syncs nothing"
    );
    let pushed = std::time::Instant::now();
    let (status, body) = http_post(
        addr,
        "/hooks/gitlab",
        &[("X-Gitlab-Token", secret), ("X-Gitlab-Event", "Push Hook")],
        &gitlab,
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).expect("JSON"),
        serde_json::json!({"triggered": [project]})
    );
    eventually("the commit the GitLab push announced", FOLLOW, || async {
        (replicas(&deploys, "web").await == Some(2)).then_some(())
    })
    .await;
    eprintln!("GitLab push to applied: {:?}", pushed.elapsed());

    // GitHub: the body's HMAC-SHA256 under the secret; a push to another branch wakes
    // nothing.
    repo.commit("main", &[file("web.yaml", deployment("web", 3))], "three");
    let github = |git_ref: &str| {
        format!(
            r#"{{"ref":"{git_ref}","repository":{{"full_name":"{project}","clone_url":"{}/{project}.git","default_branch":"main"}}}}"#,
            git::shared().base_url()
        )
    };
    let sign = |body: &str| {
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("key");
        mac.update(body.as_bytes());
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    };
    let other = github("refs/heads/feature");
    let (status, body) = http_post(
        addr,
        "/hooks/github",
        &[
            ("X-GitHub-Event", "push"),
            ("X-Hub-Signature-256", &sign(&other)),
        ],
        &other,
    )
    .await;
    assert_eq!((status, body.as_str()), (200, r#"{"triggered":[]}"#));
    let main = github("refs/heads/main");
    let (status, body) = http_post(
        addr,
        "/hooks/github",
        &[
            ("X-GitHub-Event", "push"),
            ("X-Hub-Signature-256", &sign(&other)),
        ],
        &main,
    )
    .await;
    assert_eq!(status, 401, "a signature of another body: {body}");
    let (status, body) = http_post(
        addr,
        "/hooks/github",
        &[
            ("X-GitHub-Event", "push"),
            ("X-Hub-Signature-256", &sign(&main)),
        ],
        &main,
    )
    .await;
    assert_eq!(status, 202, "{body}");
    eventually("the commit the GitHub push announced", FOLLOW, || async {
        (replicas(&deploys, "web").await == Some(3)).then_some(())
    })
    .await;

    let metrics = http_get(metrics_addr, "/metrics").await;
    for line in [
        r#"sluice_webhook_requests_total{provider="gitlab",result="unauthorized"} 1"#,
        r#"sluice_webhook_requests_total{provider="gitlab",result="triggered"} 1"#,
        r#"sluice_webhook_requests_total{provider="github",result="no_match"} 1"#,
        r#"sluice_webhook_requests_total{provider="github",result="unauthorized"} 1"#,
        r#"sluice_webhook_requests_total{provider="github",result="triggered"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    assert!(!metrics.contains(secret));
}

/// Anyone who can reach the webhook receiver cannot make the kubelet restart the agent: the
/// receivers have a port of their own, so a flood of half-sent requests there (900
/// connections, each reconnecting as soon as it is dropped) leaves `/liveness` answering
/// within 1 s on every try, and the flood's one address holds at most its share of the
/// receiver's connections, so a push from another address still gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_answer_while_the_webhook_port_is_flooded() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().expect("dir");
    let opts = options("flood", dir.path());
    let secret = "flood-secret";
    let receiver = Arc::new(sluice_agent::webhook::Receiver::new(
        secret.to_string().into(),
        opts.triggers.clone(),
        opts.metrics.clone(),
    ));
    let hooks = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let hooks_addr = hooks.local_addr().expect("addr");
    tokio::spawn(sluice_agent::webhook::serve(hooks, receiver));
    let probes = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let probes_addr = probes.local_addr().expect("addr");
    opts.metrics.set_ready();
    tokio::spawn(sluice_agent::observability::serve(
        probes,
        opts.metrics.clone(),
    ));

    let stop = Arc::new(AtomicBool::new(false));
    let connects = Arc::new(AtomicU64::new(0));
    let flood: Vec<_> = (0..900)
        .map(|_| {
            let (stop, connects) = (stop.clone(), connects.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut s) = tokio::net::TcpStream::connect(hooks_addr).await else {
                        tokio::task::yield_now().await;
                        continue;
                    };
                    connects.fetch_add(1, Ordering::Relaxed);
                    let _ = s
                        .write_all(b"POST /hooks/gitlab HTTP/1.1\r\nHost: x\r\n")
                        .await;
                    // Held until the server drops it, then again at once.
                    let mut buf = [0u8; 64];
                    let _ = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;

    for attempt in 0..20 {
        let started = std::time::Instant::now();
        let answer =
            tokio::time::timeout(Duration::from_secs(1), http_get(probes_addr, "/liveness"))
                .await
                .unwrap_or_else(|_| panic!("/liveness did not answer within 1 s (try {attempt})"));
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "try {attempt}: {answer}"
        );
        assert!(started.elapsed() < Duration::from_secs(1));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        http_get(probes_addr, "/readiness")
            .await
            .starts_with("HTTP/1.1 200"),
        "readiness too"
    );

    // A push from another address (127.0.0.2, also loopback) is served during the flood.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.2:0".parse().expect("addr"))
        .expect("bind 127.0.0.2");
    let mut s = socket
        .connect(hooks_addr)
        .await
        .expect("connect from 127.0.0.2");
    let body = r#"{"project": "nobody/here"}"#;
    let request = format!(
        "POST /hooks/generic HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {secret}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes()).await.expect("write");
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .expect("the push is answered during the flood")
        .expect("read");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");

    stop.store(true, Ordering::Relaxed);
    for f in flood {
        f.abort();
    }
    let connects = connects.load(Ordering::Relaxed);
    eprintln!("flood: {connects} connections to the receiver");
    assert!(
        connects > 900,
        "the flood reconnected as it was dropped ({connects})"
    );
}

/// Successful syncs of `project` so far, from the agent's metrics.
fn successes(metrics: &sluice_agent::observability::Metrics, project: &str) -> u64 {
    let prefix = format!("sluice_syncs_total{{project=\"{project}\",result=\"success\"}} ");
    metrics
        .encode()
        .lines()
        .find_map(|l| l.strip_prefix(&prefix)?.parse().ok())
        .unwrap_or(0)
}

/// Drift is seen on watches: with polling and the full re-apply both an hour away, an
/// object edited or deleted by someone else is restored within seconds, while the status
/// writes of controllers on a healthy Deployment cause no sync at all.
#[tokio::test]
async fn drift_is_restored_from_watches_and_status_writes_are_not_drift() {
    let client = cluster::client().await;
    let ns = cluster::namespace(&client, "drift").await;
    let project = format!("group/{ns}");
    let repo = git::shared().create_repo(&project);
    repo.commit(
        "main",
        &[
            file("web.yaml", deployment("web", 2)),
            file("cm.yaml", configmap("settings", "git")),
        ],
        "web and settings",
    );
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, format!("gitops:\n  manifest_projects:\n  - id: {project}\n    default_namespace: {ns}\n    reconcile_timeout: 60s\n")).expect("config");
    let opts = agent::Options {
        poll_interval: Duration::from_secs(3600),
        reapply_interval: Duration::from_secs(3600),
        ..options("drift", dir.path())
    };
    let metrics = opts.metrics.clone();
    let (_stop, _agent) = start(ConfigSource::File(config), opts, client.clone());
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    eventually("the first sync", FOLLOW, || async {
        (successes(&metrics, &project) == 1).then_some(())
    })
    .await;
    // The Deployment rolls out meanwhile: its controller writes status and the revision
    // annotation. None of that is drift.
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(
        successes(&metrics, &project),
        1,
        "status writes caused a sync"
    );

    // Someone edits the ConfigMap: git's value is back within seconds.
    let edit = kube::api::Patch::Merge(serde_json::json!({"data": {"value": "edited"}}));
    cms.patch("settings", &kube::api::PatchParams::default(), &edit)
        .await
        .expect("edit");
    let edited = std::time::Instant::now();
    eventually("the ConfigMap restored", FOLLOW, || async {
        let cm = cms.get("settings").await.ok()?;
        (cm.data?.get("value").map(String::as_str) == Some("git")).then_some(())
    })
    .await;
    eprintln!("an edited ConfigMap was restored in {:?}", edited.elapsed());

    // Someone scales the Deployment, then deletes it: restored each time.
    let scale = kube::api::Patch::Merge(serde_json::json!({"spec": {"replicas": 5}}));
    deploys
        .patch("web", &kube::api::PatchParams::default(), &scale)
        .await
        .expect("scale");
    eventually("replicas restored", FOLLOW, || async {
        (replicas(&deploys, "web").await == Some(2)).then_some(())
    })
    .await;
    deploys
        .delete("web", &Default::default())
        .await
        .expect("delete");
    let deleted = std::time::Instant::now();
    eventually("the Deployment recreated", FOLLOW, || async {
        let d = deploys.get_opt("web").await.ok()??;
        (d.metadata.deletion_timestamp.is_none() && d.spec?.replicas == Some(2)).then_some(())
    })
    .await;
    eprintln!(
        "a deleted Deployment was recreated in {:?}",
        deleted.elapsed()
    );
}

#[tokio::test]
async fn configuration_repository_changes_are_picked_up_without_restart() {
    let client = cluster::client().await;
    let ns1 = cluster::namespace(&client, "cfga").await;
    let ns2 = cluster::namespace(&client, "cfgb").await;
    let server = git::shared();
    let manifests = server.create_repo(&format!("group/{ns1}-manifests"));
    manifests.commit("main", &[file("a.yaml", configmap("a", "1"))], "manifests");
    let config_repo = server.create_repo(&format!("group/{ns1}-config"));
    let config = |ns: &str| {
        format!(
            "gitops:\n  manifest_projects:\n  - id: group/{ns1}-manifests\n    default_namespace: {ns}\nci_access:\n  projects:\n  - id: group/other\n"
        )
    };
    config_repo.commit(
        "main",
        &[file(".gitlab/agents/cfg/config.yaml", config(&ns1))],
        "config 1",
    );
    let dir = tempfile::tempdir().expect("dir");
    let source = ConfigSource::Repo {
        url: config_repo.http_url().into(),
    };
    let (_stop, _agent) = start(source, options("cfg", dir.path()), client.clone());

    let in_ns = |ns: &str| Api::<ConfigMap>::namespaced(client.clone(), ns);
    let (a1, a2) = (in_ns(&ns1), in_ns(&ns2));
    eventually("synced into the first namespace", FOLLOW, || async {
        a1.get_opt("a").await.ok().flatten()
    })
    .await;
    config_repo.commit(
        "main",
        &[file(".gitlab/agents/cfg/config.yaml", config(&ns2))],
        "config 2",
    );
    eventually("synced into the second namespace", FOLLOW, || async {
        a2.get_opt("a").await.ok().flatten()
    })
    .await;
}

#[tokio::test]
async fn agent_killed_mid_sync_converges_after_restart() {
    let client = cluster::client().await;
    let ns = cluster::namespace(&client, "restart").await;
    let repo = git::shared().create_repo(&format!("group/{ns}"));
    let files: Vec<_> = (0..30)
        .map(|i| file(&format!("cm{i}.yaml"), configmap(&format!("cm{i}"), "1")))
        .collect();
    repo.commit("main", &files, "thirty");
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!("gitops:\n  manifest_projects:\n  - id: group/{ns}\n    default_namespace: {ns}\n"),
    )
    .expect("config");
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);

    // Kill the agent as soon as the first object lands.
    let (stop, handle) = start(
        ConfigSource::File(config.clone()),
        options("restart", dir.path()),
        client.clone(),
    );
    eventually("the first object", FOLLOW, || async {
        cms.get_opt("cm0")
            .await
            .ok()
            .flatten()
            .or(cms.get_opt("cm1").await.ok().flatten())
    })
    .await;
    handle.abort();
    drop(stop);

    // Git moves on meanwhile: half the files are gone.
    let half: Vec<_> = (0..15)
        .map(|i| file(&format!("cm{i}.yaml"), configmap(&format!("cm{i}"), "2")))
        .collect();
    repo.commit("main", &half, "fifteen");
    let (_stop, _agent) = start(
        ConfigSource::File(config),
        options("restart", dir.path()),
        client.clone(),
    );
    let inv = format!(
        "inventory-{}",
        sluice_agent::sync::inventory_id("restart", &format!("group/{ns}"))
    );
    let want: Vec<String> = {
        let mut v: Vec<String> = (0..15).map(|i| format!("{ns}_cm{i}__ConfigMap")).collect();
        v.sort();
        v
    };
    eventually("an exact inventory", FOLLOW, || async {
        let cm = cms.get_opt(&inv).await.ok().flatten()?;
        let keys: Vec<String> = cm.data.unwrap_or_default().into_keys().collect();
        (keys == want).then_some(())
    })
    .await;
    // Foreground deletion finishes asynchronously (the garbage collector removes the
    // finalizer), so the listing converges a moment after the inventory.
    eventually("only the fifteen objects of git", FOLLOW, || async {
        let names: Vec<String> = cms
            .list(&Default::default())
            .await
            .ok()?
            .items
            .into_iter()
            .filter_map(|c| c.metadata.name)
            .filter(|n| n.starts_with("cm"))
            .collect();
        (names.len() == 15).then_some(())
    })
    .await;
}

#[tokio::test]
async fn agent_process_killed_with_sigkill_mid_sync_converges_after_restart() {
    let client = cluster::client().await;
    let ns = cluster::namespace(&client, "sigkill").await;
    let repo = git::shared().create_repo(&format!("group/{ns}"));
    let files: Vec<_> = (0..40)
        .map(|i| file(&format!("cm{i}.yaml"), configmap(&format!("cm{i}"), "1")))
        .collect();
    repo.commit("main", &files, "forty");
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!("gitops:\n  manifest_projects:\n  - id: group/{ns}\n    default_namespace: {ns}\n"),
    )
    .expect("config");
    let bin = sluice_testenv::wasm::sluice_binary();
    let spawn = || {
        std::process::Command::new(&bin)
            .args(["run", "--config"])
            .arg(&config)
            .args([
                "--git-base-url",
                git::shared().base_url(),
                "--agent-name",
                "kill",
                "--poll-interval",
                "500ms",
                "--concurrency",
                "1",
            ])
            .args([
                "--observability-listen-address",
                "127.0.0.1:0",
                "--cache-dir",
            ])
            .arg(dir.path())
            .env("KUBECONFIG", &cluster::shared().kubeconfig)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start sluice")
    };
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let mut agent = spawn();
    eventually("the first objects", FOLLOW, || async {
        let n = cms
            .list(&Default::default())
            .await
            .ok()?
            .items
            .iter()
            .filter(|c| {
                c.metadata
                    .name
                    .as_deref()
                    .is_some_and(|n| n.starts_with("cm"))
            })
            .count();
        (n >= 3).then_some(())
    })
    .await;
    agent.kill().expect("SIGKILL");
    agent.wait().expect("reaped");

    let half: Vec<_> = (0..20)
        .map(|i| file(&format!("cm{i}.yaml"), configmap(&format!("cm{i}"), "2")))
        .collect();
    repo.commit("main", &half, "twenty");
    let mut agent = spawn();
    let inv = format!(
        "inventory-{}",
        sluice_agent::sync::inventory_id("kill", &format!("group/{ns}"))
    );
    let mut want: Vec<String> = (0..20).map(|i| format!("{ns}_cm{i}__ConfigMap")).collect();
    want.sort();
    eventually(
        "an exact inventory and only git's objects",
        FOLLOW,
        || async {
            let keys: Vec<String> = cms
                .get_opt(&inv)
                .await
                .ok()
                .flatten()?
                .data
                .unwrap_or_default()
                .into_keys()
                .collect();
            let live = cms
                .list(&Default::default())
                .await
                .ok()?
                .items
                .iter()
                .filter(|c| {
                    c.metadata
                        .name
                        .as_deref()
                        .is_some_and(|n| n.starts_with("cm"))
                })
                .count();
            (keys == want && live == 20).then_some(())
        },
    )
    .await;
    let _ = agent.kill();
    let _ = agent.wait();
}
