//! Drift: notices, from watches, that someone else changed or deleted an object a project
//! applied, so the agent restores it within seconds instead of at its next full re-apply.
//!
//! After a successful sync the agent starts a [`Drift`] over the applied objects. It reads
//! the agent's [`Live`] watches (one per resource and namespace, shared by all projects and
//! kept across syncs): the objects' state when it starts is the baseline. An object
//! drifted when it is deleted, when its `metadata.generation` moves (the API server bumps
//! it for spec changes only, so the status writes of controllers are not drift), when its
//! labels or annotations change, or, for kinds without a generation (ConfigMap, Secret,
//! RBAC, …), when its resourceVersion moves. A sync drops the `Drift` before it writes (its
//! own writes are not drift) and starts a new one after, once its health wait saw the
//! watches catch up with its writes.
//!
//! Not drift: annotations that controllers write on the objects they manage
//! ([`CONTROLLER_ANNOTATIONS`]). Objects a sync left alone are compared with what the
//! previous `Drift` saw (`expected`), so a change made to them while the sync ran is
//! drift. A change made to an object the sync wrote, between its write and the end of the
//! sync's health wait, becomes the baseline; the periodic full re-apply catches it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kube::api::ObjectMeta;
use tokio::task::JoinHandle;

use crate::cluster::Cluster;
use crate::live::{Live, Notice, Scope, Seen};
use sluice_model::object::ObjRef;

/// Annotations that controllers maintain on objects users apply; a change of these is not
/// drift.
pub const CONTROLLER_ANNOTATIONS: &[&str] = &[
    "deployment.kubernetes.io/revision",
    "deprecated.daemonset.template.generation",
];

/// What a drift check compares: the parts of an object's metadata that only a change of
/// what was applied moves. Held for every watched object, so it is small: the labels and
/// the annotations are kept as digests (SHA-256, first 16 bytes), not as maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    version: Version,
    labels: [u8; 16],
    annotations: [u8; 16],
}

/// `metadata.generation` when the kind has one, else the resourceVersion.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Version {
    Generation(i64),
    Resource(Box<str>),
}

/// A digest of a string map's entries, given in key order (as a `BTreeMap` iterates).
fn digest<'a>(entries: impl Iterator<Item = (&'a String, &'a String)>) -> [u8; 16] {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    for (k, v) in entries {
        // Lengths first, so no two maps hash the same bytes.
        hash.update((k.len() as u64).to_le_bytes());
        hash.update(k);
        hash.update((v.len() as u64).to_le_bytes());
        hash.update(v);
    }
    let mut out = [0; 16];
    out.copy_from_slice(&hash.finalize()[..16]);
    out
}

impl Fingerprint {
    /// The fingerprint of an object's metadata.
    pub fn of(meta: &ObjectMeta) -> Fingerprint {
        let version = match meta.generation {
            Some(g) if g > 0 => Version::Generation(g),
            _ => Version::Resource(meta.resource_version.as_deref().unwrap_or_default().into()),
        };
        let none = BTreeMap::new();
        let annotations = meta
            .annotations
            .as_ref()
            .unwrap_or(&none)
            .iter()
            .filter(|(k, _)| !CONTROLLER_ANNOTATIONS.contains(&k.as_str()));
        Fingerprint {
            version,
            labels: digest(meta.labels.as_ref().unwrap_or(&none).iter()),
            annotations: digest(annotations),
        }
    }

    /// Why `now` differs from `self` (the baseline), if it does.
    pub fn changed(&self, now: &Fingerprint) -> Option<&'static str> {
        if self.version != now.version {
            Some(if matches!(self.version, Version::Generation(_)) {
                "its spec was changed"
            } else {
                "it was changed"
            })
        } else if self.labels != now.labels {
            Some("its labels were changed")
        } else if self.annotations != now.annotations {
            Some("its annotations were changed")
        } else {
            None
        }
    }
}

/// A running drift watch; dropping it stops it (the agent's watches go on).
#[derive(Debug)]
pub struct Drift {
    found: tokio::sync::mpsc::Receiver<String>,
    task: JoinHandle<()>,
    /// The baseline of every watched object that exists, once its watch has listed.
    baseline: Arc<Mutex<BTreeMap<ObjRef, Fingerprint>>>,
}

impl Drop for Drift {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Drift {
    /// Starts watching `objects`, the project's objects after a successful sync, in the
    /// agent's [`Live`] watches. Their state now is the baseline (the sync's health wait
    /// saw the watches catch up with its writes), except for those in `expected` (what an
    /// earlier watch saw of objects the last sync did not write): a difference from that is
    /// drift at once, which closes the window of the sync between two watches.
    pub fn watch(
        live: &Live,
        project: &str,
        cluster: &Cluster,
        objects: &[ObjRef],
        expected: &BTreeMap<ObjRef, Fingerprint>,
    ) -> Drift {
        let tracked = live.track(project, cluster, objects);
        // Subscribed before the first look: no change falls between the two.
        let notices = live.subscribe();
        // Objects of kinds the cluster does not serve cannot drift: nothing of them exists.
        let members: Vec<(ObjRef, Arc<Scope>)> = objects
            .iter()
            .zip(tracked.scopes)
            .filter_map(|(o, scope)| Some((o.clone(), scope?)))
            .collect();
        let (tx, found) = tokio::sync::mpsc::channel(1);
        let baseline = Arc::new(Mutex::new(BTreeMap::new()));
        let task = tokio::spawn(watch_members(
            live.clone(),
            members,
            expected.clone(),
            baseline.clone(),
            notices,
            tx,
        ));
        Drift {
            found,
            task,
            baseline,
        }
    }

    /// What the watches listed (the baseline), for the next watch's `expected`.
    pub fn baseline(&self) -> BTreeMap<ObjRef, Fingerprint> {
        self.baseline.lock().map(|b| b.clone()).unwrap_or_default()
    }

    /// Resolves with a description of the first drift seen (never, when there is none).
    pub async fn changed(&mut self) -> String {
        match self.found.recv().await {
            Some(why) => why,
            None => std::future::pending().await,
        }
    }
}

/// What a watch says of one object, for a drift check.
enum Look {
    Unlisted,
    Absent,
    Present(Fingerprint),
}

/// Compares `members` with their baselines whenever the watches tell of a change, until
/// one drifted.
async fn watch_members(
    live: Live,
    members: Vec<(ObjRef, Arc<Scope>)>,
    expected: BTreeMap<ObjRef, Fingerprint>,
    shared: Arc<Mutex<BTreeMap<ObjRef, Fingerprint>>>,
    mut notices: tokio::sync::broadcast::Receiver<Notice>,
    found: tokio::sync::mpsc::Sender<String>,
) {
    let index = crate::live::Index::new(
        members
            .iter()
            .map(|(o, scope)| (Some(&**scope), o.namespace.as_str(), o.name.as_str())),
    );
    let mut base: Vec<Option<Fingerprint>> = vec![None; members.len()];
    let mut dirty: Vec<usize> = (0..members.len()).collect();
    loop {
        for i in dirty.drain(..) {
            let (o, scope) = &members[i];
            let now = live.with(
                scope,
                &scope.key(&o.namespace, &o.name),
                |seen| match seen {
                    Seen::Unlisted { .. } => Look::Unlisted,
                    Seen::Absent { .. } => Look::Absent,
                    Seen::Present(e) => Look::Present(e.fingerprint.clone()),
                },
            );
            let why = match (&base[i], now) {
                // Its watch has not listed yet: the baseline comes with the list.
                (_, Look::Unlisted) => None,
                // The sync just applied it (or found it unchanged): deleted since.
                (_, Look::Absent) => Some("it was deleted"),
                (None, Look::Present(f)) => {
                    let (b, why) = match expected.get(o) {
                        Some(want) => (want.clone(), want.changed(&f)),
                        None => (f, None),
                    };
                    if let Ok(mut shared) = shared.lock() {
                        shared.insert(o.clone(), b.clone());
                    }
                    base[i] = Some(b);
                    why
                }
                (Some(b), Look::Present(f)) => b.changed(&f),
            };
            if let Some(why) = why {
                let _ = found.send(describe(o, why)).await;
                return;
            }
        }
        // A change, a (re)list, or falling behind: compare what they concern. The notices
        // end when the agent's watches are gone (it is stopping).
        if !index.touched(notices.recv().await, &mut dirty) {
            return;
        }
    }
}

fn describe(o: &ObjRef, why: &str) -> String {
    format!("{o} drifted: {why}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(
        generation: Option<i64>,
        rv: &str,
        labels: &[(&str, &str)],
        annotations: &[(&str, &str)],
    ) -> ObjectMeta {
        let map = |kv: &[(&str, &str)]| {
            Some(
                kv.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<BTreeMap<_, _>>(),
            )
        };
        ObjectMeta {
            generation,
            resource_version: Some(rv.into()),
            labels: map(labels),
            annotations: map(annotations),
            ..ObjectMeta::default()
        }
    }

    #[test]
    fn status_writes_and_controller_annotations_are_not_drift() {
        let base = Fingerprint::of(&meta(Some(1), "100", &[("app", "web")], &[]));
        // The Deployment controller writes status (new resourceVersion, same generation)
        // and its revision annotation.
        let after = Fingerprint::of(&meta(
            Some(1),
            "180",
            &[("app", "web")],
            &[("deployment.kubernetes.io/revision", "1")],
        ));
        assert_eq!(base.changed(&after), None);
    }

    #[test]
    fn spec_label_annotation_and_data_changes_are_drift() {
        let base = Fingerprint::of(&meta(Some(1), "100", &[("app", "web")], &[("a", "1")]));
        let spec = Fingerprint::of(&meta(Some(2), "101", &[("app", "web")], &[("a", "1")]));
        assert_eq!(base.changed(&spec), Some("its spec was changed"));
        let label = Fingerprint::of(&meta(Some(1), "101", &[("app", "db")], &[("a", "1")]));
        assert_eq!(base.changed(&label), Some("its labels were changed"));
        let annotation = Fingerprint::of(&meta(Some(1), "101", &[("app", "web")], &[]));
        assert_eq!(
            base.changed(&annotation),
            Some("its annotations were changed")
        );
        // A ConfigMap has no generation: any write is a change.
        let cm = Fingerprint::of(&meta(None, "100", &[], &[]));
        let edited = Fingerprint::of(&meta(None, "102", &[], &[]));
        assert_eq!(cm.changed(&edited), Some("it was changed"));
        // Digests, not maps: a key/value boundary moved is still a change.
        let ab = Fingerprint::of(&meta(Some(1), "1", &[("a", "bc")], &[]));
        let a_b = Fingerprint::of(&meta(Some(1), "1", &[("ab", "c")], &[]));
        assert_eq!(ab.changed(&a_b), Some("its labels were changed"));
    }
}
