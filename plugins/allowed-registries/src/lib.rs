//! `allowed-registries` (validator): images must come from listed registries.
//!
//! Config: `{registries: ["registry.example.com/", "docker.io/library/"]}`; an image
//! matches when it starts with one of the prefixes. Images without a registry host are
//! Docker Hub images and are compared as `docker.io/library/<name>` or `docker.io/<name>`.

use serde::Deserialize;
use serde_json::Value;
use sluice_plugin_sdk::{Finding, FindingBuilder, all_containers};

/// Plugin configuration.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Allowed prefixes.
    pub registries: Vec<String>,
}

/// Checks the configuration.
pub fn check(config: &Config) -> Result<(), String> {
    if config.registries.is_empty() {
        Err("registries must list at least one prefix".into())
    } else {
        Ok(())
    }
}

/// The fully qualified form of an image reference.
pub fn qualify(image: &str) -> String {
    let first = image.split('/').next().unwrap_or_default();
    let has_host =
        image.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
    match (has_host, image.contains('/')) {
        (true, _) => image.to_string(),
        (false, true) => format!("docker.io/{image}"),
        (false, false) => format!("docker.io/library/{image}"),
    }
}

/// Reports images from other registries.
pub fn validate(config: &Config, objects: &[Value]) -> Vec<Finding> {
    all_containers(objects)
        .into_iter()
        .filter_map(|c| {
            let image = c.container["image"].as_str()?;
            let full = qualify(image);
            if config
                .registries
                .iter()
                .any(|r| full.starts_with(r.as_str()))
            {
                return None;
            }
            let message = format!(
                "image {image} is not from an allowed registry ({})",
                config.registries.join(", ")
            );
            Some(
                FindingBuilder::error(message)
                    .object(c.index, c.object)
                    .field(format!("{}.image", c.path))
                    .rule("allowed-registries")
                    .build(),
            )
        })
        .collect()
}

/// The plugin, for [`sluice_plugin_sdk::export_validator!`].
pub struct Plugin;

impl sluice_plugin_sdk::Validator for Plugin {
    type Config = Config;

    fn check(config: &Config) -> Result<(), String> {
        check(config)
    }

    fn validate(
        config: &Config,
        _: &sluice_plugin_sdk::Context,
        objects: &[Value],
    ) -> Vec<sluice_plugin_sdk::Finding> {
        validate(config, objects)
    }
}

#[cfg(target_arch = "wasm32")]
sluice_plugin_sdk::export_validator!(Plugin, "../../wit");

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn registries_are_matched_on_the_qualified_name() {
        assert_eq!(qualify("nginx"), "docker.io/library/nginx");
        assert_eq!(qualify("bitnami/redis"), "docker.io/bitnami/redis");
        assert_eq!(qualify("reg.example.com/a/b:1"), "reg.example.com/a/b:1");
        let pod = json!({"kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": [{"image": "nginx:1"}, {"image": "evil.io/x"}, {"image": "reg.example.com/app"}]}});
        let found = validate(
            &Config {
                registries: vec!["docker.io/library/".into(), "reg.example.com/".into()],
            },
            &[pod],
        );
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].field.as_deref(), Some("spec.containers[1].image"));
    }
}
