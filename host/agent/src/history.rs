//! The history a project's syncs leave in the cluster, for people and for `sluice status`:
//!
//! - Kubernetes Events (kube's events recorder, `events.k8s.io/v1`) on the project's
//!   inventory ConfigMap, so `kubectl describe configmap inventory-…` shows what the agent
//!   did: `SyncSucceeded` and `SyncFailed` with counts, `Pruned`, `PruneHeld`,
//!   `CommitRefused` (a plugin refused the commit) and `InventoryTakenOver`.
//! - The outcome of the last sync in the inventory's [`LAST_SYNC`] annotation (Events expire
//!   after the API server's event TTL, one hour by default; the annotation stays).
//!
//! History is written only to the project's own inventory, or about one that does not exist
//! yet (a first sync that failed): never to a ConfigMap another project or tool owns.
//! Writing it never fails a sync; a failed write is logged.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

use crate::report::short;
use crate::sync::{self, Report};
use sluice_engine::apply::Action;
use sluice_engine::inventory::{INVENTORY_LABEL, InventoryRef, OWNING_PROJECT};

/// Annotation on an inventory ConfigMap holding its project's last sync ([`LastSync`], JSON).
pub const LAST_SYNC: &str = "sluice.dev/last-sync";

/// The `reportingController` of sluice's Events.
pub const CONTROLLER: &str = "sluice.dev/agent";

/// Event reasons.
pub mod reason {
    /// A sync applied the commit and everything became healthy.
    pub const SYNC_SUCCEEDED: &str = "SyncSucceeded";
    /// A sync failed.
    pub const SYNC_FAILED: &str = "SyncFailed";
    /// A plugin refused the commit; nothing was applied.
    pub const COMMIT_REFUSED: &str = "CommitRefused";
    /// Objects that left git were deleted.
    pub const PRUNED: &str = "Pruned";
    /// Pruning was held back this sync.
    pub const PRUNE_HELD: &str = "PruneHeld";
    /// An agentk inventory was adopted and retired.
    pub const TAKEN_OVER: &str = "InventoryTakenOver";
    /// Plugins reported findings that did not block the commit (warnings, audit mode,
    /// Gatekeeper's `warn` and `dryrun`).
    pub const FINDINGS: &str = "PluginFindings";
}

/// The outcome of a project's last sync, as [`LAST_SYNC`] stores it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LastSync {
    /// `Succeeded` or `Failed`.
    pub result: SyncResult,
    /// The commit it was for.
    pub commit: String,
    /// The last commit that synced successfully (after a failure, an older one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synced_commit: Option<String>,
    /// When it finished (RFC 3339).
    pub time: String,
    /// How long it took, in seconds.
    pub duration_seconds: f64,
    /// Objects per action (`created`, `unchanged`, `pruned`, …).
    #[serde(default)]
    pub counts: BTreeMap<String, usize>,
    /// Why it failed (shortened to 1 KiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The replica that ran it (its pod name), when known: with work shared across
    /// replicas, the one that owns the project.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
}

/// Whether a sync succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SyncResult {
    /// Applied, pruned and healthy.
    Succeeded,
    /// Anything else.
    Failed,
}

/// What a sync came to.
#[derive(Debug)]
pub struct Outcome<'a> {
    /// The project.
    pub project: &'a str,
    /// The commit (as the worker resolved it).
    pub commit: &'a str,
    /// The inventory the project uses by default (a report names the one it used).
    pub inventory: &'a InventoryRef,
    /// How long it took.
    pub elapsed: Duration,
    /// The report, or the error.
    pub result: Result<&'a Report, &'a sync::Error>,
}

/// One Event to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// Normal or warning.
    pub warning: bool,
    /// `reason::*`.
    pub reason: &'static str,
    /// What was done (`Sync`, `Prune`, `Validate`, `Takeover`).
    pub action: &'static str,
    /// The message, at most 1 KiB.
    pub text: String,
}

/// The Events an outcome is told by, in order (pure: no I/O).
pub fn notes(outcome: &Outcome<'_>) -> Vec<Note> {
    match outcome.result {
        Ok(report) => {
            let mut notes = Vec::new();
            let short = short(&report.commit);
            if let Some(old) = &report.adopted {
                notes.push(Note {
                    warning: false,
                    reason: reason::TAKEN_OVER,
                    action: "Takeover",
                    text: limit(format!(
                        "took over agentk inventory {old}: its objects now belong to project {}",
                        outcome.project
                    )),
                });
            }
            let pruned: Vec<String> = report
                .results
                .iter()
                .filter(|r| r.action == Action::Pruned)
                .map(|r| r.obj.to_string())
                .collect();
            if !pruned.is_empty() {
                notes.push(Note {
                    warning: false,
                    reason: reason::PRUNED,
                    action: "Prune",
                    text: limit(format!(
                        "commit {short}: pruned {} objects that left git: {}",
                        pruned.len(),
                        pruned.join(", ")
                    )),
                });
            }
            if !report.findings.is_empty() {
                notes.push(Note {
                    warning: report.findings.iter().any(|f| f.severity != "info"),
                    reason: reason::FINDINGS,
                    action: "Validate",
                    text: limit(format!(
                        "commit {short}: plugins reported {} findings that did not block it: {}",
                        report.findings.len(),
                        report
                            .findings
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join("; ")
                    )),
                });
            }
            if !report.prune_held.is_empty() {
                notes.push(Note {
                    warning: true,
                    reason: reason::PRUNE_HELD,
                    action: "Prune",
                    text: limit(format!(
                        "commit {short}: nothing was pruned: {}",
                        report.prune_held.join("; ")
                    )),
                });
            }
            notes.push(Note {
                warning: false,
                reason: reason::SYNC_SUCCEEDED,
                action: "Sync",
                text: limit(format!(
                    "commit {short}: {}",
                    crate::report::sentence(&report.results, outcome.elapsed)
                )),
            });
            notes
        }
        Err(sync::Error::Plugin(sluice_wasm::Error::Denied(findings))) => vec![Note {
            warning: true,
            reason: reason::COMMIT_REFUSED,
            action: "Validate",
            text: limit(format!(
                "commit {short} refused by plugins, nothing was applied: {}",
                findings
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; "),
                short = short(outcome.commit)
            )),
        }],
        Err(e) => vec![Note {
            warning: true,
            reason: reason::SYNC_FAILED,
            action: "Sync",
            text: limit(format!("commit {}: {e}", short(outcome.commit))),
        }],
    }
}

/// The [`LAST_SYNC`] record of an outcome, given the previous one (pure).
pub fn last_sync(outcome: &Outcome<'_>, previous: Option<&LastSync>, now: Timestamp) -> LastSync {
    let (result, commit, counts, message) = match outcome.result {
        Ok(report) => (
            SyncResult::Succeeded,
            report.commit.clone(),
            crate::report::count_by_action(&report.results),
            None,
        ),
        Err(e) => (
            SyncResult::Failed,
            outcome.commit.to_string(),
            BTreeMap::new(),
            Some(limit(e.to_string())),
        ),
    };
    let synced_commit = match result {
        SyncResult::Succeeded => Some(commit.clone()),
        SyncResult::Failed => previous.and_then(|p| p.synced_commit.clone()),
    };
    LastSync {
        result,
        commit,
        synced_commit,
        time: now.to_string(),
        duration_seconds: (outcome.elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
        counts,
        message,
        replica: None,
    }
}

/// Writes the history of each sync of one project (one per worker: it remembers what it
/// published, so a repeated Event is counted in its series instead of piling up).
pub struct History {
    client: kube::Client,
    reporter: Reporter,
    recorder: Recorder,
    /// The text of the last Event per reason. The recorder counts a repeated Event in the
    /// series of the first and keeps the first's text, so a new text needs a new Event.
    published: HashMap<&'static str, String>,
}

impl std::fmt::Debug for History {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("History")
            .field("reporter", &self.reporter)
            .finish_non_exhaustive()
    }
}

/// The longest Event note the API server accepts, and the longest message kept.
const MAX_TEXT: usize = 1024;

/// How long writing the history may take.
const TIMEOUT: Duration = Duration::from_secs(10);

impl History {
    /// A history writer; `instance` names this replica (`POD_NAME`) in its Events.
    pub fn new(client: kube::Client, instance: Option<String>) -> History {
        let reporter = Reporter {
            controller: CONTROLLER.into(),
            instance,
        };
        History {
            recorder: Recorder::new(client.clone(), reporter.clone()),
            client,
            reporter,
            published: HashMap::new(),
        }
    }

    /// Records `outcome`: its Events and the [`LAST_SYNC`] annotation. Never fails: a write
    /// that fails is logged, and the sync's result stands.
    pub async fn record(&mut self, outcome: &Outcome<'_>) {
        let inv = match outcome.result {
            Ok(report) => &report.inventory,
            Err(_) => outcome.inventory,
        };
        if tokio::time::timeout(TIMEOUT, self.write(outcome, inv))
            .await
            .is_err()
        {
            tracing::warn!(project_id = %outcome.project, inventory = %format!("{}/{}", inv.namespace, inv.name), "writing the sync history timed out");
        }
    }

    async fn write(&mut self, outcome: &Outcome<'_>, inv: &InventoryRef) {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &inv.namespace);
        let cm = match api.get_opt(&inv.name).await {
            Ok(cm) => cm,
            Err(e) => {
                tracing::warn!(project_id = %outcome.project, error = %e, "failed to read the inventory to record the sync");
                return;
            }
        };
        let ours = |cm: &ConfigMap| {
            let label = cm
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(INVENTORY_LABEL));
            let owner = cm
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(OWNING_PROJECT));
            label == Some(&inv.id) && owner.is_none_or(|p| p == outcome.project)
        };
        if cm.as_ref().is_some_and(|cm| !ours(cm)) {
            // Not this project's ConfigMap (the sync refused it): its history is not ours
            // to write.
            return;
        }
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("ConfigMap".into()),
            name: Some(inv.name.clone()),
            namespace: Some(inv.namespace.clone()),
            uid: cm.as_ref().and_then(|cm| cm.metadata.uid.clone()),
            ..ObjectReference::default()
        };
        for note in notes(outcome) {
            self.publish(note, &reference, outcome.project).await;
        }
        let Some(cm) = cm else { return };
        let previous = cm
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(LAST_SYNC))
            .and_then(|text| serde_json::from_str::<LastSync>(text).ok());
        let last = LastSync {
            replica: self.reporter.instance.clone(),
            ..last_sync(outcome, previous.as_ref(), Timestamp::now())
        };
        let patch = serde_json::json!({
            "metadata": {
                // A precondition: the inventory must not have changed hands since it was read.
                "resourceVersion": cm.metadata.resource_version,
                "annotations": {LAST_SYNC: serde_json::to_string(&last).unwrap_or_default()},
            }
        });
        if let Err(e) = api
            .patch(&inv.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            tracing::warn!(project_id = %outcome.project, error = %e, "failed to record the sync on the inventory");
        }
    }

    async fn publish(&mut self, note: Note, reference: &ObjectReference, project: &str) {
        if self.published.get(note.reason) != Some(&note.text) {
            if self.published.contains_key(note.reason) {
                // A fresh recorder: the next Event of this reason starts a new series.
                self.recorder = Recorder::new(self.client.clone(), self.reporter.clone());
                self.published.clear();
            }
            self.published.insert(note.reason, note.text.clone());
        }
        let event = Event {
            type_: if note.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: note.reason.into(),
            note: Some(note.text),
            action: note.action.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, reference).await {
            tracing::warn!(project_id = %project, reason = note.reason, error = %e, "failed to publish an Event");
        }
    }
}

/// `text` cut to [`MAX_TEXT`] bytes on a character boundary, marked with `…`.
fn limit(text: String) -> String {
    if text.len() <= MAX_TEXT {
        return text;
    }
    let mut end = MAX_TEXT - '…'.len_utf8();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_engine::apply::ObjectResult;
    use sluice_model::object::ObjRef;

    fn report(actions: &[Action]) -> Report {
        Report {
            commit: "0123456789abcdef0123456789abcdef01234567".into(),
            revision: None,
            results: actions
                .iter()
                .enumerate()
                .map(|(i, a)| ObjectResult {
                    obj: ObjRef {
                        group: "apps".into(),
                        kind: "Deployment".into(),
                        namespace: "web".into(),
                        name: format!("d{i}").into(),
                    },
                    origin: None,
                    action: *a,
                    message: None,
                    written: None,
                })
                .collect(),
            health: Vec::new(),
            findings: Vec::new(),
            prune_held: Vec::new(),
            adopted: None,
            inventory: InventoryRef::default_for("a-b", "web"),
            applied: Default::default(),
            plugins_cached: false,
        }
    }

    #[test]
    fn a_successful_sync_is_told_with_its_counts_and_prunes() {
        let mut r = report(&[Action::Created, Action::Unchanged, Action::Pruned]);
        r.adopted = Some("12-34".into());
        r.findings = vec![sluice_wasm::Finding {
            plugin: "gatekeeper".into(),
            severity: "warning",
            message: "[pods-need-app] you must provide labels: {\"app\"}".into(),
            object: None,
            origin: None,
            field: None,
            proposed_value: None,
            rule: Some("K8sRequiredLabels/pods-need-app".into()),
        }];
        let inv = InventoryRef::default_for("a-b", "web");
        let outcome = Outcome {
            project: "group/app",
            commit: "0123456789ab",
            inventory: &inv,
            elapsed: Duration::from_millis(1500),
            result: Ok(&r),
        };
        let got: Vec<(&str, bool, String)> = notes(&outcome)
            .into_iter()
            .map(|n| (n.reason, n.warning, n.text))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    reason::TAKEN_OVER,
                    false,
                    "took over agentk inventory 12-34: its objects now belong to project group/app"
                        .into()
                ),
                (
                    reason::PRUNED,
                    false,
                    "commit 0123456789ab: pruned 1 objects that left git: Deployment/web/d2".into()
                ),
                (
                    reason::FINDINGS,
                    true,
                    "commit 0123456789ab: plugins reported 1 findings that did not block it: warning: [pods-need-app] you must provide labels: {\"app\"} (gatekeeper)".into()
                ),
                (
                    reason::SYNC_SUCCEEDED,
                    false,
                    "commit 0123456789ab: created 1, unchanged 1, pruned 1 in 1.5 s".into()
                ),
            ]
        );
        let last = last_sync(&outcome, None, Timestamp::UNIX_EPOCH);
        assert_eq!(last.result, SyncResult::Succeeded);
        assert_eq!(last.synced_commit.as_deref(), Some(r.commit.as_str()));
        assert_eq!(last.counts.get("created"), Some(&1));
        assert_eq!(last.time, "1970-01-01T00:00:00Z");
    }

    #[test]
    fn a_failure_keeps_the_last_good_commit_and_a_bounded_message() {
        let inv = InventoryRef::default_for("a-b", "web");
        let err = sync::Error::Unhealthy {
            message: "x".repeat(5000),
            problems: Vec::new(),
        };
        let outcome = Outcome {
            project: "group/app",
            commit: "fedcba9876543210",
            inventory: &inv,
            elapsed: Duration::from_secs(3),
            result: Err(&err),
        };
        let good = report(&[]);
        let previous = last_sync(
            &Outcome {
                result: Ok(&good),
                ..outcome
            },
            None,
            Timestamp::UNIX_EPOCH,
        );
        let last = last_sync(&outcome, Some(&previous), Timestamp::UNIX_EPOCH);
        assert_eq!(last.result, SyncResult::Failed);
        assert_eq!(last.commit, "fedcba9876543210");
        assert_eq!(
            last.synced_commit.as_deref(),
            Some("0123456789abcdef0123456789abcdef01234567")
        );
        let message = last.message.expect("a failure has a message");
        assert!(message.len() <= MAX_TEXT && message.ends_with('…'));
        let n = notes(&outcome);
        assert_eq!(n.len(), 1);
        assert_eq!((n[0].reason, n[0].warning), (reason::SYNC_FAILED, true));
        assert!(n[0].text.starts_with("commit fedcba987654: xxx"));
    }
}
