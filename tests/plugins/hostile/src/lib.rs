//! A transformer that misbehaves as its config says (`{"act": "<what>"}`), so the tests can
//! check that every misbehaviour yields the documented error and nothing else happens.

use serde::Deserialize;
use serde_json::Value;
use sluice_plugin_sdk::{Context, Finding, FindingBuilder, Origin, Transformer};

/// What to do.
#[derive(Debug, Default, Deserialize)]
pub struct Config {
    /// `loop`, `alloc`, `trap`, `huge`, `invalid-json`, `missing-name`, `open-file`,
    /// `read-env`, `clock`, `random`, `socket`, `sleep`, `read-silent`, `refuse`, `drop`, or
    /// nothing (pass through).
    #[serde(default)]
    pub act: String,
    /// The address `read-silent` connects to.
    #[serde(default)]
    pub addr: String,
}

/// The plugin.
pub struct Plugin;

impl Transformer for Plugin {
    type Config = Config;

    fn transform(
        config: &Config,
        _: &Context,
        objects: &mut Vec<(Value, Origin)>,
    ) -> Result<(), Vec<Finding>> {
        let report = |what: String| Err(vec![FindingBuilder::error(what).build()]);
        match config.act.as_str() {
            "loop" => {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            "alloc" => {
                let mut hog: Vec<Vec<u8>> = Vec::new();
                loop {
                    hog.push(vec![1u8; 16 << 20]);
                    std::hint::black_box(&hog);
                }
            }
            "trap" => panic!("hostile plugin panics on purpose"),
            "huge" => objects[0].0["data"] = serde_json::json!({ "big": "x".repeat(8 << 20) }),
            "missing-name" => {
                for (v, _) in objects.iter_mut() {
                    v["metadata"].as_object_mut().map(|m| m.remove("name"));
                }
            }
            // The SDK always serializes valid JSON; invalid JSON needs a raw string, so this
            // act smuggles one through a field the host will read back.
            "invalid-json" => objects[0].0 = Value::String("{not json".into()),
            "open-file" => {
                return report(format!(
                    "open: {:?}",
                    std::fs::read_to_string("/etc/hostname").map(|_| "read it")
                ));
            }
            "read-env" => {
                return report(format!(
                    "env: HOME={:?} vars={}",
                    std::env::var("HOME").ok(),
                    std::env::vars().count()
                ));
            }
            "clock" => return report(format!("clock: {:?}", std::time::SystemTime::now())),
            "random" => {
                use std::hash::BuildHasher;
                let s = std::collections::hash_map::RandomState::new();
                return report(format!("random: {}", s.hash_one(42u8)));
            }
            "socket" => {
                return report(format!(
                    "socket: {:?}",
                    std::net::TcpStream::connect("127.0.0.1:1").map(|_| ())
                ));
            }
            // Host calls that block: a sleep (with `clocks`) and a read from a socket that
            // never answers (with `network`). Both must end at the plugin's deadline.
            "sleep" => std::thread::sleep(std::time::Duration::from_secs(3600)),
            "read-silent" => {
                use std::io::Read;
                let read = std::net::TcpStream::connect(&config.addr)
                    .and_then(|mut s| s.read(&mut [0u8; 16]));
                return report(format!("read-silent: {read:?}"));
            }
            // A host call in a loop: each write asks for `wasi:cli/stdout` again (a new
            // resource), writes a line to the log and drops it. Epochs interrupt it between
            // calls; the log's line cap keeps the output bounded.
            "stdout-loop" => {
                use std::io::Write;
                loop {
                    let _ = std::io::stdout().write_all(b"x\n");
                }
            }
            "refuse" => return report("refused on purpose".into()),
            // Drops every object but the first: a transformer that loses part of the set.
            "drop" => objects.truncate(1),
            _ => {}
        }
        Ok(())
    }
}

#[cfg(target_arch = "wasm32")]
sluice_plugin_sdk::export_transformer!(Plugin, "../../../wit");
