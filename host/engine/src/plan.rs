//! The order of a sync: which objects go together, in which stages, and what to prune.
//!
//! Pure: no I/O. Stages follow Flux's staged apply:
//!
//! 1. cluster definitions — CustomResourceDefinitions, Namespaces, ClusterRoles — applied
//!    first and waited for (CRDs `Established`), so what follows can use them;
//! 2. classes — every kind ending in `Class` (StorageClass, IngressClass, …);
//! 3. everything else in a fixed kind order (Helm's install order), webhook configurations
//!    last so a webhook never blocks the objects it would admit. Objects annotated with
//!    `config.kubernetes.io/depends-on` go in a later stage than what they depend on.
//!
//! Ties break by namespace, then name, so the plan does not depend on file order.
//! The prune set is the inventory minus the desired set, in reverse order.

use std::collections::{BTreeMap, BTreeSet};

use sluice_model::object::{ObjRef, Object};

/// Annotation listing the objects an object depends on (cli-utils format).
pub const DEPENDS_ON: &str = "config.kubernetes.io/depends-on";

/// A plan that cannot be made. Not retryable: the commit must change.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// A depends-on annotation does not parse.
    #[error("{origin}: {obj}: invalid {DEPENDS_ON} annotation {value:?}: {message}")]
    InvalidDependsOn {
        /// Object.
        obj: Box<ObjRef>,
        /// File and line.
        origin: String,
        /// The annotation value.
        value: String,
        /// What is wrong.
        message: String,
    },
    /// Objects depend on each other in a cycle.
    #[error("dependency cycle between {}", .0.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", "))]
    Cycle(Vec<ObjRef>),
    /// Two objects in the set have the same identity.
    #[error("{obj} is defined twice: {first} and {second}")]
    Duplicate {
        /// Object.
        obj: Box<ObjRef>,
        /// First place.
        first: String,
        /// Second place.
        second: String,
    },
}

/// What one sync will do.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Apply stages, in order.
    pub stages: Vec<Stage>,
    /// Objects to prune, in order (reverse of apply order).
    pub prune: Vec<ObjRef>,
}

/// Objects applied together; the next stage starts when these are ready.
#[derive(Debug, Clone, PartialEq)]
pub struct Stage {
    /// `definitions`, `classes`, `objects` or `objects (after dependencies N)`.
    pub name: String,
    /// The objects, in apply order.
    pub objects: Vec<Object>,
}

impl Plan {
    /// Every desired object's identity.
    pub fn desired(&self) -> BTreeSet<ObjRef> {
        self.stages
            .iter()
            .flat_map(|s| s.objects.iter().map(Object::obj_ref))
            .collect()
    }
}

/// Orders `objects` into stages and computes the prune set against `inventory`.
///
/// # Errors
/// Duplicate objects, unparsable depends-on annotations and dependency cycles.
pub fn plan(objects: Vec<Object>, inventory: &BTreeSet<ObjRef>) -> Result<Plan, Error> {
    let mut seen: BTreeMap<ObjRef, String> = BTreeMap::new();
    for o in &objects {
        if let Some(first) = seen.insert(o.obj_ref(), o.origin.to_string()) {
            return Err(Error::Duplicate {
                obj: Box::new(o.obj_ref()),
                first,
                second: o.origin.to_string(),
            });
        }
    }
    let desired: BTreeSet<ObjRef> = seen.into_keys().collect();

    let (mut definitions, mut classes, mut rest) = (Vec::new(), Vec::new(), Vec::new());
    for o in objects {
        match o.kind() {
            "CustomResourceDefinition" | "Namespace" | "ClusterRole" => definitions.push(o),
            k if k.ends_with("Class") => classes.push(o),
            _ => rest.push(o),
        }
    }
    let mut stages = Vec::new();
    for (name, mut objs) in [("definitions", definitions), ("classes", classes)] {
        if !objs.is_empty() {
            sort(&mut objs);
            stages.push(Stage {
                name: name.into(),
                objects: objs,
            });
        }
    }
    for (depth, mut objs) in dependency_layers(rest, &desired)?.into_iter().enumerate() {
        sort(&mut objs);
        let name = if depth == 0 {
            "objects".to_string()
        } else {
            format!("objects (after dependencies {depth})")
        };
        stages.push(Stage {
            name,
            objects: objs,
        });
    }

    let mut prune: Vec<ObjRef> = inventory.difference(&desired).cloned().collect();
    prune.sort_by(|a, b| {
        rank(&b.kind)
            .cmp(&rank(&a.kind))
            .then_with(|| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)))
    });
    Ok(Plan { stages, prune })
}

/// Splits objects into layers: layer N holds objects whose in-set dependencies are all in
/// layers < N. Dependencies outside the set are the cluster's business, not the plan's.
fn dependency_layers(
    objects: Vec<Object>,
    desired: &BTreeSet<ObjRef>,
) -> Result<Vec<Vec<Object>>, Error> {
    let mut deps: Vec<BTreeSet<ObjRef>> = Vec::with_capacity(objects.len());
    for o in &objects {
        let parsed = match o.annotation(DEPENDS_ON) {
            Some(v) => parse_depends_on(&v).map_err(|message| Error::InvalidDependsOn {
                obj: Box::new(o.obj_ref()),
                origin: o.origin.to_string(),
                value: v.clone(),
                message,
            })?,
            None => Vec::new(),
        };
        deps.push(parsed.into_iter().filter(|d| desired.contains(d)).collect());
    }
    // Whatever is desired but not layered here (definitions, classes) is placed already.
    let layered: BTreeSet<ObjRef> = objects.iter().map(Object::obj_ref).collect();
    let mut placed: BTreeSet<ObjRef> = desired.difference(&layered).cloned().collect();
    let mut remaining: Vec<(Object, BTreeSet<ObjRef>)> = objects.into_iter().zip(deps).collect();
    let mut layers = Vec::new();
    while !remaining.is_empty() {
        let (ready, waiting): (Vec<_>, Vec<_>) = remaining
            .into_iter()
            .partition(|(_, d)| d.is_subset(&placed));
        if ready.is_empty() {
            return Err(Error::Cycle(
                waiting.iter().map(|(o, _)| o.obj_ref()).collect(),
            ));
        }
        placed.extend(ready.iter().map(|(o, _)| o.obj_ref()));
        layers.push(ready.into_iter().map(|(o, _)| o).collect());
        remaining = waiting;
    }
    Ok(layers)
}

/// Parses `group/namespaces/ns/kind/name` and `group/kind/name` entries, comma separated.
pub fn parse_depends_on(value: &str) -> Result<Vec<ObjRef>, String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|entry| {
            let parts: Vec<&str> = entry.split('/').collect();
            match parts.as_slice() {
                [group, "namespaces", ns, kind, name] => Ok(ObjRef { group: (*group).into(), kind: (*kind).into(), namespace: (*ns).into(), name: (*name).into() }),
                [group, kind, name] => Ok(ObjRef { group: (*group).into(), kind: (*kind).into(), namespace: "".into(), name: (*name).into() }),
                _ => Err(format!("entry {entry:?} is neither group/kind/name nor group/namespaces/namespace/kind/name")),
            }
        })
        .collect()
}

/// Formats an object reference as a depends-on entry.
pub fn format_depends_on(r: &ObjRef) -> String {
    if r.namespace.is_empty() {
        format!("{}/{}/{}", r.group, r.kind, r.name)
    } else {
        format!(
            "{}/namespaces/{}/{}/{}",
            r.group, r.namespace, r.kind, r.name
        )
    }
}

fn sort(objs: &mut [Object]) {
    // Each key once per object, not per comparison: at 10,000 objects the lookups in the
    // values and the kind's rank were most of the plan's time.
    objs.sort_by_cached_key(|o| {
        (
            rank(o.kind()),
            o.kind().to_string(),
            o.namespace().map(str::to_string),
            o.name().to_string(),
        )
    });
}

/// Apply order of kinds (Helm's install order); unknown kinds go after all known ones but
/// before the webhook configurations.
const KIND_ORDER: &[&str] = &[
    "Namespace",
    "NetworkPolicy",
    "ResourceQuota",
    "LimitRange",
    "PodSecurityPolicy",
    "PodDisruptionBudget",
    "ServiceAccount",
    "Secret",
    "ConfigMap",
    "StorageClass",
    "PersistentVolume",
    "PersistentVolumeClaim",
    "CustomResourceDefinition",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
    "Service",
    "DaemonSet",
    "Pod",
    "ReplicationController",
    "ReplicaSet",
    "Deployment",
    "HorizontalPodAutoscaler",
    "StatefulSet",
    "Job",
    "CronJob",
    "IngressClass",
    "Ingress",
    "APIService",
];
const LAST: &[&str] = &[
    "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration",
];

fn rank(kind: &str) -> usize {
    if let Some(i) = LAST.iter().position(|k| *k == kind) {
        return KIND_ORDER.len() + 1 + i;
    }
    KIND_ORDER
        .iter()
        .position(|k| *k == kind)
        .unwrap_or(KIND_ORDER.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use sluice_model::object::Origin;

    fn obj(api: &str, kind: &str, ns: Option<&str>, name: &str) -> Object {
        let mut v = json!({"apiVersion": api, "kind": kind, "metadata": {"name": name}});
        if let Some(ns) = ns {
            v["metadata"]["namespace"] = json!(ns);
        }
        Object::new(
            &v,
            Origin {
                path: format!("{name}.yaml").into(),
                line: 1,
                ..Origin::default()
            },
        )
    }

    fn names(stage: &Stage) -> Vec<String> {
        stage
            .objects
            .iter()
            .map(|o| o.obj_ref().to_string())
            .collect()
    }

    #[test]
    fn stages_follow_flux_order_regardless_of_input_order() {
        let input = vec![
            obj(
                "admissionregistration.k8s.io/v1",
                "ValidatingWebhookConfiguration",
                None,
                "hook",
            ),
            obj("apps/v1", "Deployment", Some("a"), "web"),
            obj("v1", "Service", Some("a"), "web"),
            obj("storage.k8s.io/v1", "StorageClass", None, "fast"),
            obj("v1", "Namespace", None, "a"),
            obj(
                "apiextensions.k8s.io/v1",
                "CustomResourceDefinition",
                None,
                "w.example.com",
            ),
            obj("example.com/v1", "Widget", Some("a"), "w"),
            obj("v1", "ConfigMap", Some("a"), "cfg"),
        ];
        let mut reversed = input.clone();
        reversed.reverse();
        let p = plan(input, &BTreeSet::new()).expect("plan");
        assert_eq!(p, plan(reversed, &BTreeSet::new()).expect("plan"));
        assert_eq!(
            p.stages.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
            ["definitions", "classes", "objects"]
        );
        assert_eq!(
            names(&p.stages[0]),
            ["Namespace/a", "CustomResourceDefinition/w.example.com"]
        );
        assert_eq!(
            names(&p.stages[2]),
            [
                "ConfigMap/a/cfg",
                "Service/a/web",
                "Deployment/a/web",
                "Widget/a/w",
                "ValidatingWebhookConfiguration/hook"
            ]
        );
    }

    #[test]
    fn depends_on_moves_objects_to_a_later_stage() {
        let mut job = obj("batch/v1", "Job", Some("a"), "migrate");
        let mut web = obj("apps/v1", "Deployment", Some("a"), "web");
        web.edit(|v| {
            v["metadata"]["annotations"] = json!({DEPENDS_ON: "batch/namespaces/a/Job/migrate"})
        });
        job.edit(|v| {
            v["metadata"]["annotations"] = json!({DEPENDS_ON: "/namespaces/a/ConfigMap/cfg"})
        });
        let p = plan(
            vec![web, job, obj("v1", "ConfigMap", Some("a"), "cfg")],
            &BTreeSet::new(),
        )
        .expect("plan");
        let got: Vec<Vec<String>> = p.stages.iter().map(names).collect();
        assert_eq!(
            got,
            [
                vec!["ConfigMap/a/cfg"],
                vec!["Job/a/migrate"],
                vec!["Deployment/a/web"]
            ]
        );
    }

    #[test]
    fn cycles_and_duplicates_are_errors() {
        let mut a = obj("v1", "ConfigMap", Some("n"), "a");
        let mut b = obj("v1", "ConfigMap", Some("n"), "b");
        a.edit(|v| v["metadata"]["annotations"] = json!({DEPENDS_ON: "/namespaces/n/ConfigMap/b"}));
        b.edit(|v| v["metadata"]["annotations"] = json!({DEPENDS_ON: "/namespaces/n/ConfigMap/a"}));
        assert!(matches!(
            plan(vec![a, b], &BTreeSet::new()),
            Err(Error::Cycle(_))
        ));
        let e = plan(
            vec![
                obj("v1", "ConfigMap", Some("n"), "a"),
                obj("v1", "ConfigMap", Some("n"), "a"),
            ],
            &BTreeSet::new(),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "ConfigMap/n/a is defined twice: a.yaml:1 and a.yaml:1"
        );
    }

    #[test]
    fn prune_set_is_inventory_minus_desired_in_reverse_order() {
        let r = |g: &str, k: &str, ns: &str, n: &str| ObjRef {
            group: g.into(),
            kind: k.into(),
            namespace: ns.into(),
            name: n.into(),
        };
        let inventory: BTreeSet<ObjRef> = [
            r("", "Namespace", "", "old"),
            r("apps", "Deployment", "old", "web"),
            r("", "ConfigMap", "a", "keep"),
        ]
        .into();
        let p = plan(vec![obj("v1", "ConfigMap", Some("a"), "keep")], &inventory).expect("plan");
        assert_eq!(
            p.prune,
            [
                r("apps", "Deployment", "old", "web"),
                r("", "Namespace", "", "old")
            ]
        );
    }
}
