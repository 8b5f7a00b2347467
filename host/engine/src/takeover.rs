//! Taking over an agentk inventory, so an agentk cluster is adopted without recreating
//! anything.
//!
//! agentk named its inventories `inventory-<agentId>-<projectId>` (numeric GitLab ids a
//! sluice user rarely knows). For a project with no inventory yet, [`find`] picks the agentk
//! inventory in the project's namespace that owns the live objects of this commit; the sync
//! then records its objects as its own, applies with its id among the adopted ones, and
//! retires it ([`crate::inventory::retire`]) once its own inventory lists everything.

use std::collections::BTreeMap;

use sluice_model::object::{Object, annotation};

use crate::cluster::Cluster;
use crate::inventory::{self, Claimed, InventoryRef, Stored};

/// Why no agentk inventory could be chosen.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The namespace's inventories could not be listed.
    #[error(transparent)]
    Inventory(#[from] inventory::Error),
    /// Several agentk inventories own this commit's objects equally.
    #[error(transparent)]
    Ambiguous(#[from] Claimed),
}

/// The agentk inventory to adopt for `inv` (a project's own inventory, not yet in the
/// cluster): the candidate in `inv`'s namespace (an agentk id, with `agent_id` that agent's
/// only, not one of `others`, not marked as any sluice project's) that most of `objects`'
/// live copies name in `config.k8s.io/owning-inventory` and that lists them. `None` when no
/// candidate owns any.
///
/// # Errors
/// [`Error::Ambiguous`] when two candidates own equally many; listing errors.
pub async fn find(
    cluster: &Cluster,
    inv: &InventoryRef,
    objects: &[Object],
    agent_id: Option<&str>,
    others: &[InventoryRef],
) -> Result<Option<(InventoryRef, Stored)>, Error> {
    let candidates: Vec<(InventoryRef, Stored)> = inventory::list(cluster.client(), &inv.namespace)
        .await?
        .into_iter()
        .filter(|(c, s)| is_candidate(c, s, agent_id, others))
        .collect();
    if candidates.is_empty() {
        return Ok(None);
    }
    // Count, per candidate, the desired objects it lists whose live annotation is its id.
    let mut votes: BTreeMap<String, usize> = BTreeMap::new();
    for o in objects {
        let r = o.obj_ref();
        let Some((_, stored)) = candidates.iter().find(|(_, s)| s.objects.contains(&r)) else {
            continue;
        };
        let live = cluster.get(&r).await.ok().flatten();
        if let Some(owner) = live
            .as_ref()
            .and_then(|l| annotation(l, inventory::OWNING_INVENTORY))
            && stored.id.as_deref() == Some(owner)
        {
            *votes.entry(owner.to_string()).or_default() += 1;
        }
    }
    let Some(id) = elect(&votes).map_err(|tied| Claimed {
        inventory: format!("{}/{}", inv.namespace, inv.name),
        reason: format!(
            "several agentk inventories own this commit's objects ({}); pass --agentk-agent-id or --inventory-id PROJECT=ID to choose",
            tied.join(", ")
        ),
    })?
    else {
        return Ok(None);
    };
    Ok(candidates.into_iter().find(|(c, _)| c.id == id))
}

/// An inventory agentk wrote: an agentk id (of `agent_id`, if given), agentk's name for it,
/// and neither a sluice project's nor one of `others`.
fn is_candidate(
    c: &InventoryRef,
    s: &Stored,
    agent_id: Option<&str>,
    others: &[InventoryRef],
) -> bool {
    is_agentk_id(&c.id, agent_id)
        && c.name == format!("inventory-{}", c.id)
        && s.project.is_none()
        && !others.iter().any(|o| o.id == c.id)
}

/// The id with the most votes; `Err` with every voted id when the most are tied.
fn elect(votes: &BTreeMap<String, usize>) -> Result<Option<String>, Vec<String>> {
    let Some(most) = votes.values().max() else {
        return Ok(None);
    };
    let top: Vec<&String> = votes
        .iter()
        .filter(|(_, n)| *n == most)
        .map(|(id, _)| id)
        .collect();
    match top.as_slice() {
        [one] => Ok(Some((*one).clone())),
        _ => Err(votes.keys().cloned().collect()),
    }
}

/// `<agentId>-<projectId>`, both numeric (agentk's inventory ids).
fn is_agentk_id(id: &str, agent_id: Option<&str>) -> bool {
    let Some((agent, project)) = id.split_once('-') else {
        return false;
    };
    let numeric = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    numeric(agent) && numeric(project) && agent_id.is_none_or(|a| a == agent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agentk_ids_are_two_numbers() {
        assert!(is_agentk_id("17-42", None));
        assert!(is_agentk_id("17-42", Some("17")));
        assert!(!is_agentk_id("17-42", Some("18")));
        for id in ["17", "17-", "-42", "a-42", "17-42-1", "sluice-g-app"] {
            assert!(!is_agentk_id(id, None), "{id}");
        }
    }

    #[test]
    fn candidates_are_agentks_unclaimed_inventories() {
        let agentk = InventoryRef::default_for("17-42", "apps");
        let free = Stored::default();
        assert!(is_candidate(&agentk, &free, None, &[]));
        assert!(!is_candidate(&agentk, &free, Some("18"), &[]));
        assert!(!is_candidate(
            &agentk,
            &free,
            None,
            std::slice::from_ref(&agentk)
        ));
        let sluices = Stored {
            project: Some("g/app".into()),
            ..Stored::default()
        };
        assert!(!is_candidate(&agentk, &sluices, None, &[]));
        let renamed = InventoryRef {
            name: "mine".into(),
            ..agentk.clone()
        };
        assert!(!is_candidate(&renamed, &free, None, &[]));
    }

    #[test]
    fn the_inventory_owning_most_objects_wins_and_a_tie_is_refused() {
        let votes = |v: &[(&str, usize)]| -> BTreeMap<String, usize> {
            v.iter().map(|(id, n)| (id.to_string(), *n)).collect()
        };
        assert_eq!(elect(&votes(&[])), Ok(None));
        assert_eq!(
            elect(&votes(&[("17-1", 3), ("17-2", 1)])),
            Ok(Some("17-1".into()))
        );
        assert_eq!(
            elect(&votes(&[("17-1", 2), ("17-2", 2), ("17-3", 1)])),
            Err(vec!["17-1".into(), "17-2".into(), "17-3".into()])
        );
    }
}
