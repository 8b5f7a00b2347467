//! `require-resources` (validator): every container declares resource requests and limits.
//!
//! Config: `{requests: ["cpu", "memory"], limits: ["memory"]}` (these are the defaults).

use serde::Deserialize;
use serde_json::Value;
use sluice_plugin_sdk::{Finding, FindingBuilder, all_containers};

/// Plugin configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Resources every container must request.
    pub requests: Vec<String>,
    /// Resources every container must limit.
    pub limits: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            requests: vec!["cpu".into(), "memory".into()],
            limits: vec!["memory".into()],
        }
    }
}

/// Reports every missing request or limit (ephemeral containers have none by design).
pub fn validate(config: &Config, objects: &[Value]) -> Vec<Finding> {
    let mut out = Vec::new();
    for c in all_containers(objects)
        .into_iter()
        .filter(|c| !c.path.contains("ephemeralContainers["))
    {
        for (section, wanted) in [("requests", &config.requests), ("limits", &config.limits)] {
            for r in wanted
                .iter()
                .filter(|r| c.container["resources"][section][r.as_str()].is_null())
            {
                let name = c.container["name"].as_str().unwrap_or("?");
                out.push(
                    FindingBuilder::error(format!(
                        "container {name} has no {r} {}",
                        section.trim_end_matches('s')
                    ))
                    .object(c.index, c.object)
                    .field(format!("{}.resources.{section}.{r}", c.path))
                    .rule("require-resources")
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
    fn missing_requests_and_limits_are_reported() {
        let d = json!({"kind": "Deployment", "metadata": {"name": "d"}, "spec": {"template": {"spec": {"containers": [
            {"name": "ok", "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "1Gi"}}},
            {"name": "bad", "resources": {"requests": {"cpu": "1"}}}]}}}});
        let found = validate(&Config::default(), &[d]);
        let fields: Vec<&str> = found.iter().filter_map(|f| f.field.as_deref()).collect();
        assert_eq!(
            fields,
            [
                "spec.template.spec.containers[1].resources.requests.memory",
                "spec.template.spec.containers[1].resources.limits.memory"
            ]
        );
        assert_eq!(found[0].message, "container bad has no memory request");
    }
}
