//! `no-latest-tag` (validator): images must name a tag other than `latest`, or a digest.
//!
//! Config: none (`{}`).
//!
//! Built against `sluice:plugin@0.2.0`: it reads only the `image` fields.

use serde::Deserialize;
use sluice_plugin_sdk::pointer::field_path;
use sluice_plugin_sdk::v2::{Fields, Validator, images, object_ref};
use sluice_plugin_sdk::{Context, Finding, FindingBuilder, parse_image};

/// Plugin configuration: nothing to configure.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {}

/// Reports images without a tag, with `:latest`, and without a digest.
pub fn validate<O: Fields>(objects: &[O]) -> Vec<Finding> {
    let mut found = Vec::new();
    for (index, o) in objects.iter().enumerate() {
        for (at, image) in images(o) {
            let (_, tag, digest) = parse_image(&image);
            if digest.is_none() && matches!(tag, None | Some("latest")) {
                found.push(
                    FindingBuilder::error(format!(
                        "image {image} uses the latest tag; pin a version or a digest"
                    ))
                    .object_ref(object_ref(index, o))
                    .field(field_path(&at))
                    .rule("no-latest-tag")
                    .build(),
                );
            }
        }
    }
    found
}

/// The plugin, for [`sluice_plugin_sdk::export_validator_v2!`].
pub struct Plugin;

impl Validator for Plugin {
    type Config = Config;

    fn validate<O: Fields>(_: &Config, _: &Context, objects: &[O]) -> Vec<Finding> {
        validate(objects)
    }
}

#[cfg(target_arch = "wasm32")]
sluice_plugin_sdk::export_validator_v2!(Plugin, "../../wit/v0.2");

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
