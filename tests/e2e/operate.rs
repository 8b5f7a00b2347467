//! Operating sluice: the Events and the last-sync record a sync leaves on its inventory,
//! `sluice status` after a successful and after a failed sync, and the human log lines.

use std::process::{Command, Output};

use k8s_openapi::api::core::v1::{ConfigMap, Event};
use kube::api::{Api, ListParams};
use sluice_testenv::git::file;
use sluice_testenv::{cluster, git, wasm};

use crate::support::*;

fn sluice(args: &[&str]) -> Output {
    Command::new(wasm::sluice_binary())
        .args(args)
        .env("KUBECONFIG", &cluster::shared().kubeconfig)
        .output()
        .expect("run sluice")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn a_sync_is_told_in_events_in_status_and_in_one_human_line() {
    let client = cluster::client().await;
    let ns = cluster::namespace(&client, "operate").await;
    let server = git::shared();
    let config_repo = server.create_repo(&format!("group/{ns}-config"));
    let project = format!("group/{ns}-config");
    // sluice's own file beside the agentk config.yaml that agentk keeps reading: sluice
    // reads sluice.yaml, and only that.
    let config = || {
        [
            file(
                ".gitlab/agents/ops/sluice.yaml",
                format!(
                    "gitops:\n  manifest_projects:\n  - default_namespace: {ns}\n    paths:\n    - glob: 'manifests/*.yaml'\n"
                ),
            ),
            file(
                ".gitlab/agents/ops/config.yaml",
                "ci_access:\n  groups:\n  - id: group\ngitops:\n  manifest_projects:\n  - id: must/not-be-read\n",
            ),
            file("manifests/a.yaml", configmap("a", "1")),
        ]
    };
    let mut entries = config().to_vec();
    entries.push(file("manifests/b.yaml", configmap("b", "2")));
    let good = config_repo.commit("main", &entries, "two config maps");
    let dir = tempfile::tempdir().expect("dir");
    let cache = dir.path().display().to_string();
    let sync = |url: &str| {
        sluice(&[
            "sync",
            "--config-repo",
            url,
            "--agent-name",
            "ops",
            "--git-base-url",
            server.base_url(),
            "--log-format",
            "human",
            "--cache-dir",
            &cache,
        ])
    };
    let out = sync(config_repo.http_url());
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(
        !stdout.contains("must/not-be-read"),
        "config.yaml was read: {stdout}"
    );
    // One readable line for the sync; no JSON dump of every result.
    let line = format!("{project}: synced {}: created 2 in ", &good[..12]);
    assert_eq!(
        stderr.lines().filter(|l| l.contains(&line)).count(),
        1,
        "{stderr}"
    );
    assert!(!stderr.contains("\"results\""), "{stderr}");

    // The Event on the inventory ConfigMap, found the way `kubectl describe` finds it.
    let inventory = format!(
        "inventory-{}",
        sluice_agent::sync::inventory_id("ops", &project)
    );
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let uid = cms.get(&inventory).await.expect("inventory").metadata.uid;
    let api: Api<Event> = Api::namespaced(client.clone(), &ns);
    let described = api
        .list(&ListParams::default().fields(&format!(
            "involvedObject.kind=ConfigMap,involvedObject.name={inventory},involvedObject.uid={}",
            uid.unwrap_or_default()
        )))
        .await
        .expect("list events");
    let reasons: Vec<String> = described
        .items
        .iter()
        .filter_map(|e| e.reason.clone())
        .collect();
    assert_eq!(reasons, ["SyncSucceeded"], "{described:?}");
    assert_eq!(
        described.items[0]
            .message
            .as_deref()
            .map(|m| m.split(" in ").next()),
        Some(Some(format!("commit {}: created 2", &good[..12]).as_str()))
    );

    // status: the table, and JSON.
    let out = sluice(&["status", "-n", &ns]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    println!("{stdout}");
    let row = stdout
        .lines()
        .find(|l| l.starts_with(&project))
        .unwrap_or_else(|| panic!("no row for {project}: {stdout}"));
    let cols: Vec<&str> = row
        .split("   ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    assert_eq!(
        &cols[..5],
        [
            project.as_str(),
            &format!("{ns}/{inventory}"),
            &good[..12],
            "True",
            "2 (2 Current)"
        ],
        "{stdout}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&sluice(&["status", "-n", &ns, "-o", "json"]).stdout)
            .expect("status -o json is JSON");
    assert_eq!(json[0]["lastSync"]["result"], "Succeeded");
    assert_eq!(json[0]["lastSync"]["syncedCommit"], good.as_str());
    assert_eq!(json[0]["health"]["Current"], 2);

    // A commit the API server refuses: exit 1, one log line per failed object, an Event,
    // and status says False with why, still naming the last good commit.
    let mut entries = config().to_vec();
    entries.push(file(
        "manifests/b.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: b\ndata:\n  'not a key!': x\n",
    ));
    let bad = config_repo.commit("main", &entries, "a key the API server refuses");
    let out = sync(config_repo.http_url());
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stderr.contains(&format!("{project}: sync of {} failed in ", &bad[..12]))
            && stderr.contains(": 1 objects failed"),
        "{stderr}"
    );
    assert_eq!(
        stderr
            .lines()
            .filter(|l| l.contains(&format!(
                "{project}: manifests/b.yaml:1: ConfigMap/{ns}/b: "
            )))
            .count(),
        1,
        "{stderr}"
    );
    let seen = sluice_events(&client, &ns, &inventory).await;
    assert!(
        seen.iter().any(|(t, r, m)| t == "Warning"
            && r == "SyncFailed"
            && m.starts_with(&format!(
                "commit {}: 1 of 2 objects failed server-side dry-run",
                &bad[..12]
            ))),
        "{seen:?}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&sluice(&["status", "-n", &ns, "-o", "json"]).stdout)
            .expect("status -o json is JSON");
    assert_eq!(json[0]["ready"], "False");
    assert_eq!(json[0]["lastSync"]["result"], "Failed");
    assert_eq!(json[0]["lastSync"]["commit"], bad.as_str());
    assert_eq!(json[0]["lastSync"]["syncedCommit"], good.as_str());

    let out = sluice(&["status", &project]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    println!("{stdout}");
    assert!(
        stdout.contains(&format!(
            "sync of {} failed: 1 of 2 objects failed",
            &bad[..12]
        )),
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with(&format!("ConfigMap/{ns}/a")) && l.contains("Current")),
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("Warning") && l.contains("SyncFailed"))
            && stdout
                .lines()
                .any(|l| l.starts_with("Normal") && l.contains("SyncSucceeded")),
        "{stdout}"
    );
    let out = sluice(&["status", "no/such-project"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out).1.trim(),
        "error: no sluice inventory of project \"no/such-project\" in the cluster"
    );
}

/// agentk's Helm chart with only the image swapped starts sluice with agentk's flags and no
/// subcommand: sluice says what to change instead of printing clap's usage.
#[test]
fn agentk_chart_arguments_get_a_clear_message() {
    let out = sluice(&[
        "--token-file=/etc/agentk/secrets/token",
        "--kas-address",
        "wss://kas.gitlab.example.com",
    ]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.starts_with(
            "error: sluice was started with agentk's command line (--token-file, --kas-address)."
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains("  run --config-repo=") && stderr.contains("sluice generate"),
        "{stderr}"
    );
    assert!(!stderr.contains("Usage:"), "{stderr}");
}
