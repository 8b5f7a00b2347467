//! Prune: deleting what left the object set, safely.
//!
//! [`holds`] says why pruning must wait this sync, if it must (a plugin was skipped, an API
//! group did not answer discovery, the plugins dropped objects the source still has).
//! [`prune`] then deletes the prune set in the plan's order, one kind after another, as
//! many at a time as applies, and decides per object as cli-utils does: an object another
//! inventory owns is skipped, one marked `on-remove: keep` is released instead of deleted,
//! and a Namespace is deleted only when it holds nothing but what this inventory recorded.

use std::collections::{BTreeMap, BTreeSet};

use sluice_model::object::{ObjRef, annotation};
use sluice_model::policy::{InventoryPolicy, PropagationPolicy};

use crate::apply::{self, Action, ObjectResult};
use crate::cluster::Cluster;
use crate::inventory::{self, InventoryRef, Ownership};
use crate::plan::Plan;

/// What a prune decision needs to know beyond the object.
#[derive(Debug, Clone, Copy)]
pub struct Rules<'a> {
    /// The inventory doing the pruning.
    pub inv: &'a InventoryRef,
    /// Which objects it may delete (`inventory_policy`).
    pub policy: InventoryPolicy,
    /// How dependents go (`prune_propagation_policy`).
    pub propagation: PropagationPolicy,
    /// Inventory ids being adopted this sync (an agentk inventory in a takeover): objects
    /// they own count as this inventory's.
    pub adopt_ids: &'a [String],
    /// Everything the inventory records (adopted entries included).
    pub recorded: &'a BTreeSet<ObjRef>,
    /// Everything this sync applies.
    pub desired: &'a BTreeSet<ObjRef>,
    /// Objects that left this project for another one of the agent (the other project's
    /// files have them): not deleted while this inventory still owns them, but retained
    /// until the other project applies them (and its annotation makes them its own), with
    /// the other project's name.
    pub moving: &'a BTreeMap<ObjRef, String>,
}

/// What a prune did: one result per object of the prune set, and which of them are gone
/// (to wait for) or stay (to keep recording).
#[derive(Debug, Default)]
pub struct Pruned {
    /// Per object, in prune order.
    pub results: Vec<ObjectResult>,
    /// Deleted (or already gone): the objects whose deletion to wait for.
    pub deleted: Vec<ObjRef>,
    /// Still there (failed or retained): they stay in the inventory.
    pub kept: Vec<ObjRef>,
}

/// Deletes `set` (in the plan's prune order) under `rules`, the objects of one kind at a
/// time, `concurrency` at once (one at a time, 1,000 deletes took 40 s).
pub async fn prune(
    cluster: &Cluster,
    set: &[ObjRef],
    rules: &Rules<'_>,
    concurrency: usize,
) -> Pruned {
    let mut out = Pruned {
        results: Vec::with_capacity(set.len()),
        ..Pruned::default()
    };
    for same_kind in set.chunk_by(|a, b| (&a.group, &a.kind) == (&b.group, &b.kind)) {
        // (By index: a closure taking references here makes the worker future not `Send`.)
        let deletes = (0..same_kind.len()).map(|i| prune_one(cluster, &same_kind[i], rules));
        for (r, result) in same_kind
            .iter()
            .zip(apply::bounded(deletes, concurrency).await)
        {
            match result.action {
                Action::Pruned => out.deleted.push(r.clone()),
                Action::Failed | Action::Retained => out.kept.push(r.clone()),
                _ => {}
            }
            out.results.push(result);
        }
    }
    out
}

/// The prune set, kept: each object retained with `why` (pruning was held back).
pub fn retain(set: &[ObjRef], why: &str) -> Vec<ObjectResult> {
    set.iter()
        .map(|r| ObjectResult {
            obj: r.clone(),
            origin: None,
            action: Action::Retained,
            message: Some(format!("not pruned this sync: {why}")),
            written: None,
        })
        .collect()
}

/// Why pruning must wait this sync, if it must. Pure apart from reading which API groups
/// are unavailable; see [`hold_reasons`].
pub fn holds(
    cluster: &Cluster,
    plan: &Plan,
    stored: &BTreeSet<ObjRef>,
    rendered: &BTreeSet<ObjRef>,
    skipped: &[String],
) -> Vec<String> {
    let unavailable: BTreeSet<&str> = stored
        .iter()
        .filter_map(|r| cluster.unavailable_group(&r.group))
        .collect();
    hold_reasons(plan, rendered, skipped, &unavailable)
}

/// The prune safety rules, as a pure function: nothing is held when nothing would be
/// pruned; otherwise one reason per skipped plugin set, unavailable API group, and for
/// objects the source (`rendered`) still has that the plugins removed.
pub fn hold_reasons(
    plan: &Plan,
    rendered: &BTreeSet<ObjRef>,
    skipped: &[String],
    unavailable: &BTreeSet<&str>,
) -> Vec<String> {
    let mut why = Vec::new();
    if plan.prune.is_empty() {
        return why;
    }
    if !skipped.is_empty() {
        why.push(format!(
            "plugin {} failed and was skipped (failure_policy: ignore), so the object set is not what the plugins would make",
            skipped.join(", ")
        ));
    }
    for u in unavailable {
        why.push(format!(
            "{u}; objects of this project may be in it, so whether they left git cannot be told apart from not being seen"
        ));
    }
    let removed: Vec<String> = plan
        .prune
        .iter()
        .filter(|r| rendered.contains(r))
        .map(ToString::to_string)
        .collect();
    if !removed.is_empty() {
        why.push(format!(
            "the plugins removed {} objects that are still in git ({}); a transformer must not drop objects it received",
            removed.len(),
            removed.into_iter().take(5).collect::<Vec<_>>().join(", ")
        ));
    }
    why
}

async fn prune_one(cluster: &Cluster, r: &ObjRef, rules: &Rules<'_>) -> ObjectResult {
    let result = |action, message: Option<String>| ObjectResult {
        obj: r.clone(),
        origin: None,
        action,
        message,
        written: None,
    };
    if let Some(why) = cluster.unavailable_group(&r.group) {
        return result(Action::Retained, Some(format!("not pruned: {why}")));
    }
    let api = match cluster.api_for_ref(r) {
        Some(api) => api,
        None => {
            match kube::discovery::oneshot::group(cluster.client(), &r.group).await {
                // Discovery may be stale: ask once more before believing the kind is gone.
                Ok(g) if g.recommended_kind(&r.kind).is_some() => {
                    return result(
                        Action::Retained,
                        Some("not pruned: its kind appeared since the last discovery; retried next sync".into()),
                    );
                }
                Ok(_) => return result(Action::Pruned, Some("kind no longer served".into())),
                Err(kube::Error::Api(e)) if e.code == 404 => {
                    return result(Action::Pruned, Some("kind no longer served".into()));
                }
                Err(e) => {
                    return result(
                        Action::Retained,
                        Some(format!(
                            "not pruned: failed to discover {}: {}",
                            r.group,
                            apply::api_message(&e)
                        )),
                    );
                }
            }
        }
    };
    let live = match api.get_opt(&r.name).await {
        Ok(Some(o)) => serde_json::to_value(o).unwrap_or_default(),
        Ok(None) => return result(Action::Pruned, Some("already gone".into())),
        Err(e) => {
            return result(
                Action::Failed,
                Some(format!(
                    "failed to read before prune: {}",
                    apply::api_message(&e)
                )),
            );
        }
    };
    if inventory::keep_on_remove(&live) {
        let patch =
            serde_json::json!({"metadata": {"annotations": {inventory::OWNING_INVENTORY: null}}});
        return match api
            .patch(
                &r.name,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => result(Action::Abandoned, Some("kept: on-remove annotation".into())),
            Err(e) => result(
                Action::Failed,
                Some(format!("failed to release: {}", apply::api_message(&e))),
            ),
        };
    }
    if !inventory::may_prune(rules.policy, ownership(&live, rules)) {
        return result(Action::Skipped, Some("not owned by this inventory".into()));
    }
    if let Some(to) = rules.moving.get(r) {
        return result(
            Action::Retained,
            Some(format!(
                "not pruned: it moved to project {to}, which applies it next; kept until then"
            )),
        );
    }
    if r.group.is_empty()
        && r.kind == "Namespace"
        && let Some(why) = namespace_in_use(cluster, &r.name, rules).await
    {
        return result(Action::Retained, Some(format!("not pruned: {why}")));
    }
    let dp = kube::api::DeleteParams {
        propagation_policy: Some(propagation(rules.propagation)),
        ..Default::default()
    };
    match api.delete(&r.name, &dp).await {
        Ok(_) => result(Action::Pruned, None),
        Err(e) => result(
            Action::Failed,
            Some(format!("failed to delete: {}", apply::api_message(&e))),
        ),
    }
}

/// Whose the live object is: this inventory's, also when an inventory being adopted owns it.
fn ownership(live: &serde_json::Value, rules: &Rules<'_>) -> Ownership {
    let ownership = Ownership::of(live, &rules.inv.id);
    let adopted = annotation(live, inventory::OWNING_INVENTORY)
        .is_some_and(|a| rules.adopt_ids.iter().any(|id| id == a));
    if ownership == Ownership::NoMatch && adopted {
        Ownership::Match
    } else {
        ownership
    }
}

fn propagation(policy: PropagationPolicy) -> kube::api::PropagationPolicy {
    match policy {
        PropagationPolicy::Orphan => kube::api::PropagationPolicy::Orphan,
        PropagationPolicy::Background => kube::api::PropagationPolicy::Background,
        PropagationPolicy::Foreground => kube::api::PropagationPolicy::Foreground,
    }
}

/// Why the Namespace `name` must not be deleted, if it must not: deleting a Namespace
/// deletes everything in it, so it is pruned only when it holds nothing but what this
/// inventory recorded (and what the cluster made for those objects). cli-utils'
/// local-namespaces filter refuses the first two cases too.
async fn namespace_in_use(cluster: &Cluster, name: &str, rules: &Rules<'_>) -> Option<String> {
    if let Some(why) = namespace_needed(name, rules) {
        return Some(why);
    }
    if let Some(group) = cluster.unavailable().keys().next() {
        return Some(format!(
            "cannot tell whether it is empty while API group {group} is unavailable"
        ));
    }
    match cluster.foreign_objects(name, rules.recorded).await {
        Ok(foreign) if foreign.is_empty() => None,
        Ok(foreign) => Some(format!(
            "namespace still in use: it holds {} objects this project does not own ({}{}); move or delete them, or remove the Namespace from the inventory",
            foreign.len(),
            foreign
                .iter()
                .take(3)
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            if foreign.len() > 3 { ", …" } else { "" }
        )),
        Err(e) => Some(format!("failed to list what it holds: {e}")),
    }
}

/// The part of [`namespace_in_use`] that needs no cluster: the inventory or an object of
/// this sync is in the Namespace.
fn namespace_needed(name: &str, rules: &Rules<'_>) -> Option<String> {
    if name == rules.inv.namespace {
        return Some(format!(
            "namespace still in use: it holds this project's inventory {}",
            rules.inv.name
        ));
    }
    rules
        .desired
        .iter()
        .find(|o| o.namespace == name)
        .map(|o| format!("namespace still in use: {o} of this commit is in it"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cm(name: &str) -> ObjRef {
        ObjRef {
            group: "".into(),
            kind: "ConfigMap".into(),
            namespace: "ns".into(),
            name: name.into(),
        }
    }

    #[test]
    fn pruning_is_held_for_each_reason_and_only_when_something_would_be_pruned() {
        let plan = |prune: &[&str]| Plan {
            stages: Vec::new(),
            prune: prune.iter().map(|n| cm(n)).collect(),
        };
        let rendered: BTreeSet<ObjRef> = [cm("a"), cm("b")].into();
        let none = BTreeSet::new();
        assert!(hold_reasons(&plan(&["c"]), &rendered, &[], &none).is_empty());
        assert!(hold_reasons(&plan(&[]), &rendered, &["p".into()], &none).is_empty());
        let skipped = hold_reasons(&plan(&["c"]), &rendered, &["p".into()], &none);
        assert_eq!(skipped.len(), 1);
        assert!(skipped[0].starts_with("plugin p failed and was skipped"));
        let dropped = hold_reasons(&plan(&["b", "c"]), &rendered, &[], &none);
        assert_eq!(
            dropped,
            [
                "the plugins removed 1 objects that are still in git (ConfigMap/ns/b); a transformer must not drop objects it received"
            ]
        );
        let down: BTreeSet<&str> = ["API group x is unavailable"].into();
        assert_eq!(hold_reasons(&plan(&["c"]), &rendered, &[], &down).len(), 1);
    }

    fn rules<'a>(
        inv: &'a InventoryRef,
        adopt_ids: &'a [String],
        desired: &'a BTreeSet<ObjRef>,
    ) -> Rules<'a> {
        Rules {
            inv,
            policy: InventoryPolicy::MustMatch,
            propagation: PropagationPolicy::Foreground,
            adopt_ids,
            recorded: desired,
            desired,
            moving: &NOTHING_MOVES,
        }
    }

    static NOTHING_MOVES: BTreeMap<ObjRef, String> = BTreeMap::new();

    #[test]
    fn objects_of_an_adopted_inventory_are_this_inventorys() {
        let inv = InventoryRef::default_for("sluice-app", "apps");
        let adopt = ["17-42".to_string()];
        let none = BTreeSet::new();
        let owned_by = |id: &str| serde_json::json!({"metadata": {"annotations": {inventory::OWNING_INVENTORY: id}}});
        let rules = rules(&inv, &adopt, &none);
        assert_eq!(ownership(&owned_by("sluice-app"), &rules), Ownership::Match);
        assert_eq!(ownership(&owned_by("17-42"), &rules), Ownership::Match);
        assert_eq!(ownership(&owned_by("other"), &rules), Ownership::NoMatch);
        assert!(!inventory::may_prune(
            rules.policy,
            ownership(&owned_by("other"), &rules)
        ));
    }

    #[test]
    fn a_namespace_holding_the_inventory_or_this_commits_objects_stays() {
        let inv = InventoryRef::default_for("sluice-app", "apps");
        let desired: BTreeSet<ObjRef> = [cm("a")].into();
        let rules = rules(&inv, &[], &desired);
        assert_eq!(
            namespace_needed("apps", &rules).as_deref(),
            Some("namespace still in use: it holds this project's inventory inventory-sluice-app")
        );
        assert_eq!(
            namespace_needed("ns", &rules).as_deref(),
            Some("namespace still in use: ConfigMap/ns/a of this commit is in it")
        );
        assert_eq!(namespace_needed("empty", &rules), None);
    }
}
