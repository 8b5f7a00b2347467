//! Gatekeeper policies: sluice's Gatekeeper plugin (regorus, in the WebAssembly sandbox)
//! beside `gator test` (Gatekeeper v3.23.1, built from the Go module proxy) on the same
//! input, in one run, and the OPA-wasm adapter's cost per object:
//!
//! `cargo bench -p sluice-testenv --bench policies`
//!
//! Input: 2,000 objects (Deployments, Pods, Services, Ingresses, ConfigMaps, Namespaces;
//! some of each breaking a policy) and 10 Constraints over 10 ConstraintTemplates written
//! as the gatekeeper-library writes them (required labels, allowed repos through a lib,
//! disallowed tags, unique ingress host through data.inventory, privileged containers, host
//! namespaces, NodePort Services, required probes, container limits, replica limits).
//! Median of 5 runs of:
//!
//! - `gator test`: the process (its start included), `-f` the objects and the policies;
//! - `sluice validate`: the process (release build, when `target/release/sluice` exists),
//!   the plugin granted the policies with `files:`;
//! - `plugin (wasm)`: one validate call in a running process: a fresh instance, the
//!   templates compiled, every Constraint over every object;
//! - `plugin (native)`: the same code natively (`gatekeeper::validate`);
//! - `opa-wasm`: the required-labels rule compiled by `opa build -t wasm`, through the
//!   OPA ABI adapter, over the same objects.
//!
//! The violations are counted per Constraint on both sides and must agree (the bench
//! stops if they do not). No timing assertions: speed goals live here, not in tests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use sluice_model::object::{Object, Origin};
use sluice_testenv::cluster;
use sluice_wasm::{self as plugins, Mode, Runtime, Spec, Subject};

/// The agent's allocator (host/cli/src/main.rs).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const OBJECTS: usize = 2_000;
const RUNS: usize = 5;

fn median(f: impl FnMut()) -> Duration {
    sluice_testenv::median_time(RUNS, f)
}

/// Object `i`: one kind in turn, one in seven breaking something.
fn object(i: usize) -> Value {
    let ns = format!("team-{}", i % 20);
    let bad = i.is_multiple_of(7);
    let image = if bad {
        "docker.io/library/redis:latest"
    } else {
        "nginx:1.27"
    };
    let container = json!({"name": "app", "image": image,
        "readinessProbe": {"httpGet": {"path": "/", "port": 80}},
        "livenessProbe": {"httpGet": {"path": "/", "port": 80}},
        "resources": {"limits": {"cpu": "1", "memory": "256Mi"}},
        "securityContext": {"privileged": bad}});
    match i % 10 {
        0..=3 => {
            let mut labels = json!({"app": format!("app-{i}")});
            if !bad {
                labels["owner"] = json!("team");
            }
            json!({"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": format!("app-{i}"), "namespace": ns, "labels": labels},
                "spec": {"replicas": if bad { 20 } else { 2 }, "selector": {"matchLabels": {"app": format!("app-{i}")}},
                    "template": {"metadata": {"labels": {"app": format!("app-{i}")}},
                        "spec": {"hostPID": bad, "containers": [container]}}}})
        }
        4 | 5 => json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("pod-{i}"), "namespace": ns},
            "spec": {"containers": [container]}}),
        6 | 7 => json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": format!("svc-{i}"), "namespace": ns},
            "spec": {"type": if bad { "NodePort" } else { "ClusterIP" }, "selector": {"app": "x"}, "ports": [{"port": 80}]}}),
        8 => json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
            "metadata": {"name": format!("ing-{i}"), "namespace": ns},
            "spec": {"rules": [{"host": if bad { "shared.example.com".to_string() } else { format!("h{i}.example.com") }}]}}),
        // Each of the 20 namespaces once.
        _ if i % 20 == 9 && i / 20 < 20 => json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": format!("team-{}", i / 20), "labels": {"env": "prod"}}}),
        _ => json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": format!("cm-{i}"), "namespace": ns}, "data": {"k": "v"}}),
    }
}

/// The policies directory: the four templates of tests/policies/gatekeeper the bench uses,
/// the six of tests/policies/bench, and the ten Constraints.
fn policies(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let out = dir.join("policies");
    std::fs::create_dir_all(&out).expect("mkdir");
    for (i, t) in ["requiredlabels", "libs", "selectors", "uniquehost"]
        .iter()
        .enumerate()
    {
        std::fs::copy(
            src.join(format!("gatekeeper/{t}/template.yaml")),
            out.join(format!("template-{i}.yaml")),
        )
        .expect("copy");
    }
    for entry in std::fs::read_dir(src.join("bench")).expect("bench policies") {
        let path = entry.expect("entry").path();
        std::fs::copy(&path, out.join(path.file_name().expect("name"))).expect("copy");
    }
    out
}

/// `gator test`'s violations per Constraint.
fn gator(objects: &Path, policies: &Path) -> BTreeMap<String, usize> {
    let out = Command::new(cluster::reference_cli("gator"))
        .args(["test", "-o", "json", "-f"])
        .arg(objects)
        .arg("-f")
        .arg(policies)
        .output()
        .expect("gator test");
    let found: Vec<Value> = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    let mut counts = BTreeMap::new();
    for v in found {
        let name = v["constraint"]["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        *counts.entry(name).or_default() += 1;
    }
    counts
}

/// The plugin's findings per Constraint (its rule is `<Kind>/<name>`).
fn counted<'a>(rules: impl Iterator<Item = Option<&'a str>>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for rule in rules.flatten() {
        if let Some((_, name)) = rule.split_once('/') {
            *counts.entry(name.to_string()).or_default() += 1;
        }
    }
    counts
}

fn main() {
    let dir = tempfile::tempdir().expect("dir");
    let values: Vec<Value> = (0..OBJECTS).map(object).collect();
    let manifests = dir.path().join("manifests");
    std::fs::create_dir_all(&manifests).expect("mkdir");
    let objects_file = manifests.join("objects.yaml");
    let text: Vec<String> = values.iter().map(Value::to_string).collect();
    std::fs::write(&objects_file, text.join("\n---\n")).expect("write");
    let policies = policies(dir.path());

    // gator.
    let want = gator(&objects_file, &policies);
    let gator_time = median(|| {
        gator(&objects_file, &policies);
    });

    // The plugin in the sandbox, granted the policies.
    let module_path = sluice_testenv::wasm::component("gatekeeper");
    let module = std::fs::read(&module_path).expect("module");
    let runtime = Runtime::new(Some(&dir.path().join("wasm"))).expect("runtime");
    let spec = Spec {
        name: "gatekeeper".into(),
        mode: Mode::Audit,
        limits: plugins::Limits {
            timeout: Duration::from_secs(300),
            memory_bytes: 2 << 30,
            max_output_bytes: 1 << 30,
        },
        granted: Some(plugins::Granted {
            dir: policies.clone(),
            sha256: "bench".into(),
        }),
        ..Spec::default()
    };
    let plugin = Arc::new(runtime.load(&spec, &module).expect("loads"));
    let objects: Vec<Object> = values
        .iter()
        .map(|v| Object::new(v, Origin::default()))
        .collect();
    let subject = Subject {
        agent: "bench".into(),
        project: "p".into(),
        commit: "c".into(),
    };
    let run =
        || plugins::run(std::slice::from_ref(&plugin), &subject, objects.clone()).expect("run");
    let got = counted(run().findings.iter().map(|f| f.rule.as_deref()));
    assert_eq!(
        got, want,
        "sluice's violations per Constraint differ from gator's"
    );
    let wasm_time = median(|| {
        run();
    });

    // The same code natively.
    let config = gatekeeper::Config {
        paths: vec![policies.display().to_string()],
        ..gatekeeper::Config::default()
    };
    let native = gatekeeper::validate(&config, &values);
    assert_eq!(counted(native.iter().map(|f| f.rule.as_deref())), want);
    let native_time = median(|| {
        gatekeeper::validate(&config, &values);
    });

    // `sluice validate`, as a process, when a release build exists.
    let release = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/sluice");
    let cli_time = release.is_file().then(|| {
        std::fs::copy(&module_path, dir.path().join("gatekeeper.wasm")).expect("copy");
        std::fs::write(
            dir.path().join("config.yaml"),
            "plugins:\n- name: gatekeeper\n  module: gatekeeper.wasm\n  files: [policies/]\n  mode: audit\n  limits: {timeout: 300s, memory_mib: 2048}\n\
             gitops:\n  manifest_projects:\n  - id: local\n",
        )
        .expect("config");
        median(|| {
            let out = Command::new(&release)
                .args(["validate", "manifests", "--config", "config.yaml"])
                .current_dir(dir.path())
                .output()
                .expect("sluice validate");
            assert!(out.status.code().is_some_and(|c| c <= 1), "{out:?}");
        })
    });

    // The OPA ABI: required labels compiled by OPA itself, over the same objects.
    let rego = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("policies/gatekeeper/requiredlabels/template.yaml"),
    )
    .expect("template");
    let rego: String = rego
        .split_once("rego: |\n")
        .expect("rego")
        .1
        .lines()
        .map(|l| l.strip_prefix("      ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    let src = dir.path().join("labels.rego");
    std::fs::write(&src, rego).expect("rego");
    let bundle = dir.path().join("bundle.tar.gz");
    let status = Command::new(cluster::reference_cli("opa"))
        .args([
            "build",
            "-t",
            "wasm",
            "--v0-compatible",
            "-e",
            "k8srequiredlabels/violation",
            "-o",
        ])
        .arg(&bundle)
        .arg(&src)
        .status()
        .expect("opa build");
    assert!(status.success());
    let wasm = Command::new("tar")
        .arg("-xzf")
        .arg(&bundle)
        .args(["-O", "/policy.wasm"])
        .output()
        .expect("tar")
        .stdout;
    let opa_spec = Spec {
        name: "labels".into(),
        config: json!({"parameters": {"labels": ["owner"]}}),
        ..spec.clone()
    };
    let opa = Arc::new(
        runtime
            .load(
                &Spec {
                    granted: None,
                    ..opa_spec
                },
                &wasm,
            )
            .expect("opa loads"),
    );
    let opa_time = median(|| {
        plugins::run(std::slice::from_ref(&opa), &subject, objects.clone()).expect("opa run");
    });

    let evaluations = OBJECTS * 10;
    let per = |d: Duration, n: usize| d.as_secs_f64() * 1e6 / n as f64;
    println!(
        "{OBJECTS} objects, 10 Constraints; violations per Constraint (gator = sluice): {want:?}"
    );
    println!(
        "{:<24} {:>10} {:>22}",
        "", "median", "per object x constraint"
    );
    println!(
        "{:<24} {:>8.0}ms {:>20.1}us",
        "gator test (process)",
        gator_time.as_secs_f64() * 1e3,
        per(gator_time, evaluations)
    );
    if let Some(t) = cli_time {
        println!(
            "{:<24} {:>8.0}ms {:>20.1}us",
            "sluice validate (process)",
            t.as_secs_f64() * 1e3,
            per(t, evaluations)
        );
    }
    println!(
        "{:<24} {:>8.0}ms {:>20.1}us",
        "plugin (wasm)",
        wasm_time.as_secs_f64() * 1e3,
        per(wasm_time, evaluations)
    );
    println!(
        "{:<24} {:>8.0}ms {:>20.1}us",
        "plugin (native)",
        native_time.as_secs_f64() * 1e3,
        per(native_time, evaluations)
    );
    println!(
        "{:<24} {:>8.0}ms {:>20.1}us per object, 1 rule",
        "opa-wasm (OPA ABI)",
        opa_time.as_secs_f64() * 1e3,
        per(opa_time, OBJECTS)
    );
}
