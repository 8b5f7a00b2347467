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

/// Installs the global subscriber writing to stderr.
pub fn init(format: LogFormat, level: LogLevel) -> LevelHandle {
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

/// One line summarising per-object actions, e.g. `created=1 configured=2 unchanged=5`.
pub fn summary(results: &[crate::apply::ObjectResult]) -> String {
    use std::collections::BTreeMap;
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for r in results {
        *counts
            .entry(format!("{:?}", r.action).to_lowercase())
            .or_default() += 1;
    }
    counts
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}
