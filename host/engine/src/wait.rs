//! Health of applied objects, by kstatus rules, within a deadline.
//!
//! [`status`] computes one object's status from its live state (pure); [`wait_current`]
//! waits until every object is `Current` (or `Failed`), and [`wait_gone`] until pruned
//! objects are `NotFound`. A newer commit cancels a wait by dropping its future.
//!
//! Waits watch, as kstatus' status watcher does: one watch per resource and namespace among
//! the objects (a LIST, then a WATCH that the API server streams changes on), whatever
//! their number, instead of a GET per object every half second. A resource and namespace
//! with a single object is watched by name (`metadata.name=` field selector), so an
//! unrelated crowd of the same kind is never listed. Statuses that depend on time (a Pod
//! gets 15 s to be scheduled) are judged again every second from what the watch last
//! delivered, without a request.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, DynamicObject};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher;
use serde_json::Value;

use crate::cluster::Cluster;
use crate::live::{self, Live, Tracked};
use sluice_model::object::ObjRef;

/// kstatus statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Status {
    /// Reconciled and healthy.
    Current,
    /// Still progressing.
    InProgress,
    /// Will not become healthy without a change.
    Failed,
    /// Being deleted.
    Terminating,
    /// Does not exist.
    NotFound,
    /// Its status could not be computed (kstatus' `Unknown`, e.g. a Pod phase it does not
    /// know).
    Unknown,
}

/// Health after a wait, per object.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Health {
    /// Which object.
    pub obj: ObjRef,
    /// Its last status.
    pub status: Status,
    /// Why, when not Current.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// What [`compute`] decides about one object: kstatus' `Result`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Computed {
    /// The status.
    pub status: Status,
    /// kstatus' reason for InProgress and Failed (`LessReplicas`, `NoIPAssigned`, …).
    pub reason: Option<String>,
    /// A sentence for people.
    pub message: String,
}

pub use crate::cluster::live_value;

/// What a wait holds of a delivered object until that object is judged ready: the
/// [`kstatus_input`] of its [`live_value`], taken from the object without copying the rest.
pub(crate) fn judged_value(o: DynamicObject, ar: &kube::api::ApiResource) -> Value {
    let DynamicObject {
        metadata, mut data, ..
    } = o;
    let mut v = serde_json::Map::new();
    v.insert("apiVersion".into(), ar.api_version.clone().into());
    v.insert("kind".into(), ar.kind.clone().into());
    let mut meta = serde_json::Map::new();
    if let Some(name) = metadata.name {
        meta.insert("name".into(), name.into());
    }
    if let Some(generation) = metadata.generation {
        meta.insert("generation".into(), generation.into());
    }
    for (key, time) in [
        ("creationTimestamp", metadata.creation_timestamp),
        ("deletionTimestamp", metadata.deletion_timestamp),
    ] {
        if let Some(t) = time.and_then(|t| serde_json::to_value(t).ok()) {
            meta.insert(key.into(), t);
        }
    }
    v.insert("metadata".into(), meta.into());
    for key in ["spec", "status"] {
        if let Some(x) = data.get_mut(key) {
            v.insert(key.into(), x.take());
        }
    }
    kstatus_input(Value::Object(v))
}

/// The parts of an object that [`compute`] reads, and nothing else: its type, the
/// metadata kstatus judges by (generation, creation and deletion times), `spec`'s scalars
/// and `updateStrategy` (never a pod template or a CRD's schemas), and `status`. A
/// Deployment shrinks from kilobytes to a few hundred bytes, a ConfigMap to its name.
fn kstatus_input(mut v: Value) -> Value {
    let mut out = serde_json::Map::new();
    for key in ["apiVersion", "kind", "status"] {
        if let Some(x) = v.get_mut(key) {
            out.insert(key.into(), x.take());
        }
    }
    if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        let kept: serde_json::Map<String, Value> = [
            "name",
            "generation",
            "creationTimestamp",
            "deletionTimestamp",
        ]
        .into_iter()
        .filter_map(|k| Some((k.to_string(), meta.remove(k)?)))
        .collect();
        out.insert("metadata".into(), Value::Object(kept));
    }
    if let Some(spec) = v.get_mut("spec").and_then(Value::as_object_mut) {
        let kept: serde_json::Map<String, Value> = std::mem::take(spec)
            .into_iter()
            .filter(|(k, x)| !(x.is_object() || x.is_array()) || k == "updateStrategy")
            .collect();
        out.insert("spec".into(), Value::Object(kept));
    }
    Value::Object(out)
}

/// The kstatus status of a live object, with its message when it is not Current.
pub fn status(live: &Value) -> (Status, Option<String>) {
    let c = compute(live, std::time::SystemTime::now());
    match c.status {
        Status::Current => (Status::Current, None),
        s => (s, Some(c.message)),
    }
}

/// kstatus' `Compute` (sigs.k8s.io/cli-utils v0.37.2, what agentk waited with), ported rule
/// for rule: deletion, then generation, then the `Reconciling`/`Stalled` conditions, then
/// the rules of the built-in kinds kstatus knows, then a `Ready` condition, else Current.
/// `now` is only read for a Pod that cannot be scheduled (15 s of grace).
pub fn compute(live: &Value, now: std::time::SystemTime) -> Computed {
    if let Some(c) = generic(live) {
        return c;
    }
    let group = sluice_model::object::group_of(live["apiVersion"].as_str().unwrap_or_default());
    let kind = live["kind"].as_str().unwrap_or_default();
    let rule: Option<fn(&Value, std::time::SystemTime) -> Computed> = match (group, kind) {
        ("", "Service") => Some(|o, _| service(o)),
        ("", "Pod") => Some(pod),
        ("", "Secret" | "ConfigMap") | ("batch", "CronJob") => {
            Some(|_, _| current("Resource is always ready"))
        }
        ("", "PersistentVolumeClaim") => Some(|o, _| pvc(o)),
        ("apps", "StatefulSet") => Some(|o, _| statefulset(o)),
        ("apps" | "extensions", "DaemonSet") => Some(|o, _| daemonset(o)),
        ("apps" | "extensions", "Deployment") => Some(|o, _| deployment(o)),
        ("apps" | "extensions", "ReplicaSet") => Some(|o, _| replicaset(o)),
        ("policy", "PodDisruptionBudget") => {
            Some(|_, _| current("AllowedDisruptions has been computed."))
        }
        ("batch", "Job") => Some(|o, _| job(o)),
        ("apiextensions.k8s.io", "CustomResourceDefinition") => Some(|o, _| crd(o)),
        _ => None,
    };
    if let Some(rule) = rule {
        return rule(live, now);
    }
    if let Some(c) = conditions(live).find(|c| c["type"] == "Ready") {
        match c["status"].as_str() {
            Some("True") => return current("Resource is Ready"),
            Some("False" | "Unknown") => {
                return in_progress(str_of(&c["reason"]), str_of(&c["message"]));
            }
            _ => {}
        }
    }
    current("Resource is current")
}

fn current(message: &str) -> Computed {
    Computed {
        status: Status::Current,
        reason: None,
        message: message.into(),
    }
}

fn in_progress(reason: &str, message: impl Into<String>) -> Computed {
    Computed {
        status: Status::InProgress,
        reason: Some(reason.into()),
        message: message.into(),
    }
}

fn failed(reason: &str, message: impl Into<String>) -> Computed {
    Computed {
        status: Status::Failed,
        reason: Some(reason.into()),
        message: message.into(),
    }
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

/// kstatus' `GetIntField`: integers only; anything else is the default.
fn int(v: &Value, default: i64) -> i64 {
    v.as_i64().unwrap_or(default)
}

fn conditions(live: &Value) -> impl Iterator<Item = &Value> {
    live["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
}

/// kstatus' `checkGenericProperties`.
fn generic(live: &Value) -> Option<Computed> {
    if live["metadata"]["deletionTimestamp"]
        .as_str()
        .is_some_and(|t| !t.is_empty())
    {
        return Some(Computed {
            status: Status::Terminating,
            reason: None,
            message: "Resource scheduled for deletion".into(),
        });
    }
    if let (Some(g), Some(o)) = (
        live["metadata"]["generation"].as_i64(),
        live["status"]["observedGeneration"].as_i64(),
    ) && g != o
    {
        let kind = str_of(&live["kind"]);
        return Some(in_progress(
            "LatestGenerationNotObserved",
            format!("{kind} generation is {g}, but latest observed generation is {o}"),
        ));
    }
    for c in conditions(live) {
        if c["status"] == "True" && c["type"] == "Reconciling" {
            return Some(in_progress(str_of(&c["reason"]), str_of(&c["message"])));
        }
        if c["status"] == "True" && c["type"] == "Stalled" {
            return Some(failed(str_of(&c["reason"]), str_of(&c["message"])));
        }
    }
    None
}

fn service(o: &Value) -> Computed {
    let kind = o["spec"]["type"].as_str().unwrap_or("ClusterIP");
    // A LoadBalancer Service is Current once it has a cluster IP, whether or not a load
    // balancer controller ever gives it an ingress (most bare-metal clusters have none).
    if kind == "LoadBalancer" && str_of(&o["spec"]["clusterIP"]).is_empty() {
        return in_progress(
            "NoIPAssigned",
            "ClusterIP not set. Service type: LoadBalancer",
        );
    }
    current("Service is ready")
}

fn pvc(o: &Value) -> Computed {
    let phase = o["status"]["phase"].as_str().unwrap_or("unknown");
    if phase != "Bound" {
        return in_progress("NotBound", format!("PVC is not Bound. phase: {phase}"));
    }
    current("PVC is Bound")
}

fn pod(o: &Value, now: std::time::SystemTime) -> Computed {
    let is = |t: &str, s: &str| conditions(o).find(|c| c["type"] == t && c["status"] == s);
    match str_of(&o["status"]["phase"]) {
        "Succeeded" => current("Pod has completed successfully"),
        "Failed" => current("Pod has completed, but not successfully"),
        "Running" => {
            if is("Ready", "True").is_some() {
                return current("Pod is Ready");
            }
            let looping: Vec<&str> = o["status"]["containerStatuses"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|cs| cs["state"]["waiting"]["reason"] == "CrashLoopBackOff")
                .filter_map(|cs| cs["name"].as_str())
                .collect();
            if !looping.is_empty() {
                return failed(
                    "ContainerCrashLooping",
                    format!("Containers in CrashLoop state: {}", looping.join(",")),
                );
            }
            in_progress("PodRunningNotReady", "Pod is running but is not Ready")
        }
        "Pending" => match is("PodScheduled", "False") {
            Some(c) if c["reason"] == "Unschedulable" => {
                let created = o["metadata"]["creationTimestamp"]
                    .as_str()
                    .and_then(|t| humantime::parse_rfc3339_weak(t).ok());
                if created.is_some_and(|t| now < t + Duration::from_secs(15)) {
                    in_progress("PodNotScheduled", "Pod has not been scheduled")
                } else {
                    failed("PodUnschedulable", "Pod could not be scheduled")
                }
            }
            _ => in_progress("PodPending", "Pod is in the Pending phase"),
        },
        "" => in_progress("PodNotObserved", "Pod phase not available"),
        other => Computed {
            status: Status::Unknown,
            reason: None,
            message: format!("unknown phase {other}"),
        },
    }
}

fn statefulset(o: &Value) -> Computed {
    let (spec, s) = (&o["spec"], &o["status"]);
    if spec["updateStrategy"]["type"] == "OnDelete" {
        return current("StatefulSet is using the ondelete update strategy");
    }
    let want = int(&spec["replicas"], 1);
    let ready = int(&s["readyReplicas"], 0);
    let current_ = int(&s["currentReplicas"], 0);
    let updated = int(&s["updatedReplicas"], 0);
    let replicas = int(&s["replicas"], 0);
    let partition = int(&spec["updateStrategy"]["rollingUpdate"]["partition"], -1);
    if want > replicas {
        return in_progress("LessReplicas", format!("Replicas: {replicas}/{want}"));
    }
    if want > ready {
        return in_progress("LessReady", format!("Ready: {ready}/{want}"));
    }
    if replicas > want {
        return in_progress(
            "ExtraPods",
            format!("Pending termination: {}", replicas - want),
        );
    }
    if partition != -1 {
        if updated < want - partition {
            return in_progress(
                "PartitionRollout",
                format!("updated: {updated}/{}", want - partition),
            );
        }
        return current("Partition rollout complete");
    }
    if want > current_ {
        return in_progress("LessCurrent", format!("current: {current_}/{want}"));
    }
    if s["currentRevision"].as_str().unwrap_or_default()
        != s["updateRevision"].as_str().unwrap_or_default()
    {
        return in_progress(
            "RevisionMismatch",
            "Waiting for updated revision to match current",
        );
    }
    current("All replicas scheduled as expected")
}

fn deployment(o: &Value) -> Computed {
    let (spec, s) = (&o["spec"], &o["status"]);
    // Without progressDeadlineSeconds the controller sets no Progressing condition.
    let mut progressing =
        int(&spec["progressDeadlineSeconds"], i64::from(i32::MAX)) == i64::from(i32::MAX);
    let mut available = false;
    for c in conditions(o) {
        match str_of(&c["type"]) {
            "Progressing" => {
                if c["reason"] == "ProgressDeadlineExceeded" {
                    return failed("ProgressDeadlineExceeded", "Progress deadline exceeded");
                }
                if c["status"] == "True" && c["reason"] == "NewReplicaSetAvailable" {
                    progressing = true;
                }
            }
            "Available" if c["status"] == "True" => available = true,
            _ => {}
        }
    }
    let want = int(&spec["replicas"], 1);
    let replicas = int(&s["replicas"], 0);
    let updated = int(&s["updatedReplicas"], 0);
    let ready = int(&s["readyReplicas"], 0);
    let avail = int(&s["availableReplicas"], 0);
    if want > replicas {
        return in_progress("LessReplicas", format!("Replicas: {replicas}/{want}"));
    }
    if want > updated {
        return in_progress("LessUpdated", format!("Updated: {updated}/{want}"));
    }
    if replicas > want {
        return in_progress(
            "ExtraPods",
            format!("Pending termination: {}", replicas - want),
        );
    }
    if updated > avail {
        return in_progress("LessAvailable", format!("Available: {avail}/{updated}"));
    }
    if want > ready {
        return in_progress("LessReady", format!("Ready: {ready}/{want}"));
    }
    if !progressing {
        return in_progress("ReplicaSetNotAvailable", "ReplicaSet not Available");
    }
    if !available {
        return in_progress("DeploymentNotAvailable", "Deployment not Available");
    }
    current("Deployment is available")
}

fn replicaset(o: &Value) -> Computed {
    let (spec, s) = (&o["spec"], &o["status"]);
    if conditions(o).any(|c| c["type"] == "ReplicaFailure" && c["status"] == "True") {
        return in_progress("ReplicaFailure", "Replica Failure condition. Check Pods");
    }
    let want = int(&spec["replicas"], 1);
    let replicas = int(&s["replicas"], 0);
    let ready = int(&s["readyReplicas"], 0);
    let avail = int(&s["availableReplicas"], 0);
    let labelled = int(&s["fullyLabeledReplicas"], 0);
    if want > labelled {
        return in_progress("LessLabelled", format!("Labelled: {labelled}/{want}"));
    }
    if want > avail {
        return in_progress("LessAvailable", format!("Available: {avail}/{want}"));
    }
    if want > ready {
        return in_progress("LessReady", format!("Ready: {ready}/{want}"));
    }
    if replicas > want {
        return in_progress(
            "ExtraPods",
            format!("Pending termination: {}", replicas - want),
        );
    }
    current("ReplicaSet is available")
}

fn daemonset(o: &Value) -> Computed {
    let kind = str_of(&o["kind"]);
    // A DaemonSet the controller has seen always has both fields.
    if !o["metadata"]["generation"].is_i64() {
        return in_progress(
            "NoGeneration",
            format!("{kind} metadata.generation not found"),
        );
    }
    if !o["status"]["observedGeneration"].is_i64() {
        return in_progress(
            "NoObservedGeneration",
            format!("{kind} status.observedGeneration not found"),
        );
    }
    let s = &o["status"];
    let desired = int(&s["desiredNumberScheduled"], -1);
    if desired == -1 {
        return in_progress("NoDesiredNumber", "Missing .status.desiredNumberScheduled");
    }
    for (field, reason, label) in [
        ("currentNumberScheduled", "LessCurrent", "Current"),
        ("updatedNumberScheduled", "LessUpdated", "Updated"),
        ("numberAvailable", "LessAvailable", "Available"),
        ("numberReady", "LessReady", "Ready"),
    ] {
        let n = int(&s[field], 0);
        if desired > n {
            return in_progress(reason, format!("{label}: {n}/{desired}"));
        }
    }
    current("All replicas scheduled as expected")
}

fn job(o: &Value) -> Computed {
    for c in conditions(o) {
        match (str_of(&c["type"]), str_of(&c["status"])) {
            ("Complete", "True") => return current("Job Completed"),
            ("Failed", "True") => {
                let failed_pods = int(&o["status"]["failed"], 0);
                return failed("JobFailed", format!("Job Failed. failed: {failed_pods}"));
            }
            _ => {}
        }
    }
    if str_of(&o["status"]["startTime"]).is_empty() {
        return in_progress("JobNotStarted", "Job not started");
    }
    current("Job in progress")
}

fn crd(o: &Value) -> Computed {
    for c in conditions(o) {
        let (t, s, reason) = (
            str_of(&c["type"]),
            str_of(&c["status"]),
            str_of(&c["reason"]),
        );
        if t == "NamesAccepted" && s == "False" {
            return failed(reason, str_of(&c["message"]));
        }
        if t == "Established" {
            if s == "False" && reason != "Installing" {
                return failed(reason, str_of(&c["message"]));
            }
            if s == "True" {
                return current("CRD is established");
            }
        }
    }
    in_progress("Installing", "Install in progress")
}

/// The message of an object that [`wait_current`] saw and then saw deleted.
pub const DELETED_DURING_WAIT: &str = "deleted while waiting for it to become ready";

/// Watches until every object is Current or Failed, or until `timeout` (zero: no limit).
///
/// `objects` are what the sync just applied (or found unchanged), so each existed before
/// the wait began: one absent (deleted by someone else, before the wait's first list or
/// during the wait) is Failed at once, rather than awaited until the deadline: the next
/// sync recreates it.
pub async fn wait_current(cluster: &Cluster, objects: &[ObjRef], timeout: Duration) -> Vec<Health> {
    watch(
        cluster,
        objects,
        timeout,
        Some(DELETED_DURING_WAIT),
        |live| match live {
            Some(v) => status(v),
            None => (Status::NotFound, Some("not found".into())),
        },
        |s| matches!(s, Status::Current | Status::Failed),
    )
    .await
}

/// Watches until every object is NotFound, or until `timeout` (zero: no limit).
pub async fn wait_gone(cluster: &Cluster, objects: &[ObjRef], timeout: Duration) -> Vec<Health> {
    watch(
        cluster,
        objects,
        timeout,
        None,
        |live| match live {
            Some(_) => (Status::Terminating, None),
            None => (Status::NotFound, None),
        },
        |s| s == Status::NotFound,
    )
    .await
}

/// Waits as [`wait_current`] does, reading the agent's [`Live`] watches instead of listing
/// the objects again: a push's sync that changed one object of 10,000 lists nothing.
/// `written` holds the resourceVersion each write of this sync returned, all of them
/// returned by `wrote`; an object the sync wrote is judged only once the watches caught up
/// with its write ([`live::caught_up`]), so a state from before the write is never taken
/// for its health. The watches must track `objects` (`tracked`, from [`Live::track`]).
pub async fn wait_live(
    live: &Live,
    tracked: &Tracked,
    objects: &[ObjRef],
    written: &HashMap<ObjRef, Box<str>>,
    wrote: std::time::Instant,
    timeout: Duration,
) -> Vec<Health> {
    // Subscribed before the first look: no change falls between the two.
    let mut notices = live.subscribe();
    let deadline = (!timeout.is_zero()).then(|| tokio::time::Instant::now() + timeout);
    let mut health: Vec<Health> = objects
        .iter()
        .map(|o| Health {
            obj: o.clone(),
            status: Status::InProgress,
            message: None,
        })
        .collect();
    let done = |s: Status| matches!(s, Status::Current | Status::Failed);
    let index = live::Index::new(
        tracked
            .scopes
            .iter()
            .zip(objects)
            .map(|(s, o)| (s.as_deref(), o.namespace.as_str(), o.name.as_str())),
    );
    // Whether the watches caught up with the object's write (those not written: at once).
    let mut caught: Vec<bool> = objects.iter().map(|o| !written.contains_key(o)).collect();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut dirty: Vec<usize> = (0..objects.len()).collect();
    let mut remaining = objects.len();
    let mut closed = false;
    loop {
        for i in dirty.drain(..) {
            if done(health[i].status) {
                continue;
            }
            let h = &mut health[i];
            (h.status, h.message) = match &tracked.scopes[i] {
                // A kind the cluster does not serve: nothing of it exists.
                None => (Status::NotFound, Some("not found".into())),
                Some(scope) => live.with(
                    scope,
                    &scope.key(&objects[i].namespace, &objects[i].name),
                    |seen| {
                        if !caught[i]
                            && let Some(version) = written.get(&objects[i])
                        {
                            caught[i] = live::caught_up(&seen, version, wrote);
                        }
                        match seen {
                            live::Seen::Unlisted { error } => (
                                Status::InProgress,
                                Some(match error {
                                    Some(e) => format!("failed to watch: {e}"),
                                    None => "waiting for the watch's first list".into(),
                                }),
                            ),
                            _ if !caught[i] => (
                                Status::InProgress,
                                Some("waiting for the watch to deliver the applied object".into()),
                            ),
                            // It existed when the wait began (applied or found unchanged).
                            live::Seen::Absent { .. } => {
                                (Status::Failed, Some(DELETED_DURING_WAIT.to_string()))
                            }
                            live::Seen::Present(entry) => match serde_json::from_str(&entry.judged)
                            {
                                Ok(v) => status(&v),
                                Err(e) => (Status::Unknown, Some(format!("unreadable state: {e}"))),
                            },
                        }
                    },
                ),
            };
            if done(h.status) {
                remaining -= 1;
            }
        }
        if remaining == 0 {
            return health;
        }
        let expired = until(deadline);
        tokio::select! {
            // (Once the watches are gone with the agent, the ticks still judge.)
            notice = notices.recv(), if !closed => closed = !index.touched(notice, &mut dirty),
            // Statuses that depend on time, and anything a notice missed.
            _ = tick.tick() => dirty.extend(0..objects.len()),
            _ = expired => return health,
        }
    }
}

/// Resolves at a wait's deadline; never when it has none.
async fn until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The objects of one resource in one namespace, watched together.
struct Group {
    api: Api<DynamicObject>,
    resource: kube::api::ApiResource,
    /// Object name → index in the wait's list.
    members: HashMap<sluice_model::object::Name, usize>,
}

/// What a wait knows about each object.
struct Seen {
    /// The live object as last delivered (`None`: absent).
    live: Vec<Option<Value>>,
    /// Whether its watch has finished its first list (before that, absence means nothing).
    known: Vec<bool>,
    /// Whether the cluster serves its kind (in a wait on what was just applied, a served
    /// object that is absent was deleted).
    served: Vec<bool>,
}

async fn watch(
    cluster: &Cluster,
    objects: &[ObjRef],
    timeout: Duration,
    // When set, every object existed as the wait began, and one absent is Failed with this
    // message.
    deleted: Option<&str>,
    judge: impl Fn(Option<&Value>) -> (Status, Option<String>),
    done: impl Fn(Status) -> bool,
) -> Vec<Health> {
    let deadline = (!timeout.is_zero()).then(|| tokio::time::Instant::now() + timeout);
    let mut health: Vec<Health> = objects
        .iter()
        .map(|o| Health {
            obj: o.clone(),
            status: Status::InProgress,
            message: None,
        })
        .collect();
    let mut seen = Seen {
        live: vec![None; objects.len()],
        known: vec![false; objects.len()],
        served: vec![true; objects.len()],
    };
    let (by_resource, unserved) = cluster.by_resource(objects);
    // A kind the cluster does not serve: nothing of it exists (nor was deleted).
    for i in unserved {
        seen.known[i] = true;
        seen.served[i] = false;
    }
    let groups: Vec<Group> = by_resource
        .into_iter()
        .map(|g| Group {
            api: cluster.api(&g.resource, &g.caps, &g.namespace),
            members: g
                .members
                .iter()
                .map(|&i| (objects[i].name.clone(), i))
                .collect(),
            resource: g.resource,
        })
        .collect();
    // One group lists at a time (`cluster::list_in_turn`): one page of whole objects held.
    let turn = std::sync::Arc::new(tokio::sync::Semaphore::new(1));
    let streams = groups.iter().enumerate().map(|(g, group)| {
        let mut config = watcher::Config::default().page_size(crate::cluster::WATCH_PAGE);
        if group.members.len() == 1 {
            let name = group
                .members
                .keys()
                .next()
                .map(sluice_model::object::Name::as_str)
                .unwrap_or_default();
            config = config.fields(&format!("metadata.name={name}"));
        }
        crate::cluster::list_in_turn(
            watcher(group.api.clone(), config).default_backoff(),
            turn.clone(),
        )
        .map(move |event| (g, event))
        .boxed()
    });
    let mut events = futures::stream::select_all(streams);
    // Objects of the group whose (re)list is under way, and those it delivered so far.
    let mut listing: HashMap<usize, HashSet<usize>> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // Objects to judge again: those an event touched; all of them on each tick.
    let mut dirty: Vec<usize> = Vec::new();
    let mut remaining = objects.len();
    loop {
        for i in dirty.drain(..) {
            let h = &mut health[i];
            if seen.known[i] && !done(h.status) {
                (h.status, h.message) = match (&seen.live[i], deleted) {
                    (None, Some(message)) if seen.served[i] => {
                        (Status::Failed, Some(message.to_string()))
                    }
                    (live, _) => judge(live.as_ref()),
                };
                if done(h.status) {
                    remaining -= 1;
                    seen.live[i] = None;
                }
            }
        }
        if remaining == 0 {
            return health;
        }
        let expired = until(deadline);
        tokio::select! {
            event = events.next() => {
                let Some((g, event)) = event else {
                    // No watch at all (every kind unserved) and something not done yet:
                    // nothing will change; wait for the deadline.
                    until(deadline).await;
                    return health;
                };
                let members = &groups[g].members;
                let index = |o: &DynamicObject| o.metadata.name.as_deref().and_then(|n| members.get(n)).copied();
                match event {
                    Ok(watcher::Event::Init) => {
                        listing.insert(g, HashSet::new());
                    }
                    Ok(watcher::Event::InitApply(o)) => {
                        if let Some(i) = index(&o) {
                            listing.entry(g).or_default().insert(i);
                            // As for Apply: a judged object (on a re-list) needs no value.
                            if !done(health[i].status) {
                                seen.live[i] = Some(judged_value(o, &groups[g].resource));
                                dirty.push(i);
                            }
                        }
                    }
                    Ok(watcher::Event::InitDone) => {
                        let delivered = listing.remove(&g).unwrap_or_default();
                        for &i in members.values() {
                            if !delivered.contains(&i) {
                                seen.live[i] = None;
                            }
                            seen.known[i] = true;
                            dirty.push(i);
                        }
                    }
                    Ok(watcher::Event::Apply(o)) => {
                        // A judged object's value is never read again: hold none.
                        if let Some(i) = index(&o).filter(|&i| !done(health[i].status)) {
                            seen.live[i] = Some(judged_value(o, &groups[g].resource));
                            dirty.push(i);
                        }
                    }
                    Ok(watcher::Event::Delete(o)) => {
                        if let Some(i) = index(&o) {
                            seen.live[i] = None;
                            dirty.push(i);
                        }
                    }
                    Err(e) => {
                        // The watch retries with backoff; say why it is not progressing.
                        for &i in members.values() {
                            if !done(health[i].status) {
                                health[i].message = Some(format!("failed to watch: {e}"));
                            }
                        }
                    }
                }
            }
            _ = tick.tick() => dirty.extend(0..objects.len()),
            _ = expired => return health,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Every case of kstatus' own table (`wait/kstatus_cases.yaml`) computes the same
    /// status and reason here.
    /// Items of a LIST or WATCH carry no kind: judged without it, a Deployment that no
    /// controller has seen yet looked Current.
    #[test]
    fn a_listed_object_is_judged_by_its_resources_kind() {
        let listed: DynamicObject = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "dev", "generation": 1},
            "spec": {"replicas": 3}
        }))
        .expect("object");
        let ar = kube::api::ApiResource {
            group: "apps".into(),
            version: "v1".into(),
            api_version: "apps/v1".into(),
            kind: "Deployment".into(),
            plural: "deployments".into(),
        };
        let (s, message) = status(&live_value(&listed, &ar));
        assert_eq!(s, Status::InProgress, "{message:?}");
        // What a wait holds is what kstatus reads of the whole object.
        let full: DynamicObject = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "dev", "generation": 2,
                "creationTimestamp": "2026-01-01T00:00:00Z",
                "deletionTimestamp": "2026-01-02T00:00:00Z",
                "labels": {"app": "web"}, "managedFields": [{"manager": "m"}]},
            "spec": {"replicas": 3, "template": {"spec": {}}},
            "status": {"observedGeneration": 2, "replicas": 3}
        }))
        .expect("object");
        let held = judged_value(full.clone(), &ar);
        assert_eq!(held, kstatus_input(live_value(&full, &ar)));
        assert_eq!(
            held["metadata"]["deletionTimestamp"],
            "2026-01-02T00:00:00Z"
        );
        assert_eq!(
            status(&serde_json::to_value(&listed).expect("json")).0,
            Status::Current,
            "without its kind, kstatus' generic rules find nothing wrong"
        );
    }

    #[test]
    fn kstatus_cases() {
        let text = include_str!("wait/kstatus_cases.yaml");
        // Read as kstatus' tests read them (sigs.k8s.io/yaml: a repeated key keeps its last
        // value; some fixtures repeat one).
        let options = serde_saphyr::options! {
            duplicate_keys: serde_saphyr::options::DuplicateKeyPolicy::LastWins,
        };
        let cases: Vec<Value> =
            serde_saphyr::from_multiple_with_options(text, options).expect("cases parse");
        assert_eq!(cases.len(), 52);
        let mut wrong = Vec::new();
        for case in &cases {
            let now = std::time::SystemTime::now();
            let got = compute(&case["object"], now);
            // A wait judges what it holds: the same judgement, from a fraction of the object.
            let held = kstatus_input(case["object"].clone());
            assert_eq!(
                compute(&held, now),
                got,
                "{}: judged from {held}",
                case["name"]
            );
            let want_status = case["status"].as_str().expect("status");
            if format!("{:?}", got.status) != want_status
                || got.reason.as_deref() != case["reason"].as_str()
            {
                wrong.push(format!(
                    "{}: want {want_status} {:?}, got {:?} {:?}",
                    case["name"], case["reason"], got.status, got.reason
                ));
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    #[test]
    fn a_wait_holds_no_pod_template_data_or_annotations() {
        let deployment = json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "d", "namespace": "n", "generation": 2,
                "annotations": {"big": "x"}, "labels": {"app": "d"}},
            "spec": {"replicas": 3, "progressDeadlineSeconds": 600,
                "selector": {"matchLabels": {"app": "d"}},
                "strategy": {"type": "RollingUpdate"},
                "template": {"spec": {"containers": [{"name": "c", "image": "i"}]}}},
            "data": {"k": "v"},
            "status": {"observedGeneration": 2, "replicas": 3}});
        assert_eq!(
            kstatus_input(deployment),
            json!({"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "d", "generation": 2},
                "spec": {"replicas": 3, "progressDeadlineSeconds": 600},
                "status": {"observedGeneration": 2, "replicas": 3}})
        );
        let sts = json!({"kind": "StatefulSet", "spec": {"updateStrategy": {"type": "OnDelete"}}});
        assert_eq!(kstatus_input(sts.clone()), sts);
    }

    #[test]
    fn a_pod_gets_fifteen_seconds_to_be_scheduled() {
        let pod = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}]}});
        let created = humantime::parse_rfc3339("2026-01-01T00:00:00Z").expect("time");
        let at = |s| compute(&pod, created + Duration::from_secs(s));
        assert_eq!(at(5).reason.as_deref(), Some("PodNotScheduled"));
        assert_eq!(at(5).status, Status::InProgress);
        assert_eq!(at(20).status, Status::Failed);
    }

    #[test]
    fn a_load_balancer_service_without_a_load_balancer_is_current() {
        let svc = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.0.0.7"}, "status": {"loadBalancer": {}}});
        assert_eq!(status(&svc), (Status::Current, None));
    }

    #[test]
    fn terminating_and_unknown() {
        assert_eq!(
            status(&json!({"kind": "X", "metadata": {"deletionTimestamp": "t"}})).0,
            Status::Terminating
        );
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {}, "status": {"phase": "Weird"}});
        assert_eq!(status(&pod).0, Status::Unknown);
    }
}
