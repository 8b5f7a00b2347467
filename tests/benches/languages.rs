//! The same validator (`no-latest-tag`) written in Rust (with the SDK, and with wit-bindgen
//! alone), Python, JavaScript, C and Go (a KRM function), side by side in one run: module size, cold compile (empty cache), load
//! from the on-disk cache, instantiate (a call on one object), and per-object time on 10,000
//! Deployments (one in ten with an untagged image, so findings are built and returned too).
//!
//! `cargo bench -p sluice-testenv --bench languages` (builds the components: the Rust one
//! with cargo, the others with `examples/plugins/build.sh`). Median of several runs; no
//! timing assertions. Figures: docs/performance.md.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice_model::object::{Object, Origin};
use sluice_testenv::wasm;
use sluice_wasm::{self as plugins, FailurePolicy, Limits, Mode, Runtime, Spec, Subject};

const OBJECTS: usize = 10_000;
const RUNS: usize = 5;

fn deployment(i: usize) -> Value {
    let image = if i.is_multiple_of(10) {
        "nginx"
    } else {
        "nginx:1.27"
    };
    json!({"apiVersion": "apps/v1", "kind": "Deployment",
           "metadata": {"name": format!("app-{i}"), "namespace": "dev", "labels": {"app": format!("app-{i}")}},
           "spec": {"replicas": 2, "selector": {"matchLabels": {"app": format!("app-{i}")}},
                    "template": {"metadata": {"labels": {"app": format!("app-{i}")}},
                                 "spec": {"initContainers": [{"name": "init", "image": "busybox:1.36"}],
                                          "containers": [{"name": "web", "image": image},
                                                         {"name": "sidecar", "image": "envoy:1.30"}]}}}})
}

fn spec() -> Spec {
    Spec {
        name: "no-latest-tag".into(),
        module: String::new(),
        sha256: None,
        config: Value::Null,
        limits: Limits {
            timeout: Duration::from_secs(120),
            memory_bytes: 1 << 30,
            max_output_bytes: 1 << 30,
        },
        capabilities: Vec::new(),
        failure_policy: FailurePolicy::Fail,
        // Audit: findings are returned, not a refusal, so every run does the same work.
        mode: Mode::Audit,
        ..Spec::default()
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    match d.as_secs_f64() * 1e3 {
        m if m < 10.0 => format!("{m:.2} ms"),
        m => format!("{m:.0} ms"),
    }
}

fn main() {
    let objects: Vec<Object> = (0..OBJECTS)
        .map(|i| {
            Object::new(
                &deployment(i),
                Origin {
                    path: format!("apps/{i}.yaml").into(),
                    line: 1,
                    ..Origin::default()
                },
            )
        })
        .collect();
    let subject = Subject {
        agent: "bench".into(),
        project: "bench".into(),
        commit: "0".repeat(40).into(),
    };
    let modules = [
        ("Rust (SDK)", wasm::component("no-latest-tag")),
        (
            "Rust (wit-bindgen alone)",
            wasm::example_plugin("rust_no_latest_tag"),
        ),
        (
            "Python (componentize-py 0.25.1)",
            wasm::example_plugin("python_no_latest_tag"),
        ),
        (
            "JavaScript (componentize-js 0.23.0)",
            wasm::example_plugin("javascript_no_latest_tag"),
        ),
        (
            "C (clang 14, wasi-libc, wit-bindgen 0.57.1)",
            wasm::example_plugin("c_no_latest_tag"),
        ),
        (
            "Go KRM function (wasip1, kyaml v0.20.1)",
            wasm::example_plugin("go_no_latest_tag"),
        ),
    ];
    println!(
        "| language | module | cold compile | load from cache | instantiate + 1 object | per object (10,000 Deployments) | findings |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (language, path) in modules {
        let bytes = std::fs::read(&path).expect("built");
        let cache = tempfile::tempdir().expect("cache dir");
        let t = Instant::now();
        let cold = Runtime::new(Some(cache.path()))
            .expect("runtime")
            .load(&spec(), &bytes)
            .expect("loads");
        let cold_time = t.elapsed();
        drop(cold);
        let runtime = Runtime::new(Some(cache.path())).expect("runtime");
        let t = Instant::now();
        let plugin = std::sync::Arc::new(runtime.load(&spec(), &bytes).expect("loads"));
        let warm_time = t.elapsed();
        let chain = [plugin];
        let one = median(
            (0..RUNS)
                .map(|_| {
                    let t = Instant::now();
                    plugins::run(&chain, &subject, objects[..1].to_vec()).expect("runs");
                    t.elapsed()
                })
                .collect(),
        );
        // A plugin may fail at this size (a limit): the row says so, and gives the figure on
        // a tenth of the objects instead.
        let (mut per_object, mut findings) = time_per_object(&chain, &subject, &objects, one);
        if let Err(why) = &per_object {
            let (small, small_findings) =
                time_per_object(&chain, &subject, &objects[..OBJECTS / 10], one);
            per_object = Err(match small {
                Ok(us) => format!("{us:.1} µs on 1,000 objects; 10,000 {why}"),
                Err(e) => format!("{why}; 1,000 also {e}"),
            });
            findings = small_findings;
        }
        let per_object = match per_object {
            Ok(us) => format!("{us:.1} µs"),
            Err(text) => text,
        };
        println!(
            "| {language} | {:.1} MB | {} | {} | {} | {per_object} | {findings} |",
            bytes.len() as f64 / 1e6,
            ms(cold_time),
            ms(warm_time),
            ms(one),
        );
    }
}

/// Per-object time of `chain` on `objects` (the median of [`RUNS`] calls, less the call on
/// one object), and the findings of the last call; or how it failed.
fn time_per_object(
    chain: &[std::sync::Arc<plugins::Plugin>],
    subject: &Subject,
    objects: &[Object],
    one: Duration,
) -> (Result<f64, String>, usize) {
    let mut findings = 0;
    let mut runs = Vec::new();
    for _ in 0..RUNS {
        let t = Instant::now();
        match plugins::run(chain, subject, objects.to_vec()) {
            Ok(out) => {
                runs.push(t.elapsed());
                findings = out.findings.len();
            }
            Err(e) => {
                let text = e.to_string();
                // The reason, without the plugin/project/commit prefix.
                let why = text.lines().next().unwrap_or_default();
                let why = why.rsplit(": ").next().unwrap_or(why).trim().to_string();
                return (Err(format!("fails: {why}")), 0);
            }
        }
    }
    let per = median(runs).saturating_sub(one).as_secs_f64() * 1e6 / (objects.len() - 1) as f64;
    (Ok(per), findings)
}
