//! `no-latest-tag` (validator): images must name a tag other than `latest`, or a digest.
//!
//! Config: none (`{}`).

use serde::Deserialize;
use serde_json::Value;
use sluice_plugin_sdk::{Finding, FindingBuilder, all_containers, parse_image};

/// Plugin configuration: nothing to configure.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {}

/// Reports images without a tag, with `:latest`, and without a digest.
pub fn validate(objects: &[Value]) -> Vec<Finding> {
    all_containers(objects)
        .into_iter()
        .filter_map(|c| {
            let image = c.container["image"].as_str()?;
            let (_, tag, digest) = parse_image(image);
            (digest.is_none() && matches!(tag, None | Some("latest"))).then(|| {
                FindingBuilder::error(format!(
                    "image {image} uses the latest tag; pin a version or a digest"
                ))
                .object(c.index, c.object)
                .field(format!("{}.image", c.path))
                .rule("no-latest-tag")
                .build()
            })
        })
        .collect()
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
