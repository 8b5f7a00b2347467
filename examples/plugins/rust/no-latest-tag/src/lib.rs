//! no-latest-tag, in Rust with nothing but wit-bindgen: images must name a tag other than
//! `latest`, or a digest. The same rule as the first-party plugin `plugins/no-latest-tag`
//! (which uses sluice's SDK), against the same contract, `sluice:plugin@0.2.0`: the objects
//! stay in the host and the plugin reads only the fields it needs. Built with:
//!
//!     cargo build --release --target wasm32-wasip2

wit_bindgen::generate!({ path: "../../../../wit/v0.2", world: "validator" });

use sluice::plugin::types::{ObjectRef, Severity};

/// Where each workload kind keeps its pod spec, as a JSON Pointer.
const POD_SPEC: &[(&str, &str)] = &[
    ("Pod", "/spec"),
    ("Deployment", "/spec/template/spec"),
    ("ReplicaSet", "/spec/template/spec"),
    ("StatefulSet", "/spec/template/spec"),
    ("DaemonSet", "/spec/template/spec"),
    ("Job", "/spec/template/spec"),
    ("ReplicationController", "/spec/template/spec"),
    ("CronJob", "/spec/jobTemplate/spec/template/spec"),
    ("PodTemplate", "/template/spec"),
];
const CONTAINER_LISTS: [&str; 3] = ["initContainers", "containers", "ephemeralContainers"];
const RULE: &str = "no-latest-tag";

/// Whether an image pins something: a digest, or a tag other than `latest` (a `:` before
/// the last `/` is a registry port, not a tag).
fn pinned(image: &str) -> bool {
    if image.contains('@') {
        return true;
    }
    let name = &image[image.rfind('/').map_or(0, |s| s + 1)..];
    name.split_once(':').is_some_and(|(_, tag)| tag != "latest")
}

struct Plugin;

impl Guest for Plugin {
    fn validate_config(config: String) -> Result<(), String> {
        match config.trim() {
            "null" | "{}" => Ok(()),
            _ => Err(format!("{RULE} takes no configuration")),
        }
    }

    fn validate(_ctx: Context, objects: Vec<Object>) -> Vec<Finding> {
        let mut findings = Vec::new();
        for (index, o) in objects.iter().enumerate() {
            let kind = o.get_string("/kind").unwrap_or_default();
            let Some((_, base)) = POD_SPEC.iter().find(|(k, _)| *k == kind) else {
                continue;
            };
            let object = ObjectRef {
                index: index as u32,
                api_version: o.get_string("/apiVersion").unwrap_or_default(),
                kind: kind.clone(),
                namespace: o.get_string("/metadata/namespace").unwrap_or_default(),
                name: o.get_string("/metadata/name").unwrap_or_default(),
            };
            let field = base.trim_start_matches('/').replace('/', ".");
            for list in CONTAINER_LISTS {
                for i in 0..o.len(&format!("{base}/{list}")).unwrap_or(0) {
                    let Some(image) = o.get_string(&format!("{base}/{list}/{i}/image")) else {
                        continue;
                    };
                    if pinned(&image) {
                        continue;
                    }
                    findings.push(Finding {
                        severity: Severity::Error,
                        message: format!("image {image} uses the latest tag; pin a version or a digest"),
                        object: Some(object.clone()),
                        field: Some(format!("{field}.{list}[{i}].image")),
                        proposed_value: None,
                        rule: Some(RULE.into()),
                    });
                }
            }
        }
        findings
    }
}

export!(Plugin);
