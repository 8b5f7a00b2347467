//! `no-privileged` (validator): rejects pods that can escape their sandbox: privileged
//! containers, `allowPrivilegeEscalation: true`, added capabilities, hostPath volumes and
//! hostNetwork/hostPID/hostIPC.
//!
//! Config: `{allowed_capabilities: ["NET_BIND_SERVICE"]}` (default: none).

use serde::Deserialize;
use serde_json::Value;
use sluice_plugin_sdk::{Finding, FindingBuilder, containers, pod_spec};

/// Plugin configuration.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Capabilities that may be added.
    pub allowed_capabilities: Vec<String>,
}

/// Reports every privileged setting.
pub fn validate(config: &Config, objects: &[Value]) -> Vec<Finding> {
    let mut out = Vec::new();
    for (index, o) in objects.iter().enumerate() {
        let Some((base, spec)) = pod_spec(o) else {
            continue;
        };
        let mut report = |field: String, message: String| {
            out.push(
                FindingBuilder::error(message)
                    .object(index, o)
                    .field(field)
                    .rule("no-privileged")
                    .build(),
            );
        };
        for host in ["hostNetwork", "hostPID", "hostIPC"] {
            if spec[host] == true {
                report(format!("{base}.{host}"), format!("{host} is not allowed"));
            }
        }
        for (i, v) in spec["volumes"].as_array().into_iter().flatten().enumerate() {
            if v.get("hostPath").is_some() {
                report(
                    format!("{base}.volumes[{i}].hostPath"),
                    format!(
                        "hostPath volume {} is not allowed",
                        v["name"].as_str().unwrap_or("?")
                    ),
                );
            }
        }
        for (path, c) in containers(spec) {
            let sc = &c["securityContext"];
            let name = c["name"].as_str().unwrap_or("?");
            if sc["privileged"] == true {
                report(
                    format!("{base}.{path}.securityContext.privileged"),
                    format!("container {name} is privileged"),
                );
            }
            if sc["allowPrivilegeEscalation"] == true {
                report(
                    format!("{base}.{path}.securityContext.allowPrivilegeEscalation"),
                    format!("container {name} allows privilege escalation"),
                );
            }
            for cap in sc["capabilities"]["add"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                if !config.allowed_capabilities.iter().any(|a| a == cap) {
                    report(
                        format!("{base}.{path}.securityContext.capabilities.add"),
                        format!("container {name} adds capability {cap}"),
                    );
                }
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
    fn every_privileged_setting_is_reported() {
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {
            "hostNetwork": true, "hostPID": true, "hostIPC": false,
            "volumes": [{"name": "root", "hostPath": {"path": "/"}}, {"name": "ok", "emptyDir": {}}],
            "initContainers": [{"name": "i", "securityContext": {"privileged": true}}],
            "containers": [{"name": "c", "securityContext": {"allowPrivilegeEscalation": true, "capabilities": {"add": ["NET_ADMIN", "NET_BIND_SERVICE"]}}}]}});
        let found = validate(
            &Config {
                allowed_capabilities: vec!["NET_BIND_SERVICE".into()],
            },
            &[pod],
        );
        let fields: Vec<&str> = found.iter().filter_map(|f| f.field.as_deref()).collect();
        assert_eq!(
            fields,
            [
                "spec.hostNetwork",
                "spec.hostPID",
                "spec.volumes[0].hostPath",
                "spec.initContainers[0].securityContext.privileged",
                "spec.containers[0].securityContext.allowPrivilegeEscalation",
                "spec.containers[0].securityContext.capabilities.add",
            ]
        );
    }

    #[test]
    fn a_plain_deployment_passes() {
        let d = json!({"kind": "Deployment", "metadata": {"name": "d"}, "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "x"}]}}}});
        assert!(validate(&Config::default(), &[d]).is_empty());
    }
}
