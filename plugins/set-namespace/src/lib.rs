//! `set-namespace`: moves every namespaced object into one namespace, and fixes what
//! refers to namespaces: RoleBinding/ClusterRoleBinding ServiceAccount subjects and
//! `config.kubernetes.io/depends-on` entries pointing at moved objects.
//!
//! Config: `{namespace: <name>, cluster_scoped_kinds: [extra kinds to leave alone]}`.
//!
//! Built against `sluice:plugin@0.2.0`: it reads and writes only the fields it needs.

use serde::Deserialize;
use sluice_plugin_sdk::v2::{Fields, Object, Transformer, object_ref};
use sluice_plugin_sdk::{Context, Finding, FindingBuilder};

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

/// The annotation through which cli-utils orders objects, naming the objects they wait
/// for by namespace.
const DEPENDS_ON: &str = "/metadata/annotations/config.kubernetes.io~1depends-on";

/// What set-namespace reads of every object.
const READ: [&str; 3] = ["/kind", "/metadata/namespace", DEPENDS_ON];

/// Moves the objects, field by field (no write where nothing changes).
///
/// # Errors
/// An error finding for an object whose `metadata` or `subjects` cannot hold the change
/// (a scalar where a map must be).
pub fn transform<O: Fields>(config: &Config, objects: &mut [O]) -> Result<(), Vec<Finding>> {
    let ns = config.namespace.as_str();
    let scoped = |kind: &str| {
        !CLUSTER_SCOPED.contains(&kind) && !config.cluster_scoped_kinds.iter().any(|k| k == kind)
    };
    let failed = |index: usize, o: &O, message: String| {
        vec![
            FindingBuilder::error(message)
                .object_ref(object_ref(index, o))
                .rule("set-namespace")
                .build(),
        ]
    };
    // Each object's kind, namespace and depends-on annotation, read in one crossing.
    let read: Vec<[Option<String>; 3]> = objects
        .iter()
        .map(|o| {
            let mut fields = [None, None, None];
            for (at, value) in o.find_strings(&READ) {
                if let Some(i) = READ.iter().position(|r| *r == at) {
                    fields[i] = Some(value.into_owned());
                }
            }
            fields
        })
        .collect();
    // Old namespaces of moved objects: references into them are references to moved objects.
    let mut moved: Vec<String> = Vec::new();
    for (index, (o, [kind, namespace, _])) in objects.iter_mut().zip(&read).enumerate() {
        if !scoped(kind.as_deref().unwrap_or_default()) {
            continue;
        }
        match namespace {
            Some(old) if old == ns => continue,
            Some(old) if !moved.contains(old) => moved.push(old.clone()),
            _ => {}
        }
        o.set_str("/metadata/namespace", ns)
            .map_err(|e| failed(index, o, e))?;
    }
    for (index, (o, [kind, _, deps])) in objects.iter_mut().zip(&read).enumerate() {
        let kind = kind.as_deref().unwrap_or_default();
        if kind == "RoleBinding" || kind == "ClusterRoleBinding" {
            for i in 0..o.len("/subjects").unwrap_or(0) {
                let is_account = o
                    .get_str(&format!("/subjects/{i}/kind"))
                    .is_some_and(|k| k == "ServiceAccount");
                let at = format!("/subjects/{i}/namespace");
                let in_moved = o
                    .get_str(&at)
                    .is_none_or(|n| n.is_empty() || moved.iter().any(|m| *m == n));
                if is_account && in_moved {
                    o.set_str(&at, ns).map_err(|e| failed(index, o, e))?;
                }
            }
        }
        let Some(deps) = deps else {
            continue;
        };
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
        let rewritten = rewritten.join(",");
        if rewritten != *deps {
            o.set_str(DEPENDS_ON, &rewritten)
                .map_err(|e| failed(index, o, e))?;
        }
    }
    Ok(())
}

/// The plugin, for [`sluice_plugin_sdk::export_transformer_v2!`].
pub struct Plugin;

impl Transformer for Plugin {
    type Config = Config;

    fn check(config: &Config) -> Result<(), String> {
        check(config)
    }

    fn transform<O: Object>(
        config: &Config,
        _: &Context,
        objects: &mut Vec<O>,
    ) -> Result<(), Vec<Finding>> {
        transform(config, objects)
    }
}

#[cfg(target_arch = "wasm32")]
sluice_plugin_sdk::export_transformer_v2!(Plugin, "../../wit/v0.2");

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn run(ns: &str, mut objects: Vec<Value>) -> Vec<Value> {
        transform(
            &Config {
                namespace: ns.into(),
                cluster_scoped_kinds: vec!["Widget".into()],
            },
            &mut objects,
        )
        .expect("moved");
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
