//! `set-labels`: adds labels and annotations to every object, and optionally to pod
//! templates and selectors.
//!
//! Config: `{labels: {k: v}, annotations: {k: v}, pod_templates: true, selectors: false}`.
//! Selectors are off by default: a Deployment's selector is immutable, so changing it on a
//! live object fails; turn it on for new applications only.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

/// Plugin configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Labels to set.
    pub labels: BTreeMap<String, String>,
    /// Annotations to set.
    pub annotations: BTreeMap<String, String>,
    /// Also label pod templates (default true).
    pub pod_templates: bool,
    /// Also add the labels to selectors (default false).
    pub selectors: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            pod_templates: true,
            selectors: false,
        }
    }
}

/// Checks the configuration.
pub fn check(config: &Config) -> Result<(), String> {
    if config.labels.is_empty() && config.annotations.is_empty() {
        return Err("set at least one of labels, annotations".into());
    }
    Ok(())
}

fn merge(target: &mut Value, key: &str, values: &BTreeMap<String, String>) {
    if values.is_empty() {
        return;
    }
    if !target[key].is_object() {
        target[key] = Value::Object(Default::default());
    }
    for (k, v) in values {
        target[key][k] = Value::String(v.clone());
    }
}

/// Labels the objects.
pub fn transform(config: &Config, objects: &mut [Value]) {
    for o in objects.iter_mut() {
        merge(&mut o["metadata"], "labels", &config.labels);
        merge(&mut o["metadata"], "annotations", &config.annotations);
        if config.selectors {
            match o["kind"].as_str() {
                Some("Service") => merge(&mut o["spec"], "selector", &config.labels),
                Some(k)
                    if sluice_plugin_sdk::pod_spec_path(k).is_some()
                        && k != "Pod"
                        && k != "CronJob"
                        && k != "PodTemplate" =>
                {
                    merge(&mut o["spec"]["selector"], "matchLabels", &config.labels)
                }
                _ => {}
            }
        }
        if config.pod_templates
            && let Some(meta) = sluice_plugin_sdk::pod_template_metadata_mut(o)
        {
            merge(meta, "labels", &config.labels);
        }
    }
}

/// The plugin, for [`sluice_plugin_sdk::export_transformer!`].
pub struct Plugin;

impl sluice_plugin_sdk::Transformer for Plugin {
    type Config = Config;

    fn check(config: &Config) -> Result<(), String> {
        check(config)
    }

    fn transform(
        config: &Config,
        _: &sluice_plugin_sdk::Context,
        objects: &mut Vec<(Value, sluice_plugin_sdk::Origin)>,
    ) -> Result<(), Vec<sluice_plugin_sdk::Finding>> {
        sluice_plugin_sdk::with_values(objects, |values| {
            transform(config, values);
            Ok(())
        })
    }
}

#[cfg(target_arch = "wasm32")]
sluice_plugin_sdk::export_transformer!(Plugin, "../../wit");

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn labels_templates_and_optionally_selectors() {
        let deploy = json!({"kind": "Deployment", "metadata": {"name": "d"}, "spec": {"selector": {"matchLabels": {"app": "d"}}, "template": {"metadata": {"labels": {"app": "d"}}}}});
        let mut cfg = Config {
            labels: [("team".to_string(), "a".to_string())].into(),
            ..Config::default()
        };
        let mut objs = vec![
            deploy.clone(),
            json!({"kind": "ConfigMap", "metadata": {"name": "c"}}),
        ];
        transform(&cfg, &mut objs);
        assert_eq!(objs[0]["metadata"]["labels"]["team"], "a");
        assert_eq!(
            objs[0]["spec"]["template"]["metadata"]["labels"],
            json!({"app": "d", "team": "a"})
        );
        assert_eq!(
            objs[0]["spec"]["selector"]["matchLabels"],
            json!({"app": "d"}),
            "selectors untouched by default"
        );
        assert_eq!(objs[1]["metadata"]["labels"]["team"], "a");
        cfg.selectors = true;
        let mut objs = vec![deploy];
        transform(&cfg, &mut objs);
        assert_eq!(
            objs[0]["spec"]["selector"]["matchLabels"],
            json!({"app": "d", "team": "a"})
        );
    }

    #[test]
    fn empty_config_is_rejected() {
        assert!(check(&Config::default()).is_err());
    }
}
