//! `set-namespace`: moves every namespaced object into one namespace, and fixes what
//! refers to namespaces: RoleBinding/ClusterRoleBinding ServiceAccount subjects and
//! `config.kubernetes.io/depends-on` entries pointing at moved objects.
//!
//! Config: `{namespace: <name>, cluster_scoped_kinds: [extra kinds to leave alone]}`.

use serde::Deserialize;
use serde_json::Value;

/// Plugin configuration.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Target namespace.
    pub namespace: String,
    /// Kinds to treat as cluster-scoped besides the built-in ones (e.g. your CRDs').
    #[serde(default)]
    pub cluster_scoped_kinds: Vec<String>,
}

/// Built-in cluster-scoped kinds (a plugin cannot ask the API server).
const CLUSTER_SCOPED: &[&str] = &[
    "Namespace",
    "Node",
    "PersistentVolume",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "StorageClass",
    "IngressClass",
    "PriorityClass",
    "RuntimeClass",
    "CSIDriver",
    "CSINode",
    "VolumeAttachment",
    "APIService",
    "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
    "CertificateSigningRequest",
    "FlowSchema",
    "PriorityLevelConfiguration",
];

/// Checks the configuration.
pub fn check(config: &Config) -> Result<(), String> {
    if config.namespace.is_empty() {
        return Err("namespace is required".into());
    }
    Ok(())
}

/// Moves the objects.
pub fn transform(config: &Config, objects: &mut [Value]) {
    let ns = config.namespace.as_str();
    let scoped = |kind: &str| {
        !CLUSTER_SCOPED.contains(&kind) && !config.cluster_scoped_kinds.iter().any(|k| k == kind)
    };
    // Old namespaces of moved objects: references into them are references to moved objects.
    let mut moved: Vec<String> = Vec::new();
    for o in objects.iter_mut() {
        if !scoped(o["kind"].as_str().unwrap_or_default()) {
            continue;
        }
        if let Some(old) = o["metadata"]["namespace"].as_str()
            && old != ns
            && !moved.iter().any(|m| m == old)
        {
            moved.push(old.to_string());
        }
        o["metadata"]["namespace"] = Value::String(ns.to_string());
    }
    for o in objects.iter_mut() {
        let kind = o["kind"].as_str().unwrap_or_default().to_string();
        if kind == "RoleBinding" || kind == "ClusterRoleBinding" {
            for s in o["subjects"].as_array_mut().into_iter().flatten() {
                let in_moved = s["namespace"]
                    .as_str()
                    .is_none_or(|n| n.is_empty() || moved.iter().any(|m| m == n));
                if s["kind"] == "ServiceAccount" && in_moved {
                    s["namespace"] = Value::String(ns.to_string());
                }
            }
        }
        let key = "config.kubernetes.io/depends-on";
        if let Some(deps) = o["metadata"]["annotations"][key].as_str() {
            let rewritten: Vec<String> = deps
                .split(',')
                .map(|entry| {
                    let parts: Vec<&str> = entry.trim().split('/').collect();
                    match parts.as_slice() {
                        [g, "namespaces", old, k, n] if moved.iter().any(|m| m == old) => {
                            format!("{g}/namespaces/{ns}/{k}/{n}")
                        }
                        _ => entry.trim().to_string(),
                    }
                })
                .collect();
            o["metadata"]["annotations"][key] = Value::String(rewritten.join(","));
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

    fn run(ns: &str, mut objects: Vec<Value>) -> Vec<Value> {
        transform(
            &Config {
                namespace: ns.into(),
                cluster_scoped_kinds: vec!["Widget".into()],
            },
            &mut objects,
        );
        objects
    }

    #[test]
    fn namespaced_objects_move_cluster_scoped_ones_do_not() {
        let out = run(
            "prod",
            vec![
                json!({"kind": "ConfigMap", "metadata": {"name": "a"}}),
                json!({"kind": "Deployment", "metadata": {"name": "b", "namespace": "dev"}}),
                json!({"kind": "ClusterRole", "metadata": {"name": "c"}}),
                json!({"kind": "Widget", "metadata": {"name": "w"}}),
            ],
        );
        assert_eq!(out[0]["metadata"]["namespace"], "prod");
        assert_eq!(out[1]["metadata"]["namespace"], "prod");
        assert!(out[2]["metadata"]["namespace"].is_null());
        assert!(out[3]["metadata"]["namespace"].is_null());
    }

    #[test]
    fn subjects_and_depends_on_follow() {
        let out = run(
            "prod",
            vec![
                json!({"kind": "ServiceAccount", "metadata": {"name": "sa", "namespace": "dev"}}),
                json!({"kind": "ClusterRoleBinding", "metadata": {"name": "crb"}, "subjects": [
                {"kind": "ServiceAccount", "name": "sa", "namespace": "dev"},
                {"kind": "ServiceAccount", "name": "other", "namespace": "kube-system"},
                {"kind": "User", "name": "alice"}]}),
                json!({"kind": "Deployment", "metadata": {"name": "d", "namespace": "dev", "annotations": {
                "config.kubernetes.io/depends-on": "/namespaces/dev/ServiceAccount/sa,apps/namespaces/kube-system/Deployment/x"}}}),
            ],
        );
        assert_eq!(out[1]["subjects"][0]["namespace"], "prod");
        assert_eq!(
            out[1]["subjects"][1]["namespace"], "kube-system",
            "subjects outside moved namespaces stay"
        );
        assert!(out[1]["subjects"][2]["namespace"].is_null());
        assert_eq!(
            out[2]["metadata"]["annotations"]["config.kubernetes.io/depends-on"],
            "/namespaces/prod/ServiceAccount/sa,apps/namespaces/kube-system/Deployment/x"
        );
    }

    #[test]
    fn config_needs_a_namespace() {
        assert_eq!(
            check(&Config::default()),
            Err("namespace is required".into())
        );
    }
}
