//! The KRM function ABI: a plugin may also be a WASI preview 1 command (a core module with
//! `_start`, as `GOOS=wasip1 GOARCH=wasm go build` makes) that reads a KRM `ResourceList`
//! on stdin and writes one on stdout, as KRM functions do. Functions written against
//! `sigs.k8s.io/kustomize/kyaml/fn/framework` then run unchanged.
//!
//! - stdin: `{"apiVersion": "config.kubernetes.io/v1", "kind": "ResourceList", "items":
//!   [...], "functionConfig": <the plugin's config>}` (JSON, which is YAML).
//! - stdout: a ResourceList, YAML or JSON. `items` are the objects to apply (a function is a
//!   transformer: it may change, add or remove objects); `results` become findings with
//!   their severity (`error` when none is given). An `error` result refuses the commit, as a
//!   failing KRM function would.
//! - A non-zero exit without error results fails the call, quoting stderr.
//!
//! The sandbox is the components' (`sandbox.rs`): wasmtime's preview 1 implementation with
//! no preopened directory, an empty environment, deterministic clocks and randomness unless
//! granted (preview 1 has no sockets), the memory cap, the deadline (epochs, and `finish`
//! for what the host waits on), and stdout
//! capped at the output limit.

use std::time::Duration;

use serde_json::{Value, json};
use wasmtime::{Engine, InstancePre, Linker, Module, Store, StoreLimits};
use wasmtime_wasi::WasiCtxBuilder;
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::{MemoryInputPipe, MemoryOutputPipe};

use super::{Capability, Spec};

/// True for a core WebAssembly module (version 1), as opposed to a component.
pub fn is_core_module(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && bytes[..4] == *b"\0asm" && bytes[4..8] == [1, 0, 0, 0]
}

/// State of one function call.
pub struct P1 {
    wasi: WasiP1Ctx,
    limits: StoreLimits,
}

/// A compiled, linked function.
pub struct FunctionPre(InstancePre<P1>);

/// Compiles `bytes` (or loads them from the engine's cache).
///
/// # Errors
/// When it does not compile.
pub fn compile(engine: &Engine, bytes: &[u8]) -> Result<Module, String> {
    Module::from_binary(engine, bytes).map_err(|e| format!("failed to compile: {e:#}"))
}

/// Links a compiled module against WASI preview 1.
///
/// # Errors
/// When it has no `_start`, or imports anything but preview 1.
pub fn prepare(engine: &Engine, module: &Module) -> Result<FunctionPre, String> {
    if module.get_export("_start").is_none() {
        return Err(
            "a core module must be a WASI command (export _start) reading a KRM ResourceList on stdin"
                .into(),
        );
    }
    let mut linker: Linker<P1> = Linker::new(engine);
    wasmtime_wasi::p1::add_to_linker_async(&mut linker, |s: &mut P1| &mut s.wasi)
        .map_err(|e| format!("{e:#}"))?;
    linker
        .instantiate_pre(module)
        .map(FunctionPre)
        .map_err(|e| format!("{e:#}"))
}

/// What a function returned.
#[derive(Debug)]
pub struct Output {
    /// `items`.
    pub items: Vec<Value>,
    /// `results`.
    pub results: Vec<Value>,
}

/// Why a call failed.
#[derive(Debug)]
pub enum CallError {
    /// Trapped, timed out, out of memory, or exited non-zero without error results.
    Failed(String),
    /// The output is not a ResourceList, or is too large.
    Invalid(String),
}

/// Runs the function once over `items` with the plugin's config as its `functionConfig`,
/// within the plugin's limits (`tick`: the engine's epoch period).
pub fn call(
    engine: &Engine,
    pre: &FunctionPre,
    items: Vec<Value>,
    spec: &Spec,
    tick: Duration,
    trap_message: impl Fn(&wasmtime::Error) -> String,
) -> Result<Output, CallError> {
    let (config, limits, capabilities) = (&spec.config, &spec.limits, &spec.capabilities[..]);
    let mut input = json!({
        "apiVersion": "config.kubernetes.io/v1",
        "kind": "ResourceList",
        "items": items,
    });
    if !config.is_null() {
        input["functionConfig"] = config.clone();
    }
    let Exited {
        code,
        stdout: out,
        stderr,
    } = run(
        engine,
        pre,
        input.to_string().into_bytes(),
        limits,
        capabilities,
        tick,
        trap_message,
    )?;
    let stderr_tail = || stderr.clone();
    let parsed: Result<Value, String> = std::str::from_utf8(&out)
        .map_err(|e| e.to_string())
        .and_then(|text| serde_saphyr::from_str::<Value>(text).map_err(|e| e.to_string()));
    let list = match (code, parsed) {
        (_, Ok(v)) if v["kind"] == "ResourceList" => v,
        (0, Ok(_)) => {
            return Err(CallError::Invalid(
                "stdout is not a ResourceList (kind: ResourceList)".into(),
            ));
        }
        (0, Err(e)) => {
            return Err(CallError::Invalid(format!(
                "stdout is not a ResourceList: {e}"
            )));
        }
        (code, _) => {
            return Err(CallError::Failed(format!(
                "exited with code {code}: {}",
                stderr_tail()
            )));
        }
    };
    let results: Vec<Value> = list["results"].as_array().cloned().unwrap_or_default();
    if code != 0 && !results.iter().any(|r| severity(r) == "error") {
        return Err(CallError::Failed(format!(
            "exited with code {code}: {}",
            stderr_tail()
        )));
    }
    let items = match &list["items"] {
        Value::Array(items) => items.clone(),
        Value::Null => Vec::new(),
        _ => return Err(CallError::Invalid("items is not a list".into())),
    };
    Ok(Output { items, results })
}

/// How a command ended: its exit code, its stdout, and the last 2 KiB of its stderr.
pub struct Exited {
    /// The exit code (0 when `_start` returned).
    pub code: i32,
    /// Everything it wrote to stdout (at most `limits.max_output_bytes`).
    pub stdout: Vec<u8>,
    /// The end of what it wrote to stderr, trimmed.
    pub stderr: String,
}

/// Runs a WASI preview 1 command once with `stdin`, in the sandbox: no preopened
/// directory, no environment unless granted, deterministic clocks and randomness unless
/// granted, the memory cap, the deadline, and stdout capped at the output limit.
///
/// # Errors
/// [`CallError::Failed`] when it traps, times out or runs out of memory;
/// [`CallError::Invalid`] when its output is over the limit.
pub fn run(
    engine: &Engine,
    pre: &FunctionPre,
    stdin: Vec<u8>,
    limits: &super::Limits,
    capabilities: &[Capability],
    tick: Duration,
    trap_message: impl Fn(&wasmtime::Error) -> String,
) -> Result<Exited, CallError> {
    let stdin = MemoryInputPipe::new(stdin);
    // One byte over the limit tells a full pipe from output that fits exactly.
    let stdout = MemoryOutputPipe::new(limits.max_output_bytes + 1);
    let stderr = MemoryOutputPipe::new(64 << 10);
    let mut wasi = WasiCtxBuilder::new();
    wasi.stdin(stdin)
        .stdout(stdout.clone())
        .stderr(stderr.clone())
        .arg("function");
    if capabilities.contains(&Capability::Environment) {
        wasi.inherit_env();
    }
    super::sandbox::stand_ins(&mut wasi, capabilities);
    let mut store = Store::new(
        engine,
        P1 {
            wasi: wasi.build_p1(),
            limits: wasmtime::StoreLimitsBuilder::new()
                .memory_size(limits.memory_bytes)
                .instances(4)
                .tables(16)
                .memories(1)
                .trap_on_grow_failure(true)
                .build(),
        },
    );
    store.limiter(|s| &mut s.limits);
    store.set_epoch_deadline(ticks(limits.timeout, tick));
    store.epoch_deadline_trap();
    let exit = super::finish(limits, async {
        let instance = pre.0.instantiate_async(&mut store).await?;
        let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
        start.call_async(&mut store, ()).await
    });
    let code = match exit {
        Ok(()) => 0,
        Err(e) => match e.downcast_ref::<wasmtime_wasi::I32Exit>() {
            Some(exit) => exit.0,
            None => return Err(CallError::Failed(trap_message(&e))),
        },
    };
    let out = stdout.contents();
    if out.len() > limits.max_output_bytes {
        return Err(CallError::Invalid(format!(
            "output is more than {} bytes, the limit",
            limits.max_output_bytes
        )));
    }
    let text = String::from_utf8_lossy(&stderr.contents()).into_owned();
    let text = text.trim();
    let start = text.len().saturating_sub(2048);
    let start = (start..=text.len())
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(text.len());
    Ok(Exited {
        code,
        stdout: out.to_vec(),
        stderr: text[start..].to_string(),
    })
}

/// A result's severity: `error`, `warning` or `info` (KRM's default is `error`).
pub fn severity(result: &Value) -> &'static str {
    match result["severity"].as_str() {
        Some("warning") => "warning",
        Some("info") => "info",
        _ => "error",
    }
}

/// The annotation sluice puts on each item to find its origin in the output.
pub const ORIGIN_ANNOTATION: &str = "sluice.dev/krm-index";

/// Removes what sluice and kyaml's reader add to items (`sluice.dev/krm-index`,
/// `config.kubernetes.io/index`, `internal.config.kubernetes.io/*`) and returns the index
/// sluice added, if any. An annotation map left empty is removed.
pub fn take_origin(item: &mut Value) -> Option<usize> {
    let annotations = item["metadata"]["annotations"].as_object_mut()?;
    let index = annotations
        .remove(ORIGIN_ANNOTATION)
        .and_then(|v| v.as_str().and_then(|s| s.parse().ok()));
    annotations.retain(|k, _| {
        k != "config.kubernetes.io/index" && !k.starts_with("internal.config.kubernetes.io/")
    });
    if annotations.is_empty()
        && let Some(meta) = item["metadata"].as_object_mut()
    {
        meta.remove("annotations");
    }
    index
}

/// The deadline in epoch ticks.
fn ticks(timeout: Duration, tick: Duration) -> u64 {
    (timeout.as_millis() / tick.as_millis()).max(1) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_and_reader_annotations_are_taken_off() {
        let mut item = json!({"metadata": {"name": "a", "annotations": {
            ORIGIN_ANNOTATION: "3", "config.kubernetes.io/index": "0",
            "internal.config.kubernetes.io/path": "x"}}});
        assert_eq!(take_origin(&mut item), Some(3));
        assert_eq!(item, json!({"metadata": {"name": "a"}}));
        let mut kept = json!({"metadata": {"name": "a", "annotations": {"team": "web"}}});
        assert_eq!(take_origin(&mut kept), None);
        assert_eq!(kept["metadata"]["annotations"], json!({"team": "web"}));
        assert!(is_core_module(b"\0asm\x01\0\0\0rest"));
        assert!(!is_core_module(b"\0asm\x0d\0\x01\0rest"));
        assert_eq!(severity(&json!({})), "error");
        assert_eq!(severity(&json!({"severity": "warning"})), "warning");
    }
}
