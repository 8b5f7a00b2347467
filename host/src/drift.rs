//! Drift: notices, from watches, that someone else changed or deleted an object a project
//! applied, so the agent restores it within seconds instead of at its next full re-apply.
//!
//! After a successful sync the agent starts a [`Drift`] over the applied objects: one
//! metadata-only watch per resource and namespace among them (a single object is watched
//! by name), whose first list is the baseline. An object drifted when it is deleted, when
//! its `metadata.generation` moves (the API server bumps it for spec changes only, so the
//! status writes of controllers are not drift), when its labels or annotations change, or,
//! for kinds without a generation (ConfigMap, Secret, RBAC, …), when its resourceVersion
//! moves. A sync stops the watch before it writes (its own writes are not drift) and
//! starts a new one after.
//!
//! Not drift: annotations that controllers write on the objects they manage
//! ([`CONTROLLER_ANNOTATIONS`]). Between two watches (while a sync runs), objects the sync
//! left alone are compared with what the previous watch saw (`expected`); a change made
//! to an object the sync wrote, between its write and the new watch's first list, is not
//! seen (it becomes the baseline), and the periodic full re-apply catches it. The watch's
//! resources list one at a time (`cluster::list_in_turn`), so for the last of them that
//! window lasts until the lists before it are done.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use kube::api::{Api, DynamicObject, ObjectMeta, PartialObjectMeta};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher;
use tokio::task::JoinHandle;

use crate::cluster::{Cluster, list_in_turn};
use crate::object::ObjRef;

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

/// A running drift watch; dropping it stops the watches.
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
    /// Starts watching `objects`. Their state now is the baseline, except for those in
    /// `expected` (what an earlier watch saw of objects the last sync did not write): a
    /// difference from that is drift at once, which closes the window between two watches.
    pub fn watch(
        cluster: &Cluster,
        objects: &[ObjRef],
        expected: &BTreeMap<ObjRef, Fingerprint>,
    ) -> Drift {
        // Objects of kinds the cluster does not serve cannot drift: nothing of them exists.
        let (by_resource, _unserved) = cluster.by_resource(objects);
        let groups: Vec<Group> = by_resource
            .into_iter()
            .map(|g| {
                let client = cluster.client().clone();
                Group {
                    api: match g.caps.scope {
                        kube::discovery::Scope::Namespaced => {
                            Api::namespaced_with(client, &g.namespace, &g.resource)
                        }
                        kube::discovery::Scope::Cluster => Api::all_with(client, &g.resource),
                    },
                    members: g.members.iter().map(|&i| objects[i].clone()).collect(),
                }
            })
            .collect();
        let (tx, found) = tokio::sync::mpsc::channel(1);
        let baseline = Arc::new(Mutex::new(BTreeMap::new()));
        let expected = Arc::new(expected.clone());
        let (shared, expected_all) = (baseline.clone(), expected.clone());
        let task = tokio::spawn(async move {
            let turn = Arc::new(tokio::sync::Semaphore::new(1));
            let watches = groups.into_iter().map(|group| {
                let tx = tx.clone();
                let (shared, expected) = (shared.clone(), expected_all.clone());
                let turn = turn.clone();
                async move {
                    if let Some(why) = watch_group(group, &expected, &shared, turn).await {
                        let _ = tx.send(why).await;
                    }
                }
            });
            futures::future::join_all(watches).await;
        });
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

/// The objects of one resource in one namespace, watched together (metadata only).
struct Group {
    api: Api<PartialObjectMeta<DynamicObject>>,
    members: Vec<ObjRef>,
}

/// Watches one resource in one namespace until one of its members drifts.
async fn watch_group(
    Group { api, members }: Group,
    expected: &BTreeMap<ObjRef, Fingerprint>,
    shared: &Mutex<BTreeMap<ObjRef, Fingerprint>>,
    turn: Arc<tokio::sync::Semaphore>,
) -> Option<String> {
    let mut config = watcher::Config::default().page_size(crate::cluster::WATCH_PAGE);
    if let [only] = members.as_slice() {
        config = config.fields(&format!("metadata.name={}", only.name));
    }
    let by_name: HashMap<String, ObjRef> =
        members.into_iter().map(|o| (o.name.clone(), o)).collect();
    let mut baseline: Option<HashMap<String, Fingerprint>> = None;
    // The (re)list under way: what it delivered so far.
    let mut listing: HashMap<String, Fingerprint> = HashMap::new();
    // One group lists at a time (`cluster::list_in_turn`): its first list is its baseline.
    let mut events = list_in_turn(watcher(api, config).default_backoff(), turn).boxed();
    while let Some(event) = events.next().await {
        let Ok(event) = event else {
            // The watcher retries with backoff.
            continue;
        };
        let seen = |meta: &ObjectMeta| -> Option<(String, Fingerprint)> {
            let name = meta.name.clone()?;
            by_name
                .contains_key(&name)
                .then(|| (name, Fingerprint::of(meta)))
        };
        match event {
            watcher::Event::Init => listing.clear(),
            watcher::Event::InitApply(o) => {
                if let Some((name, f)) = seen(&o.metadata) {
                    listing.insert(name, f);
                }
            }
            watcher::Event::InitDone => match &baseline {
                None => {
                    let listed = std::mem::take(&mut listing);
                    for (name, o) in &by_name {
                        // The sync just applied every member: one missing was deleted since.
                        if !listed.contains_key(name) {
                            return Some(describe(o, "it was deleted"));
                        }
                        if let Some(want) = expected.get(o)
                            && let Some(why) = differs(Some(want), listed.get(name))
                        {
                            return Some(describe(o, why));
                        }
                    }
                    if let Ok(mut shared) = shared.lock() {
                        for (name, f) in &listed {
                            shared.insert(by_name[name.as_str()].clone(), f.clone());
                        }
                    }
                    baseline = Some(listed);
                }
                Some(base) => {
                    // A re-list (the watch expired): compare everything against the baseline.
                    let names: HashSet<&String> = base.keys().chain(listing.keys()).collect();
                    for name in names {
                        if let Some(why) = differs(base.get(name), listing.get(name)) {
                            return Some(describe(&by_name[name.as_str()], why));
                        }
                    }
                }
            },
            watcher::Event::Apply(o) => {
                if let (Some(base), Some((name, f))) = (&baseline, seen(&o.metadata))
                    && let Some(why) = differs(base.get(&name), Some(&f))
                {
                    return Some(describe(&by_name[name.as_str()], why));
                }
            }
            watcher::Event::Delete(o) => {
                if let (Some(base), Some((name, _))) = (&baseline, seen(&o.metadata))
                    && base.contains_key(&name)
                {
                    return Some(describe(&by_name[name.as_str()], "it was deleted"));
                }
            }
        }
    }
    None
}

/// Whether an object drifted from its baseline (`None`: absent).
fn differs(base: Option<&Fingerprint>, now: Option<&Fingerprint>) -> Option<&'static str> {
    match (base, now) {
        (Some(b), Some(n)) => b.changed(n),
        (Some(_), None) => Some("it was deleted"),
        // Absent at the baseline: not ours to judge (it failed to apply, or is pruned).
        (None, _) => None,
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
        assert_eq!(differs(Some(&cm), None), Some("it was deleted"));
        assert_eq!(differs(None, Some(&cm)), None);
        // Digests, not maps: a key/value boundary moved is still a change.
        let ab = Fingerprint::of(&meta(Some(1), "1", &[("a", "bc")], &[]));
        let a_b = Fingerprint::of(&meta(Some(1), "1", &[("ab", "c")], &[]));
        assert_eq!(ab.changed(&a_b), Some("its labels were changed"));
    }
}
