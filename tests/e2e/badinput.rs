//! The bad-input suite: commits a project can push that must be refused whole. Each case
//! is a commit that also changes a good object and adds another, next to one bad file. The
//! sync must fail with an error naming where the problem is, write nothing (no object,
//! not the inventory: every resourceVersion in the namespace stays as it was), and a
//! neighbouring project must go on syncing through the same cluster handle.
//!
//! Agent-level isolation (one project failing while the agent keeps syncing the others) is
//! `agent::one_broken_project_never_stops_another`; config, plugin and API-fault inputs
//! have their own tests, listed with these in `docs/reliability.md`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams};
use sluice_testenv::git::{Entry, file};

use crate::support::*;

/// One bad input: a name, the bad file (or files), and fragments the error must contain
/// (`{ns}` stands for the project's namespace, in the files and in the fragments).
struct Case {
    name: &'static str,
    files: Vec<Entry>,
    error: &'static [&'static str],
}

fn case(name: &'static str, path: &str, content: &str, error: &'static [&'static str]) -> Case {
    Case {
        name,
        files: vec![file(path, content)],
        error,
    }
}

/// A nested alias bomb: ten levels of ten aliases, 10¹⁰ strings once expanded.
fn alias_bomb() -> String {
    let mut text = String::from(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: bomb\nx0: &a0 [\"lol\"]\n",
    );
    for level in 1..=10 {
        let prev = format!("*a{}", level - 1);
        text.push_str(&format!(
            "x{level}: &a{level} [{}]\n",
            [prev.as_str(); 10].join(", ")
        ));
    }
    text
}

fn cases() -> Vec<Case> {
    let cm = |rest: &str| format!("apiVersion: v1\nkind: ConfigMap\n{rest}");
    let two = |a: &str, b: &str| format!("{a}---\n{b}");
    vec![
        // YAML and JSON syntax.
        case(
            "unclosed flow sequence",
            "bad.yaml",
            &cm("metadata:\n  name: [oops\n"),
            &["failed to decode manifest objects: bad.yaml:"],
        ),
        case(
            "tab indentation",
            "bad.yaml",
            &cm("metadata:\n\tname: x\n"),
            &["failed to decode manifest objects: bad.yaml:"],
        ),
        case(
            "a scalar document",
            "bad.yaml",
            "just a string\n",
            &["failed to decode manifest objects: bad.yaml:1"],
        ),
        case(
            "a sequence document",
            "bad.yaml",
            "- a\n- b\n",
            &["failed to decode manifest objects: bad.yaml:1"],
        ),
        case(
            "metadata is not a mapping",
            "bad.yaml",
            &cm("metadata: x\n"),
            &["failed to decode manifest objects: bad.yaml:1"],
        ),
        case(
            "truncated JSON",
            "bad.json",
            "{\"apiVersion\": \"v1\", \"kind\": \"ConfigMap\",",
            &["failed to decode manifest objects: bad.json:"],
        ),
        Case {
            name: "bytes that are not UTF-8",
            files: vec![Entry::File(
                "bad.yaml".into(),
                b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: \xff\xfe\n".to_vec(),
            )],
            error: &["failed to decode manifest objects: bad.yaml"],
        },
        case(
            "a nested alias bomb",
            "bad.yaml",
            &alias_bomb(),
            &["failed to decode manifest objects: bad.yaml"],
        ),
        // Objects the decoder refuses.
        case(
            "no kind",
            "bad.yaml",
            "apiVersion: v1\nmetadata:\n  name: x\n",
            &["failed to decode manifest objects: bad.yaml:1", "kind"],
        ),
        case(
            "no apiVersion",
            "bad.yaml",
            "kind: ConfigMap\nmetadata:\n  name: x\n",
            &[
                "failed to decode manifest objects: bad.yaml:1",
                "apiVersion",
            ],
        ),
        case(
            "no name",
            "bad.yaml",
            &cm("metadata: {}\n"),
            &["failed to decode manifest objects: bad.yaml:1", "name"],
        ),
        case(
            "generateName instead of a name",
            "bad.yaml",
            &cm("metadata:\n  generateName: x-\n"),
            &["failed to decode manifest objects: bad.yaml:1", "name"],
        ),
        case(
            "a List item without kind",
            "bad.yaml",
            "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  metadata: {name: x}\n",
            &["failed to decode manifest objects: bad.yaml", "kind"],
        ),
        case(
            "List items that are not a list",
            "bad.yaml",
            "apiVersion: v1\nkind: List\nitems: x\n",
            &["failed to decode manifest objects: bad.yaml:1"],
        ),
        // Objects the plan refuses.
        case(
            "the same object twice",
            "bad.yaml",
            &two(
                &cm("metadata:\n  name: dup\n"),
                &cm("metadata:\n  name: dup\n"),
            ),
            &["ConfigMap/{ns}/dup", "bad.yaml"],
        ),
        case(
            "a depends-on cycle",
            "bad.yaml",
            &two(
                &cm(
                    "metadata:\n  name: c1\n  annotations:\n    config.kubernetes.io/depends-on: /namespaces/{ns}/ConfigMap/c2\n",
                ),
                &cm(
                    "metadata:\n  name: c2\n  annotations:\n    config.kubernetes.io/depends-on: /namespaces/{ns}/ConfigMap/c1\n",
                ),
            ),
            &["cycle"],
        ),
        case(
            "a cluster-scoped kind with a namespace",
            "bad.yaml",
            "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata:\n  name: badinput-x\n  namespace: {ns}\nrules: []\n",
            &["bad.yaml:1", "ClusterRole"],
        ),
        case(
            "a kind the cluster does not serve",
            "bad.yaml",
            "apiVersion: example.com/v1\nkind: Nope\nmetadata:\n  name: x\n",
            &["bad.yaml:1", "example.com/v1", "Nope"],
        ),
        case(
            "a version the cluster does not serve",
            "bad.yaml",
            "apiVersion: v2\nkind: ConfigMap\nmetadata:\n  name: x\n",
            &[
                "bad.yaml:1: ConfigMap/{ns}/x: the server has no resource for v2 ConfigMap, and no CustomResourceDefinition of this commit defines it",
            ],
        ),
        case(
            "a label claiming another project's inventory",
            "bad.yaml",
            &cm(
                "metadata:\n  name: claim\n  labels:\n    cli-utils.sigs.k8s.io/inventory-id: someone-else\n",
            ),
            &[
                "a.yaml:1: ConfigMap/{ns}/a: inventory policy prevented actuation",
                "; this commit's inventory is the ConfigMap {ns}/claim (bad.yaml:1) with id \"someone-else\"",
            ],
        ),
        // Objects the API server refuses (server-side dry-run): nothing is written.
        case(
            "a name the server refuses",
            "bad.yaml",
            &cm("metadata:\n  name: Bad_Name\n"),
            &["bad.yaml:1: ConfigMap/{ns}/Bad_Name"],
        ),
        case(
            "a name longer than 253 characters",
            "bad.yaml",
            &cm(&format!("metadata:\n  name: {}\n", "n".repeat(254))),
            &["bad.yaml:1: ConfigMap/{ns}/nnnn"],
        ),
        case(
            "ConfigMap data that is not text",
            "bad.yaml",
            &cm("metadata:\n  name: nested\ndata:\n  a:\n    b: c\n"),
            &["bad.yaml:1: ConfigMap/{ns}/nested"],
        ),
        case(
            "Secret data that is not base64",
            "bad.yaml",
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: s\ndata:\n  k: not base64!\n",
            &["bad.yaml:1: Secret/{ns}/s"],
        ),
        case(
            "a Deployment with replicas as text",
            "bad.yaml",
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: d\nspec:\n  replicas: three\n  selector:\n    matchLabels: {app: d}\n  template:\n    metadata:\n      labels: {app: d}\n    spec:\n      containers:\n      - name: app\n        image: nginx:1.27\n",
            &["bad.yaml:1: Deployment/{ns}/d"],
        ),
        case(
            "a Deployment whose selector does not match its template",
            "bad.yaml",
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: d\nspec:\n  selector:\n    matchLabels: {app: d}\n  template:\n    metadata:\n      labels: {app: other}\n    spec:\n      containers:\n      - name: app\n        image: nginx:1.27\n",
            &["bad.yaml:1: Deployment/{ns}/d"],
        ),
        case(
            "a namespace that does not exist",
            "bad.yaml",
            &cm("metadata:\n  name: lost\n  namespace: badinput-nowhere\n"),
            &["bad.yaml:1: ConfigMap/badinput-nowhere/lost"],
        ),
        // Files the selection refuses.
        Case {
            name: "a symlinked manifest",
            files: vec![Entry::Symlink("bad.yaml".into(), "a.yaml".into())],
            error: &["bad.yaml"],
        },
        case(
            "a file over 5 MiB",
            "bad.yaml",
            &cm(&format!(
                "metadata:\n  name: big\ndata:\n  v: {}\n",
                "x".repeat(5 << 20)
            )),
            &["bad.yaml"],
        ),
        Case {
            name: "more than 1,000 files",
            files: (0..1000)
                .map(|i| {
                    file(
                        &format!("many/{i}.yaml"),
                        cm(&format!("metadata:\n  name: m{i}\n")),
                    )
                })
                .collect(),
            error: &["1000"],
        },
    ]
}

/// Every object of the namespace's ConfigMaps, Secrets and Deployments, by kind and name,
/// with its resourceVersion: equal before and after means nothing was written.
async fn snapshot(client: &kube::Client, ns: &str) -> BTreeMap<String, String> {
    let mut all = BTreeMap::new();
    for (api_version, kind, plural) in [
        ("v1", "ConfigMap", "configmaps"),
        ("v1", "Secret", "secrets"),
        ("apps/v1", "Deployment", "deployments"),
    ] {
        let list = api(client, ns, api_version, kind, plural)
            .list(&ListParams::default())
            .await
            .expect("list");
        for o in list.items {
            all.insert(
                format!("{kind}/{}", o.metadata.name.unwrap_or_default()),
                o.metadata.resource_version.unwrap_or_default(),
            );
        }
    }
    all
}

#[tokio::test]
async fn bad_commits_are_refused_whole_with_their_origin_and_the_neighbour_keeps_syncing() {
    let Fixture {
        client,
        ns,
        repo,
        src,
        cluster: mut c,
        cache: _cache,
    } = Fixture::new("badinput").await;
    let good = |v: &str| {
        vec![
            file("a.yaml", configmap("a", v)),
            file("b.yaml", configmap("b", "stays")),
        ]
    };
    repo.commit("main", &good("good"), "good");
    let p = project(&ns, "");
    let s = settings(&format!("t-{ns}"));
    sync_once(&mut c, &src, &p, &s).await.expect("good sync");
    let mut before = snapshot(&client, &ns).await;
    assert!(
        before.contains_key("ConfigMap/a") && before.len() >= 3,
        "{before:?}"
    );

    // The neighbour: another project, in another namespace, synced after every case.
    let neighbour = Fixture::new("badinput-n").await;
    let np = project(&neighbour.ns, "");
    let ns_settings = settings(&format!("t-{}", neighbour.ns));
    let neighbour_cms: Api<ConfigMap> = Api::namespaced(client.clone(), &neighbour.ns);

    let cases = cases();
    let mut failures = Vec::new();
    for (i, bad) in cases.iter().enumerate() {
        let mut files = good(&format!("changed-{i}"));
        files.push(file("new.yaml", configmap(&format!("new-{i}"), "x")));
        files.extend(bad.files.iter().map(|f| {
            match f {
                Entry::File(path, bytes) if bytes.windows(4).any(|w| w == b"{ns}") => Entry::File(
                    path.clone(),
                    String::from_utf8_lossy(bytes)
                        .replace("{ns}", &ns)
                        .into_bytes(),
                ),
                other => other.clone(),
            }
        }));
        repo.commit("main", &files, bad.name);
        let err = match sync_once(&mut c, &src, &p, &s).await {
            Ok(report) => {
                let applied: Vec<String> = report
                    .results
                    .iter()
                    .map(|r| format!("{} {:?}", r.obj, r.action))
                    .collect();
                failures.push(format!("{}: applied: {}", bad.name, applied.join(", ")));
                // The next cases start from what this one left.
                before = snapshot(&client, &ns).await;
                continue;
            }
            Err(e) => e,
        };
        let text = err.to_string();
        for want in bad.error {
            let want = want.replace("{ns}", &ns);
            if !text.contains(&want) {
                failures.push(format!("{}: error lacks {want:?}: {text}", bad.name));
            }
        }
        let after = snapshot(&client, &ns).await;
        if after != before {
            failures.push(format!(
                "{}: the namespace changed: {before:?} -> {after:?}",
                bad.name
            ));
            before = after;
        }

        neighbour.repo.commit(
            "main",
            &[file("n.yaml", configmap("n", &format!("v{i}")))],
            "neighbour",
        );
        let mut nc = c.clone();
        sync_once(&mut nc, &neighbour.src, &np, &ns_settings)
            .await
            .unwrap_or_else(|e| panic!("{}: the neighbour failed: {e}", bad.name));
        let n = neighbour_cms.get("n").await.expect("neighbour object");
        assert_eq!(
            n.data.and_then(|d| d.get("value").cloned()),
            Some(format!("v{i}")),
            "{}: the neighbour synced",
            bad.name
        );
    }
    assert!(
        failures.is_empty(),
        "{} of {} bad inputs misbehaved:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    eprintln!(
        "bad-input suite: {} commits refused, nothing written",
        cases.len()
    );
}
