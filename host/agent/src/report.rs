//! What the agent tells people: JSON logs on stderr with agentk's message names and fields,
//! or a human format for terminals.
//!
//! Only this module decides how results look; stages return values.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::LogLevel;

/// agentk's message names, so existing dashboards and alerts keep working.
pub mod msg {
    /// A worker for a manifest project started.
    pub const STARTING_WORKER: &str = "Starting worker";
    /// A project's entry changed; its worker restarts.
    pub const RESTARTING_WORKER: &str = "Configuration has been updated, restarting worker";
    /// A project left the configuration; its worker stops (nothing is deleted).
    pub const STOPPING_WORKER: &str = "Stopping worker";
    /// The configuration could not be loaded or applied.
    pub const CONFIG_FAILED: &str = "Failed to apply configuration";
    /// Polling or fetching the manifest repository failed.
    pub const POLL_FAILED: &str = "GitOps: repository poll failed";
    /// A new commit was seen.
    pub const NEW_COMMIT: &str = "GitOps: new commit";
    /// Selecting or decoding the files failed.
    pub const DECODE_FAILED: &str = "Failed to decode manifest objects";
    /// More than one inventory object among the manifests.
    pub const INVENTORY_LOCATE_FAILED: &str =
        "Failed to locate inventory object in manifest objects";
    /// An apply starts (also for the periodic re-apply).
    pub const SYNCHRONIZING: &str = "Synchronizing objects";
    /// An apply finished and everything is healthy.
    pub const SYNCHRONIZED: &str = "Objects synchronized";
    /// An apply failed.
    pub const SYNC_FAILED: &str = "Synchronization failed";
    /// A newer commit superseded a running sync.
    pub const CANCELED: &str = "Synchronization was canceled";
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line (agentk's zap format).
    #[default]
    Json,
    /// Readable lines for a terminal.
    Human,
}

/// Handle to change the level at runtime (`observability.logging.level`).
#[derive(Clone)]
pub struct LevelHandle(tracing_subscriber::reload::Handle<EnvFilter, tracing_subscriber::Registry>);

impl std::fmt::Debug for LevelHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LevelHandle")
    }
}

impl LevelHandle {
    /// Sets the level; `RUST_LOG`, when set, wins.
    pub fn set(&self, level: LogLevel) {
        if std::env::var_os("RUST_LOG").is_none() {
            let _ = self.0.reload(filter(level));
        }
    }
}

fn filter(level: LogLevel) -> EnvFilter {
    EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("warn,sluice={}", level.as_str())))
}

/// The format [`init`] installed; what [`sync_finished`] writes depends on it.
static FORMAT: std::sync::OnceLock<LogFormat> = std::sync::OnceLock::new();

/// Installs the global subscriber writing to stderr.
pub fn init(format: LogFormat, level: LogLevel) -> LevelHandle {
    let _ = FORMAT.set(format);
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter(level));
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(false)
                    .with_writer(std::io::stderr),
            )
            .init(),
        LogFormat::Human => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_target(false)
                    .with_writer(std::io::stderr),
            )
            .init(),
    }
    LevelHandle(handle)
}

/// At most this many per-object results go into a sync's JSON log line; `summary` still
/// counts them all. A first sync of 10,000 objects listed every one: a 3 MB line, more than
/// log pipelines accept (Docker splits lines at 16 KiB), and a formatting buffer the logger
/// kept for good.
pub const LOGGED_RESULTS: usize = 100;

/// The results a sync's JSON log line lists, and how many it leaves out: failures first,
/// then every other result that changed or withheld something, in order; unchanged objects
/// only by count.
pub fn logged_results(
    results: &[sluice_engine::apply::ObjectResult],
) -> (Vec<&sluice_engine::apply::ObjectResult>, usize) {
    use sluice_engine::apply::Action;
    let failed = results.iter().filter(|r| r.action == Action::Failed);
    let others = results
        .iter()
        .filter(|r| !matches!(r.action, Action::Failed | Action::Unchanged));
    let listed: Vec<_> = failed.chain(others).take(LOGGED_RESULTS).collect();
    let omitted = results.len() - listed.len();
    (listed, omitted)
}

/// Logs how one sync ended. JSON logs carry agentk's message, the counts, and the results
/// that are not unchanged (at most [`LOGGED_RESULTS`], failures first); human logs
/// say it in one sentence (`group/app: synced 0123456789ab: created 2, unchanged 40 in
/// 1.2 s`), then one line per object that failed and per finding.
pub fn sync_finished(
    project: &str,
    agent: &str,
    commit: &str,
    elapsed: std::time::Duration,
    result: Result<&crate::sync::Report, &crate::sync::Error>,
) {
    use tracing::{error, info, warn};
    let human = FORMAT.get() == Some(&LogFormat::Human);
    match result {
        Ok(report) if human => {
            info!(
                "{project}: synced {}{}: {}",
                short(&report.commit),
                report
                    .revision
                    .as_deref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default(),
                sentence(&report.results, elapsed)
            );
            for f in &report.findings {
                warn!("{project}: {f}");
            }
            for why in &report.prune_held {
                warn!("{project}: nothing pruned: {why}");
            }
        }
        Ok(report) => {
            let (listed, omitted) = logged_results(&report.results);
            info!(
                project_id = %project, commit_id = %report.commit, agent_id = %agent,
                revision = report.revision.as_deref().unwrap_or_default(),
                summary = %summary(&report.results),
                results = %serde_json::to_string(&listed).unwrap_or_default(),
                results_omitted = omitted,
                findings = %serde_json::to_string(&report.findings).unwrap_or_default(),
                prune_held = %report.prune_held.join("; "),
                "{}", msg::SYNCHRONIZED
            )
        }
        Err(e) if human => {
            let problems = e.problems();
            let commit = short(commit);
            let secs = elapsed.as_secs_f64();
            if problems.is_empty() {
                error!("{project}: sync of {commit} failed in {secs:.1} s: {e}");
            } else {
                error!(
                    "{project}: sync of {commit} failed in {secs:.1} s: {} objects failed",
                    problems.len()
                );
                for p in &problems {
                    let origin = p
                        .origin
                        .as_ref()
                        .map(|o| format!("{o}: "))
                        .unwrap_or_default();
                    error!("{project}: {origin}{}: {}", p.obj, p.message);
                }
            }
        }
        Err(e) => {
            // User errors wait for a new commit; the rest are retried with backoff.
            if e.is_user_error() {
                error!(project_id = %project, commit_id = %commit, agent_id = %agent, error = %e, "{}", msg::DECODE_FAILED);
            } else {
                warn!(project_id = %project, commit_id = %commit, agent_id = %agent, error = %e, "{}", msg::SYNC_FAILED);
            }
        }
    }
}

/// A commit id or an artifact digest as logs and Events show it: 12 hexadecimal digits
/// (`sha256:` and 12 for a digest).
pub(crate) fn short(commit: &str) -> &str {
    let keep = if commit.starts_with("sha256:") {
        19
    } else {
        12
    };
    commit.get(..keep).unwrap_or(commit)
}

/// Objects per action, by the action's lowercase name (`created`, `unchanged`, …).
pub fn count_by_action(
    results: &[sluice_engine::apply::ObjectResult],
) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for r in results {
        *counts
            .entry(format!("{:?}", r.action).to_lowercase())
            .or_default() += 1;
    }
    counts
}

/// One line summarising per-object actions, e.g. `created=1 configured=2 unchanged=5`.
pub fn summary(results: &[sluice_engine::apply::ObjectResult]) -> String {
    count_by_action(results)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Per-object actions as a sentence, in a fixed order, zeros left out:
/// `created 2, configured 1, unchanged 40, pruned 1`.
pub fn counts(results: &[sluice_engine::apply::ObjectResult]) -> String {
    use sluice_engine::apply::Action;
    const ORDER: [(Action, &str); 8] = [
        (Action::Created, "created"),
        (Action::Configured, "configured"),
        (Action::Unchanged, "unchanged"),
        (Action::Pruned, "pruned"),
        (Action::Abandoned, "abandoned"),
        (Action::Retained, "retained"),
        (Action::Skipped, "skipped"),
        (Action::Failed, "failed"),
    ];
    let parts: Vec<String> = ORDER
        .iter()
        .filter_map(|(action, word)| {
            let n = results.iter().filter(|r| r.action == *action).count();
            (n > 0).then(|| format!("{word} {n}"))
        })
        .collect();
    if parts.is_empty() {
        "no objects".into()
    } else {
        parts.join(", ")
    }
}

/// The human log line of a sync: `created 2, configured 1, unchanged 40, pruned 1 in 1.2 s`.
pub fn sentence(
    results: &[sluice_engine::apply::ObjectResult],
    elapsed: std::time::Duration,
) -> String {
    format!("{} in {:.1} s", counts(results), elapsed.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_engine::apply::{Action, ObjectResult};
    use sluice_model::object::ObjRef;

    fn result(action: Action) -> ObjectResult {
        ObjectResult {
            obj: ObjRef {
                group: "".into(),
                kind: "ConfigMap".into(),
                namespace: "n".into(),
                name: "c".into(),
            },
            origin: None,
            action,
            message: None,
            written: None,
        }
    }

    #[test]
    fn a_sync_reads_as_one_sentence() {
        let mut results = vec![result(Action::Unchanged); 40];
        results.extend([
            result(Action::Pruned),
            result(Action::Created),
            result(Action::Configured),
            result(Action::Created),
        ]);
        assert_eq!(
            sentence(&results, std::time::Duration::from_millis(1234)),
            "created 2, configured 1, unchanged 40, pruned 1 in 1.2 s"
        );
        assert_eq!(
            sentence(&[], std::time::Duration::ZERO),
            "no objects in 0.0 s"
        );
    }

    #[test]
    fn a_json_log_line_lists_failures_first_and_at_most_a_hundred_results() {
        let mut results = vec![result(Action::Unchanged); 10_000];
        results.extend(vec![result(Action::Created); 150]);
        results.push(result(Action::Failed));
        let (listed, omitted) = logged_results(&results);
        assert_eq!(listed.len(), LOGGED_RESULTS);
        assert_eq!(omitted, 10_051);
        assert_eq!(listed[0].action, Action::Failed);
        assert!(listed[1..].iter().all(|r| r.action == Action::Created));

        // A no-op sync lists nothing; a small one lists every change.
        let (listed, omitted) = logged_results(&results[..40]);
        assert!(listed.is_empty());
        assert_eq!(omitted, 40);
        let few = [result(Action::Pruned), result(Action::Unchanged)];
        let (listed, omitted) = logged_results(&few);
        assert_eq!(
            listed.iter().map(|r| r.action).collect::<Vec<_>>(),
            [Action::Pruned]
        );
        assert_eq!(omitted, 1);
    }
}
