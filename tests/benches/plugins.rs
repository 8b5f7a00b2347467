//! WASM plugins versus the same logic in native Rust, side by side in one run.
//!
//! `cargo bench -p sluice-testenv --bench plugins` (divan: every input is built outside
//! the timed region, each figure is the median of its samples with the fastest and slowest
//! beside it; docs/performance.md divides by the 10,000 objects):
//!
//! - `native_in_place`: the plugin crates' own functions on `serde_json::Value`s, as
//!   transformers built into the host would run: set-namespace, pin-images, no-latest-tag,
//!   and the three as one chain. The three are written against `sluice:plugin@0.2.0`'s
//!   `Fields` (JSON Pointer reads and writes), which natively runs on the values;
//!   `chain_on_host_objects` runs the chain on the host's objects (compact JSON text),
//!   parsing each and writing it back, as a transformer built into the host would;
//! - `native_round_trip`: the same chain plus the JSON text passes the contract asks for
//!   (each plugin: objects to text, parsed, worked on, written back, parsed by the host);
//! - `wasm`: the components (`sluice:plugin@0.2.0`: the objects stay in the host, the guest
//!   reads and writes fields through handles) through `sluice_wasm::run`, one by one
//!   and as one chain, and the cost of a call with no objects (a fresh Store and instance);
//! - `cold_start`: loading set-namespace with an empty compilation cache, and with the
//!   on-disk cache a previous load wrote (a new engine, as after a restart).
//!
//! No timing assertions: speed goals live here, not in tests.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use divan::Bencher;
use divan::counter::ItemsCount;
use serde_json::{Value, json};
use sluice_model::object::{Object, Origin};
use sluice_wasm::{self as plugins, FailurePolicy, Limits, Mode, Plugin, Runtime, Spec, Subject};

/// The agent's allocator (host/cli/src/main.rs): both sides allocate as they would in it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const OBJECTS: usize = 10_000;
const DIGEST: &str = "sha256:00000000000000000000000000000000000000000000000000000000000000aa";

fn main() {
    divan::main();
}

/// A Deployment with an init container and two containers; one in ten has an untagged
/// image, so no-latest-tag reports 1,000 findings.
fn deployment(i: usize) -> Value {
    let sidecar = if i.is_multiple_of(10) {
        "envoy"
    } else {
        "envoy:1.30"
    };
    json!({"apiVersion": "apps/v1", "kind": "Deployment",
           "metadata": {"name": format!("app-{i}"), "namespace": "dev", "labels": {"app": format!("app-{i}"), "tier": "web"}},
           "spec": {"replicas": 2, "selector": {"matchLabels": {"app": format!("app-{i}")}},
                    "template": {"metadata": {"labels": {"app": format!("app-{i}")}},
                                 "spec": {"initContainers": [{"name": "init", "image": "busybox:1.36"}],
                                          "containers": [{"name": "web", "image": "nginx:1.27", "ports": [{"containerPort": 80}],
                                                          "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}},
                                                         {"name": "sidecar", "image": sidecar}]}}}})
}

static VALUES: LazyLock<Vec<Value>> = LazyLock::new(|| (0..OBJECTS).map(deployment).collect());

static INPUT: LazyLock<Vec<Object>> = LazyLock::new(|| {
    VALUES
        .iter()
        .enumerate()
        .map(|(i, v)| {
            Object::new(
                v,
                Origin {
                    project: "bench".into(),
                    commit: "0".repeat(40).into(),
                    path: format!("apps/{i}.yaml").into(),
                    line: 1,
                    ..Origin::default()
                },
            )
        })
        .collect()
});

static SUBJECT: LazyLock<Subject> = LazyLock::new(|| Subject {
    agent: "bench".into(),
    project: "bench".into(),
    commit: "0".repeat(40).into(),
});

static NS_CONFIG: LazyLock<set_namespace::Config> = LazyLock::new(|| set_namespace::Config {
    namespace: "prod".into(),
    cluster_scoped_kinds: vec![],
});

static PIN_CONFIG: LazyLock<pin_images::Config> = LazyLock::new(|| pin_images::Config {
    images: [("nginx:1.27", DIGEST), ("busybox:1.36", DIGEST)]
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .into(),
    require_pinned: false,
});

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
        // Audit: the findings are reported, the chain's output still comes back.
        mode: Mode::Audit,
        ..Spec::default()
    }
}

fn configs() -> [(&'static str, Value); 3] {
    [
        ("set-namespace", json!({"namespace": "prod"})),
        (
            "pin-images",
            json!({"images": {"nginx:1.27": DIGEST, "busybox:1.36": DIGEST}}),
        ),
        ("no-latest-tag", Value::Null),
    ]
}

/// set-namespace, pin-images and no-latest-tag, loaded once (no compilation cache).
static CHAIN: LazyLock<Vec<Arc<Plugin>>> = LazyLock::new(|| {
    let runtime = Runtime::new(None).expect("runtime");
    configs()
        .into_iter()
        .map(|(name, config)| {
            let bytes = std::fs::read(sluice_testenv::wasm::component(name)).expect("component");
            Arc::new(runtime.load(&spec(name, config), &bytes).expect("load"))
        })
        .collect()
});

fn native_set_namespace(v: &mut [Value]) {
    set_namespace::transform(&NS_CONFIG, v).expect("moved");
}

fn native_pin_images(v: &mut [Value]) {
    pin_images::transform(&PIN_CONFIG, v).expect("pinned");
}

fn native_no_latest_tag(v: &mut [Value]) -> usize {
    no_latest_tag::validate(v).len()
}

fn native_chain(v: &mut [Value]) -> usize {
    native_set_namespace(v);
    native_pin_images(v);
    native_no_latest_tag(v)
}

/// One plugin's share of the contract: the host writes the objects as text, the guest
/// parses them, works, writes them back, and the host parses its output.
fn round_trip(v: &mut Vec<Value>, work: impl FnOnce(&mut [Value])) {
    let texts: Vec<String> = v.iter().map(Value::to_string).collect();
    let mut parsed: Vec<Value> = texts
        .iter()
        .map(|t| serde_json::from_str(t).expect("json"))
        .collect();
    work(&mut parsed);
    let back: Vec<String> = parsed.iter().map(Value::to_string).collect();
    *v = back
        .iter()
        .map(|t| serde_json::from_str(t).expect("json"))
        .collect();
}

#[divan::bench_group(sample_count = 15, sample_size = 1)]
mod native_in_place {
    use super::*;

    #[divan::bench]
    fn set_namespace(b: Bencher) {
        b.counter(ItemsCount::new(OBJECTS))
            .with_inputs(|| VALUES.clone())
            .bench_local_refs(|v| native_set_namespace(v));
    }

    #[divan::bench]
    fn pin_images(b: Bencher) {
        b.counter(ItemsCount::new(OBJECTS))
            .with_inputs(|| VALUES.clone())
            .bench_local_refs(|v| native_pin_images(v));
    }

    #[divan::bench]
    fn no_latest_tag(b: Bencher) {
        b.counter(ItemsCount::new(OBJECTS))
            .with_inputs(|| VALUES.clone())
            .bench_local_refs(|v| native_no_latest_tag(v));
    }

    #[divan::bench]
    fn chain(b: Bencher) {
        b.counter(ItemsCount::new(OBJECTS))
            .with_inputs(|| VALUES.clone())
            .bench_local_refs(|v| native_chain(v));
    }

    /// The chain as a transformer built into the host would run it on the host's objects,
    /// which are compact JSON text (`object::Object`): each parsed, worked on in place, and
    /// written back, as the plugin stage does for WASM plugins that write.
    #[divan::bench]
    fn chain_on_host_objects(b: Bencher) {
        b.counter(ItemsCount::new(OBJECTS))
            .with_inputs(|| INPUT.clone())
            .bench_local_values(|objects: Vec<Object>| {
                let mut values: Vec<Value> = objects.iter().map(Object::value).collect();
                let findings = native_chain(&mut values);
                let back: Vec<Object> = values
                    .iter()
                    .zip(objects)
                    .map(|(v, o)| Object::new(v, o.origin))
                    .collect();
                (back, findings)
            });
    }
}

#[divan::bench_group(sample_count = 10, sample_size = 1)]
mod native_round_trip {
    use super::*;

    /// The chain with each plugin's JSON passes: two transformers (text out and back) and
    /// a validator (text out).
    #[divan::bench]
    fn chain(b: Bencher) {
        b.counter(ItemsCount::new(OBJECTS))
            .with_inputs(|| VALUES.clone())
            .bench_local_refs(|v| {
                round_trip(v, native_set_namespace);
                round_trip(v, native_pin_images);
                let texts: Vec<String> = v.iter().map(Value::to_string).collect();
                let mut parsed: Vec<Value> = texts
                    .iter()
                    .map(|t| serde_json::from_str(t).expect("json"))
                    .collect();
                native_no_latest_tag(&mut parsed)
            });
    }
}

#[divan::bench_group(sample_count = 10, sample_size = 1)]
mod wasm {
    use super::*;

    fn run(b: Bencher, plugins: &[Arc<Plugin>]) {
        b.counter(ItemsCount::new(OBJECTS))
            .with_inputs(|| INPUT.clone())
            .bench_local_values(|objects| plugins::run(plugins, &SUBJECT, objects).expect("run"));
    }

    #[divan::bench]
    fn set_namespace(b: Bencher) {
        run(b, &CHAIN[0..1]);
    }

    #[divan::bench]
    fn pin_images(b: Bencher) {
        run(b, &CHAIN[1..2]);
    }

    #[divan::bench]
    fn no_latest_tag(b: Bencher) {
        run(b, &CHAIN[2..3]);
    }

    #[divan::bench]
    fn chain(b: Bencher) {
        run(b, &CHAIN);
    }

    /// The contract's own cost per object: a 0.2.0 transformer that returns the handles it
    /// got without touching them (the hostile test plugin with no act).
    #[divan::bench]
    fn pass_through(b: Bencher) {
        static PASS: LazyLock<Vec<Arc<Plugin>>> = LazyLock::new(|| {
            let bytes =
                std::fs::read(sluice_testenv::wasm::component("hostile-v2")).expect("component");
            let runtime = Runtime::new(None).expect("runtime");
            vec![Arc::new(
                runtime
                    .load(&spec("hostile-v2", Value::Null), &bytes)
                    .expect("load"),
            )]
        });
        run(b, &PASS);
    }

    /// A call with no objects: a fresh Store and instance from the InstancePre.
    #[divan::bench(sample_count = 200)]
    fn instantiate_and_call_with_no_objects(b: Bencher) {
        b.bench_local(|| plugins::run(&CHAIN[0..1], &SUBJECT, Vec::new()).expect("run"));
    }
}

#[divan::bench_group(sample_count = 5, sample_size = 1)]
mod cold_start {
    use super::*;

    fn set_namespace() -> (Spec, Vec<u8>) {
        let (name, config) = configs().into_iter().next().expect("set-namespace");
        let bytes = std::fs::read(sluice_testenv::wasm::component(name)).expect("component");
        (spec(name, config), bytes)
    }

    /// Compile, type-check and `validate-config`, with an empty compilation cache.
    #[divan::bench]
    fn compile(b: Bencher) {
        let (spec, bytes) = set_namespace();
        b.with_inputs(|| {
            let dir = tempfile::tempdir().expect("cache dir");
            let runtime = Runtime::new(Some(dir.path())).expect("runtime");
            (dir, runtime)
        })
        .bench_local_refs(|(_, runtime)| runtime.load(&spec, &bytes).expect("load"));
    }

    /// The same load by a new engine reading the cache a first load wrote.
    #[divan::bench]
    fn from_disk_cache(b: Bencher) {
        let (spec, bytes) = set_namespace();
        let dir = tempfile::tempdir().expect("cache dir");
        Runtime::new(Some(dir.path()))
            .expect("runtime")
            .load(&spec, &bytes)
            .expect("load");
        b.with_inputs(|| Runtime::new(Some(dir.path())).expect("runtime"))
            .bench_local_refs(|runtime| runtime.load(&spec, &bytes).expect("load"));
    }
}
