//! A validator that rewrites its own copy of the objects and reports what it did. The host
//! must apply the objects unchanged: a validator's world has no way to return objects.

use serde::Deserialize;
use serde_json::Value;
use sluice_plugin_sdk::{Context, Finding, FindingBuilder, Validator};

/// No configuration.
#[derive(Debug, Default, Deserialize)]
pub struct Config {}

/// The plugin.
pub struct Plugin;

impl Validator for Plugin {
    type Config = Config;

    fn validate(_: &Config, _: &Context, objects: &[Value]) -> Vec<Finding> {
        let mut mine = objects.to_vec();
        for o in &mut mine {
            o["metadata"]["labels"]["mutated"] = "yes".into();
        }
        vec![
            FindingBuilder::warning(format!("mutated {} objects in my own memory", mine.len()))
                .build(),
        ]
    }
}

#[cfg(target_arch = "wasm32")]
sluice_plugin_sdk::export_validator!(Plugin, "../../../wit");
