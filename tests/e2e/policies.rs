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

/// A suite file as `<directory>/<file>`, however the tool printed its path.
fn suite_key(path: &str) -> String {
    let parts: Vec<&str> = path.rsplit('/').take(2).collect();
    format!("{}/{}", parts[1], parts[0])
}

/// Per test and case of `gator verify -v`'s output: (suite file, test, case) → passed. A
/// test-level line has an empty case.
/// (suite file, test, case) → passed.
type Verdicts = std::collections::BTreeMap<(String, String, String), bool>;

fn gator_verdicts(dir: &Path, suites: &str) -> Verdicts {
    let gator = cluster::reference_cli("gator");
    let out = Command::new(&gator)
        .args(["verify", "-v", suites])
        .current_dir(dir)
        .output()
        .expect("gator verify");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut verdicts = std::collections::BTreeMap::new();
    let mut pending: Vec<(String, String, bool)> = Vec::new();
    let mut test = String::new();
    for line in text.lines() {
        let indented = line.starts_with("    ");
        let line = line.trim();
        if let Some(name) = line.strip_prefix("=== RUN") {
            if !indented {
                test = name.trim().to_string();
            }
        } else if let Some((ok, rest)) = line
            .strip_prefix("--- PASS:")
            .map(|r| (true, r))
            .or_else(|| line.strip_prefix("--- FAIL:").map(|r| (false, r)))
        {
            let name = rest
                .split('\t')
                .next()
                .unwrap_or_default()
                .trim()
                .to_string();
            match indented {
                true => pending.push((test.clone(), name, ok)),
                false => pending.push((name, String::new(), ok)),
            }
        } else if let Some(path) = line
            .strip_prefix("ok\t")
            .or_else(|| line.strip_prefix("FAIL\t"))
        {
            let suite = suite_key(path.split('\t').next().unwrap_or_default());
            for (t, c, ok) in pending.drain(..) {
                verdicts.insert((suite.clone(), t, c), ok);
            }
        }
    }
    assert!(!verdicts.is_empty(), "gator printed no verdicts: {text}");
    verdicts
}

/// `sluice plugin test -o json` of `dir` with the Gatekeeper plugin: (suite, test, case) →
/// passed, with a test-level entry that is its cases together, and the raw results.
fn sluice_verdicts(dir: &Path, suites: &str) -> (Verdicts, Vec<Value>) {
    let out = Command::new(sluice_testenv::wasm::sluice_binary())
        .args(["plugin", "test", suites, "-o", "json", "--gatekeeper"])
        .arg(sluice_testenv::wasm::component("gatekeeper"))
        .current_dir(dir)
        .output()
        .expect("sluice plugin test");
    let results: Vec<Value> = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    let mut verdicts = std::collections::BTreeMap::new();
    let mut tests: std::collections::BTreeMap<(String, String), bool> = Default::default();
    for r in &results {
        let file = suite_key(r["file"].as_str().unwrap());
        let (test, case) = (r["test"].as_str().unwrap(), r["case"].as_str().unwrap());
        let ok = r["result"] == "pass";
        verdicts.insert((file.clone(), test.to_string(), case.to_string()), ok);
        *tests.entry((file, test.to_string())).or_insert(true) &= ok;
    }
    for ((file, test), ok) in tests {
        verdicts.insert((file, test, String::new()), ok);
    }
    (verdicts, results)
}

/// The Gatekeeper plugin's verdicts on Suites equal `gator verify`'s (Gatekeeper v3.23.1,
/// built from the Go module proxy) case by case, on suites written for each semantic:
/// match by kinds, excluded namespaces, label and namespace selectors, scope and name;
/// `warn` and `dryrun` constraints; `data.inventory`; `libs`; parameters; deprecated Rego
/// v0 built-ins; a template that does not parse (both fail it, sluice naming the line).
#[test]
fn gatekeeper_suites_give_gators_verdicts_case_by_case() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/gatekeeper");
    let gator = gator_verdicts(&dir, "./...");
    let (sluice, results) = sluice_verdicts(&dir, ".");
    let mut agree = 0;
    for (key, verdict) in &gator {
        assert_eq!(
            sluice.get(key),
            Some(verdict),
            "{key:?}: gator says {verdict}"
        );
        agree += 1;
    }
    let cases = gator.keys().filter(|(_, _, c)| !c.is_empty()).count();
    assert_eq!((agree, cases), (24, 17), "{gator:#?}");
    let broken = results
        .iter()
        .find(|r| r["file"].as_str().unwrap().contains("broken"))
        .expect("broken suite");
    assert_eq!(
        broken["message"],
        "plugin gatekeeper: invalid config: ConstraintTemplate k8sbroken: rego: line 3 column 25: expecting }"
    );

    // Gatekeeper's own Suite (test/gator/verify of the module gator was built from), run
    // unchanged: every case agrees but those of the two tests that use ExpansionTemplates,
    // which sluice reports as not supported.
    let version =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("cluster/versions.env"))
            .expect("versions.env")
            .lines()
            .find_map(|l| l.strip_prefix("GATEKEEPER_VERSION=").map(str::to_string))
            .expect("GATEKEEPER_VERSION");
    // The module's directory (downloaded from the module proxy if the cache lost it).
    let download = Command::new("go")
        .args(["mod", "download", "-json"])
        .arg(format!(
            "github.com/open-policy-agent/gatekeeper/v3@{version}"
        ))
        .output()
        .expect("go mod download");
    let module: Value = serde_json::from_slice(&download.stdout).expect("go mod download -json");
    let upstream = Path::new(module["Dir"].as_str().expect("Dir")).join("test/gator");
    let gator = gator_verdicts(&upstream, "verify");
    let (sluice, results) = sluice_verdicts(&upstream, "verify");
    let mut agree = 0;
    for (key, verdict) in &gator {
        if key.1.contains("expansion") {
            continue;
        }
        assert_eq!(
            sluice.get(key),
            Some(verdict),
            "{key:?}: gator says {verdict}"
        );
        agree += 1;
    }
    assert_eq!(agree, 9, "{gator:#?}");
    let unsupported: Vec<&str> = results
        .iter()
        .filter(|r| r["result"] == "fail")
        .map(|r| r["message"].as_str().unwrap())
        .collect();
    assert_eq!(
        unsupported,
        [
            "expansion foo_expansion.yaml: Gatekeeper's ExpansionTemplates are not supported by sluice",
            "expansion foobar_expansion.yaml: Gatekeeper's ExpansionTemplates are not supported by sluice"
        ]
    );
}

/// The Gatekeeper plugin in the agent, its policies in the configuration repository
/// (`files: [policies/]`): a commit with a Deployment violating a `deny` Constraint is
/// refused with the Constraint's message and the file, applying nothing; a `warn`
/// violation applies and is reported, in the sync's report and as an Event.
#[tokio::test]
async fn gatekeeper_policies_from_the_config_repository_refuse_or_warn() {
    let client = cluster::client().await;
    let ns = cluster::namespace(&client, "gk").await;
    let server = sluice_testenv::git::shared();
    let manifests = server.create_repo(&format!("group/{ns}-manifests"));
    let config_repo = server.create_repo(&format!("group/{ns}-config"));
    let policies = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/gatekeeper/requiredlabels");
    let read = |f: &str| std::fs::read_to_string(policies.join(f)).expect("policy file");
    let module = std::fs::read(sluice_testenv::wasm::component("gatekeeper")).expect("built");
    let config = format!(
        "plugins:\n- name: gatekeeper\n  module: plugins/gatekeeper.wasm\n  files: [policies/]\n\
         gitops:\n  manifest_projects:\n  - id: group/{ns}-manifests\n    default_namespace: {ns}\n"
    );
    // Deployments need owner and team (deny); ConfigMaps should have app (warn).
    let warn = read("constraint-warn.yaml")
        .replace("kinds: [\"Pod\"]", "kinds: [\"ConfigMap\"]")
        .replace("pods-should-have-app", "configmaps-should-have-app");
    config_repo.commit(
        "main",
        &[
            sluice_testenv::git::file(".gitlab/agents/gk/config.yaml", config),
            sluice_testenv::git::file("plugins/gatekeeper.wasm", &module),
            sluice_testenv::git::file("policies/template.yaml", read("template.yaml")),
            sluice_testenv::git::file("policies/deny.yaml", read("constraint.yaml")),
            sluice_testenv::git::file("policies/warn.yaml", warn),
            // Not a policy: ignored.
            sluice_testenv::git::file("policies/suite.yaml", read("suite.yaml")),
        ],
        "policies",
    );
    let deployment =
        read("deploy-no-owner.yaml").replace("namespace: shop", &format!("namespace: {ns}"));
    manifests.commit(
        "main",
        &[
            sluice_testenv::git::file("app/deploy.yaml", deployment),
            sluice_testenv::git::file("app/settings.yaml", configmap("settings", "1")),
        ],
        "a deployment without an owner",
    );
    let dir = tempfile::tempdir().expect("dir");
    let opts = || sluice_agent::agent::Options {
        plugin_cache_dir: Some(dir.path().join("wasm")),
        ..options("gk", dir.path())
    };
    let once = || async {
        sluice_agent::agent::run_once(
            client.clone(),
            sluice_agent::agent::ConfigSource::Repo {
                url: config_repo.http_url().into(),
            },
            opts(),
        )
        .await
        .expect("run once")
        .remove(0)
        .result
    };
    let e = once()
        .await
        .expect_err("the deny constraint refuses the commit");
    assert!(
        e.contains("app/deploy.yaml:1: error: [deployments-need-owner] you must provide labels: {\"owner\"} (gatekeeper, Deployment/"),
        "{e}"
    );
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    assert!(
        cms.get_opt("settings").await.expect("get").is_none(),
        "nothing applied"
    );

    let deployment = read("deploy-ok.yaml").replace("namespace: shop", &format!("namespace: {ns}"));
    manifests.commit(
        "main",
        &[
            sluice_testenv::git::file("app/deploy.yaml", deployment),
            sluice_testenv::git::file("app/settings.yaml", configmap("settings", "1")),
        ],
        "owned",
    );
    let report = once().await.expect("only a warning left");
    let warnings: Vec<String> = report.findings.iter().map(ToString::to_string).collect();
    assert_eq!(
        warnings,
        ["app/settings.yaml:1: warning: [configmaps-should-have-app] you must provide labels: {\"app\"} (gatekeeper, ConfigMap/".to_string() + &ns + "/settings)"],
    );
    assert!(
        cms.get_opt("settings").await.expect("get").is_some(),
        "applied"
    );
    let events = sluice_events(&client, &ns, &report.inventory.name).await;
    assert!(
        events.iter().any(|(t, reason, text)| t == "Warning"
            && reason == "PluginFindings"
            && text.contains("[configmaps-should-have-app] you must provide labels")),
        "{events:?}"
    );
}
