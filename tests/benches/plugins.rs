//! WASM plugins versus the same logic in native Rust, side by side in one run.
//!
//! `cargo bench -p sluice-testenv --bench plugins` prints a table (also used in
//! docs/performance.md):
//!
//! - per-object time on 10,000 Deployments for `set-namespace` and `pin-images`:
//!   native on `serde_json::Value` (what a built-in transformer would cost), and the
//!   component through the host (serialise, call, parse, check: what sluice pays);
//! - instantiate time (fresh Store + instance from the InstancePre);
//! - cold start: load (compile) with an empty cache, and again with the on-disk cache warm.
//!
//! Median of several runs; no timing assertions (speed goals live here, not in tests).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice::object::{Object, Origin};
use sluice::plugins::{self, FailurePolicy, Limits, Mode, Runtime, Spec, Subject};

const OBJECTS: usize = 10_000;
const RUNS: usize = 7;
const DIGEST: &str = "sha256:00000000000000000000000000000000000000000000000000000000000000aa";

fn deployment(i: usize) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "Deployment",
           "metadata": {"name": format!("app-{i}"), "namespace": "dev", "labels": {"app": format!("app-{i}"), "tier": "web"}},
           "spec": {"replicas": 2, "selector": {"matchLabels": {"app": format!("app-{i}")}},
                    "template": {"metadata": {"labels": {"app": format!("app-{i}")}},
                                 "spec": {"initContainers": [{"name": "init", "image": "busybox:1.36"}],
                                          "containers": [{"name": "web", "image": "nginx:1.27", "ports": [{"containerPort": 80}],
                                                          "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}},
                                                         {"name": "sidecar", "image": "envoy:1.30"}]}}}})
}

/// A plugin's logic called natively.
type NativeTransform = Box<dyn Fn(&mut Vec<Value>)>;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time<F: FnMut()>(mut f: F) -> Duration {
    let runs: Vec<Duration> = (0..RUNS)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    median(runs)
}

fn spec(name: &str, config: Value) -> Spec {
    Spec {
        name: name.into(),
        module: String::new(),
        sha256: None,
        config,
        limits: Limits {
            timeout: Duration::from_secs(60),
            memory_bytes: 1 << 30,
            max_output_bytes: 1 << 30,
        },
        capabilities: Vec::new(),
        failure_policy: FailurePolicy::Fail,
        mode: Mode::Enforce,
    }
}

fn per_object(d: Duration) -> String {
    format!("{:.2} µs", d.as_secs_f64() * 1e6 / OBJECTS as f64)
}

fn main() {
    let values: Vec<Value> = (0..OBJECTS).map(deployment).collect();
    let objects: Vec<Object> = values
        .iter()
        .enumerate()
        .map(|(i, v)| Object {
            value: v.clone(),
            origin: Origin {
                path: format!("apps/{i}.yaml"),
                line: 1,
                ..Origin::default()
            },
        })
        .collect();
    let subject = Subject {
        agent: "bench".into(),
        project: "bench".into(),
        commit: "0".repeat(40),
    };
    let runtime = Runtime::new(None).expect("runtime");

    println!(
        "| measurement | native Rust, in place | native Rust, same JSON round trip | WASM plugin | WASM / in place | WASM / round trip |"
    );
    println!("|---|---|---|---|---|---|");
    let ns_config = set_namespace::Config {
        namespace: "prod".into(),
        cluster_scoped_kinds: vec![],
    };
    let pin_config = pin_images::Config {
        images: [
            ("nginx:1.27", DIGEST),
            ("busybox:1.36", DIGEST),
            ("envoy:1.30", DIGEST),
        ]
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .into(),
        require_pinned: false,
    };
    let cases: [(&str, Value, NativeTransform); 2] = [
        (
            "set-namespace",
            json!({"namespace": "prod"}),
            Box::new(move |v: &mut Vec<Value>| set_namespace::transform(&ns_config, v)),
        ),
        (
            "pin-images",
            json!({"images": {"nginx:1.27": DIGEST, "busybox:1.36": DIGEST, "envoy:1.30": DIGEST}}),
            Box::new(move |v: &mut Vec<Value>| {
                pin_images::transform(&pin_config, v).expect("pinned")
            }),
        ),
    ];
    for (name, config, native) in cases {
        let bytes = std::fs::read(sluice_testenv::wasm::component(name)).expect("component");
        let plugin = Arc::new(runtime.load(&spec(name, config), &bytes).expect("load"));
        let native_time = time(|| {
            let mut v = values.clone();
            native(&mut v);
            std::hint::black_box(v);
        });
        // The clone is part of both sides: the host hands the chain an owned list too.
        let clone_time = time(|| {
            std::hint::black_box(values.clone());
        });
        // The plugin contract's work without WebAssembly: objects to JSON text, parsed,
        // transformed, serialised and parsed back, as the host and guest do.
        let round_trip = time(|| {
            let texts: Vec<String> = values.iter().map(|v| v.to_string()).collect();
            let mut parsed: Vec<Value> = texts
                .iter()
                .map(|t| serde_json::from_str(t).expect("json"))
                .collect();
            native(&mut parsed);
            let back: Vec<String> = parsed.iter().map(|v| v.to_string()).collect();
            let out: Vec<Value> = back
                .iter()
                .map(|t| serde_json::from_str(t).expect("json"))
                .collect();
            std::hint::black_box(out);
        });
        let wasm_time = time(|| {
            let out = plugins::run(std::slice::from_ref(&plugin), &subject, objects.clone())
                .expect("run");
            std::hint::black_box(out);
        });
        let (n, w) = (
            native_time.saturating_sub(clone_time),
            wasm_time.saturating_sub(clone_time),
        );
        println!(
            "| {name}, per object ({OBJECTS} Deployments) | {} | {} | {} | {:.2}× | {:.2}× |",
            per_object(n),
            per_object(round_trip),
            per_object(w),
            w.as_secs_f64() / n.as_secs_f64(),
            w.as_secs_f64() / round_trip.as_secs_f64()
        );
    }

    // Instantiate: a fresh Store and instance per call, with an empty object list.
    let bytes = std::fs::read(sluice_testenv::wasm::component("set-namespace")).expect("component");
    let plugin = Arc::new(
        runtime
            .load(&spec("set-namespace", json!({"namespace": "prod"})), &bytes)
            .expect("load"),
    );
    let calls = 200;
    let inst = time(|| {
        for _ in 0..calls {
            std::hint::black_box(
                plugins::run(std::slice::from_ref(&plugin), &subject, Vec::new()).expect("run"),
            );
        }
    });
    println!(
        "| instantiate + call with no objects | — | — | {:.1} µs | — | — |",
        inst.as_secs_f64() * 1e6 / calls as f64
    );

    // Cold start: compile with an empty on-disk cache, then load from the warm cache.
    let cache = tempfile::tempdir().expect("cache dir");
    let cold = Runtime::new(Some(cache.path())).expect("runtime");
    let t = Instant::now();
    cold.load(&spec("set-namespace", json!({"namespace": "prod"})), &bytes)
        .expect("load");
    let compile = t.elapsed();
    // A new engine, as after a restart, reading the same cache.
    let warm = Runtime::new(Some(cache.path())).expect("runtime");
    let t = Instant::now();
    warm.load(&spec("set-namespace", json!({"namespace": "prod"})), &bytes)
        .expect("load");
    let cached = t.elapsed();
    println!(
        "| cold start of set-namespace ({} KiB): compile / from on-disk cache | — | — | {:.1} ms / {:.1} ms | {:.1}× faster | — |",
        bytes.len() / 1024,
        compile.as_secs_f64() * 1e3,
        cached.as_secs_f64() * 1e3,
        compile.as_secs_f64() / cached.as_secs_f64()
    );
}
