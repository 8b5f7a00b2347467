//! Which kinds are namespaced: discovery's answer, or a stand-in without a cluster.

use std::collections::HashMap;

use crate::object::{Object, group_of};

/// Which kinds are namespaced, keyed by (group, kind).
#[derive(Debug, Clone, Default)]
pub struct Scopes(HashMap<(String, String), bool>);

impl Scopes {
    /// Records that `group`/`kind` is namespaced (or not).
    pub fn insert(&mut self, group: &str, kind: &str, namespaced: bool) {
        self.0
            .insert((group.to_string(), kind.to_string()), namespaced);
    }

    /// Scopes without a cluster (for `sluice render`): the built-in cluster-scoped kinds,
    /// CRDs among `objects`, and every other kind of `objects` assumed namespaced.
    pub fn offline(objects: &[Object]) -> Scopes {
        const CLUSTER_SCOPED: &[(&str, &str)] = &[
            ("", "Namespace"),
            ("", "Node"),
            ("", "PersistentVolume"),
            ("rbac.authorization.k8s.io", "ClusterRole"),
            ("rbac.authorization.k8s.io", "ClusterRoleBinding"),
            ("apiextensions.k8s.io", "CustomResourceDefinition"),
            ("storage.k8s.io", "StorageClass"),
            ("storage.k8s.io", "CSIDriver"),
            ("networking.k8s.io", "IngressClass"),
            ("scheduling.k8s.io", "PriorityClass"),
            ("node.k8s.io", "RuntimeClass"),
            ("apiregistration.k8s.io", "APIService"),
            (
                "admissionregistration.k8s.io",
                "MutatingWebhookConfiguration",
            ),
            (
                "admissionregistration.k8s.io",
                "ValidatingWebhookConfiguration",
            ),
        ];
        let mut scopes = Scopes::default();
        for o in objects {
            scopes.insert(group_of(o.api_version()), o.kind(), true);
        }
        for (g, k) in CLUSTER_SCOPED {
            scopes.insert(g, k, false);
        }
        scopes.add_crds(objects);
        scopes
    }

    /// Adds the kinds defined by CRDs among `objects`, so their CRs in the same commit
    /// resolve before the CRD exists in the cluster.
    pub fn add_crds(&mut self, objects: &[Object]) {
        for o in objects
            .iter()
            .filter(|o| o.kind() == "CustomResourceDefinition")
        {
            let value = o.value();
            let spec = &value["spec"];
            if let (Some(group), Some(kind)) =
                (spec["group"].as_str(), spec["names"]["kind"].as_str())
            {
                self.insert(group, kind, spec["scope"].as_str() != Some("Cluster"));
            }
        }
    }

    /// Whether the kind is namespaced, if known.
    pub fn namespaced(&self, group: &str, kind: &str) -> Option<bool> {
        self.0.get(&(group.to_string(), kind.to_string())).copied()
    }
}
