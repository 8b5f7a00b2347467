//! `sluice status`: each project's state, read from the cluster alone (its inventory, the
//! live objects the inventory names, and the Events its syncs left; see [`sluice_agent::history`]).
//! No configuration or git access is needed: what it shows is what the cluster holds.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Event};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams};

use sluice_agent::history::{self, LastSync, SyncResult};
use sluice_engine::cluster::Cluster;
use sluice_engine::inventory::{self, INVENTORY_LABEL, OWNING_PROJECT};
use sluice_engine::wait::{self, Status};
use sluice_model::object::ObjRef;

/// Reading the state failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A read from the API server failed.
    #[error("failed to {what}: {source}")]
    Api {
        /// What was being read.
        what: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// A read took longer than its deadline.
    #[error("timed out trying to {0}")]
    Timeout(String),
    /// No inventory of that project.
    #[error("no sluice inventory of project {0:?} in the cluster")]
    NotFound(String),
}

/// One project's state.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProjectStatus {
    /// The manifest project.
    pub project: String,
    /// Its inventory: `namespace/name`.
    pub inventory: String,
    /// The inventory id.
    pub inventory_id: String,
    /// `True`, `False` or `Unknown` (as `flux get`): the last sync succeeded and every
    /// object is Current; it failed or an object Failed or is missing; objects are still
    /// progressing.
    pub ready: String,
    /// The last sync, as the agent recorded it (absent when it never recorded one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_sync: Option<LastSync>,
    /// How many objects the inventory names.
    pub objects: usize,
    /// Object counts by kstatus status (`Current`, `InProgress`, `Failed`, …).
    pub health: BTreeMap<String, usize>,
    /// Every object that is not Current, worst first.
    pub problems: Vec<ObjectStatus>,
    /// Per-object state (only for `sluice status PROJECT`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub object_status: Vec<ObjectStatus>,
    /// The Events of its syncs still held by the API server, newest first.
    pub events: Vec<EventSummary>,
}

/// One object's state.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ObjectStatus {
    /// `Kind/namespace/name`.
    pub object: String,
    /// kstatus status.
    pub status: Status,
    /// Why, when not Current.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// One Event.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EventSummary {
    /// `Normal` or `Warning`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `SyncSucceeded`, `SyncFailed`, …
    pub reason: String,
    /// When it was last seen (RFC 3339).
    pub time: String,
    /// How many times it was seen.
    pub count: i32,
    /// Its message.
    pub message: String,
}

/// How long each read may take.
const TIMEOUT: Duration = Duration::from_secs(30);

async fn read<T>(
    what: impl Into<String>,
    fut: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, Error> {
    let what = what.into();
    match tokio::time::timeout(TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(Error::Api { what, source }),
        Err(_) => Err(Error::Timeout(what)),
    }
}

/// The state of every project with a sluice inventory (in `namespace`, or in all
/// namespaces), sorted by project; with `project`, only that one, with per-object state.
///
/// # Errors
/// [`Error`] when the inventories cannot be listed, or `project` has none.
pub async fn collect(
    cluster: &Cluster,
    namespace: Option<&str>,
    project: Option<&str>,
) -> Result<Vec<ProjectStatus>, Error> {
    let api: Api<ConfigMap> = match namespace {
        Some(ns) => Api::namespaced(cluster.client().clone(), ns),
        None => Api::all(cluster.client().clone()),
    };
    let cms = read(
        "list inventory ConfigMaps",
        api.list(&ListParams::default().labels(INVENTORY_LABEL)),
    )
    .await?;
    let mut out = Vec::new();
    for cm in &cms.items {
        let annotations = cm.metadata.annotations.clone().unwrap_or_default();
        // sluice's inventories only (agentk's, not taken over yet, name no project).
        let Some(owner) = annotations.get(OWNING_PROJECT) else {
            continue;
        };
        if project.is_some_and(|p| p != owner) {
            continue;
        }
        let (Some(name), Some(ns)) = (&cm.metadata.name, &cm.metadata.namespace) else {
            continue;
        };
        let id = cm
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(INVENTORY_LABEL))
            .cloned()
            .unwrap_or_default();
        let objects: BTreeSet<ObjRef> = cm
            .data
            .iter()
            .flat_map(|d| d.keys())
            .filter_map(|k| inventory::decode_key(k).ok())
            .collect();
        let states = object_states(cluster, &objects).await?;
        let events = events(cluster, ns, name).await?;
        let last_sync = annotations
            .get(history::LAST_SYNC)
            .and_then(|t| serde_json::from_str::<LastSync>(t).ok());
        out.push(summarise(
            owner,
            &format!("{ns}/{name}"),
            &id,
            last_sync,
            states,
            events,
            project.is_some(),
        ));
    }
    if let (Some(p), true) = (project, out.is_empty()) {
        return Err(Error::NotFound(p.to_string()));
    }
    out.sort_by(|a, b| (&a.project, &a.inventory).cmp(&(&b.project, &b.inventory)));
    Ok(out)
}

/// A project's status from what was read (pure).
fn summarise(
    project: &str,
    inventory: &str,
    id: &str,
    last_sync: Option<LastSync>,
    mut states: Vec<ObjectStatus>,
    events: Vec<EventSummary>,
    detailed: bool,
) -> ProjectStatus {
    let mut health = BTreeMap::new();
    for s in &states {
        *health.entry(format!("{:?}", s.status)).or_insert(0) += 1;
    }
    states.sort_by_key(|s| (severity(s.status), s.object.clone()));
    let problems: Vec<ObjectStatus> = states
        .iter()
        .filter(|s| s.status != Status::Current)
        .cloned()
        .collect();
    let failed_sync = last_sync
        .as_ref()
        .is_none_or(|l| l.result == SyncResult::Failed);
    let ready = if failed_sync
        || problems
            .iter()
            .any(|p| matches!(p.status, Status::Failed | Status::NotFound))
    {
        "False"
    } else if problems.is_empty() {
        "True"
    } else {
        "Unknown"
    };
    ProjectStatus {
        project: project.into(),
        inventory: inventory.into(),
        inventory_id: id.into(),
        ready: ready.into(),
        last_sync,
        objects: states.len(),
        health,
        problems,
        object_status: if detailed { states } else { Vec::new() },
        events,
    }
}

/// Worst first: Failed, NotFound, Terminating, Unknown, InProgress, Current.
fn severity(s: Status) -> u8 {
    match s {
        Status::Failed => 0,
        Status::NotFound => 1,
        Status::Terminating => 2,
        Status::Unknown => 3,
        Status::InProgress => 4,
        Status::Current => 5,
    }
}

/// The kstatus state of each object: one LIST per kind and namespace, not one GET per
/// object.
async fn object_states(
    cluster: &Cluster,
    objects: &BTreeSet<ObjRef>,
) -> Result<Vec<ObjectStatus>, Error> {
    let mut groups: BTreeMap<(&str, &str, &str), Vec<&ObjRef>> = BTreeMap::new();
    for r in objects {
        groups
            .entry((&r.group, &r.kind, &r.namespace))
            .or_default()
            .push(r);
    }
    let mut out = Vec::new();
    for ((group, kind, ns), refs) in groups {
        let Some((ar, caps)) = cluster.resolve_ref(refs[0]) else {
            let why = match cluster.unavailable_group(group) {
                Some(why) => why.to_string(),
                None => format!("kind {kind} of group {group:?} is not served"),
            };
            out.extend(refs.iter().map(|r| ObjectStatus {
                object: r.to_string(),
                status: Status::Unknown,
                message: Some(why.clone()),
            }));
            continue;
        };
        let live = read(
            format!(
                "list {kind} in {}",
                if ns.is_empty() { "the cluster" } else { ns }
            ),
            cluster.api(&ar, &caps, ns).list(&ListParams::default()),
        )
        .await?;
        let by_name: BTreeMap<String, serde_json::Value> = live
            .items
            .into_iter()
            .filter_map(|o| {
                let name = o.metadata.name.clone()?;
                Some((name, wait::live_value(&o, &ar)))
            })
            .collect();
        for r in refs {
            let (status, message) = match by_name.get(r.name.as_str()) {
                Some(v) => wait::status(v),
                None => (Status::NotFound, Some("not found in the cluster".into())),
            };
            out.push(ObjectStatus {
                object: r.to_string(),
                status,
                message,
            });
        }
    }
    Ok(out)
}

/// The Events sluice published about an inventory, newest first.
async fn events(cluster: &Cluster, ns: &str, name: &str) -> Result<Vec<EventSummary>, Error> {
    let api: Api<Event> = Api::namespaced(cluster.client().clone(), ns);
    let list = read(
        format!("list the Events of {ns}/{name}"),
        api.list(&ListParams::default().fields(&format!(
            "involvedObject.kind=ConfigMap,involvedObject.name={name}"
        ))),
    )
    .await?;
    let mut events: Vec<(Timestamp, EventSummary)> = list
        .items
        .into_iter()
        .filter(|e| e.reporting_component.as_deref() == Some(history::CONTROLLER))
        .map(|e| {
            let time = e
                .series
                .as_ref()
                .and_then(|s| s.last_observed_time.as_ref().map(|t| t.0))
                .or(e.event_time.as_ref().map(|t| t.0))
                .or(e.last_timestamp.as_ref().map(|t| t.0))
                .unwrap_or(Timestamp::UNIX_EPOCH);
            let count = e
                .series
                .as_ref()
                .and_then(|s| s.count)
                .or(e.count)
                .unwrap_or(1);
            (
                time,
                EventSummary {
                    type_: e.type_.unwrap_or_default(),
                    reason: e.reason.unwrap_or_default(),
                    time: time.to_string(),
                    count,
                    message: e.message.unwrap_or_default(),
                },
            )
        })
        .collect();
    events.sort_by_key(|e| std::cmp::Reverse(e.0));
    Ok(events.into_iter().map(|(_, e)| e).collect())
}

/// `5s`, `3m`, `2h`, `4d`: kubectl's ages.
pub fn age(since: &str, now: Timestamp) -> String {
    let Ok(t) = since.parse::<Timestamp>() else {
        return "-".into();
    };
    let secs = now.duration_since(t).as_secs().max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// The status table, like `flux get kustomizations`; a REPLICA column (who ran the last
/// sync: the owner of the project's shard) when the agent runs as several replicas.
pub fn table(projects: &[ProjectStatus], now: Timestamp) -> String {
    let mut rows = vec![vec![
        "PROJECT".to_string(),
        "INVENTORY".into(),
        "REVISION".into(),
        "READY".into(),
        "OBJECTS".into(),
        "LAST SYNC".into(),
        "REPLICA".into(),
        "MESSAGE".into(),
    ]];
    for p in projects {
        let revision = p
            .last_sync
            .as_ref()
            .and_then(|l| l.synced_commit.as_deref())
            .map(|c| c.get(..12).unwrap_or(c).to_string())
            .unwrap_or_else(|| "-".into());
        let last = p
            .last_sync
            .as_ref()
            .map(|l| format!("{} ago", age(&l.time, now)))
            .unwrap_or_else(|| "-".into());
        let replica = p.last_sync.as_ref().and_then(|l| l.replica.clone());
        rows.push(vec![
            p.project.clone(),
            p.inventory.clone(),
            revision,
            p.ready.clone(),
            objects_column(p),
            last,
            replica.unwrap_or_else(|| "-".into()),
            message(p),
        ]);
    }
    if rows.iter().skip(1).all(|r| r[6] == "-") {
        for r in &mut rows {
            r.remove(6);
        }
    }
    render(&rows)
}

/// `42 (40 Current, 2 InProgress)`.
fn objects_column(p: &ProjectStatus) -> String {
    let mut by: Vec<(&String, &usize)> = p.health.iter().collect();
    by.sort_by_key(|(k, n)| (std::cmp::Reverse(**n), (*k).clone()));
    let parts: Vec<String> = by.iter().map(|(k, n)| format!("{n} {k}")).collect();
    if parts.is_empty() {
        "0".into()
    } else {
        format!("{} ({})", p.objects, parts.join(", "))
    }
}

/// The one-line message: the failure, else the first problem, else what the sync did.
fn message(p: &ProjectStatus) -> String {
    let text = match &p.last_sync {
        Some(l) if l.result == SyncResult::Failed => format!(
            "sync of {} failed: {}",
            l.commit.get(..12).unwrap_or(&l.commit),
            l.message.as_deref().unwrap_or_default()
        ),
        _ if !p.problems.is_empty() => {
            let first = &p.problems[0];
            format!(
                "{} is {:?}{}",
                first.object,
                first.status,
                first
                    .message
                    .as_ref()
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default()
            )
        }
        Some(l) => {
            let counts: Vec<String> = l.counts.iter().map(|(k, n)| format!("{k} {n}")).collect();
            format!("applied: {}", counts.join(", "))
        }
        None => "no sync recorded".into(),
    };
    shorten(&text, 100)
}

fn shorten(text: &str, max: usize) -> String {
    let line = text.lines().next().unwrap_or_default();
    if line.chars().count() <= max {
        return line.to_string();
    }
    let cut: String = line.chars().take(max - 1).collect();
    format!("{cut}…")
}

/// `sluice status PROJECT`: the project's row, then one row per object, then its Events.
pub fn detail(p: &ProjectStatus, now: Timestamp) -> String {
    let mut out = table(std::slice::from_ref(p), now);
    out.push('\n');
    let mut rows = vec![vec![
        "OBJECT".to_string(),
        "STATUS".into(),
        "MESSAGE".into(),
    ]];
    for s in &p.object_status {
        rows.push(vec![
            s.object.clone(),
            format!("{:?}", s.status),
            shorten(s.message.as_deref().unwrap_or_default(), 100),
        ]);
    }
    out.push_str(&render(&rows));
    if !p.events.is_empty() {
        out.push('\n');
        let mut rows = vec![vec![
            "TYPE".to_string(),
            "REASON".into(),
            "AGE".into(),
            "MESSAGE".into(),
        ]];
        for e in &p.events {
            let age = age(&e.time, now);
            rows.push(vec![
                e.type_.clone(),
                e.reason.clone(),
                if e.count > 1 {
                    format!("{age} (x{})", e.count)
                } else {
                    age
                },
                shorten(&e.message, 120),
            ]);
        }
        out.push_str(&render(&rows));
    }
    out
}

/// Left-aligned columns separated by three spaces, like kubectl's tables.
fn render(rows: &[Vec<String>]) -> String {
    let n = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..n)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i + 1 == n {
                    c.clone()
                } else {
                    format!("{c:<w$}", w = widths[i])
                }
            })
            .collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(name: &str, status: Status) -> ObjectStatus {
        ObjectStatus {
            object: format!("Deployment/web/{name}"),
            status,
            message: (status != Status::Current).then(|| format!("{name} is not ready")),
        }
    }

    fn last(result: SyncResult) -> LastSync {
        LastSync {
            result,
            commit: "0123456789abcdef".into(),
            synced_commit: Some("0123456789abcdef".into()),
            time: "2026-11-25T10:00:00Z".into(),
            duration_seconds: 1.0,
            counts: [("unchanged".to_string(), 2)].into(),
            message: (result == SyncResult::Failed).then(|| "1 objects failed".into()),
            replica: None,
        }
    }

    #[test]
    fn readiness_follows_the_last_sync_and_the_worst_object() {
        let ready = |l: Option<LastSync>, states: Vec<ObjectStatus>| {
            summarise("p", "ns/inv", "id", l, states, Vec::new(), false).ready
        };
        let ok = || Some(last(SyncResult::Succeeded));
        assert_eq!(ready(ok(), vec![obj("a", Status::Current)]), "True");
        assert_eq!(
            ready(
                ok(),
                vec![obj("a", Status::InProgress), obj("b", Status::Current)]
            ),
            "Unknown"
        );
        assert_eq!(ready(ok(), vec![obj("a", Status::Failed)]), "False");
        assert_eq!(ready(ok(), vec![obj("a", Status::NotFound)]), "False");
        assert_eq!(
            ready(
                Some(last(SyncResult::Failed)),
                vec![obj("a", Status::Current)]
            ),
            "False"
        );
        assert_eq!(ready(None, vec![]), "False");
    }

    #[test]
    fn the_table_reads_like_flux_get() {
        let now: Timestamp = "2026-11-25T10:02:30Z".parse().unwrap();
        let p = summarise(
            "group/app",
            "web/inventory-x",
            "x",
            Some(last(SyncResult::Succeeded)),
            vec![obj("b", Status::InProgress), obj("a", Status::Current)],
            Vec::new(),
            false,
        );
        assert_eq!(p.problems.len(), 1);
        assert_eq!(
            table(&[p], now),
            "PROJECT     INVENTORY         REVISION       READY     OBJECTS                       LAST SYNC   MESSAGE\n\
             group/app   web/inventory-x   0123456789ab   Unknown   2 (1 Current, 1 InProgress)   2m ago      Deployment/web/b is InProgress: b is not ready\n"
        );
        assert_eq!(age("2026-11-25T10:02:25Z", now), "5s");
        assert_eq!(age("2026-11-23T10:02:30Z", now), "2d");
        assert_eq!(age("garbage", now), "-");
    }
}
