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

use sluice_model::object::{ObjRef, Object, Origin};
use sluice_model::policy::InventoryPolicy;

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
        /// `read`, `list`, `write` or `delete`.
        verb: &'static str,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// Cause.
        #[source]
        source: Box<kube::Error>,
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

/// Annotation on sluice's inventory ConfigMaps naming the manifest project that owns it,
/// so no other project of any sluice agent can claim it.
pub const OWNING_PROJECT: &str = "sluice.dev/project";

/// What an inventory ConfigMap holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stored {
    /// The objects its keys name.
    pub objects: BTreeSet<ObjRef>,
    /// Keys that do not parse; kept as they are on every write, and reported.
    pub malformed: Vec<String>,
    /// Its `inventory-id` label.
    pub id: Option<String>,
    /// Its [`OWNING_PROJECT`] annotation.
    pub project: Option<String>,
}

/// Reads an inventory; `None` when the ConfigMap does not exist. A key that does not parse
/// is kept in [`Stored::malformed`] (and logged), never fatal: one bad key must not stop a
/// project for good.
///
/// # Errors
/// API failures.
pub async fn load(client: &kube::Client, inv: &InventoryRef) -> Result<Option<Stored>> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &inv.namespace);
    let cm = api.get_opt(&inv.name).await.map_err(|source| Error::Api {
        verb: "read",
        namespace: inv.namespace.clone(),
        name: inv.name.clone(),
        source: Box::new(source),
    })?;
    Ok(cm.map(|cm| parse(&cm, inv)))
}

fn parse(cm: &ConfigMap, inv: &InventoryRef) -> Stored {
    let mut stored = Stored {
        id: cm
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(INVENTORY_LABEL).cloned()),
        project: cm
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(OWNING_PROJECT).cloned()),
        ..Stored::default()
    };
    for key in cm.data.iter().flat_map(|d| d.keys()) {
        match decode_key(key) {
            Ok(r) => {
                stored.objects.insert(r);
            }
            Err(message) => {
                tracing::warn!(
                    inventory = %format!("{}/{}", inv.namespace, inv.name), key, reason = %message,
                    "inventory key does not name an object; it is kept as it is, and the object it meant is neither applied over nor pruned by this key"
                );
                stored.malformed.push(key.clone());
            }
        }
    }
    stored
}

/// Every inventory ConfigMap (labelled with an inventory id) in `namespace`.
///
/// # Errors
/// API failures.
pub async fn list(client: &kube::Client, namespace: &str) -> Result<Vec<(InventoryRef, Stored)>> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let cms = api
        .list(&kube::api::ListParams::default().labels(INVENTORY_LABEL))
        .await
        .map_err(|source| Error::Api {
            verb: "list",
            namespace: namespace.into(),
            name: format!("(label {INVENTORY_LABEL})"),
            source: Box::new(source),
        })?;
    Ok(cms
        .items
        .iter()
        .filter_map(|cm| {
            let inv = InventoryRef {
                name: cm.metadata.name.clone()?,
                namespace: namespace.into(),
                id: cm.metadata.labels.as_ref()?.get(INVENTORY_LABEL)?.clone(),
            };
            let stored = parse(cm, &inv);
            Some((inv, stored))
        })
        .collect())
}

/// Writes `objects` (and `malformed`, unchanged) as the inventory's content, creating the
/// ConfigMap if needed, and marks it as `project`'s.
///
/// # Errors
/// API failures.
pub async fn store(
    client: &kube::Client,
    inv: &InventoryRef,
    project: &str,
    objects: &BTreeSet<ObjRef>,
    malformed: &[String],
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
        .map(encode_key)
        .chain(malformed.iter().cloned())
        .map(|k| (k, String::new()))
        .collect();
    match api.get_opt(&inv.name).await.map_err(api_err)? {
        Some(mut cm) => {
            cm.data = Some(data);
            cm.metadata
                .labels
                .get_or_insert_default()
                .insert(INVENTORY_LABEL.into(), inv.id.clone());
            cm.metadata
                .annotations
                .get_or_insert_default()
                .insert(OWNING_PROJECT.into(), project.into());
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
                    annotations: Some([(OWNING_PROJECT.to_string(), project.to_string())].into()),
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

/// Deletes an inventory ConfigMap (an adopted agentk inventory, once its objects are
/// recorded in sluice's). Gone already is fine.
///
/// # Errors
/// API failures.
pub async fn retire(client: &kube::Client, inv: &InventoryRef) -> Result<()> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &inv.namespace);
    match api.delete(&inv.name, &Default::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(source) => Err(Error::Api {
            verb: "delete",
            namespace: inv.namespace.clone(),
            name: inv.name.clone(),
            source: Box::new(source),
        }),
    }
}

const RBAC_GROUP: &str = "rbac.authorization.k8s.io";
const RBAC_KINDS: &[&str] = &["Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"];

/// `<namespace>_<name>_<group>_<kind>`, cli-utils' `ObjMetadata` key.
///
/// cli-utils writes `:` in RBAC names as `__` and cannot store a name with `_` or any other
/// character a ConfigMap key may not hold (RBAC names may contain almost anything): its
/// reader fails on such keys ("too many fields"). sluice writes those names escaped: every
/// byte outside `[-.a-zA-Z0-9]` as `_` and two lowercase hex digits (`a_b` → `a_5fb`).
/// cli-utils' keys never hold a lone `_` in the name field and escaped names always do, so
/// both forms read back unambiguously, and a name cli-utils can store is stored its way.
pub fn encode_key(r: &ObjRef) -> String {
    let rbac = r.group == RBAC_GROUP && RBAC_KINDS.contains(&r.kind.as_str());
    let plain = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '.';
    let name = if r.name.chars().all(|c| plain(c) || (rbac && c == ':')) {
        r.name.replace(':', "__")
    } else {
        let mut escaped = String::with_capacity(r.name.len() * 2);
        for b in r.name.bytes() {
            if plain(b as char) && b.is_ascii() {
                escaped.push(b as char);
            } else {
                escaped.push_str(&format!("_{b:02x}"));
            }
        }
        escaped
    };
    format!("{}_{}_{}_{}", r.namespace, name, r.group, r.kind)
}

/// Inverse of [`encode_key`]: cli-utils' parsing rules, plus sluice's escaped names.
pub fn decode_key(key: &str) -> Result<ObjRef, String> {
    let (namespace, rest) = key.split_once('_').ok_or("too few fields")?;
    let (rest, kind) = rest.rsplit_once('_').ok_or("too few fields")?;
    let (name, group) = rest.rsplit_once('_').ok_or("too few fields")?;
    let cli_utils = name.replace("__", ":");
    let name = if cli_utils.contains('_') {
        unescape(name).ok_or("too many fields")?
    } else {
        cli_utils
    };
    if name.is_empty() || kind.is_empty() {
        return Err("empty name or kind".into());
    }
    Ok(ObjRef {
        group: group.into(),
        kind: kind.into(),
        namespace: namespace.into(),
        name: name.into(),
    })
}

/// `a_5fb` → `a_b`; `None` when `_` is not followed by two hex digits.
fn unescape(name: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(name.len());
    let mut rest = name.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        if b == b'_' {
            let hex = std::str::from_utf8(tail.get(..2)?).ok()?;
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
            rest = &tail[2..];
        } else {
            bytes.push(b);
            rest = tail;
        }
    }
    String::from_utf8(bytes).ok()
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
        match sluice_model::object::annotation(live, OWNING_INVENTORY) {
            None => Ownership::Empty,
            Some(owner) if owner == id => Ownership::Match,
            Some(_) => Ownership::NoMatch,
        }
    }
}

/// How every refusal of [`may_apply`] starts (cli-utils' text).
pub const POLICY_REFUSAL: &str = "inventory policy prevented actuation";

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
    sluice_model::object::annotation(live, ON_REMOVE) == Some("keep")
        || sluice_model::object::annotation(live, LIFECYCLE_DELETION) == Some("detach")
}

/// An inventory that is not this project's to use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("refusing inventory {inventory}: {reason}")]
pub struct Claimed {
    /// Namespace, name and id.
    pub inventory: String,
    /// Whose it is, and what to change.
    pub reason: String,
}

/// An inventory is `project`'s alone: not one of `others` (by id or ConfigMap: the agent's
/// other projects), not marked as another project's by any sluice, and not a ConfigMap that
/// is already the inventory of another id. `live` is what the ConfigMap holds, if it exists.
///
/// # Errors
/// [`Claimed`], saying whose it is.
pub fn check_claim(
    inv: &InventoryRef,
    live: Option<&Stored>,
    project: &str,
    others: &[InventoryRef],
) -> Result<(), Claimed> {
    let refuse = |reason: String| {
        Err(Claimed {
            inventory: format!("{}/{} (id {})", inv.namespace, inv.name, inv.id),
            reason,
        })
    };
    if let Some(other) = others
        .iter()
        .find(|o| o.id == inv.id || (o.name == inv.name && o.namespace == inv.namespace))
    {
        return refuse(format!(
            "it is the inventory of another project of this agent ({}/{}, id {}); give this project an inventory of its own",
            other.namespace, other.name, other.id
        ));
    }
    if let Some(live) = live {
        if let Some(id) = live.id.as_deref().filter(|id| *id != inv.id) {
            return refuse(format!(
                "the ConfigMap already exists as the inventory of id {id:?}"
            ));
        }
        if let Some(owner) = live.project.as_deref().filter(|p| *p != project) {
            return refuse(format!(
                "the ConfigMap is the inventory of project {owner:?}"
            ));
        }
    }
    Ok(())
}

/// Which inventory a set of objects uses. agentk lets users commit their own inventory
/// ConfigMap (labelled [`INVENTORY_LABEL`] with the inventory id); it is then used instead
/// of the default (`default_id` in `namespace`), taken out of `objects` (it is not applied
/// as a normal object), and its origin returned.
///
/// # Errors
/// The number of inventory ConfigMaps, when there is more than one.
pub fn locate(
    objects: &mut Vec<Object>,
    default_id: &str,
    namespace: &str,
) -> Result<(InventoryRef, Option<Origin>), usize> {
    let is_inventory = |o: &Object| o.kind() == "ConfigMap" && o.label(INVENTORY_LABEL).is_some();
    let found: Vec<Object> = objects
        .iter()
        .filter(|o| is_inventory(o))
        .cloned()
        .collect();
    match found.as_slice() {
        [] => Ok((InventoryRef::default_for(default_id, namespace), None)),
        [o] => {
            objects.retain(|x| !is_inventory(x));
            let inv = InventoryRef {
                name: o.name().to_string(),
                namespace: o.namespace().unwrap_or(namespace).to_string(),
                id: o
                    .label(INVENTORY_LABEL)
                    .unwrap_or_else(|| default_id.into()),
            };
            Ok((inv, Some(o.origin.clone())))
        }
        many => Err(many.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_inventory_claimed_by_another_project_or_id_is_refused() {
        let inv = InventoryRef::default_for("agent-g-app", "apps");
        assert_eq!(check_claim(&inv, None, "g/app", &[]), Ok(()));
        let other = InventoryRef::default_for("agent-g-web", "apps");
        assert_eq!(
            check_claim(&inv, None, "g/app", std::slice::from_ref(&other)),
            Ok(())
        );
        let same_id = InventoryRef {
            name: "mine".into(),
            ..inv.clone()
        };
        let err = check_claim(&inv, None, "g/app", &[same_id]).unwrap_err();
        assert!(
            err.reason
                .starts_with("it is the inventory of another project of this agent (apps/mine"),
            "{err}"
        );
        let live = |id: Option<&str>, project: Option<&str>| Stored {
            id: id.map(Into::into),
            project: project.map(Into::into),
            ..Stored::default()
        };
        assert_eq!(
            check_claim(
                &inv,
                Some(&live(Some("agent-g-app"), Some("g/app"))),
                "g/app",
                &[]
            ),
            Ok(())
        );
        assert_eq!(
            check_claim(&inv, Some(&live(Some("x"), None)), "g/app", &[])
                .unwrap_err()
                .to_string(),
            "refusing inventory apps/inventory-agent-g-app (id agent-g-app): the ConfigMap already exists as the inventory of id \"x\""
        );
        assert_eq!(
            check_claim(&inv, Some(&live(None, Some("g/web"))), "g/app", &[])
                .unwrap_err()
                .reason,
            "the ConfigMap is the inventory of project \"g/web\""
        );
    }

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
    fn every_legal_name_round_trips() {
        let names = [
            "a_b",
            "a__b",
            "system:a_b",
            "_x",
            "x_",
            "a:b:",
            "with space",
            "ünïcode",
            "a%b@c!",
            "__",
            "a_5fb",
        ];
        for kind in ["ClusterRole", "RoleBinding"] {
            for name in names {
                let obj = r(RBAC_GROUP, kind, "ns", name);
                let key = encode_key(&obj);
                assert!(
                    key.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c)),
                    "{key} is not a valid ConfigMap key"
                );
                assert_eq!(decode_key(&key), Ok(obj), "{name:?} via {key}");
            }
        }
        // Escaped names never read as another name, and cli-utils' own keys keep theirs.
        assert_eq!(
            encode_key(&r(RBAC_GROUP, "ClusterRole", "", "a_b")),
            "_a_5fb_rbac.authorization.k8s.io_ClusterRole"
        );
        assert_eq!(
            decode_key("_a__b_rbac.authorization.k8s.io_ClusterRole").map(|r| r.name.to_string()),
            Ok("a:b".to_string())
        );
        // A custom resource named with `:` is escaped too (only RBAC kinds get `__`).
        let cr = r("example.com", "Widget", "ns", "a:b");
        assert_eq!(encode_key(&cr), "ns_a_3ab_example.com_Widget");
        assert_eq!(decode_key(&encode_key(&cr)), Ok(cr));
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
