//! `no-latest-tag` (validator): images must name a tag other than `latest`, or a digest.
//!
//! Config: none (`{}`).

use serde::Deserialize;
use serde_json::Value;
use sluice_plugin_sdk::{Finding, FindingBuilder, containers, parse_image, pod_spec};

/// Plugin configuration: nothing to configure.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {}

/// Reports images without a tag, with `:latest`, and without a digest.
pub fn validate(objects: &[Value]) -> Vec<Finding> {
    let mut out = Vec::new();
    for (index, o) in objects.iter().enumerate() {
        let Some((base, spec)) = pod_spec(o) else {
            continue;
        };
        for (path, c) in containers(spec) {
            let Some(image) = c["image"].as_str() else {
                continue;
            };
            let (_, tag, digest) = parse_image(image);
            if digest.is_none() && matches!(tag, None | Some("latest")) {
                out.push(
                    FindingBuilder::error(format!(
                        "image {image} uses the latest tag; pin a version or a digest"
                    ))
                    .object(index, o)
                    .field(format!("{base}.{path}.image"))
                    .rule("no-latest-tag")
                    .build(),
                );
            }
        }
    }
    out
}

/// The plugin, for [`sluice_plugin_sdk::export_validator!`].
pub struct Plugin;

impl sluice_plugin_sdk::Validator for Plugin {
    type Config = Config;

    fn validate(
        config: &Config,
        _: &sluice_plugin_sdk::Context,
        objects: &[Value],
    ) -> Vec<sluice_plugin_sdk::Finding> {
        let _ = config;
        validate(objects)
    }
}

#[cfg(target_arch = "wasm32")]
sluice_plugin_sdk::export_validator!(Plugin, "../../wit");

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn latest_and_untagged_images_are_reported() {
        let pod = json!({"kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": [
            {"image": "nginx"}, {"image": "nginx:latest"}, {"image": "nginx:1.27"}, {"image": "nginx@sha256:ab"}, {"image": "reg:5000/app"}]}});
        let found = validate(&[pod]);
        let fields: Vec<&str> = found.iter().filter_map(|f| f.field.as_deref()).collect();
        assert_eq!(
            fields,
            [
                "spec.containers[0].image",
                "spec.containers[1].image",
                "spec.containers[4].image"
            ]
        );
    }
}
