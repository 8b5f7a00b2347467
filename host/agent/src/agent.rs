//! `sluice run`: keeps the cluster equal to git, one task per manifest project.
//!
//! The agent loads the configuration (a local file, or `.gitlab/agents/<name>/sluice.yaml`,
//! else `.gitlab/agents/<name>/config.yaml`, on the default branch of a configuration repository, re-read every poll), starts one
//! worker per manifest project, restarts a worker when its entry changes and stops it when
//! the entry goes (deleting nothing, as agentk). A worker that fails never stops another.
//!
//! Each worker is a small state machine: poll the ref (advertisement only); when the commit
//! changes, when the last sync failed and its backoff expired, or when the re-apply timer
//! fires, sync. A newer commit cancels a running sync. A push webhook ([`crate::webhook`])
//! wakes a worker (or the configuration loader) before its next poll.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::config::{self, AgentConfig, GitRef, ManifestProject};
use crate::history::{self, History};
use crate::report::{self, msg};
use crate::source::{Credentials, Source};
use crate::sync::{self, Settings};
use crate::webhook::{self, Triggers};
use crate::{decode, moves};
use sluice_engine::apply::Action;
use sluice_engine::cluster::Cluster;
use sluice_engine::drift::Drift;
use sluice_engine::inventory::InventoryRef;
use sluice_engine::live::Live;
use sluice_engine::wait;
use sluice_model::object::ObjRef;
use sluice_wasm::{self as plugins, Plugin};

/// Where the configuration comes from.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    /// A local file.
    File(PathBuf),
    /// `.gitlab/agents/<agent>/sluice.yaml`, else `config.yaml`, on the default branch of a
    /// repository ([`config_path`]).
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
    /// How often a synced commit is applied again in full (the safety net behind the drift
    /// watches, [`sluice_engine::drift`]). Default 1 h.
    pub reapply_interval: Duration,
    /// Git cache directory.
    pub cache_dir: PathBuf,
    /// Field manager. Default `sluice`.
    pub field_manager: String,
    /// Concurrent applies per stage. Default 8.
    pub concurrency: usize,
    /// Inventory id per project id, to take over agentk inventories (`<agentId>-<projectId>`).
    pub inventory_ids: HashMap<String, String>,
    /// Adopt agentk inventories found for projects that have no inventory yet.
    pub takeover: sync::Takeover,
    /// Field managers whose ownership is removed from applied objects (default `agentk`).
    pub cleanup_managers: Vec<String>,
    /// Allow pruning everything when no file is selected.
    pub allow_empty_prune: bool,
    /// Extra CA certificates (PEM) for https git servers (and registries without one of
    /// their own in [`Self::registries`]).
    pub git_ca: Option<Vec<u8>>,
    /// How `oci://` sources reach their registries.
    pub registries: crate::oci::Registries,
    /// Where compiled plugins are cached (none: compile on every start).
    pub plugin_cache_dir: Option<PathBuf>,
    /// Kustomize and Helm, shared by every project (none: a project that needs one fails
    /// with a message saying so).
    pub renderers: Option<Arc<sluice_wasm::renderer::Renderers>>,
    /// File selection limits (agentk's by default).
    pub limits: crate::select::Limits,
    /// The agent's own objects ([`crate::limits::Protected`]).
    pub protected: crate::limits::Protected,
    /// Where syncs are recorded for `/metrics`.
    pub metrics: Arc<crate::observability::Metrics>,
    /// What push webhooks can wake: the agent registers its workers here.
    pub triggers: Arc<Triggers>,
    /// Work shared across replicas ([`crate::shards`]): only the projects of the shards
    /// this replica holds run, each writing through its shard's gate. None: every project.
    pub ownership: Option<Arc<crate::shards::Ownership>>,
    /// Watch each namespace on its own, never a resource in every namespace at once
    /// ([`sluice_engine::live::WIDE_AFTER`]): for an agent allowed to list only the
    /// namespaces it syncs into.
    pub per_namespace_watches: bool,
    /// Syncs that may work at once across all projects (Flux's `--concurrent`): a sync
    /// holds a slot from its render to its prune, not while it waits for health, so a
    /// slow rollout does not hold up other projects; at rest every slot is free.
    pub sync_slots: Arc<tokio::sync::Semaphore>,
}

/// A loaded configuration: the file, the module bytes of its plugins, and the plugins.
struct Loaded {
    config: AgentConfig,
    /// Per plugin: sha256 of its module, or why it could not be read.
    digests: BTreeMap<String, String>,
    plugins: BTreeMap<String, Result<Arc<Plugin>, plugins::Error>>,
}

/// The agent could not start. Later failures are logged and retried, never returned.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The API server cannot be reached.
    #[error(transparent)]
    Discovery(#[from] sluice_engine::cluster::DiscoveryError),
    /// No WebAssembly engine could be built.
    #[error("failed to start the plugin runtime: {0}")]
    Plugins(String),
    /// The configuration could not be read (`sluice sync` only; the agent retries).
    #[error("failed to load the configuration: {0}")]
    Config(String),
}

/// Runs until `shutdown` resolves.
///
/// # Errors
/// [`StartError`] when the cluster cannot be reached or no WebAssembly engine can be built at
/// start; later failures are logged and retried.
pub async fn run(
    client: kube::Client,
    config_source: ConfigSource,
    opts: Options,
    levels: Option<report::LevelHandle>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let cluster = Cluster::connect(client).await?;
    let runtime = match plugins::Runtime::new(opts.plugin_cache_dir.as_deref()) {
        Ok(r) => r,
        Err(e) => {
            // An unusable cache directory should not stop the agent: compile every start.
            warn!(error = %e, "plugin compilation cache unavailable; plugins are compiled on every start");
            plugins::Runtime::new(None).map_err(StartError::Plugins)?
        }
    };
    let runtime = Arc::new(runtime);
    // The watches of the projects' live objects, shared by the workers ([`Live`]).
    let live = if opts.per_namespace_watches {
        Live::per_namespace()
    } else {
        Live::new()
    };
    let mut workers = Workers::default();
    let mut last: Option<(AgentConfig, BTreeMap<String, String>)> = None;
    let mut loaded: Option<Loaded> = None;
    // The shards held (all projects when the work is not shared).
    let mut owned = opts.ownership.as_ref().map(|o| o.subscribe());
    let mut woken = opts.ownership.as_ref().map(|o| o.woken());
    // A push to the configuration repository reloads the configuration at once.
    let config_target = match &config_source {
        ConfigSource::Repo { url } => Some(webhook::Target {
            id: url.clone(),
            url: url.clone(),
            git_ref: GitRef::DefaultBranch,
            wake: Arc::new(webhook::Wake::default()),
        }),
        ConfigSource::File(_) => None,
    };
    let config_wake = config_target
        .as_ref()
        .map_or_else(|| Arc::new(webhook::Wake::default()), |t| t.wake.clone());
    tokio::pin!(shutdown);
    loop {
        match load_config(&config_source, &opts).await {
            Ok((cfg, modules)) => {
                let digests = digests(&modules);
                if last
                    .as_ref()
                    .is_none_or(|(c, d)| *c != cfg || *d != digests)
                {
                    for section in &cfg.ignored_sections {
                        if last
                            .as_ref()
                            .is_none_or(|(c, _)| !c.ignored_sections.contains(section))
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
                    let l = load_plugins(&runtime, cfg.clone(), modules, digests.clone()).await;
                    let held = owned.as_ref().map(|o| o.borrow().clone());
                    reconcile_workers(&mut workers, &l, held.as_ref(), &cluster, &live, &opts);
                    opts.triggers
                        .set(targets(&workers, &l, &opts, config_target.as_ref()));
                    opts.metrics.set_ready();
                    last = Some((cfg, digests));
                    loaded = Some(l);
                }
            }
            Err(e) => error!(error = %e, "{}", msg::CONFIG_FAILED),
        }
        loop {
            let ownership_changed = async {
                match owned.as_mut() {
                    Some(o) => o.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            let woken_elsewhere = async {
                match woken.as_mut() {
                    Some(w) => w.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(opts.poll_interval) => break,
                _ = config_wake.notified() => break,
                _ = &mut shutdown => {
                    opts.triggers.set(Vec::new());
                    drop(workers);
                    info!("agent stopped");
                    return Ok(());
                }
                true = ownership_changed => {
                    // Shards came or went: start and stop workers, configuration unchanged.
                    if let (Some(l), Some(o)) = (&loaded, &owned) {
                        let held = o.borrow().clone();
                        reconcile_workers(&mut workers, l, Some(&held), &cluster, &live, &opts);
                        opts.triggers
                            .set(targets(&workers, l, &opts, config_target.as_ref()));
                    }
                }
                true = woken_elsewhere => {
                    // Pushes another replica received for projects synced here.
                    if let Some(w) = &mut woken {
                        for id in w.borrow_and_update().iter() {
                            if let Some(worker) = workers.get(id) {
                                worker.target.wake.push();
                            }
                        }
                    }
                }
            }
        }
    }
}
/// What push webhooks can wake: every worker here, the configuration repository, and,
/// when the work is shared, every other configured project, whose pushes are passed on
/// to the replica that syncs it ([`crate::shards::Ownership::forward`]).
fn targets(
    workers: &Workers,
    loaded: &Loaded,
    opts: &Options,
    config: Option<&webhook::Target>,
) -> Vec<webhook::Target> {
    let mut out: Vec<webhook::Target> = workers.values().map(|w| w.target.clone()).collect();
    if let Some(ownership) = &opts.ownership {
        for p in &loaded.config.manifest_projects {
            if workers.contains_key(&p.id) {
                continue;
            }
            let (ownership, id) = (ownership.clone(), p.id.clone());
            out.push(webhook::Target {
                id: p.id.clone(),
                url: sync::project_url(p.repository(), &opts.git_base_url),
                git_ref: p.git_ref.clone(),
                wake: Arc::new(webhook::Wake::forwarding(move || ownership.forward(&id))),
            });
        }
    }
    out.extend(config.cloned());
    out
}

/// A running worker: what it was started with, its task, and what wakes it.
struct Running {
    key: WorkerKey,
    handle: JoinHandle<()>,
    target: webhook::Target,
}

/// The running workers by project id. Dropping it aborts them all: when the agent's future
/// is dropped (shutdown, or leadership lost), no worker keeps applying.
#[derive(Default)]
struct Workers(HashMap<String, Running>);

impl std::ops::Deref for Workers {
    type Target = HashMap<String, Running>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Workers {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for (id, Running { handle, .. }) in self.0.drain() {
            handle.abort();
            info!(worker_id = %id, "Stopped worker");
        }
    }
}

/// What a worker was started with; a change restarts it.
#[derive(Debug, Clone, PartialEq)]
struct WorkerKey {
    project: ManifestProject,
    /// Each plugin it uses (its spec, config included) and the sha256 of its module.
    plugins: Vec<(plugins::Spec, String)>,
    /// The projects reading the same repository ([`moves`]).
    siblings: Vec<ManifestProject>,
}

/// Starts, restarts and stops workers to match the configuration and, when the work is
/// shared, the shards held (`held`): a project of a shard another replica holds has no
/// worker here.
fn reconcile_workers(
    workers: &mut HashMap<String, Running>,
    loaded: &Loaded,
    held: Option<&crate::shards::Owned>,
    cluster: &Cluster,
    live: &Live,
    opts: &Options,
) {
    let cfg = &loaded.config;
    let ours = |id: &str| held.is_none_or(|h| h.owns(id));
    workers.retain(|id, w| {
        let keep = ours(id) && cfg.manifest_projects.iter().any(|p| &p.id == id);
        if !keep {
            info!(worker_id = %id, "{}", msg::STOPPING_WORKER);
            w.handle.abort();
            live.forget(id);
        }
        keep
    });
    let ids = inventory_ids(cfg, opts);
    let repos = Repositories::of(cfg, &opts.git_base_url);
    for project in cfg.manifest_projects.iter().filter(|p| ours(&p.id)) {
        let names: Vec<String> = match &project.plugins {
            Some(names) => names.clone(),
            None => cfg.plugins.iter().map(|p| p.name.clone()).collect(),
        };
        let key = WorkerKey {
            project: project.clone(),
            plugins: cfg
                .plugins
                .iter()
                .filter(|p| names.contains(&p.name))
                .map(|p| {
                    (
                        p.clone(),
                        loaded.digests.get(&p.name).cloned().unwrap_or_default(),
                    )
                })
                .collect(),
            siblings: repos.siblings(cfg, project).into_iter().cloned().collect(),
        };
        match workers.get(&project.id) {
            Some(w) if w.key == key => continue,
            Some(w) => {
                info!(worker_id = %project.id, "{}", msg::RESTARTING_WORKER);
                w.handle.abort();
            }
            None => info!(worker_id = %project.id, "{}", msg::STARTING_WORKER),
        }
        let selected = selected_plugins(loaded, project);
        if let Err(e) = &selected {
            error!(worker_id = %project.id, error = %e, "plugin unavailable; this project's syncs fail until it loads");
        }
        let inventory = inventory_for(cfg, &ids, project, &repos);
        if let Err(e) = &inventory {
            error!(worker_id = %project.id, error = %e, "this project does not sync until it has an inventory of its own");
        }
        let target = webhook::Target {
            id: project.id.clone(),
            url: sync::project_url(project.repository(), &opts.git_base_url),
            git_ref: project.git_ref.clone(),
            wake: Arc::new(webhook::Wake::default()),
        };
        // Every write of this project's syncs passes its shard's gate.
        let cluster = match (&opts.ownership, held) {
            (Some(o), Some(h)) => {
                let gate = o.gate(crate::shards::shard_of(&project.id, h.shards));
                cluster.gated(Arc::new(move || {
                    gate.admit()
                        .map(|pass| Box::new(pass) as Box<dyn std::any::Any + Send>)
                        .map_err(Into::into)
                }))
            }
            _ => cluster.clone(),
        };
        let handle = tokio::spawn(worker(
            cluster,
            live.clone(),
            project.clone(),
            selected,
            inventory,
            opts.clone(),
            target.wake.clone(),
        ));
        workers.insert(
            project.id.clone(),
            Running {
                key,
                handle,
                target,
            },
        );
    }
}

/// The plugins `project` uses, in configuration order (the run order); a plugin that failed
/// to load fails this project only.
fn selected_plugins(
    loaded: &Loaded,
    project: &ManifestProject,
) -> Result<Vec<Arc<Plugin>>, plugins::Error> {
    let cfg = &loaded.config;
    cfg.plugins
        .iter()
        .filter(|p| {
            project
                .plugins
                .as_ref()
                .is_none_or(|names| names.contains(&p.name))
        })
        .map(|p| {
            loaded.plugins.get(&p.name).cloned().unwrap_or_else(|| {
                Err(plugins::Error::Load {
                    plugin: p.name.clone(),
                    message: "not loaded".into(),
                })
            })
        })
        .collect()
}

/// A project's inventory id, the default inventories of the agent's other projects, and
/// those of them that read the same repository (with their inventory ids).
#[derive(Debug, Clone)]
struct Inventories {
    id: String,
    others: Vec<InventoryRef>,
    siblings: Vec<(ManifestProject, String)>,
}

/// Each project's repository URL (`git_base_url` applied), and the projects reading each:
/// worked out once per configuration, not once per pair of projects.
struct Repositories {
    url_of: HashMap<String, String>,
    readers: HashMap<String, Vec<usize>>,
}

impl Repositories {
    fn of(cfg: &AgentConfig, git_base_url: &str) -> Repositories {
        let mut url_of = HashMap::new();
        let mut readers: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, p) in cfg.manifest_projects.iter().enumerate() {
            let url = sync::project_url(p.repository(), git_base_url);
            readers.entry(url.clone()).or_default().push(i);
            url_of.insert(p.id.clone(), url);
        }
        Repositories { url_of, readers }
    }

    /// The other projects of `cfg` that read `project`'s repository.
    fn siblings<'c>(
        &self,
        cfg: &'c AgentConfig,
        project: &ManifestProject,
    ) -> Vec<&'c ManifestProject> {
        let readers = self
            .url_of
            .get(&project.id)
            .and_then(|url| self.readers.get(url));
        readers
            .into_iter()
            .flatten()
            .map(|&i| &cfg.manifest_projects[i])
            .filter(|p| p.id != project.id)
            .collect()
    }
}

/// `project`'s [`Inventories`].
fn inventory_for(
    cfg: &AgentConfig,
    ids: &BTreeMap<String, Result<String, String>>,
    project: &ManifestProject,
    repos: &Repositories,
) -> Result<Inventories, String> {
    let id = ids
        .get(&project.id)
        .cloned()
        .unwrap_or_else(|| Err(format!("no inventory id for project {}", project.id)))?;
    let others = cfg
        .manifest_projects
        .iter()
        .filter(|p| p.id != project.id)
        .filter_map(|p| {
            let id = ids.get(&p.id)?.as_ref().ok()?;
            Some(InventoryRef::default_for(id, &p.default_namespace))
        })
        .collect();
    let siblings = repos
        .siblings(cfg, project)
        .into_iter()
        .filter_map(|p| Some((p.clone(), ids.get(&p.id)?.as_ref().ok()?.clone())))
        .collect();
    Ok(Inventories {
        id,
        others,
        siblings,
    })
}

/// The source and settings a project syncs with.
fn prepare(
    project: &ManifestProject,
    plugins: Result<Vec<Arc<Plugin>>, plugins::Error>,
    inventories: Inventories,
    live: Option<Live>,
    opts: &Options,
) -> (Source, Settings) {
    let url = sync::project_url(project.repository(), &opts.git_base_url);
    // Credentials written into the project's URL win over the host's token.
    let source = source_for(&url, opts, project.credentials.clone());
    let Inventories {
        id: inventory_id,
        others,
        siblings,
    } = inventories;
    let siblings = siblings
        .into_iter()
        .map(|(p, inventory_id)| moves::Sibling {
            source: source_for(&url, opts, p.credentials.clone()),
            project: p,
            inventory_id,
        })
        .collect();
    let settings = Settings {
        inventory_id,
        field_manager: opts.field_manager.clone(),
        cleanup_managers: opts.cleanup_managers.clone(),
        concurrency: opts.concurrency,
        limits: opts.limits,
        allow_empty_prune: opts.allow_empty_prune,
        agent: opts.agent_name.clone(),
        plugins,
        others,
        takeover: opts.takeover.clone(),
        known: Arc::default(),
        render_cache: Some(plugins::OutcomeCache::new(opts.cache_dir.join("rendered"))),
        decoded: Some(decode::Memo::default()),
        protected: opts.protected.clone(),
        live,
        renderers: opts.renderers.clone(),
        slots: Some(opts.sync_slots.clone()),
        siblings,
    };
    (source, settings)
}

/// What [`run_once`] did for one project.
#[derive(Debug)]
pub struct Once {
    /// The project.
    pub project: String,
    /// Its report, or why it failed.
    pub result: Result<sync::Report, String>,
}

/// `sluice sync`: syncs every project of the configuration once, waits for health, and
/// returns each project's outcome (projects run concurrently; one failing never stops
/// another).
///
/// # Errors
/// [`StartError`] when the cluster, the configuration or the plugin runtime is unusable.
pub async fn run_once(
    client: kube::Client,
    config_source: ConfigSource,
    opts: Options,
) -> Result<Vec<Once>, StartError> {
    let cluster = Cluster::connect(client).await?;
    let runtime = Arc::new(
        plugins::Runtime::new(opts.plugin_cache_dir.as_deref())
            .or_else(|_| plugins::Runtime::new(None))
            .map_err(StartError::Plugins)?,
    );
    let (cfg, modules) = load_config(&config_source, &opts)
        .await
        .map_err(StartError::Config)?;
    let digests = digests(&modules);
    let loaded = load_plugins(&runtime, cfg, modules, digests).await;
    let ids = inventory_ids(&loaded.config, &opts);
    let repos = Repositories::of(&loaded.config, &opts.git_base_url);
    let runs = loaded.config.manifest_projects.iter().map(|project| {
        let mut cluster = cluster.clone();
        let (loaded, ids, opts, repos) = (&loaded, &ids, &opts, &repos);
        async move {
            let result = async {
                let inventory = inventory_for(&loaded.config, ids, project, repos)?;
                let (source, settings) = prepare(
                    project,
                    selected_plugins(loaded, project),
                    inventory,
                    None,
                    opts,
                );
                let commit = resolve(source.clone(), project.git_ref.clone()).await?;
                info!(project_id = %project.id, commit_id = %commit, "{}", msg::SYNCHRONIZING);
                let started = std::time::Instant::now();
                let result = sync::sync(&mut cluster, &source, project, &commit, &settings).await;
                let mut history = History::new(cluster.client().clone(), instance());
                let ended = Ended {
                    project,
                    settings: &settings,
                    commit: &commit,
                    elapsed: started.elapsed(),
                };
                ended
                    .tell(&mut history, &opts.agent_name, result.as_ref())
                    .await;
                result.map_err(|e| e.to_string())
            }
            .await;
            Once {
                project: project.id.clone(),
                result,
            }
        }
    });
    Ok(futures::future::join_all(runs).await)
}

/// Each project's inventory id: `--inventory-id`, else [`sync::inventory_id`]. Ids must be
/// unique within the agent (two projects sharing one would prune each other's objects):
/// every project whose id another project also has gets an error instead, naming both.
pub fn inventory_ids(
    cfg: &AgentConfig,
    opts: &Options,
) -> BTreeMap<String, Result<String, String>> {
    let ids: Vec<(String, String)> = cfg
        .manifest_projects
        .iter()
        .map(|p| {
            let id = opts
                .inventory_ids
                .get(&p.id)
                .cloned()
                .unwrap_or_else(|| sync::inventory_id(&opts.agent_name, &p.id));
            (p.id.clone(), id)
        })
        .collect();
    ids.iter()
        .map(|(project, id)| {
            let sharing: Vec<&str> = ids
                .iter()
                .filter(|(p, other)| other == id && p != project)
                .map(|(p, _)| p.as_str())
                .collect();
            let result = if sharing.is_empty() {
                Ok(id.clone())
            } else {
                Err(format!(
                    "inventory id {id:?} of project {project:?} is also the id of {}: projects sharing an inventory would prune each other's objects; give one of them its own with --inventory-id PROJECT=ID",
                    sharing.iter().map(|p| format!("{p:?}")).collect::<Vec<_>>().join(", ")
                ))
            };
            (project.clone(), result)
        })
        .collect()
}

fn digests(modules: &BTreeMap<String, Result<Vec<u8>, String>>) -> BTreeMap<String, String> {
    use sha2::Digest;
    modules
        .iter()
        .map(|(name, m)| {
            (
                name.clone(),
                match m {
                    Ok(bytes) => hex::encode(sha2::Sha256::digest(bytes)),
                    Err(e) => format!("error: {e}"),
                },
            )
        })
        .collect()
}

/// Compiles every plugin of the configuration (off the async workers).
async fn load_plugins(
    runtime: &Arc<plugins::Runtime>,
    config: AgentConfig,
    modules: BTreeMap<String, Result<Vec<u8>, String>>,
    digests: BTreeMap<String, String>,
) -> Loaded {
    let rt = runtime.clone();
    let specs = config.plugins.clone();
    let plugins = tokio::task::spawn_blocking(move || {
        specs
            .iter()
            .map(|spec| {
                let loaded = match modules.get(&spec.name) {
                    Some(Ok(bytes)) => rt.load(spec, bytes).map(Arc::new),
                    Some(Err(e)) => Err(plugins::Error::Load {
                        plugin: spec.name.clone(),
                        message: e.clone(),
                    }),
                    None => Err(plugins::Error::Load {
                        plugin: spec.name.clone(),
                        message: "module not read".into(),
                    }),
                };
                match &loaded {
                    Ok(p) => info!(plugin = %spec.name, world = ?p.world(), "plugin loaded"),
                    Err(e) => error!(plugin = %spec.name, error = %e, "plugin failed to load"),
                }
                (spec.name.clone(), loaded)
            })
            .collect()
    })
    .await
    .unwrap_or_default();
    Loaded {
        config,
        digests,
        plugins,
    }
}

type Modules = BTreeMap<String, Result<Vec<u8>, String>>;

/// Reads the configuration and the modules of its plugins. Modules in a configuration
/// repository are read at the configuration's commit, so both change together; paths in a
/// local configuration are relative to its directory.
async fn load_config(src: &ConfigSource, opts: &Options) -> Result<(AgentConfig, Modules), String> {
    let (source, agent, config_project) = (
        src.clone(),
        opts.agent_name.clone(),
        opts.config_project.clone(),
    );
    let cache_dir = opts.cache_dir.clone();
    let opts = opts.clone();
    let repo_source = match src {
        ConfigSource::Repo { url } => Some(source_for(url, &opts, None)),
        ConfigSource::File(_) => None,
    };
    tokio::task::spawn_blocking(move || match (source, repo_source) {
        (ConfigSource::File(path), _) => {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("failed to read {}: {e}", path.display()))?;
            let cfg =
                config::parse_with_origin(&text, &config_project, &path.display().to_string())
                    .map_err(|e| e.to_string())?;
            let base = path.parent().map(PathBuf::from).unwrap_or_default();
            let mut cfg = cfg;
            let read = |p: &str| {
                std::fs::read(base.join(p))
                    .map_err(|e| format!("failed to read {}: {e}", base.join(p).display()))
            };
            let modules = read_modules(&cfg, &cache_dir, &opts, read);
            let list = |p: &str| local_files(&base, p);
            let modules = grant_files(&mut cfg, modules, &cache_dir, list, read);
            Ok((cfg, modules))
        }
        (ConfigSource::Repo { .. }, Some(source)) => {
            let commit = source
                .resolve(&GitRef::DefaultBranch)
                .map_err(|e| e.to_string())?;
            let snapshot = source.fetch(&commit).map_err(|e| e.to_string())?;
            let path = config_path(&agent, |p| snapshot.entries().iter().any(|e| e.path == p));
            let origin = format!("{}@{commit}:{path}", source.url());
            let read = |p: &str| -> Result<Vec<u8>, String> {
                let p = p.trim_start_matches('/');
                let entry = snapshot
                    .entries()
                    .iter()
                    .find(|e| e.path == p)
                    .ok_or_else(|| format!("{p}: not found at commit {commit}"))?;
                if entry.kind != crate::source::EntryKind::File {
                    return Err(format!(
                        "{p}: is not a regular file (symlinks are never followed)"
                    ));
                }
                snapshot.read_blob(&entry.id).map_err(|e| e.to_string())
            };
            // A missing file is an empty configuration, as in agentk.
            let text = match snapshot.entries().iter().any(|e| e.path == path) {
                true => {
                    String::from_utf8(read(&path)?).map_err(|_| format!("{origin}: not UTF-8"))?
                }
                false => String::new(),
            };
            let mut cfg = config::parse_with_origin(&text, &config_project, &origin)
                .map_err(|e| e.to_string())?;
            let modules = read_modules(&cfg, &cache_dir, &opts, read);
            // Regular files only: symlinks are never followed, here as for modules.
            let list = |p: &str| -> Result<Vec<String>, String> {
                let p = p.trim_matches('/');
                let under = format!("{p}/");
                let found: Vec<String> = snapshot
                    .entries()
                    .iter()
                    .filter(|e| e.kind == crate::source::EntryKind::File)
                    .filter(|e| e.path == p || e.path.starts_with(&under))
                    .map(|e| e.path.clone())
                    .collect();
                match found.is_empty() {
                    true => Err(format!("{p}: not found at commit {commit}")),
                    false => Ok(found),
                }
            };
            let modules = grant_files(&mut cfg, modules, &cache_dir, list, read);
            Ok((cfg, modules))
        }
        (ConfigSource::Repo { .. }, None) => unreachable!("repo_source is set for repositories"),
    })
    .await
    .map_err(|e| format!("config task failed: {e}"))?
}

/// The configuration file of agent `agent` in a configuration repository: sluice's own
/// `.gitlab/agents/<agent>/sluice.yaml` when the repository has it (a file agentk never
/// parses, for agents that keep agentk running beside sluice), else agentk's
/// `.gitlab/agents/<agent>/config.yaml` (taking an agentk configuration over as it is).
pub fn config_path(agent: &str, exists: impl Fn(&str) -> bool) -> String {
    let own = format!(".gitlab/agents/{agent}/sluice.yaml");
    if exists(&own) {
        own
    } else {
        format!(".gitlab/agents/{agent}/config.yaml")
    }
}

/// The largest set of files one plugin is granted.
const MAX_GRANTED_BYTES: usize = 16 << 20;

/// Puts each plugin's `files:` on disk for it (see [`sluice_wasm::Granted`]):
/// `<cache_dir>/plugin-files/<sha256>/`, written once per content (whole, then renamed) and
/// shared by every plugin and reload with the same files. `list` gives the regular files
/// under a configured path, `read` their bytes. A plugin whose files cannot be read does
/// not load: its entry in `modules` becomes that error.
fn grant_files(
    cfg: &mut AgentConfig,
    mut modules: Modules,
    cache_dir: &std::path::Path,
    list: impl Fn(&str) -> Result<Vec<String>, String>,
    read: impl Fn(&str) -> Result<Vec<u8>, String>,
) -> Modules {
    for spec in cfg.plugins.iter_mut().filter(|s| !s.files.is_empty()) {
        match grant(&spec.files, cache_dir, &list, &read) {
            Ok(g) => spec.granted = Some(g),
            Err(e) => {
                modules.insert(spec.name.clone(), Err(e));
            }
        }
    }
    modules
}

/// The files under `paths`, read and stored ([`store_granted`]).
fn grant(
    paths: &[String],
    cache_dir: &std::path::Path,
    list: impl Fn(&str) -> Result<Vec<String>, String>,
    read: impl Fn(&str) -> Result<Vec<u8>, String>,
) -> Result<sluice_wasm::Granted, String> {
    let mut files = BTreeMap::new();
    let mut total = 0;
    for p in paths {
        for path in list(p).map_err(|e| format!("files: {e}"))? {
            let bytes = read(&path).map_err(|e| format!("files: {e}"))?;
            total += bytes.len();
            if total > MAX_GRANTED_BYTES {
                return Err(format!("files: more than {MAX_GRANTED_BYTES} bytes"));
            }
            files.insert(path, bytes);
        }
    }
    store_granted(cache_dir, &files)
}

/// `spec`'s `files:` read from a directory on disk (the CLI's local configuration), stored
/// as the agent stores them.
///
/// # Errors
/// A path that is missing or unreadable, or more than the files one plugin may hold.
pub fn grant_local_files(
    spec: &sluice_wasm::Spec,
    base: &std::path::Path,
    cache_dir: &std::path::Path,
) -> Result<Option<sluice_wasm::Granted>, String> {
    if spec.files.is_empty() {
        return Ok(None);
    }
    let read = |p: &str| {
        std::fs::read(base.join(p)).map_err(|e| format!("{}: {e}", base.join(p).display()))
    };
    grant(&spec.files, cache_dir, |p| local_files(base, p), read).map(Some)
}

/// Writes `files` (repository-relative path → bytes) under their digest, unless there.
fn store_granted(
    cache_dir: &std::path::Path,
    files: &BTreeMap<String, Vec<u8>>,
) -> Result<sluice_wasm::Granted, String> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for (path, bytes) in files {
        for field in [path.as_bytes(), bytes] {
            h.update((field.len() as u64).to_le_bytes());
            h.update(field);
        }
    }
    let sha256 = hex::encode(h.finalize());
    let root = cache_dir.join("plugin-files");
    let dir = root.join(&sha256);
    if !dir.is_dir() {
        let tmp = root.join(format!("{sha256}.tmp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let written = files.iter().try_for_each(|(path, bytes)| {
            let at = tmp.join(path);
            std::fs::create_dir_all(at.parent().unwrap_or(&tmp))?;
            std::fs::write(at, bytes)
        });
        if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, &dir)) {
            let _ = std::fs::remove_dir_all(&tmp);
            if !dir.is_dir() {
                return Err(format!(
                    "files: failed to store them in {}: {e}",
                    root.display()
                ));
            }
        }
    }
    Ok(sluice_wasm::Granted { dir, sha256 })
}

/// The regular files under `path` (relative to `base`), as `/`-separated paths relative to
/// `base`, in name order; symlinks are skipped, as in a repository.
pub fn local_files(base: &std::path::Path, path: &str) -> Result<Vec<String>, String> {
    let path = path.trim_matches('/');
    let mut out = Vec::new();
    let mut stack = vec![std::path::PathBuf::from(path)];
    while let Some(rel) = stack.pop() {
        let full = base.join(&rel);
        let meta =
            std::fs::symlink_metadata(&full).map_err(|e| format!("{}: {e}", full.display()))?;
        if meta.is_dir() {
            let mut names: Vec<_> = std::fs::read_dir(&full)
                .map_err(|e| format!("{}: {e}", full.display()))?
                .filter_map(Result::ok)
                .map(|e| rel.join(e.file_name()))
                .collect();
            names.sort();
            stack.extend(names.into_iter().rev());
        } else if meta.is_file() {
            out.push(rel.to_string_lossy().replace('\\', "/"));
        }
    }
    Ok(out)
}

fn read_modules(
    cfg: &AgentConfig,
    cache_dir: &std::path::Path,
    opts: &Options,
    read_path: impl Fn(&str) -> Result<Vec<u8>, String>,
) -> Modules {
    cfg.plugins
        .iter()
        .map(|s| {
            let bytes = if s.module.starts_with("https://") {
                fetch_module(&s.module, s.sha256.as_deref(), cache_dir, MAX_MODULE_BYTES)
            } else if s.module.starts_with("oci://") {
                let keys = cfg.plugin_keys.get(&s.name).map(|path| {
                    read_path(path).and_then(|pem| {
                        crate::cosign::Keys::parse([(path.as_str(), pem.as_slice())])
                    })
                });
                match keys.transpose() {
                    Ok(keys) => pull_module(&s.name, &s.module, s.sha256.as_deref(), keys, opts),
                    Err(e) => Err(format!("verify.key: {e}")),
                }
            } else {
                read_path(&s.module)
            };
            (s.name.clone(), bytes)
        })
        .collect()
}

/// A module by OCI reference ([`crate::oci::pull_module`]), through its registry's
/// credentials and CA; with `sha256`, the module itself must have that digest too. The
/// manifest digest it resolved to is logged.
fn pull_module(
    name: &str,
    reference: &str,
    sha256: Option<&str>,
    keys: Option<crate::cosign::Keys>,
    opts: &Options,
) -> Result<Vec<u8>, String> {
    let r = crate::oci::ModuleRef::parse(reference)?;
    let source = source_for(&r.repository, opts, None);
    let crate::oci::Module { bytes, digest, .. } = crate::oci::pull_module(&source, &r)?;
    if let Some(keys) = &keys {
        let how =
            crate::oci::verify(&source, &digest, keys).map_err(|e| format!("refused: {e}"))?;
        info!(plugin = %name, digest = %digest, verified = %how, "plugin module signature verified");
    }
    let got = sluice_model::object::sha256_bytes_hex(&bytes);
    if let Some(want) = sha256
        && got != want
    {
        return Err(format!(
            "{reference}: the module's sha256 is {got}, the configuration says {want}"
        ));
    }
    info!(plugin = %name, module = %r.repository, tag = r.tag.as_deref().unwrap_or_default(), digest = %digest, sha256 = %got, "plugin module from an OCI registry");
    Ok(bytes)
}

/// The largest module downloaded over https.
const MAX_MODULE_BYTES: u64 = 100 << 20;

/// A module from `url`, downloaded once per digest: `<cache_dir>/modules/<sha256>.wasm` is
/// used while its content has that digest (the configuration re-read every poll does not
/// download again). A download has a 60 s deadline and reads at most `max` bytes, whatever
/// the server announces; a body whose digest is not `sha256` is refused and not cached.
fn fetch_module(
    url: &str,
    sha256: Option<&str>,
    cache_dir: &std::path::Path,
    max: u64,
) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let shown = without_credentials(url);
    let cached = sha256.map(|h| cache_dir.join("modules").join(format!("{h}.wasm")));
    if let (Some(path), Some(want)) = (&cached, sha256)
        && let Ok(bytes) = std::fs::read(path)
        && sluice_model::object::sha256_bytes_hex(&bytes) == want
    {
        return Ok(bytes);
    }
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .map_err(|e| format!("failed to build an HTTP client: {e}"))?;
    let resp = client
        .get(url)
        .send()
        .and_then(|r| r.error_for_status())
        .map_err(|e| format!("failed to download {shown}: {}", e.without_url()))?;
    if resp.content_length().is_some_and(|n| n > max) {
        return Err(format!("{shown}: module larger than {max} bytes"));
    }
    let mut bytes = Vec::new();
    resp.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("failed to download {shown}: {e}"))?;
    if bytes.len() as u64 > max {
        return Err(format!("{shown}: module larger than {max} bytes"));
    }
    if let (Some(path), Some(want)) = (&cached, sha256) {
        let got = sluice_model::object::sha256_bytes_hex(&bytes);
        if got != want {
            return Err(format!(
                "{shown}: sha256 is {got}, the configuration says {want}"
            ));
        }
        // Written whole, then renamed: a reader never sees half a module.
        let dir = path.parent().unwrap_or(cache_dir);
        let tmp = dir.join(format!("{want}.tmp-{}", std::process::id()));
        let stored = std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::write(&tmp, &bytes))
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = stored {
            let _ = std::fs::remove_file(&tmp);
            warn!(module = %shown, error = %e, "failed to cache a downloaded module; it is downloaded again next time");
        }
    }
    Ok(bytes)
}

/// `url` without user name and password, for messages.
fn without_credentials(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.to_string()
        }
        Err(_) => "(module URL)".into(),
    }
}

/// A source for `url` with `credentials`, else the token of its host, and the extra CA.
fn source_for(url: &str, opts: &Options, credentials: Option<Credentials>) -> Source {
    let credentials = credentials.or_else(|| credentials_for(url, opts));
    let source = Source::new(url, &opts.cache_dir, credentials);
    let source = match &opts.git_ca {
        Some(pem) => source.with_ca(pem.clone()),
        None => source,
    };
    if source.is_oci() {
        opts.registries.configure(source)
    } else {
        source
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
    /// Live objects drifted from the last sync: sync again now.
    drifted: bool,
    /// How soon drift may be restored again.
    drift_budget: DriftBudget,
    /// What the last successful sync applied, while no drift was seen since
    /// ([`sync::Settings::known`]).
    known: Arc<BTreeMap<ObjRef, sluice_engine::apply::Digest>>,
}

/// Drift is restored at once up to DRIFT_BURST times in a row, then at most once every
/// DRIFT_MIN_INTERVAL per project: an edit or a deletion by hand is undone within a second,
/// and a controller that rewrites a field git sets cannot make the agent apply in a loop.
const DRIFT_MIN_INTERVAL: Duration = Duration::from_secs(5);
const DRIFT_BURST: u32 = 3;

/// A token bucket for drift restores: DRIFT_BURST tokens, one more every
/// DRIFT_MIN_INTERVAL.
#[derive(Debug, Clone, Copy, Default)]
struct DriftBudget {
    /// Tokens spent and not yet earned back, and when the last one was earned back (or
    /// spent, when all were there).
    spent: u32,
    since: Option<tokio::time::Instant>,
}

impl DriftBudget {
    /// When a drift restore asked for at `now` may start; spends a token.
    fn take(&mut self, now: tokio::time::Instant) -> tokio::time::Instant {
        if let Some(since) = self.since {
            let earned =
                now.saturating_duration_since(since).as_nanos() / DRIFT_MIN_INTERVAL.as_nanos();
            let earned = u32::try_from(earned).unwrap_or(u32::MAX).min(self.spent);
            self.spent -= earned;
            self.since = Some(since + DRIFT_MIN_INTERVAL * earned);
        }
        if self.spent == 0 {
            self.since = Some(now);
        }
        if self.spent < DRIFT_BURST {
            self.spent += 1;
            return now;
        }
        // All spent: wait for the next token, and spend it.
        let at = self.since.unwrap_or(now) + DRIFT_MIN_INTERVAL;
        self.since = Some(at);
        at
    }
}

/// agentk's backoffs: 10 s doubling to 1 min for sync failures.
const BACKOFF_START: Duration = Duration::from_secs(10);
const BACKOFF_MAX: Duration = Duration::from_secs(60);

async fn worker(
    mut cluster: Cluster,
    live: Live,
    project: ManifestProject,
    plugins: Result<Vec<Arc<Plugin>>, plugins::Error>,
    inventory: Result<Inventories, String>,
    opts: Options,
    wake: Arc<webhook::Wake>,
) {
    let Ok(inventory) = inventory else {
        // The error was logged when the worker started; it never syncs (nothing it could
        // do is safe) until the configuration changes.
        return std::future::pending().await;
    };
    let (source, settings) = prepare(&project, plugins, inventory, Some(live.clone()), &opts);
    let replica = match &opts.ownership {
        Some(o) => Some(o.identity().to_string()),
        None => instance(),
    };
    let mut history = History::new(cluster.client().clone(), replica);
    let mut state = State::default();
    // Watches the objects of the last successful sync; none while a sync runs.
    let mut drift: Option<Drift> = None;
    let id = &project.id;
    loop {
        // A push after this point means: list the ref again before waiting.
        let pushes = wake.pushes();
        let commit = match resolve(source.clone(), project.git_ref.clone()).await {
            Ok(c) => c,
            Err(e) => {
                warn!(project_id = %id, agent_id = %opts.agent_name, git_ref = %project.git_ref, error = %e, "{}", msg::POLL_FAILED);
                pause(&mut drift, &mut state, id, &opts, &wake).await;
                continue;
            }
        };
        let now = tokio::time::Instant::now();
        if !state.due(&commit, now, opts.reapply_interval) {
            if wake.pushes() == pushes {
                pause(&mut drift, &mut state, id, &opts, &wake).await;
            }
            continue;
        }
        // The sync's own writes are not drift. What the watch saw of the objects stays
        // the expectation for those the sync leaves alone.
        let expected = drift.take().map(|d| d.baseline()).unwrap_or_default();
        if state.synced.as_ref().is_none_or(|(c, _)| *c != commit) {
            info!(project_id = %id, commit_id = %commit, "{}", msg::NEW_COMMIT);
        }
        let settings = Settings {
            known: state.start(&commit, now, opts.reapply_interval),
            ..settings.clone()
        };
        info!(project_id = %id, commit_id = %commit, agent_id = %opts.agent_name, "{}", msg::SYNCHRONIZING);
        let started = std::time::Instant::now();
        let result = tokio::select! {
            r = sync::sync(&mut cluster, &source, &project, &commit, &settings) => r,
            _ = newer_commit(source.clone(), project.git_ref.clone(), commit.clone(), opts.poll_interval, &wake) => {
                opts.metrics.record_sync(id, "canceled", started.elapsed(), &[]);
                info!(project_id = %id, commit_id = %commit, "{}", msg::CANCELED);
                state.known = Default::default();
                // A newer commit is there: sync it now, not after a poll interval.
                continue;
            }
        };
        let elapsed = started.elapsed();
        let ended = Ended {
            project: &project,
            settings: &settings,
            commit: &commit,
            elapsed,
        };
        ended
            .tell(&mut history, &opts.agent_name, result.as_ref())
            .await;
        match result {
            Ok(report) => {
                opts.metrics
                    .record_sync(id, "success", elapsed, &report.results);
                drift = Some(watch_drift(&live, &cluster, id, &report, &expected));
                state.succeeded(&commit, report.applied.clone());
            }
            Err(e) => {
                opts.metrics.record_sync(id, "failure", elapsed, &[]);
                if deleted_during_wait(&e) {
                    // Someone deleted what this sync applied, before it was ready: drift,
                    // restored now rather than after a failure's backoff.
                    info!(project_id = %id, "objects were deleted during the health wait; syncing again");
                    state.drifted(tokio::time::Instant::now()).await;
                    continue;
                }
                state.failed(&commit, tokio::time::Instant::now());
                // Discovery may be stale (a CRD appeared or went); refresh before retrying.
                let _ = cluster.refresh().await;
            }
        }
        // A push during the sync may have been taken by a wait that the sync's end
        // abandoned: look at the ref again instead of sleeping.
        if wake.pushes() == pushes {
            pause(&mut drift, &mut state, id, &opts, &wake).await;
        }
    }
}

/// Waits until the next poll (or sooner, when a failed sync's backoff or the re-apply timer
/// ends), a push webhook for this project, or drift; after drift, until the drift budget
/// allows the restore.
async fn pause(
    drift: &mut Option<Drift>,
    state: &mut State,
    project: &str,
    opts: &Options,
    wake: &webhook::Wake,
) {
    let drifted = async {
        match drift.as_mut() {
            Some(d) => d.changed().await,
            None => std::future::pending().await,
        }
    };
    let next = state.next_wake(
        tokio::time::Instant::now(),
        opts.poll_interval,
        opts.reapply_interval,
    );
    let why = tokio::select! {
        _ = tokio::time::sleep_until(next) => return,
        _ = wake.notified() => return,
        why = drifted => why,
    };
    info!(project_id = %project, drift = %why, "live objects drifted from git; syncing again");
    *drift = None;
    state.drifted(tokio::time::Instant::now()).await;
}

/// Watches the objects a successful sync applied for drift; the unchanged ones keep what
/// the last watch saw of them (`expected`) as their baseline.
fn watch_drift(
    live: &Live,
    cluster: &Cluster,
    project: &str,
    report: &sync::Report,
    expected: &BTreeMap<ObjRef, sluice_engine::drift::Fingerprint>,
) -> Drift {
    let applied: Vec<_> = report.applied.keys().cloned().collect();
    let untouched: BTreeMap<_, _> = report
        .results
        .iter()
        .filter(|r| r.action == Action::Unchanged)
        .filter_map(|r| Some((r.obj.clone(), expected.get(&r.obj)?.clone())))
        .collect();
    Drift::watch(live, project, cluster, &applied, &untouched)
}

/// A sync that failed only because what it applied was deleted before it became healthy.
fn deleted_during_wait(e: &sync::Error) -> bool {
    let problems = e.problems();
    !problems.is_empty()
        && problems
            .iter()
            .all(|p| p.message.contains(wait::DELETED_DURING_WAIT))
}

impl State {
    /// Whether `commit` is to be synced at `now`: a new commit at once, a failed one when
    /// its backoff ends, the synced one after drift or when the re-apply timer ends.
    fn due(&self, commit: &str, now: tokio::time::Instant, reapply: Duration) -> bool {
        match (&self.synced, &self.failed) {
            (_, Some((c, at, _))) if c == commit => now >= *at,
            (Some((c, at)), _) if c == commit => self.drifted || now.duration_since(*at) >= reapply,
            _ => true,
        }
    }

    /// A sync of `commit` starts at `now`: returns what it may take as applied
    /// ([`sync::Settings::known`]): nothing on the periodic full re-apply (the safety net
    /// checks everything), else what the last sync applied and no one changed since.
    fn start(
        &mut self,
        commit: &str,
        now: tokio::time::Instant,
        reapply: Duration,
    ) -> Arc<BTreeMap<ObjRef, sluice_engine::apply::Digest>> {
        self.drifted = false;
        let full = self
            .synced
            .as_ref()
            .is_some_and(|(c, at)| c == commit && now.duration_since(*at) >= reapply);
        if full {
            Default::default()
        } else {
            self.known.clone()
        }
    }

    /// The next time to look at the ref: the next poll, or sooner when a failed sync's
    /// backoff or the re-apply timer ends (only those still ahead: one that passed did not
    /// make the sync due).
    fn next_wake(
        &self,
        now: tokio::time::Instant,
        poll: Duration,
        reapply: Duration,
    ) -> tokio::time::Instant {
        [
            self.failed.as_ref().map(|(_, at, _)| *at),
            self.synced.as_ref().map(|(_, at)| *at + reapply),
        ]
        .into_iter()
        .flatten()
        .filter(|at| *at > now)
        .fold(now + poll, std::cmp::min)
    }

    fn succeeded(
        &mut self,
        commit: &str,
        applied: Arc<BTreeMap<ObjRef, sluice_engine::apply::Digest>>,
    ) {
        self.known = applied;
        self.synced = Some((commit.to_string(), tokio::time::Instant::now()));
        self.failed = None;
    }

    /// A sync of `commit` failed at `now`: retried after agentk's backoff, 10 s doubling to
    /// 1 min while the same commit keeps failing. Unknown what the cluster holds now: the
    /// next sync checks it all.
    fn failed(&mut self, commit: &str, now: tokio::time::Instant) {
        self.known = Default::default();
        let backoff = match &self.failed {
            Some((c, _, b)) if c == commit => (*b * 2).min(BACKOFF_MAX),
            _ => BACKOFF_START,
        };
        self.failed = Some((commit.to_string(), now + backoff, backoff));
    }

    /// Live objects drifted at `now`: sync again, once the drift budget allows (a
    /// controller that fights git is answered at most every DRIFT_MIN_INTERVAL, after a
    /// burst of DRIFT_BURST).
    async fn drifted(&mut self, now: tokio::time::Instant) {
        // What drifted is no longer as applied: the next sync checks everything.
        self.known = Default::default();
        self.drifted = true;
        let at = self.drift_budget.take(now);
        tokio::time::sleep_until(at).await;
    }
}

/// A sync that ended, for the logs and the cluster's history.
struct Ended<'a> {
    project: &'a ManifestProject,
    settings: &'a Settings,
    commit: &'a str,
    elapsed: Duration,
}

impl Ended<'_> {
    /// Logs the outcome ([`report::sync_finished`]) and records it on the project's
    /// inventory ([`History::record`]).
    async fn tell(
        &self,
        history: &mut History,
        agent: &str,
        result: Result<&sync::Report, &sync::Error>,
    ) {
        report::sync_finished(&self.project.id, agent, self.commit, self.elapsed, result);
        let inventory =
            InventoryRef::default_for(&self.settings.inventory_id, &self.project.default_namespace);
        history
            .record(&history::Outcome {
                project: &self.project.id,
                commit: self.commit,
                inventory: &inventory,
                elapsed: self.elapsed,
                result,
            })
            .await;
    }
}

/// This replica's name in Events (agentk's `POD_NAME`).
fn instance() -> Option<String> {
    std::env::var("POD_NAME").ok().filter(|n| !n.is_empty())
}

/// Ref listings (polls) running at once across all projects: 1,000 workers polling
/// together held a blocking thread each, and each gix connection its own HTTP client.
const POLLS_AT_ONCE: usize = 16;
static POLLS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(POLLS_AT_ONCE);

async fn resolve(source: Source, git_ref: GitRef) -> Result<String, String> {
    // The deadline starts once the poll has its slot: waiting for one is not the remote's
    // fault.
    let _slot = POLLS.acquire().await.map_err(|e| e.to_string())?;
    source
        .resolve_within(&git_ref, sync::GIT_TIMEOUT)
        .await
        .map_err(|e| e.to_string())
}

/// Resolves when the ref moves away from `current` (never for a commit ref); looks every
/// `every`, or when a push wakes it.
async fn newer_commit(
    source: Source,
    git_ref: GitRef,
    current: String,
    every: Duration,
    wake: &webhook::Wake,
) {
    if matches!(git_ref, GitRef::Commit(_)) {
        return std::future::pending().await;
    }
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = wake.notified() => {}
        }
        match resolve(source.clone(), git_ref.clone()).await {
            Ok(c) if c != current => return,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn projects_reading_one_repository_are_siblings() {
        // The configuration project's manifests, a chart from it, the same repository
        // spelled as a URL, and another repository.
        let cfg = config::parse(
            "gitops:\n  manifest_projects:\n  - id: group/agent\n  - id: https://git.example/group/agent.git\n  - id: group/other\n  charts:\n  - release_name: web\n    source: {project: {path: charts/web}}\n",
            "group/agent",
        )
        .expect("config");
        let ids = cfg
            .manifest_projects
            .iter()
            .map(|p| (p.id.clone(), Ok(format!("inv-{}", p.id.len()))))
            .collect();
        let siblings = |id: &str| -> Vec<String> {
            let p = cfg
                .manifest_projects
                .iter()
                .find(|p| p.id == id)
                .expect("project");
            let repos = Repositories::of(&cfg, "https://git.example");
            let inv = inventory_for(&cfg, &ids, p, &repos).expect("inventories");
            assert_eq!(inv.others.len(), 3);
            inv.siblings.into_iter().map(|(p, _)| p.id).collect()
        };
        assert_eq!(
            siblings("group/agent"),
            ["https://git.example/group/agent.git", "chart:default/web"]
        );
        assert_eq!(
            siblings("chart:default/web"),
            ["group/agent", "https://git.example/group/agent.git"]
        );
        assert!(siblings("group/other").is_empty());
    }

    #[test]
    fn a_commit_is_due_when_new_after_its_backoff_after_drift_or_at_reapply() {
        let t0 = tokio::time::Instant::now();
        let reapply = Duration::from_secs(300);
        let mut state = State::default();
        assert!(state.due("a", t0, reapply), "new commit");
        state.succeeded("a", Default::default());
        let t1 = state.synced.as_ref().unwrap().1;
        assert!(!state.due("a", t1 + Duration::from_secs(10), reapply));
        assert!(state.due("a", t1 + reapply, reapply), "re-apply timer");
        assert!(state.due("b", t1, reapply), "another commit");
        state.drifted = true;
        assert!(state.due("a", t1, reapply), "drift");
        state.drifted = false;
        state.failed("b", t1);
        assert!(!state.due("b", t1 + Duration::from_secs(9), reapply));
        assert!(state.due("b", t1 + BACKOFF_START, reapply));
    }

    #[tokio::test]
    async fn drift_and_failure_forget_what_was_known_as_applied() {
        let r = ObjRef {
            group: "".into(),
            kind: "ConfigMap".into(),
            namespace: "ns".into(),
            name: "a".into(),
        };
        let known = || Arc::new(BTreeMap::from([(r.clone(), [0u8; 32])]));
        let mut state = State::default();
        state.succeeded("a", known());
        state.drifted(tokio::time::Instant::now()).await;
        assert!(
            state.known.is_empty(),
            "drift: the next sync checks everything"
        );
        assert!(state.drifted);
        state.succeeded("a", known());
        state.failed("a", tokio::time::Instant::now());
        assert!(
            state.known.is_empty(),
            "failure: the next sync checks everything"
        );
    }

    #[test]
    fn a_failing_commit_backs_off_from_10_s_doubling_to_a_minute() {
        let t0 = tokio::time::Instant::now();
        let mut state = State::default();
        let mut backoffs = Vec::new();
        for _ in 0..5 {
            state.failed("a", t0);
            backoffs.push(state.failed.as_ref().unwrap().2.as_secs());
        }
        assert_eq!(backoffs, [10, 20, 40, 60, 60]);
        state.failed("b", t0);
        assert_eq!(
            state.failed.as_ref().unwrap().2,
            BACKOFF_START,
            "a new commit starts over"
        );
    }

    #[test]
    fn the_worker_wakes_at_the_next_poll_backoff_or_reapply_still_ahead() {
        let t0 = tokio::time::Instant::now();
        let (poll, reapply) = (Duration::from_secs(20), Duration::from_secs(300));
        let mut state = State::default();
        assert_eq!(state.next_wake(t0, poll, reapply), t0 + poll);
        state.failed("a", t0);
        assert_eq!(state.next_wake(t0, poll, reapply), t0 + BACKOFF_START);
        assert_eq!(
            state.next_wake(t0 + BACKOFF_START, poll, reapply),
            t0 + BACKOFF_START + poll,
            "a backoff that passed does not count"
        );
    }

    #[test]
    fn drift_is_restored_at_once_a_few_times_then_every_interval() {
        let t0 = tokio::time::Instant::now();
        let s = |n: u64| t0 + Duration::from_millis(n);
        let mut b = DriftBudget::default();
        // A burst of DRIFT_BURST restores, each at once.
        assert_eq!(b.take(s(0)), s(0));
        assert_eq!(b.take(s(100)), s(100));
        assert_eq!(b.take(s(200)), s(200));
        // Then one per DRIFT_MIN_INTERVAL, counted from the first spent token.
        assert_eq!(b.take(s(300)), s(5_000));
        assert_eq!(b.take(s(5_000)), s(10_000));
        // A controller that fights git keeps getting one every interval.
        assert_eq!(b.take(s(10_000)), s(15_000));
        // Quiet for long enough, and the whole burst is back.
        let later = s(60_000);
        assert_eq!(b.take(later), later);
        assert_eq!(b.take(s(60_001)), s(60_001));
        assert_eq!(b.take(s(60_002)), s(60_002));
        assert_eq!(b.take(s(60_003)), s(65_000));
        // One quiet interval earns one token back.
        let mut b = DriftBudget::default();
        for k in 0..3 {
            b.take(s(k));
        }
        assert_eq!(b.take(s(5_500)), s(5_500), "one token earned back at 5 s");
        assert_eq!(b.take(s(5_600)), s(10_000));
    }

    #[test]
    fn sluice_yaml_wins_over_agentk_config_yaml() {
        let both = |p: &str| p.ends_with("sluice.yaml") || p.ends_with("config.yaml");
        assert_eq!(config_path("a", both), ".gitlab/agents/a/sluice.yaml");
        let agentk_only = |p: &str| p.ends_with("config.yaml");
        assert_eq!(
            config_path("a", agentk_only),
            ".gitlab/agents/a/config.yaml"
        );
        // Neither: agentk's path, read as an empty configuration.
        assert_eq!(config_path("a", |_| false), ".gitlab/agents/a/config.yaml");
    }
}

#[cfg(test)]
mod module_tests {
    use super::*;

    /// A one-shot HTTP server on loopback answering with `body` and no Content-Length.
    fn serve(body: Vec<u8>) -> String {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        std::thread::spawn(move || {
            if let Ok((mut conn, _)) = listener.accept() {
                let mut request = [0u8; 1024];
                let _ = conn.read(&mut request);
                let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n");
                let _ = conn.write_all(&body);
            }
        });
        format!("http://user:secret-token@{addr}/plugin.wasm")
    }

    #[test]
    fn a_module_is_downloaded_once_per_digest_and_bounded() {
        let cache = tempfile::tempdir().expect("dir");
        let module = b"\0asm pretend".to_vec();
        let digest = sluice_model::object::sha256_bytes_hex(&module);
        let url = serve(module.clone());
        assert_eq!(
            fetch_module(&url, Some(&digest), cache.path(), 1024),
            Ok(module.clone())
        );
        // The server is gone: the cached copy is used.
        assert_eq!(
            fetch_module(&url, Some(&digest), cache.path(), 1024),
            Ok(module)
        );

        // A body past the limit, without a Content-Length: refused after max + 1 bytes.
        let url = serve(vec![b'x'; 4096]);
        let err =
            fetch_module(&url, Some(&"0".repeat(64)), cache.path(), 1024).expect_err("too large");
        assert!(err.ends_with("module larger than 1024 bytes"), "{err}");
        assert!(!err.contains("secret-token"), "{err}");

        // A body with another digest is refused and not cached.
        let url = serve(b"other".to_vec());
        let err =
            fetch_module(&url, Some(&"0".repeat(64)), cache.path(), 1024).expect_err("digest");
        assert!(err.contains("the configuration says 0000"), "{err}");
        assert!(
            !cache
                .path()
                .join("modules")
                .join(format!("{}.wasm", "0".repeat(64)))
                .exists()
        );
    }
}
