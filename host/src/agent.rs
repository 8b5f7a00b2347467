//! `sluice run`: keeps the cluster equal to git, one task per manifest project.
//!
//! The agent loads the configuration (a local file, or `.gitlab/agents/<name>/config.yaml`
//! on the default branch of a configuration repository, re-read every poll), starts one
//! worker per manifest project, restarts a worker when its entry changes and stops it when
//! the entry goes (deleting nothing, as agentk). A worker that fails never stops another.
//!
//! Each worker is a small state machine: poll the ref (advertisement only); when the commit
//! changes, when the last sync failed and its backoff expired, or when the re-apply timer
//! fires, sync. A newer commit cancels a running sync.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::cluster::Cluster;
use crate::config::{self, AgentConfig, GitRef, ManifestProject};
use crate::report::{self, msg};
use crate::source::{Credentials, Source};
use crate::sync::{self, Settings};

/// Where the configuration comes from.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    /// A local file.
    File(PathBuf),
    /// `.gitlab/agents/<agent>/config.yaml` on the default branch of a repository.
    Repo {
        /// Repository URL.
        url: String,
    },
}

/// Agent settings (flags), beyond the configuration file.
#[derive(Debug, Clone)]
pub struct Options {
    /// Agent name (`.gitlab/agents/<name>`), also the default inventory id prefix.
    pub agent_name: String,
    /// Base URL that project paths resolve against, e.g. `https://gitlab.example.com`.
    pub git_base_url: String,
    /// Project path of the configuration project (default manifest project).
    pub config_project: String,
    /// Credentials per host (`host[:port]`).
    pub credentials: HashMap<String, Credentials>,
    /// How often refs are polled. Default 10 s.
    pub poll_interval: Duration,
    /// How often a synced commit is applied again to correct drift. Default 5 min.
    pub reapply_interval: Duration,
    /// Git cache directory.
    pub cache_dir: PathBuf,
    /// Field manager. Default `sluice`.
    pub field_manager: String,
    /// Concurrent applies per stage. Default 8.
    pub concurrency: usize,
    /// Inventory id per project id, to take over agentk inventories (`<agentId>-<projectId>`).
    pub inventory_ids: HashMap<String, String>,
    /// Allow pruning everything when no file is selected.
    pub allow_empty_prune: bool,
    /// Extra CA certificates (PEM) for https git servers.
    pub git_ca: Option<Vec<u8>>,
}

/// Runs until `shutdown` resolves.
///
/// # Errors
/// Only when the cluster cannot be reached at start; later failures are logged and retried.
pub async fn run(
    client: kube::Client,
    config_source: ConfigSource,
    opts: Options,
    levels: Option<report::LevelHandle>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), crate::cluster::DiscoveryError> {
    let cluster = Cluster::connect(client).await?;
    let mut workers: HashMap<String, (ManifestProject, JoinHandle<()>)> = HashMap::new();
    let mut last_config: Option<AgentConfig> = None;
    tokio::pin!(shutdown);
    loop {
        match load_config(&config_source, &opts).await {
            Ok(cfg) if last_config.as_ref() != Some(&cfg) => {
                for section in &cfg.ignored_sections {
                    if last_config
                        .as_ref()
                        .is_none_or(|c| !c.ignored_sections.contains(section))
                    {
                        warn!(
                            section,
                            "configuration section is accepted for agentk compatibility and ignored by sluice"
                        );
                    }
                }
                if let Some(l) = &levels {
                    l.set(cfg.log_level);
                }
                reconcile_workers(&mut workers, &cfg, &cluster, &opts);
                last_config = Some(cfg);
            }
            Ok(_) => {}
            Err(e) => error!(error = %e, "{}", msg::CONFIG_FAILED),
        }
        tokio::select! {
            _ = tokio::time::sleep(opts.poll_interval) => {}
            _ = &mut shutdown => break,
        }
    }
    for (id, (_, handle)) in workers {
        handle.abort();
        info!(worker_id = %id, "Stopped worker");
    }
    info!("agent stopped");
    Ok(())
}

fn reconcile_workers(
    workers: &mut HashMap<String, (ManifestProject, JoinHandle<()>)>,
    cfg: &AgentConfig,
    cluster: &Cluster,
    opts: &Options,
) {
    workers.retain(|id, (_, handle)| {
        let keep = cfg.manifest_projects.iter().any(|p| &p.id == id);
        if !keep {
            info!(worker_id = %id, "{}", msg::STOPPING_WORKER);
            handle.abort();
        }
        keep
    });
    for project in &cfg.manifest_projects {
        match workers.get(&project.id) {
            Some((old, _)) if old == project => continue,
            Some((_, handle)) => {
                info!(worker_id = %project.id, "{}", msg::RESTARTING_WORKER);
                handle.abort();
            }
            None => info!(worker_id = %project.id, "{}", msg::STARTING_WORKER),
        }
        let handle = tokio::spawn(worker(cluster.clone(), project.clone(), opts.clone()));
        workers.insert(project.id.clone(), (project.clone(), handle));
    }
}

async fn load_config(src: &ConfigSource, opts: &Options) -> Result<AgentConfig, String> {
    match src {
        ConfigSource::File(path) => {
            let text = tokio::fs::read_to_string(path)
                .await
                .map_err(|e| format!("failed to read {}: {e}", path.display()))?;
            config::parse_with_origin(&text, &opts.config_project, &path.display().to_string())
                .map_err(|e| e.to_string())
        }
        ConfigSource::Repo { url } => {
            let source = source_for(url, opts);
            let path = format!(".gitlab/agents/{}/config.yaml", opts.agent_name);
            let (config_project, path2) = (opts.config_project.clone(), path.clone());
            tokio::task::spawn_blocking(move || {
                let commit = source
                    .resolve(&GitRef::DefaultBranch)
                    .map_err(|e| e.to_string())?;
                let snapshot = source.fetch(&commit).map_err(|e| e.to_string())?;
                let origin = format!("{url}@{commit}:{path2}", url = source.url());
                // A missing file is an empty configuration, as in agentk.
                let Some(entry) = snapshot.entries().iter().find(|e| e.path == path2) else {
                    return config::parse_with_origin("", &config_project, &origin)
                        .map_err(|e| e.to_string());
                };
                if entry.kind != crate::source::EntryKind::File {
                    return Err(format!(
                        "{origin}: is not a regular file (symlinks are never followed)"
                    ));
                }
                let bytes = snapshot.read_blob(&entry.id).map_err(|e| e.to_string())?;
                let text = String::from_utf8(bytes).map_err(|_| format!("{origin}: not UTF-8"))?;
                config::parse_with_origin(&text, &config_project, &origin)
                    .map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| format!("config task failed: {e}"))?
            .map_err(|e| format!("{e} ({path})"))
        }
    }
}

fn source_for(url: &str, opts: &Options) -> Source {
    let source = Source::new(url, &opts.cache_dir, credentials_for(url, opts));
    match &opts.git_ca {
        Some(pem) => source.with_ca(pem.clone()),
        None => source,
    }
}

fn credentials_for(url: &str, opts: &Options) -> Option<Credentials> {
    let host = url.split("://").nth(1)?.split('/').next()?;
    opts.credentials.get(host).cloned()
}

/// Worker states: what the worker knows about its project.
#[derive(Debug, Default)]
struct State {
    /// The commit last synced successfully, and when.
    synced: Option<(String, tokio::time::Instant)>,
    /// The commit that last failed, and when it may be retried.
    failed: Option<(String, tokio::time::Instant, Duration)>,
}

/// agentk's backoffs: 10 s doubling to 1 min for sync failures.
const BACKOFF_START: Duration = Duration::from_secs(10);
const BACKOFF_MAX: Duration = Duration::from_secs(60);

async fn worker(mut cluster: Cluster, project: ManifestProject, opts: Options) {
    let url = sync::project_url(&project.id, &opts.git_base_url);
    let source = source_for(&url, &opts);
    let settings = Settings {
        inventory_id: opts
            .inventory_ids
            .get(&project.id)
            .cloned()
            .unwrap_or_else(|| sync::inventory_id(&opts.agent_name, &project.id)),
        field_manager: opts.field_manager.clone(),
        concurrency: opts.concurrency,
        limits: Default::default(),
        allow_empty_prune: opts.allow_empty_prune,
    };
    let mut state = State::default();
    loop {
        let commit = match resolve(source.clone(), project.git_ref.clone()).await {
            Ok(c) => c,
            Err(e) => {
                warn!(project_id = %project.id, agent_id = %opts.agent_name, git_ref = %project.git_ref, error = %e, "{}", msg::POLL_FAILED);
                tokio::time::sleep(opts.poll_interval).await;
                continue;
            }
        };
        let now = tokio::time::Instant::now();
        let due = match (&state.synced, &state.failed) {
            (_, Some((c, at, _))) if *c == commit => now >= *at,
            (Some((c, at)), _) if *c == commit => now.duration_since(*at) >= opts.reapply_interval,
            _ => true,
        };
        if !due {
            tokio::time::sleep(opts.poll_interval).await;
            continue;
        }
        if state.synced.as_ref().is_none_or(|(c, _)| *c != commit) {
            info!(project_id = %project.id, commit_id = %commit, "{}", msg::NEW_COMMIT);
        }
        info!(project_id = %project.id, commit_id = %commit, agent_id = %opts.agent_name, "{}", msg::SYNCHRONIZING);
        let outcome = tokio::select! {
            r = sync::sync(&mut cluster, &source, &project, &commit, &settings) => Some(r),
            _ = newer_commit(source.clone(), project.git_ref.clone(), commit.clone(), opts.poll_interval) => None,
        };
        match outcome {
            None => info!(project_id = %project.id, commit_id = %commit, "{}", msg::CANCELED),
            Some(Ok(report)) => {
                info!(
                    project_id = %project.id, commit_id = %commit, agent_id = %opts.agent_name,
                    summary = %report::summary(&report.results),
                    results = %serde_json::to_string(&report.results).unwrap_or_default(),
                    "{}", msg::SYNCHRONIZED
                );
                state.synced = Some((commit.clone(), tokio::time::Instant::now()));
                state.failed = None;
            }
            Some(Err(e)) => {
                let backoff = match &state.failed {
                    Some((c, _, b)) if *c == commit => (*b * 2).min(BACKOFF_MAX),
                    _ => BACKOFF_START,
                };
                let message = if e.is_user_error() {
                    msg::DECODE_FAILED
                } else {
                    msg::SYNC_FAILED
                };
                if e.is_user_error() {
                    error!(project_id = %project.id, commit_id = %commit, agent_id = %opts.agent_name, error = %e, "{message}");
                } else {
                    warn!(project_id = %project.id, commit_id = %commit, agent_id = %opts.agent_name, error = %e, "{message}");
                }
                state.failed = Some((
                    commit.clone(),
                    tokio::time::Instant::now() + backoff,
                    backoff,
                ));
                // Discovery may be stale (a CRD appeared or went); refresh before retrying.
                let _ = cluster.refresh().await;
            }
        }
        tokio::time::sleep(opts.poll_interval).await;
    }
}

async fn resolve(source: Source, git_ref: GitRef) -> Result<String, String> {
    tokio::time::timeout(
        sync::GIT_TIMEOUT,
        tokio::task::spawn_blocking(move || source.resolve(&git_ref)),
    )
    .await
    .map_err(|_| "timed out listing refs".to_string())?
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())
}

/// Resolves when the ref moves away from `current` (never for a commit ref).
async fn newer_commit(source: Source, git_ref: GitRef, current: String, every: Duration) {
    if matches!(git_ref, GitRef::Commit(_)) {
        return std::future::pending().await;
    }
    loop {
        tokio::time::sleep(every).await;
        match resolve(source.clone(), git_ref.clone()).await {
            Ok(c) if c != current => return,
            _ => {}
        }
    }
}
