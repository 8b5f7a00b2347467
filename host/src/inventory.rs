//! The record of what a manifest project owns, in agentk's (cli-utils') format, so an
//! agentk installation is taken over without recreating objects.
//!
//! - A ConfigMap `inventory-<id>` in the project's `default_namespace`, labelled
//!   `cli-utils.sigs.k8s.io/inventory-id: <id>`, with one data key per object:
//!   `<namespace>_<name>_<group>_<kind>` (`:` in RBAC names written as `__`), value `""`.
//! - Every applied object carries the annotation `config.k8s.io/owning-inventory: <id>`.
//! - The three inventory policies decide which live objects may be changed or deleted.
//!
//! The ConfigMap is written with create/update, not server-side apply, as cli-utils does.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ObjectMeta, PostParams};

use crate::config::InventoryPolicy;
use crate::object::ObjRef;

/// Label naming the inventory a ConfigMap is.
pub const INVENTORY_LABEL: &str = "cli-utils.sigs.k8s.io/inventory-id";
/// Annotation naming the inventory that owns an object.
pub const OWNING_INVENTORY: &str = "config.k8s.io/owning-inventory";
/// Annotation that keeps an object in the cluster when it leaves git.
pub const ON_REMOVE: &str = "cli-utils.sigs.k8s.io/on-remove";
/// The older annotation with the same meaning (`detach`).
pub const LIFECYCLE_DELETION: &str = "client.lifecycle.config.k8s.io/deletion";

/// Reading or writing the inventory failed. Retryable.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API call failed.
    #[error("failed to {verb} inventory ConfigMap {namespace}/{name}: {source}")]
    Api {
        /// `read` or `write`.
        verb: &'static str,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// Cause.
        #[source]
        source: Box<kube::Error>,
    },
    /// A data key does not parse.
    #[error("inventory ConfigMap {namespace}/{name} has an invalid key {key:?}: {message}")]
    InvalidKey {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// The key.
        key: String,
        /// Why.
        message: String,
    },
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where an inventory lives and what it is called.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InventoryRef {
    /// ConfigMap name.
    pub name: String,
    /// ConfigMap namespace.
    pub namespace: String,
    /// Inventory id (label value and owning-inventory annotation value).
    pub id: String,
}

impl InventoryRef {
    /// agentk's default inventory: `inventory-<id>` in `namespace`.
    pub fn default_for(id: &str, namespace: &str) -> InventoryRef {
        InventoryRef {
            name: format!("inventory-{id}"),
            namespace: namespace.to_string(),
            id: id.to_string(),
        }
    }
}

/// Reads the stored object set; a missing ConfigMap is an empty inventory.
///
/// # Errors
/// API failures and unparsable keys.
pub async fn load(client: &kube::Client, inv: &InventoryRef) -> Result<Option<BTreeSet<ObjRef>>> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &inv.namespace);
    let cm = api.get_opt(&inv.name).await.map_err(|source| Error::Api {
        verb: "read",
        namespace: inv.namespace.clone(),
        name: inv.name.clone(),
        source: Box::new(source),
    })?;
    let Some(cm) = cm else { return Ok(None) };
    let mut set = BTreeSet::new();
    for key in cm.data.unwrap_or_default().into_keys() {
        let r = decode_key(&key).map_err(|message| Error::InvalidKey {
            namespace: inv.namespace.clone(),
            name: inv.name.clone(),
            key: key.clone(),
            message,
        })?;
        set.insert(r);
    }
    Ok(Some(set))
}

/// Writes `objects` as the inventory's content, creating the ConfigMap if needed.
///
/// # Errors
/// API failures.
pub async fn store(
    client: &kube::Client,
    inv: &InventoryRef,
    objects: &BTreeSet<ObjRef>,
) -> Result<()> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &inv.namespace);
    let api_err = |source| Error::Api {
        verb: "write",
        namespace: inv.namespace.clone(),
        name: inv.name.clone(),
        source: Box::new(source),
    };
    let data: BTreeMap<String, String> = objects
        .iter()
        .map(|r| (encode_key(r), String::new()))
        .collect();
    match api.get_opt(&inv.name).await.map_err(api_err)? {
        Some(mut cm) => {
            cm.data = Some(data);
            cm.metadata
                .labels
                .get_or_insert_default()
                .insert(INVENTORY_LABEL.into(), inv.id.clone());
            api.replace(&inv.name, &PostParams::default(), &cm)
                .await
                .map_err(api_err)?;
        }
        None => {
            let cm = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(inv.name.clone()),
                    namespace: Some(inv.namespace.clone()),
                    labels: Some([(INVENTORY_LABEL.to_string(), inv.id.clone())].into()),
                    ..ObjectMeta::default()
                },
                data: Some(data),
                ..ConfigMap::default()
            };
            api.create(&PostParams::default(), &cm)
                .await
                .map_err(api_err)?;
        }
    }
    Ok(())
}

const RBAC_GROUP: &str = "rbac.authorization.k8s.io";
const RBAC_KINDS: &[&str] = &["Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"];

/// `<namespace>_<name>_<group>_<kind>`; `:` in RBAC names becomes `__`.
pub fn encode_key(r: &ObjRef) -> String {
    let name = if r.group == RBAC_GROUP && RBAC_KINDS.contains(&r.kind.as_str()) {
        r.name.replace(':', "__")
    } else {
        r.name.clone()
    };
    format!("{}_{}_{}_{}", r.namespace, name, r.group, r.kind)
}

/// Inverse of [`encode_key`], with cli-utils' parsing rules.
pub fn decode_key(key: &str) -> Result<ObjRef, String> {
    let (namespace, rest) = key.split_once('_').ok_or("too few fields")?;
    let (rest, kind) = rest.rsplit_once('_').ok_or("too few fields")?;
    let (name, group) = rest.rsplit_once('_').ok_or("too few fields")?;
    let name = name.replace("__", ":");
    if name.contains('_') || name.is_empty() || kind.is_empty() {
        return Err("too many fields".into());
    }
    Ok(ObjRef {
        group: group.into(),
        kind: kind.into(),
        namespace: namespace.into(),
        name,
    })
}

/// How a live object relates to this inventory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ownership {
    /// No owning-inventory annotation.
    Empty,
    /// Owned by this inventory.
    Match,
    /// Owned by another inventory.
    NoMatch,
}

impl Ownership {
    /// Compares a live object's annotation with `id`.
    pub fn of(live: &serde_json::Value, id: &str) -> Ownership {
        match crate::object::annotation(live, OWNING_INVENTORY) {
            None => Ownership::Empty,
            Some(owner) if owner == id => Ownership::Match,
            Some(_) => Ownership::NoMatch,
        }
    }
}

/// Whether `policy` allows applying over a live object; the error is cli-utils' text.
pub fn may_apply(policy: InventoryPolicy, ownership: Ownership) -> Result<(), String> {
    match (policy, ownership) {
        (_, Ownership::Match)
        | (InventoryPolicy::AdoptAll, _)
        | (InventoryPolicy::AdoptIfNoInventory, Ownership::Empty) => Ok(()),
        (_, Ownership::Empty) => Err(format!(
            "inventory policy prevented actuation (policy: must_match): can't adopt an object without the annotation {OWNING_INVENTORY}; set inventory_policy: adopt_if_no_inventory to adopt it"
        )),
        (_, Ownership::NoMatch) => Err(format!(
            "inventory policy prevented actuation (policy: {}): can't apply the resource since its annotation {OWNING_INVENTORY} is a different inventory object",
            policy.as_str()
        )),
    }
}

/// Whether `policy` allows deleting a live object.
pub fn may_prune(policy: InventoryPolicy, ownership: Ownership) -> bool {
    matches!(
        (policy, ownership),
        (_, Ownership::Match)
            | (InventoryPolicy::AdoptAll, _)
            | (InventoryPolicy::AdoptIfNoInventory, Ownership::Empty)
    )
}

/// True when the object asks to be left in the cluster when it leaves git.
pub fn keep_on_remove(live: &serde_json::Value) -> bool {
    crate::object::annotation(live, ON_REMOVE) == Some("keep")
        || crate::object::annotation(live, LIFECYCLE_DELETION) == Some("detach")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(g: &str, k: &str, ns: &str, n: &str) -> ObjRef {
        ObjRef {
            group: g.into(),
            kind: k.into(),
            namespace: ns.into(),
            name: n.into(),
        }
    }

    #[test]
    fn keys_match_cli_utils() {
        let cases = [
            (
                r("apps", "Deployment", "shop", "web"),
                "shop_web_apps_Deployment",
            ),
            (r("", "Service", "shop", "web"), "shop_web__Service"),
            (r("", "Namespace", "", "shop"), "_shop__Namespace"),
            (
                r(RBAC_GROUP, "ClusterRole", "", "system:reader"),
                "_system__reader_rbac.authorization.k8s.io_ClusterRole",
            ),
            (
                r(RBAC_GROUP, "RoleBinding", "shop", "ns:edit"),
                "shop_ns__edit_rbac.authorization.k8s.io_RoleBinding",
            ),
        ];
        for (obj, key) in cases {
            assert_eq!(encode_key(&obj), key);
            assert_eq!(decode_key(key).as_ref(), Ok(&obj), "{key}");
        }
        assert_eq!(decode_key("a_b_c_d_e"), Err("too many fields".into()));
        assert!(decode_key("nounderscore").is_err());
    }

    #[test]
    fn policies_match_cli_utils_table() {
        use InventoryPolicy::*;
        use Ownership::*;
        // (policy, ownership, may apply, may prune)
        let table = [
            (MustMatch, Empty, false, false),
            (MustMatch, Match, true, true),
            (MustMatch, NoMatch, false, false),
            (AdoptIfNoInventory, Empty, true, true),
            (AdoptIfNoInventory, Match, true, true),
            (AdoptIfNoInventory, NoMatch, false, false),
            (AdoptAll, Empty, true, true),
            (AdoptAll, Match, true, true),
            (AdoptAll, NoMatch, true, true),
        ];
        for (policy, own, apply, prune) in table {
            assert_eq!(may_apply(policy, own).is_ok(), apply, "{policy:?} {own:?}");
            assert_eq!(may_prune(policy, own), prune, "{policy:?} {own:?}");
        }
    }
}
