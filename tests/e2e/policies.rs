//! Policies people already wrote, run unchanged: Rego compiled by OPA's own compiler
//! (`opa build -t wasm`, OPA v1.22.4 from the Go module proxy) runs as a validator through
//! OPA's WebAssembly ABI, and its verdicts equal `opa eval` of the same Rego.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use serde_json::{Value, json};
use sluice_testenv::cluster;
use sluice_wasm::{Error, Runtime};

use crate::plugins::spec;

use crate::support::*;

/// A ConstraintTemplate's Rego as the gatekeeper-library writes it (Rego v0, `sprintf`
/// left to the host), and a plain deny rule (Rego v1).
const REQUIRED_LABELS: &str = r#"package k8srequiredlabels

violation[{"msg": msg, "details": {"missing_labels": missing}}] {
  provided := {label | input.review.object.metadata.labels[label]}
  required := {label | label := input.parameters.labels[_]}
  missing := required - provided
  count(missing) > 0
  msg := sprintf("you must provide labels: %v", [missing])
}
"#;

const NO_LOAD_BALANCERS: &str = r#"package policy

deny contains msg if {
  input.kind == "Service"
  input.spec.type == "LoadBalancer"
  msg := sprintf("Service %s: type LoadBalancer is not allowed here", [input.metadata.name])
}
"#;

/// `opa build -t wasm -e <entrypoint>` of `rego`: the bundle's `/policy.wasm`.
fn opa_build(dir: &Path, name: &str, rego: &str, entrypoint: &str, v0: bool) -> Vec<u8> {
    let opa = cluster::reference_cli("opa");
    let src = dir.join(format!("{name}.rego"));
    std::fs::write(&src, rego).expect("write rego");
    let bundle = dir.join(format!("{name}.tar.gz"));
    let mut cmd = Command::new(&opa);
    cmd.args(["build", "-t", "wasm", "-e", entrypoint, "-o"])
        .arg(&bundle)
        .arg(&src);
    if v0 {
        cmd.arg("--v0-compatible");
    }
    let out = cmd.output().expect("opa build");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("tar")
        .args(["-xzf"])
        .arg(&bundle)
        .args(["-O", "/policy.wasm"])
        .output()
        .expect("tar");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// `opa eval` of `rego` for `input`: the messages of `query`'s value, as a sorted list.
fn opa_eval(dir: &Path, rego: &str, input: &Value, query: &str, v0: bool) -> Vec<String> {
    let opa = cluster::reference_cli("opa");
    let src = dir.join("eval.rego");
    std::fs::write(&src, rego).expect("write rego");
    let input_file = dir.join("input.json");
    std::fs::write(&input_file, input.to_string()).expect("write input");
    let mut cmd = Command::new(&opa);
    cmd.args(["eval", "--format", "json", "-d"])
        .arg(&src)
        .arg("-i")
        .arg(&input_file)
        .arg(query);
    if v0 {
        cmd.arg("--v0-compatible");
    }
    let out = cmd.output().expect("opa eval");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let mut messages: Vec<String> = v["result"][0]["expressions"][0]["value"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| match m {
            Value::String(s) => s.clone(),
            other => other["msg"].as_str().unwrap_or_default().to_string(),
        })
        .collect();
    messages.sort();
    messages
}

/// A Gatekeeper-style rule and a plain deny rule, compiled by `opa build -t wasm`, give the
/// verdicts `opa eval` gives on the same objects; in a sync, a violation refuses the commit
/// with the policy's own message and the object's file and line, and nothing is applied.
#[tokio::test]
async fn policies_compiled_by_opa_give_opa_evals_verdicts_and_refuse_commits() {
    let dir = tempfile::tempdir().expect("dir");
    let runtime = Runtime::new(None).expect("runtime");
    let labels_wasm = opa_build(
        dir.path(),
        "labels",
        REQUIRED_LABELS,
        "k8srequiredlabels/violation",
        true,
    );
    let lb_wasm = opa_build(dir.path(), "lb", NO_LOAD_BALANCERS, "policy/deny", false);
    let parameters = json!({"labels": ["team", "owner"]});
    let labels = Arc::new(
        runtime
            .load(
                &spec("required-labels", json!({"parameters": parameters})),
                &labels_wasm,
            )
            .expect("an OPA policy loads as a validator"),
    );
    assert_eq!(labels.world(), sluice_wasm::World::Validator);
    let lb = Arc::new(
        runtime
            .load(&spec("no-lb", json!({})), &lb_wasm)
            .expect("loads"),
    );

    // The same objects through sluice and through `opa eval`.
    let cases = [
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a", "namespace": "n", "labels": {"team": "web", "owner": "x"}}}),
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "b", "namespace": "n", "labels": {"team": "web"}}}),
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "c", "namespace": "n"}}),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "d", "namespace": "n"}, "spec": {"type": "LoadBalancer"}}),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "e", "namespace": "n"}, "spec": {"type": "ClusterIP"}}),
    ];
    let subject = sluice_wasm::Subject {
        agent: "test".into(),
        project: "p".into(),
        commit: "c".into(),
    };
    for case in &cases {
        let object =
            sluice_model::object::Object::new(case, sluice_model::object::Origin::default());
        let found = |plugin: &Arc<sluice_wasm::Plugin>| -> Vec<String> {
            let mut m: Vec<String> = match sluice_wasm::run(
                std::slice::from_ref(plugin),
                &subject,
                vec![object.clone()],
            ) {
                Ok(_) => Vec::new(),
                Err(Error::Denied(f)) => f.into_iter().map(|f| f.message).collect(),
                Err(e) => panic!("{e}"),
            };
            m.sort();
            m
        };
        let review = sluice_wasm::opa::input("k8srequiredlabels/violation", case, &parameters);
        assert_eq!(
            found(&labels),
            opa_eval(
                dir.path(),
                REQUIRED_LABELS,
                &review,
                "data.k8srequiredlabels.violation",
                true
            ),
            "{case}"
        );
        assert_eq!(
            found(&lb),
            opa_eval(
                dir.path(),
                NO_LOAD_BALANCERS,
                case,
                "data.policy.deny",
                false
            ),
            "{case}"
        );
    }

    // In a sync: the commit with a violation is refused whole, naming the file.
    let Fixture {
        client,
        ns,
        repo,
        src,
        cluster: mut c,
        cache: _cache,
    } = Fixture::new("opa").await;
    let labelled = |name: &str, labels: &str| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  labels: {{{labels}}}\ndata: {{}}\n"
        )
    };
    repo.commit(
        "main",
        &[
            sluice_testenv::git::file("ok.yaml", labelled("ok", "team: web, owner: me")),
            sluice_testenv::git::file("bad.yaml", labelled("bad", "team: web")),
        ],
        "one unlabelled",
    );
    let p = project(&ns, "");
    let s = sluice_agent::sync::Settings {
        plugins: Ok(vec![labels.clone(), lb.clone()]),
        ..settings(&format!("opa-{ns}"))
    };
    let e = sync_once(&mut c, &src, &p, &s)
        .await
        .expect_err("a violation refuses the commit")
        .to_string();
    assert!(e.contains("you must provide labels"), "{e}");
    assert!(e.contains("owner"), "{e}");
    assert!(e.contains("bad.yaml"), "{e}");
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    assert!(
        cms.get_opt("ok").await.expect("get").is_none(),
        "nothing applied"
    );
    repo.commit(
        "main",
        &[
            sluice_testenv::git::file("ok.yaml", labelled("ok", "team: web, owner: me")),
            sluice_testenv::git::file("bad.yaml", labelled("bad", "team: web, owner: you")),
        ],
        "labelled",
    );
    sync_once(&mut c, &src, &p, &s)
        .await
        .expect("every object labelled");
    assert!(cms.get_opt("bad").await.expect("get").is_some());
}
