//! Objects that move between projects reading one repository, in one push.
//!
//! Several projects of an agent may read one repository: agentk's `charts:` beside the
//! manifests of the same project, or one repository named once as a path and once as a
//! URL. A commit that moves an object from project A to project B (a team turning its
//! manifests into a chart does exactly that) must neither delete it nor let it be absent
//! for a moment, whichever of the two syncs first:
//!
//! - A, about to prune an object that a sibling's files have at the sibling's head, keeps
//!   it: retained in A's inventory, still annotated as A's, until the sibling applies it.
//!   From then on its annotation names the sibling, and A's prune skips it and drops it from
//!   the inventory without a delete ([`moving_out`]).
//! - B, meeting an object annotated with a sibling's inventory, takes it over when the
//!   sibling's files at its head no longer have it ([`taken_over`]); when both have it, the
//!   conflict is refused as before.
//!
//! A sibling's objects are read as its files and charts give them (fetch, select, render,
//! decode, namespaces), before its plugins: a transformer that renames or adds objects is not
//! followed. A sibling that cannot be read counts as wanting nothing (B's take-over is then
//! refused and A prunes as usual); that is logged with the sibling's name. Projects of other
//! repositories are not siblings: a move between repositories is two pushes, and the way to
//! make it is the cli-utils one (annotate the object `cli-utils.sigs.k8s.io/on-remove: keep`
//! in A, then add it to B with `inventory_policy: adopt_if_no_inventory`).

use std::collections::{BTreeMap, BTreeSet};

use sluice_engine::apply::ObjectResult;
use sluice_engine::cluster::Cluster;
use sluice_engine::inventory::{OWNING_INVENTORY, POLICY_REFUSAL};
use sluice_model::object::{ObjRef, Object, annotation};

use crate::config::ManifestProject;
use crate::source::Source;
use crate::{render, sync};

/// Another project of the agent that reads the same repository.
#[derive(Debug, Clone)]
pub struct Sibling {
    /// Its configuration.
    pub project: ManifestProject,
    /// Its inventory id (the owning-inventory annotation of its objects).
    pub inventory_id: String,
    /// Its source (the same repository; its own ref may differ).
    pub source: Source,
}

/// Where a sync stands: what a sibling's files are compared at. (Namespaces of what the
/// siblings render and their decryption keys come from the cluster given beside it.)
#[derive(Clone, Copy)]
pub struct Here<'a> {
    /// The project syncing.
    pub project: &'a ManifestProject,
    /// Its source.
    pub source: &'a Source,
    /// The commit it syncs (full id).
    pub commit: &'a str,
    /// Its siblings.
    pub siblings: &'a [Sibling],
    /// Renderers and capabilities (a sibling's own keys are read for it).
    pub cx: &'a render::Context,
    /// Selection limits.
    pub limits: crate::select::Limits,
}

/// Of `prune`, the objects a sibling's files have at its head: object → the sibling's
/// project id. The prune keeps them until the sibling has applied them.
pub async fn moving_out(
    cluster: &Cluster,
    here: Here<'_>,
    prune: &[ObjRef],
) -> BTreeMap<ObjRef, String> {
    if prune.is_empty() || here.siblings.is_empty() {
        return BTreeMap::new();
    }
    let mut wanted = Vec::new();
    for s in here.siblings {
        if let Some(set) = files_of(cluster, here, s).await {
            wanted.push((s.project.id.as_str(), set));
        }
    }
    moving(prune, &wanted)
}

/// Of the objects `failures` refused because another inventory owns them, those a sibling
/// owns whose files at its head no longer have them: object → the sibling's inventory id,
/// for [`sluice_engine::apply::Options::handoffs`]. Reads each such object once.
pub async fn taken_over(
    cluster: &Cluster,
    here: Here<'_>,
    failures: &[ObjectResult],
) -> BTreeMap<ObjRef, String> {
    if here.siblings.is_empty() {
        return BTreeMap::new();
    }
    let mut conflicts = Vec::new();
    for f in failures.iter().filter(|f| owned_elsewhere(f)) {
        // The refusal does not say whose it is: the live object does.
        if let Ok(Some(live)) = cluster.get(&f.obj).await
            && let Some(owner) = annotation(&live, OWNING_INVENTORY)
        {
            conflicts.push((f.obj.clone(), owner.to_string()));
        }
    }
    let mut wanted = Vec::new();
    for s in here.siblings {
        if conflicts.iter().any(|(_, owner)| *owner == s.inventory_id)
            && let Some(set) = files_of(cluster, here, s).await
        {
            wanted.push((s.inventory_id.as_str(), set));
        }
    }
    handoffs(&conflicts, &wanted)
}

/// A refusal because the live object carries another inventory's annotation.
fn owned_elsewhere(f: &ObjectResult) -> bool {
    f.message
        .as_deref()
        .is_some_and(|m| m.starts_with(POLICY_REFUSAL) && m.contains("a different inventory"))
}

/// Which of `prune` the siblings want (`wanted`: project id and the objects of its files),
/// each with the first sibling that wants it.
pub fn moving(prune: &[ObjRef], wanted: &[(&str, BTreeSet<ObjRef>)]) -> BTreeMap<ObjRef, String> {
    prune
        .iter()
        .filter_map(|r| {
            let (project, _) = wanted.iter().find(|(_, set)| set.contains(r))?;
            Some((r.clone(), (*project).to_string()))
        })
        .collect()
}

/// Which `conflicts` (object, its live owner's inventory id) may be taken over: those whose
/// owner is a sibling read in `wanted` (inventory id and the objects of its files) whose
/// files no longer have the object. An owner that is no sibling, or could not be read, keeps
/// its object.
pub fn handoffs(
    conflicts: &[(ObjRef, String)],
    wanted: &[(&str, BTreeSet<ObjRef>)],
) -> BTreeMap<ObjRef, String> {
    conflicts
        .iter()
        .filter(|(r, owner)| {
            wanted
                .iter()
                .any(|(id, set)| id == owner && !set.contains(r))
        })
        .cloned()
        .collect()
}

/// The objects `s`'s files have at its head (the commit `here` syncs, when it follows the
/// same ref of the same repository), or `None`, logged, when they cannot be read.
async fn files_of(cluster: &Cluster, here: Here<'_>, s: &Sibling) -> Option<BTreeSet<ObjRef>> {
    let read = async {
        let commit =
            if s.source.url() == here.source.url() && s.project.git_ref == here.project.git_ref {
                here.commit.to_string()
            } else {
                s.source
                    .resolve_within(&s.project.git_ref, sync::GIT_TIMEOUT)
                    .await
                    .map_err(|e| e.to_string())?
            };
        let cx = render::Context {
            keys: match &s.project.decryption {
                Some(d) => Some(std::sync::Arc::new(
                    sync::decryption_keys(cluster, d)
                        .await
                        .map_err(|e| e.to_string())?,
                )),
                None => None,
            },
            ..here.cx.clone()
        };
        let (mut objects, _, _) =
            sync::render(&s.source, &s.project, &commit, here.limits, None, &cx)
                .await
                .map_err(|e| e.to_string())?;
        let mut scopes = cluster.scopes();
        scopes.add_crds(&objects);
        crate::decode::set_namespaces(&mut objects, &s.project.default_namespace, &scopes)
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(objects.iter().map(Object::obj_ref).collect())
    };
    match read.await {
        Ok(set) => Some(set),
        Err(e) => {
            tracing::warn!(project_id = %here.project.id, sibling = %s.project.id, error = %e, "cannot tell whether objects moved to a project of the same repository");
            None
        }
    }
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
    fn a_pruned_object_a_sibling_has_is_moving_to_it() {
        let wanted = [
            ("chart:ns/web", BTreeSet::from([cm("x"), cm("y")])),
            ("group/other", BTreeSet::from([cm("y")])),
        ];
        let moving = moving(&[cm("x"), cm("y"), cm("z")], &wanted);
        assert_eq!(
            moving,
            BTreeMap::from([
                (cm("x"), "chart:ns/web".to_string()),
                (cm("y"), "chart:ns/web".to_string())
            ])
        );
        assert!(super::moving(&[cm("z")], &wanted).is_empty());
        assert!(super::moving(&[cm("x")], &[]).is_empty());
    }

    #[test]
    fn only_what_the_owning_sibling_let_go_is_taken_over() {
        let wanted = [("inv-a", BTreeSet::from([cm("kept")]))];
        let conflicts = [
            (cm("moved"), "inv-a".to_string()),
            (cm("kept"), "inv-a".to_string()),
            (cm("foreign"), "inv-elsewhere".to_string()),
        ];
        assert_eq!(
            handoffs(&conflicts, &wanted),
            BTreeMap::from([(cm("moved"), "inv-a".to_string())])
        );
        // A sibling that could not be read keeps everything.
        assert!(handoffs(&conflicts, &[]).is_empty());
    }
}
