//! One sync of one commit of one manifest project: the whole path, top to bottom.
//!
//! fetch → select → decode → (plugins) → plan → apply → inventory/prune → wait.
//!
//! Any failure before apply returns with nothing changed in the cluster. Apply itself
//! dry-runs everything first. Pruning only happens after a fully successful apply, and never
//! prunes everything because the selected file set happened to be empty.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use crate::config::{DryRunStrategy, ManifestProject, PropagationPolicy};
use crate::source::Source;
use crate::{decode, select};
use sluice_engine::apply::{self, Action, ObjectResult};
use sluice_engine::cluster::Cluster;
use sluice_engine::inventory::{self, INVENTORY_LABEL, InventoryRef, Ownership};
use sluice_engine::live::Live;
use sluice_engine::plan;
use sluice_engine::wait::{self, Status};
use sluice_model::object::{ObjRef, Object};
use sluice_wasm::{self as plugin_stage, OutcomeCache, Plugin};

/// Why a sync failed. Every variant leaves the cluster as the last good sync left it,
/// except [`Error::Apply`] and [`Error::Unhealthy`], which report what was done.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Fetching the commit failed (retry with backoff).
    #[error(transparent)]
    Source(#[from] crate::source::Error),
    /// File selection failed (user error; retry when the commit changes).
    #[error(transparent)]
    Select(#[from] select::Error),
    /// Decoding failed (user error).
    #[error(transparent)]
    Decode(#[from] decode::Errors),
    /// Planning failed (user error).
    #[error("failed to plan: {0}")]
    Plan(#[from] plan::Error),
    /// More than one inventory object among the manifests.
    #[error(
        "failed to locate inventory object in manifest objects: {0} ConfigMaps carry the label {INVENTORY_LABEL}"
    )]
    InventoryObjects(usize),
    /// The file set is empty while pruning is on.
    #[error(
        "refusing to prune every object of the inventory: the selected file set is empty (check paths; pass --allow-empty-prune to allow it)"
    )]
    EmptySet,
    /// Discovery failed.
    #[error(transparent)]
    Discovery(#[from] sluice_engine::cluster::DiscoveryError),
    /// The inventory could not be read or written.
    #[error(transparent)]
    Inventory(#[from] inventory::Error),
    /// Apply failed (nothing changed for `Rejected`).
    #[error(transparent)]
    Apply(#[from] apply::Error),
    /// Some objects were not applied (their API group is unavailable), failed to prune, or
    /// did not become healthy in time.
    #[error("{message}")]
    Unhealthy {
        /// The whole story, one part per kind of problem.
        message: String,
        /// Each object concerned, with why.
        problems: Vec<Problem>,
    },
    /// A plugin failed, refused the commit, or an enforce-mode validator reported errors.
    #[error(transparent)]
    Plugin(#[from] sluice_wasm::Error),
    /// The inventory this sync would use belongs to someone else.
    #[error("refusing inventory {inventory}: {reason}")]
    InventoryClaimed {
        /// Namespace, name and id.
        inventory: String,
        /// Whose it is, and what to change.
        reason: String,
    },
    /// Objects the project may not create: its `limits:`, or the agent's own objects.
    #[error("{} objects are outside what this project may create: {}", .0.len(), .0.iter().map(|v| format!("{} ({}): {}", v.obj, v.origin, v.message)).collect::<Vec<_>>().join("; "))]
    Limits(Vec<crate::limits::Violation>),
    /// The project's `service_account` cannot be acted as.
    #[error("project {project}: cannot act as its service_account: {message}")]
    Identity {
        /// The project.
        project: String,
        /// Why.
        message: String,
    },
    /// The blocking git task panicked or was cancelled.
    #[error("git task failed: {0}")]
    Task(String),
}

/// One object that made a sync fail, and why.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Problem {
    /// Which object.
    pub obj: ObjRef,
    /// Where git has it (absent for objects only the inventory knows).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin: Option<sluice_model::object::Origin>,
    /// What went wrong.
    pub message: String,
}

impl Error {
    /// The objects this failure is about (none when the commit as a whole failed).
    pub fn problems(&self) -> Vec<Problem> {
        let from_results = |results: &[ObjectResult]| -> Vec<Problem> {
            results
                .iter()
                .filter(|r| r.action == Action::Failed)
                .map(|r| Problem {
                    obj: r.obj.clone(),
                    origin: r.origin.clone(),
                    message: r.message.clone().unwrap_or_default(),
                })
                .collect()
        };
        match self {
            Error::Apply(apply::Error::Rejected { failures, .. }) => from_results(failures),
            Error::Apply(apply::Error::Partial { results }) => from_results(results),
            Error::Unhealthy { problems, .. } => problems.clone(),
            Error::Limits(violations) => violations
                .iter()
                .map(|v| Problem {
                    obj: v.obj.clone(),
                    origin: Some(v.origin.clone()),
                    message: v.message.clone(),
                })
                .collect(),
            _ => Vec::new(),
        }
    }

    /// True for errors only a new commit (or config) can fix; these are logged as
    /// decode failures and retried slowly.
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            Error::Select(_)
                | Error::Decode(_)
                | Error::Plan(_)
                | Error::InventoryObjects(_)
                | Error::InventoryClaimed { .. }
                | Error::Limits(_)
                | Error::Identity { .. }
                | Error::EmptySet
        )
    }
}

/// What one sync did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// Commit id (the full id, also when the configuration names a short one).
    pub commit: String,
    /// Per-object results (applies and prunes).
    pub results: Vec<ObjectResult>,
    /// Health of applied objects after the wait.
    pub health: Vec<wait::Health>,
    /// Plugin findings that did not block the commit (warnings, audit mode).
    pub findings: Vec<sluice_wasm::Finding>,
    /// Why nothing was pruned this time, when pruning was held back (a plugin was
    /// skipped, an API group did not answer discovery, the plugins removed objects git
    /// still has). Empty when pruning ran.
    pub prune_held: Vec<String>,
    /// The agentk inventory this sync adopted and retired, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adopted: Option<String>,
    /// The inventory this sync used.
    #[serde(skip)]
    pub inventory: InventoryRef,
    /// The [`apply::digest`] of each object now in the cluster as applied (created,
    /// configured or unchanged): the next sync's [`Settings::known`] while nothing drifts.
    #[serde(skip)]
    pub applied: Arc<BTreeMap<ObjRef, apply::Digest>>,
    /// The plugins' outcome came from the render cache ([`Settings::render_cache`]): no
    /// plugin ran this sync.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub plugins_cached: bool,
}

/// How to sync, beyond the project's own configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Inventory id when the manifests carry no inventory object.
    pub inventory_id: String,
    /// Server-side apply field manager.
    pub field_manager: String,
    /// Field managers whose ownership is removed from objects this project applies
    /// (default `agentk`): after a takeover, a field removed from git is then removed from
    /// the cluster instead of staying behind, co-owned by the old manager.
    pub cleanup_managers: Vec<String>,
    /// Concurrent applies per stage.
    pub concurrency: usize,
    /// Selection limits.
    pub limits: select::Limits,
    /// Allow pruning everything when no file is selected.
    pub allow_empty_prune: bool,
    /// Agent name (plugins see it in their context).
    pub agent: String,
    /// The plugins this project uses, in order, or why they could not be loaded.
    pub plugins: Result<Vec<Arc<Plugin>>, sluice_wasm::Error>,
    /// The inventories of the agent's other projects: this project may never use them.
    pub others: Vec<InventoryRef>,
    /// Adopt an agentk inventory (`inventory-<agentId>-<projectId>`) found in the
    /// project's namespace when this project has no inventory yet.
    pub takeover: Takeover,
    /// Objects known to be in the cluster as applied ([`apply::Options::known`]): the
    /// agent passes the last sync's [`Report::applied`] while its watches see no drift.
    pub known: Arc<BTreeMap<ObjRef, apply::Digest>>,
    /// Where the plugin chain's outcome is kept per project ([`OutcomeCache`]), so a
    /// resync or restart does not run the plugins again over the same input. `None`: the
    /// plugins run every sync.
    pub render_cache: Option<OutcomeCache>,
    /// The files earlier syncs of this project decoded ([`decode::Memo`]), so a commit
    /// that changes few files decodes few. `None`: every file is decoded every sync.
    pub decoded: Option<decode::Memo>,
    /// The agent's own objects, which no project may create or change.
    pub protected: crate::limits::Protected,
    /// The agent's watches of the live objects ([`Live`]), which the health wait reads
    /// instead of listing the objects again each sync. `None`: each wait watches for
    /// itself.
    pub live: Option<Live>,
}

/// Which agentk inventory a project without an inventory of its own may adopt.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Takeover {
    /// Never adopt.
    #[default]
    Off,
    /// Adopt the agentk inventory (an id of the form `<agentId>-<projectId>`, in the
    /// project's `default_namespace`) that owns the live objects of this commit; with an
    /// agent id, only that agent's.
    Agentk {
        /// agentk's numeric agent id, if known.
        agent_id: Option<String>,
    },
}

/// How long fetching one commit may take before it is interrupted and the sync fails (and
/// is retried with backoff).
pub const FETCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// Fetches, selects and decodes `commit`: the offline part of the path. Returns the
/// objects and the full commit id (`commit` may be a short id).
///
/// # Errors
/// Source, selection and decode errors.
pub async fn render(
    source: &Source,
    project: &ManifestProject,
    commit: &str,
    limits: select::Limits,
    memo: Option<&decode::Memo>,
) -> Result<(Vec<Object>, String), Error> {
    let (globs, id, memo) = (project.paths.clone(), project.id.clone(), memo.cloned());
    // Fetch (within its deadline), select and decode are blocking I/O and CPU: all off
    // the async workers.
    source
        .fetch_within(commit, FETCH_TIMEOUT, move |snapshot| {
            let files = select::select(&snapshot, &globs, &limits)?;
            Ok((
                decode::decode_with(&files, &id, &snapshot.commit, memo.as_ref())?,
                snapshot.commit.clone(),
            ))
        })
        .await
}

/// Runs the whole path for `commit`.
///
/// # Errors
/// See [`Error`].
///
/// # Cancellation
/// Dropping the future stops at the next await; the inventory may then be behind the
/// cluster, and objects created meanwhile carry the owning-inventory annotation, so the
/// next sync adopts them under any policy.
pub async fn sync(
    cluster: &mut Cluster,
    source: &Source,
    project: &ManifestProject,
    commit: &str,
    settings: &Settings,
) -> Result<Report, Error> {
    let mut laps = Laps::new(&project.id);
    let (objects, commit) = render(
        source,
        project,
        commit,
        settings.limits,
        settings.decoded.as_ref(),
    )
    .await?;
    let commit = commit.as_str();
    laps.lap("render");

    // Objects of API groups that did not answer discovery are not applied (and fail the
    // sync, naming the APIService); everything else goes on.
    let (mut objects, unserved) = split_unavailable(cluster, objects);
    let mut scopes = cluster.scopes();
    scopes.add_crds(&objects);
    decode::set_namespaces(&mut objects, &project.default_namespace, &scopes)?;
    // What git says, before any plugin: a plugin must not make the sync prune any of it.
    let rendered: BTreeSet<ObjRef> = objects.iter().map(Object::obj_ref).collect();
    let plugins = settings.plugins.clone()?;
    let outcome = transform(
        objects,
        plugins,
        &plugin_stage::Subject {
            agent: settings.agent.clone(),
            project: project.id.as_str().into(),
            commit: commit.into(),
        },
        settings.render_cache.as_ref(),
    )
    .await?;
    laps.lap("plugins");
    let cached = outcome.cached;
    let (mut objects, findings) = (outcome.objects, outcome.findings);
    // Plugins may add objects or kinds: the namespace rules hold for their output too.
    scopes.add_crds(&objects);
    decode::set_namespaces(&mut objects, &project.default_namespace, &scopes)?;
    // And so do the project's limits: git and plugins alike, before any request.
    let refused = crate::limits::check(&objects, &project.limits, &settings.protected);
    if !refused.is_empty() {
        return Err(Error::Limits(refused));
    }

    let (inv, template) = locate_inventory(
        &mut objects,
        &settings.inventory_id,
        &project.default_namespace,
    )?;
    // What the ConfigMap holds (None: no ConfigMap yet); writes are skipped when it would
    // not change, so the 5-minute re-apply of an unchanged commit writes nothing.
    let loaded = inventory::load(cluster.client(), &inv).await?;
    check_ownership(&inv, loaded.as_ref(), project, settings)?;
    let adopted = match (&loaded, &settings.takeover) {
        (None, Takeover::Agentk { agent_id }) => {
            find_agentk_inventory(cluster, &inv, &objects, agent_id.as_deref(), settings).await?
        }
        _ => None,
    };
    let mut recorded = loaded.as_ref().map(|s| s.objects.clone());
    let malformed = loaded.map(|s| s.malformed).unwrap_or_default();
    let mut stored = recorded.clone().unwrap_or_default();
    if let Some((old, old_set)) = &adopted {
        tracing::info!(project_id = %project.id, inventory = %old.id, objects = old_set.objects.len(), "taking over agentk inventory");
        stored.extend(old_set.objects.iter().cloned());
    }
    if objects.is_empty() && project.prune && !stored.is_empty() && !settings.allow_empty_prune {
        return Err(Error::EmptySet);
    }
    laps.lap("inventory");
    let plan = plan::plan(objects, &stored)?;
    let prune_held = prune_holds(cluster, &plan, &stored, &rendered, &outcome.skipped);
    laps.lap("plan");

    let opts = apply::Options {
        field_manager: settings.field_manager.clone(),
        cleanup_managers: settings.cleanup_managers.clone(),
        concurrency: settings.concurrency,
        inventory_id: inv.id.clone(),
        adopt_ids: adopted.iter().map(|(old, _)| old.id.clone()).collect(),
        inventory_policy: project.inventory_policy,
        dry_run: project.dry_run_strategy,
        known: settings.known.clone(),
        ..apply::Options::new(&inv.id)
    };
    let dry_run = project.dry_run_strategy != DryRunStrategy::None;
    let desired_refs = plan.desired();
    let plan::Plan { stages, prune } = plan;
    // The project's objects are read, dry-run, applied, pruned and waited on as its
    // ServiceAccount when it names one; the inventory stays the agent's to write.
    let mut actor = match &project.service_account {
        Some(sa) => cluster
            .acting_as(&sa.user(), &sa.groups())
            .map_err(|message| Error::Identity {
                project: project.id.clone(),
                message,
            })?,
        None => cluster.clone(),
    };
    let mut checked = apply::check(&actor, stages, &opts)
        .await
        .map_err(|e| name_the_template(e, &inv, template.as_ref()))?;
    let digests = checked.digests().clone();
    laps.lap("check");
    let mut results = Vec::new();
    if !dry_run {
        // The inventory's own namespace may come with this commit (a fresh cluster,
        // disaster recovery): it is applied first, as cli-utils does, so the inventory
        // can be written before anything else.
        results.extend(apply::namespace_first(&actor, &mut checked, &inv.namespace, &opts).await?);
        // Record everything about to be written before the first write, so an agent killed
        // mid-apply still knows what it may have created (cli-utils' inventory-add step).
        let upcoming: BTreeSet<ObjRef> = checked
            .objects()
            .map(Object::obj_ref)
            .chain(results.iter().map(|r: &ObjectResult| r.obj.clone()))
            .collect();
        let set = stored.union(&upcoming).cloned().collect();
        record(cluster, &inv, project, &mut recorded, set, &malformed).await?;
    }
    // (namespace_first took its Namespace out of the plan: nothing is applied twice.)
    let applied = apply::apply(&mut actor, checked, &opts).await;
    // Every write of the sync has returned (`live::caught_up`).
    let wrote = std::time::Instant::now();
    // The apply may have refreshed discovery (new CRDs): the agent's handle keeps it.
    cluster.take_discovery(&actor);
    // One buffer of the right size for every result of the sync (10,000 objects: an
    // ObjectResult is about 180 bytes, and a doubling Vec would copy them on the way).
    let applied = applied?;
    let mut all = Vec::with_capacity(results.len() + applied.len() + unserved.len() + prune.len());
    all.append(&mut results);
    all.extend(applied);
    all.extend(unserved.iter().cloned());
    let mut results = all;
    laps.lap("apply");
    if dry_run {
        return Ok(Report {
            commit: commit.into(),
            results,
            health: Vec::new(),
            findings,
            prune_held,
            adopted: None,
            inventory: inv,
            applied: Arc::default(),
            plugins_cached: cached,
        });
    }

    // Already recorded before the writes (stored ∪ upcoming ⊇ stored ∪ applied).
    let desired = applied_refs(&results);
    // Recorded objects of unavailable groups stay recorded (their kinds are not gone):
    // they are in the prune set, which `prune_holds` holds back.
    let mut kept: BTreeSet<ObjRef> = desired.clone();
    let mut pruned = Vec::new();
    if project.prune && prune_held.is_empty() {
        let ctx = PruneContext {
            inv: &inv,
            project,
            adopt_ids: &opts.adopt_ids,
            recorded: &stored,
            desired: &desired_refs,
        };
        // In prune order, kind after kind; the objects of one kind at once, as many at a
        // time as applies (one at a time, 1,000 deletes took 40 s).
        let cluster: &Cluster = &actor;
        for same_kind in prune.chunk_by(|a, b| (&a.group, &a.kind) == (&b.group, &b.kind)) {
            // (By index: a closure taking references here makes the worker future not `Send`.)
            let deletes = (0..same_kind.len()).map(|i| prune_one(cluster, &same_kind[i], &ctx));
            for (r, result) in same_kind
                .iter()
                .zip(apply::bounded(deletes, opts.concurrency).await)
            {
                match result.action {
                    Action::Pruned => pruned.push(r.clone()),
                    Action::Failed | Action::Retained => {
                        kept.insert(r.clone());
                    }
                    _ => {}
                }
                results.push(result);
            }
        }
    } else {
        kept.extend(prune.iter().cloned());
        if project.prune {
            let why = prune_held.join("; ");
            tracing::warn!(project_id = %project.id, commit_id = %commit, reason = %why, "pruning held back");
            results.extend(prune.iter().map(|r| ObjectResult {
                obj: r.clone(),
                origin: None,
                action: Action::Retained,
                message: Some(format!("not pruned this sync: {why}")),
                written: None,
            }));
        }
    }
    record(cluster, &inv, project, &mut recorded, kept, &malformed).await?;
    laps.lap("prune");
    // The adopted agentk inventory is retired only once sluice's records all of it.
    if let Some((old, _)) = &adopted {
        inventory::retire(cluster.client(), old).await?;
        tracing::info!(project_id = %project.id, inventory = %old.id, "agentk inventory retired");
    }

    let applied: Vec<ObjRef> = desired.into_iter().collect();
    let current = async {
        match &settings.live {
            // The agent's watches: what the last sync left is not listed again.
            Some(live) => {
                let tracked = live.track(&project.id, cluster, &applied);
                let written: HashMap<ObjRef, Box<str>> = results
                    .iter()
                    .filter_map(|r| Some((r.obj.clone(), r.written.clone()?)))
                    .collect();
                wait::wait_live(
                    live,
                    &tracked,
                    &applied,
                    &written,
                    wrote,
                    project.reconcile_timeout,
                )
                .await
            }
            None => wait::wait_current(&actor, &applied, project.reconcile_timeout).await,
        }
    };
    let (health, gone) = tokio::join!(
        current,
        wait::wait_gone(&actor, &pruned, project.prune_timeout)
    );
    laps.lap("wait");
    let failed_prunes: Vec<&ObjectResult> = results
        .iter()
        .filter(|r| r.action == Action::Failed && r.origin.is_none())
        .collect();
    let not_ready: Vec<&wait::Health> = health
        .iter()
        .chain(gone.iter())
        .filter(|h| {
            !matches!(h.status, Status::Current | Status::NotFound)
                || (h.status == Status::NotFound && applied.contains(&h.obj))
        })
        .collect();
    if !failed_prunes.is_empty() || !not_ready.is_empty() || !unserved.is_empty() {
        let origins: BTreeMap<&ObjRef, &sluice_model::object::Origin> = results
            .iter()
            .filter_map(|r| Some((&r.obj, r.origin.as_ref()?)))
            .collect();
        let mut problems = Vec::new();
        let mut parts = Vec::new();
        let mut part = |what: String, items: Vec<Problem>| {
            let listed: Vec<String> = items
                .iter()
                .map(|p| format!("{}{}{}", p.obj, separator(&p.message), p.message))
                .collect();
            parts.push(format!("{} {what}: {}", items.len(), listed.join("; ")));
            problems.extend(items);
        };
        if !unserved.is_empty() {
            part(
                "resources not applied".into(),
                unserved
                    .iter()
                    .map(|r| Problem {
                        obj: r.obj.clone(),
                        origin: r.origin.clone(),
                        message: r.message.clone().unwrap_or_default(),
                    })
                    .collect(),
            );
        }
        if !failed_prunes.is_empty() {
            part(
                "resources failed to prune".into(),
                failed_prunes
                    .iter()
                    .map(|r| Problem {
                        obj: r.obj.clone(),
                        origin: None,
                        message: r.message.clone().unwrap_or_default(),
                    })
                    .collect(),
            );
        }
        if !not_ready.is_empty() {
            part(
                "resources failed to reconcile before timeout".into(),
                not_ready
                    .iter()
                    .map(|h| Problem {
                        obj: h.obj.clone(),
                        origin: origins.get(&h.obj).map(|o| (*o).clone()),
                        message: format!(
                            "is {:?}{}",
                            h.status,
                            h.message
                                .as_ref()
                                .map(|m| format!(" ({m})"))
                                .unwrap_or_default()
                        ),
                    })
                    .collect(),
            );
        }
        return Err(Error::Unhealthy {
            message: parts.join("; "),
            problems,
        });
    }
    let applied = Arc::new(
        applied_refs(&results)
            .into_iter()
            .filter_map(|r| {
                let digest = *digests.get(&r)?;
                Some((r, digest))
            })
            .collect(),
    );
    Ok(Report {
        commit: commit.into(),
        results,
        health,
        findings,
        prune_held,
        adopted: adopted.map(|(old, _)| old.id),
        applied,
        inventory: inv,
        plugins_cached: cached,
    })
}

/// Time per stage of one sync, logged at debug level when the sync ends, fails or is
/// cancelled (`RUST_LOG=sluice=debug`): where a slow sync spends its time.
struct Laps<'a> {
    project: &'a str,
    last: std::time::Instant,
    laps: Vec<(&'static str, std::time::Duration)>,
}

impl<'a> Laps<'a> {
    fn new(project: &'a str) -> Self {
        Laps {
            project,
            last: std::time::Instant::now(),
            laps: Vec::new(),
        }
    }

    /// Ends the stage `name` now.
    fn lap(&mut self, name: &'static str) {
        let now = std::time::Instant::now();
        self.laps.push((name, now - self.last));
        self.last = now;
    }
}

impl Drop for Laps<'_> {
    fn drop(&mut self) {
        let stages: Vec<String> = self
            .laps
            .iter()
            .map(|(name, d)| format!("{name} {} ms", d.as_millis()))
            .collect();
        tracing::debug!(project_id = %self.project, stages = %stages.join(", "), "sync stages");
    }
}

/// How a problem's message follows its object in a one-line report: `X is InProgress (…)`
/// reads as a sentence, anything else after a colon.
fn separator(message: &str) -> &'static str {
    if message.starts_with("is ") {
        " "
    } else {
        ": "
    }
}

/// The plugin stage: transformers, then validators, off the async workers. With a
/// `cache`, an outcome stored for the same input is returned without running a plugin,
/// and a new one is stored.
///
/// # Errors
/// [`Error::Plugin`] when a plugin fails or the commit is denied.
pub async fn transform(
    objects: Vec<Object>,
    plugins: Vec<Arc<Plugin>>,
    subject: &plugin_stage::Subject,
    cache: Option<&OutcomeCache>,
) -> Result<plugin_stage::Outcome, Error> {
    if plugins.is_empty() {
        return Ok(plugin_stage::Outcome {
            objects,
            ..Default::default()
        });
    }
    let (subject, cache) = (subject.clone(), cache.cloned());
    let outcome = tokio::task::spawn_blocking(move || {
        let key = cache
            .as_ref()
            .and_then(|_| OutcomeCache::key(&plugins, &subject, &objects));
        if let (Some(cache), Some(key)) = (&cache, &key)
            && let Some(hit) = cache.get(&subject.project, key)
        {
            return Ok(hit);
        }
        let outcome = plugin_stage::run(&plugins, &subject, objects)?;
        if let (Some(cache), Some(key)) = (&cache, &key) {
            cache.put(&subject.project, key, &outcome);
        }
        Ok::<_, sluice_wasm::Error>(outcome)
    })
    .await
    .map_err(|e| Error::Task(e.to_string()))??;
    Ok(outcome)
}

/// Takes out the objects whose API group did not answer discovery, as failed results
/// naming the APIService.
fn split_unavailable(cluster: &Cluster, objects: Vec<Object>) -> (Vec<Object>, Vec<ObjectResult>) {
    let mut unserved = Vec::new();
    let objects = objects
        .into_iter()
        .filter(|o| {
            let Some(why) =
                cluster.unavailable_group(sluice_model::object::group_of(o.api_version()))
            else {
                return true;
            };
            unserved.push(ObjectResult {
                obj: o.obj_ref(),
                origin: Some(o.origin.clone()),
                action: Action::Failed,
                message: Some(format!("not applied: {why}")),
                written: None,
            });
            false
        })
        .collect();
    (objects, unserved)
}

/// Why pruning must wait this sync, if it must. Pure apart from reading which API groups
/// are unavailable.
fn prune_holds(
    cluster: &Cluster,
    plan: &plan::Plan,
    stored: &BTreeSet<ObjRef>,
    rendered: &BTreeSet<ObjRef>,
    skipped: &[String],
) -> Vec<String> {
    let unavailable: BTreeSet<&str> = stored
        .iter()
        .filter_map(|r| cluster.unavailable_group(&r.group))
        .collect();
    hold_reasons(plan, rendered, skipped, &unavailable)
}

/// The prune safety rules, as a pure function (see [`Report::prune_held`]).
fn hold_reasons(
    plan: &plan::Plan,
    rendered: &BTreeSet<ObjRef>,
    skipped: &[String],
    unavailable: &BTreeSet<&str>,
) -> Vec<String> {
    let mut why = Vec::new();
    if plan.prune.is_empty() {
        return why;
    }
    if !skipped.is_empty() {
        why.push(format!(
            "plugin {} failed and was skipped (failure_policy: ignore), so the object set is not what the plugins would make",
            skipped.join(", ")
        ));
    }
    for u in unavailable {
        why.push(format!(
            "{u}; objects of this project may be in it, so whether they left git cannot be told apart from not being seen"
        ));
    }
    let removed: Vec<String> = plan
        .prune
        .iter()
        .filter(|r| rendered.contains(r))
        .map(ToString::to_string)
        .collect();
    if !removed.is_empty() {
        why.push(format!(
            "the plugins removed {} objects that are still in git ({}); a transformer must not drop objects it received",
            removed.len(),
            removed.into_iter().take(5).collect::<Vec<_>>().join(", ")
        ));
    }
    why
}

/// Writes `set` as the inventory unless that is what it already holds.
async fn record(
    cluster: &Cluster,
    inv: &InventoryRef,
    project: &ManifestProject,
    recorded: &mut Option<BTreeSet<ObjRef>>,
    set: BTreeSet<ObjRef>,
    malformed: &[String],
) -> Result<(), Error> {
    if recorded.as_ref() != Some(&set) {
        inventory::store(cluster.client(), inv, &project.id, &set, malformed).await?;
        *recorded = Some(set);
    }
    Ok(())
}

fn applied_refs(results: &[ObjectResult]) -> BTreeSet<ObjRef> {
    results
        .iter()
        .filter(|r| {
            matches!(
                r.action,
                Action::Created | Action::Configured | Action::Unchanged
            )
        })
        .map(|r| r.obj.clone())
        .collect()
}

/// agentk lets users commit their own inventory ConfigMap (labelled with the inventory id);
/// it is then used instead of the default and is not applied as a normal object. Returns
/// the inventory, and where git has the ConfigMap when the commit brings one.
fn locate_inventory(
    objects: &mut Vec<Object>,
    default_id: &str,
    namespace: &str,
) -> Result<(InventoryRef, Option<sluice_model::object::Origin>), Error> {
    let is_inventory = |o: &Object| o.kind() == "ConfigMap" && o.label(INVENTORY_LABEL).is_some();
    let found: Vec<Object> = objects
        .iter()
        .filter(|o| is_inventory(o))
        .cloned()
        .collect();
    match found.as_slice() {
        [] => Ok((InventoryRef::default_for(default_id, namespace), None)),
        [o] => {
            objects.retain(|x| !is_inventory(x));
            let inv = InventoryRef {
                name: o.name().to_string(),
                namespace: o.namespace().unwrap_or(namespace).to_string(),
                id: o
                    .label(INVENTORY_LABEL)
                    .unwrap_or_else(|| default_id.into()),
            };
            Ok((inv, Some(o.origin.clone())))
        }
        many => Err(Error::InventoryObjects(many.len())),
    }
}

/// When objects are refused because another inventory owns them and the commit brings its
/// own inventory ConfigMap, says so on each of them: the cause is usually that ConfigMap
/// (a new or mistyped inventory id), not the objects the server names.
fn name_the_template(
    e: apply::Error,
    inv: &InventoryRef,
    template: Option<&sluice_model::object::Origin>,
) -> apply::Error {
    let (mut failures, total, origin) = match (e, template) {
        (apply::Error::Rejected { failures, total }, Some(origin)) => (failures, total, origin),
        (e, _) => return e,
    };
    for message in failures.iter_mut().filter_map(|f| f.message.as_mut()) {
        if message.starts_with(inventory::POLICY_REFUSAL) {
            message.push_str(&format!(
                "; this commit's inventory is the ConfigMap {}/{} ({origin}) with id {:?}",
                inv.namespace, inv.name, inv.id
            ));
        }
    }
    apply::Error::Rejected { failures, total }
}

/// An inventory is this project's alone: not another project's id or ConfigMap (of this
/// agent, or marked as another project's by any sluice), and not a ConfigMap that is
/// already the inventory of another id.
fn check_ownership(
    inv: &InventoryRef,
    live: Option<&inventory::Stored>,
    project: &ManifestProject,
    settings: &Settings,
) -> Result<(), Error> {
    let refuse = |reason: String| {
        Err(Error::InventoryClaimed {
            inventory: format!("{}/{} (id {})", inv.namespace, inv.name, inv.id),
            reason,
        })
    };
    if let Some(other) = settings
        .others
        .iter()
        .find(|o| o.id == inv.id || (o.name == inv.name && o.namespace == inv.namespace))
    {
        return refuse(format!(
            "it is the inventory of another project of this agent ({}/{}, id {}); give this project an inventory of its own",
            other.namespace, other.name, other.id
        ));
    }
    if let Some(live) = live {
        if let Some(id) = live.id.as_deref().filter(|id| *id != inv.id) {
            return refuse(format!(
                "the ConfigMap already exists as the inventory of id {id:?}"
            ));
        }
        if let Some(owner) = live.project.as_deref().filter(|p| *p != project.id) {
            return refuse(format!(
                "the ConfigMap is the inventory of project {owner:?}"
            ));
        }
    }
    Ok(())
}

/// agentk named its inventories `inventory-<agentId>-<projectId>` (numeric GitLab ids a
/// sluice user rarely knows). For a project with no inventory yet, the one to adopt is the
/// agentk inventory in the project's namespace that owns the live objects of this commit:
/// the id most of them carry in `config.k8s.io/owning-inventory`, if its ConfigMap exists,
/// is not another sluice project's, and lists them.
async fn find_agentk_inventory(
    cluster: &Cluster,
    inv: &InventoryRef,
    objects: &[Object],
    agent_id: Option<&str>,
    settings: &Settings,
) -> Result<Option<(InventoryRef, inventory::Stored)>, Error> {
    let candidates: Vec<(InventoryRef, inventory::Stored)> =
        inventory::list(cluster.client(), &inv.namespace)
            .await?
            .into_iter()
            .filter(|(c, s)| {
                is_agentk_id(&c.id, agent_id)
                    && c.name == format!("inventory-{}", c.id)
                    && s.project.is_none()
                    && !settings.others.iter().any(|o| o.id == c.id)
            })
            .collect();
    if candidates.is_empty() {
        return Ok(None);
    }
    // Count, per candidate, the desired objects it lists whose live annotation is its id.
    let mut votes: BTreeMap<String, usize> = BTreeMap::new();
    for o in objects {
        let r = o.obj_ref();
        let Some((_, stored)) = candidates.iter().find(|(_, s)| s.objects.contains(&r)) else {
            continue;
        };
        let live = cluster.get(&r).await.ok().flatten();
        if let Some(owner) = live
            .as_ref()
            .and_then(|l| sluice_model::object::annotation(l, inventory::OWNING_INVENTORY))
            && stored.id.as_deref() == Some(owner)
        {
            *votes.entry(owner.to_string()).or_default() += 1;
        }
    }
    let best = votes
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(id, n)| (id.clone(), *n));
    let Some((id, n)) = best else { return Ok(None) };
    if votes.values().filter(|v| **v == n).count() > 1 {
        return Err(Error::InventoryClaimed {
            inventory: format!("{}/{}", inv.namespace, inv.name),
            reason: format!(
                "several agentk inventories own this commit's objects ({}); pass --agentk-agent-id or --inventory-id PROJECT=ID to choose",
                votes.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        });
    }
    Ok(candidates.into_iter().find(|(c, _)| c.id == id))
}

/// `<agentId>-<projectId>`, both numeric (agentk's inventory ids).
fn is_agentk_id(id: &str, agent_id: Option<&str>) -> bool {
    let Some((agent, project)) = id.split_once('-') else {
        return false;
    };
    let numeric = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    numeric(agent) && numeric(project) && agent_id.is_none_or(|a| a == agent)
}

/// What a prune decision needs to know beyond the object.
struct PruneContext<'a> {
    inv: &'a InventoryRef,
    project: &'a ManifestProject,
    adopt_ids: &'a [String],
    /// Everything the inventory records (adopted entries included).
    recorded: &'a BTreeSet<ObjRef>,
    /// Everything this commit applies.
    desired: &'a BTreeSet<ObjRef>,
}

async fn prune_one(cluster: &Cluster, r: &ObjRef, ctx: &PruneContext<'_>) -> ObjectResult {
    let result = |action, message: Option<String>| ObjectResult {
        obj: r.clone(),
        origin: None,
        action,
        message,
        written: None,
    };
    if let Some(why) = cluster.unavailable_group(&r.group) {
        return result(Action::Retained, Some(format!("not pruned: {why}")));
    }
    let api = match cluster.api_for_ref(r) {
        Some(api) => api,
        None => {
            match kube::discovery::oneshot::group(cluster.client(), &r.group).await {
                // Discovery may be stale: ask once more before believing the kind is gone.
                Ok(g) if g.recommended_kind(&r.kind).is_some() => {
                    return result(
                    Action::Retained,
                    Some("not pruned: its kind appeared since the last discovery; retried next sync".into()),
                );
                }
                Ok(_) => return result(Action::Pruned, Some("kind no longer served".into())),
                Err(kube::Error::Api(e)) if e.code == 404 => {
                    return result(Action::Pruned, Some("kind no longer served".into()));
                }
                Err(e) => {
                    return result(
                        Action::Retained,
                        Some(format!(
                            "not pruned: failed to discover {}: {}",
                            r.group,
                            apply::api_message(&e)
                        )),
                    );
                }
            }
        }
    };
    let live = match api.get_opt(&r.name).await {
        Ok(Some(o)) => serde_json::to_value(o).unwrap_or_default(),
        Ok(None) => return result(Action::Pruned, Some("already gone".into())),
        Err(e) => {
            return result(
                Action::Failed,
                Some(format!(
                    "failed to read before prune: {}",
                    apply::api_message(&e)
                )),
            );
        }
    };
    if inventory::keep_on_remove(&live) {
        let patch =
            serde_json::json!({"metadata": {"annotations": {inventory::OWNING_INVENTORY: null}}});
        return match api
            .patch(
                &r.name,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => result(Action::Abandoned, Some("kept: on-remove annotation".into())),
            Err(e) => result(
                Action::Failed,
                Some(format!("failed to release: {}", apply::api_message(&e))),
            ),
        };
    }
    let mut ownership = Ownership::of(&live, &ctx.inv.id);
    if ownership == Ownership::NoMatch
        && sluice_model::object::annotation(&live, inventory::OWNING_INVENTORY)
            .is_some_and(|a| ctx.adopt_ids.iter().any(|id| id == a))
    {
        ownership = Ownership::Match;
    }
    if !inventory::may_prune(ctx.project.inventory_policy, ownership) {
        return result(Action::Skipped, Some("not owned by this inventory".into()));
    }
    if r.group.is_empty()
        && r.kind == "Namespace"
        && let Some(why) = namespace_in_use(cluster, &r.name, ctx).await
    {
        return result(Action::Retained, Some(format!("not pruned: {why}")));
    }
    let propagation = match ctx.project.prune_propagation_policy {
        PropagationPolicy::Orphan => kube::api::PropagationPolicy::Orphan,
        PropagationPolicy::Background => kube::api::PropagationPolicy::Background,
        PropagationPolicy::Foreground => kube::api::PropagationPolicy::Foreground,
    };
    let dp = kube::api::DeleteParams {
        propagation_policy: Some(propagation),
        ..Default::default()
    };
    match api.delete(&r.name, &dp).await {
        Ok(_) => result(Action::Pruned, None),
        Err(e) => result(
            Action::Failed,
            Some(format!("failed to delete: {}", apply::api_message(&e))),
        ),
    }
}

/// Why the Namespace `name` must not be deleted, if it must not: deleting a Namespace
/// deletes everything in it, so it is pruned only when it holds nothing but what this
/// project recorded (and what the cluster made for those objects). cli-utils'
/// local-namespaces filter refuses the first two cases too.
async fn namespace_in_use(cluster: &Cluster, name: &str, ctx: &PruneContext<'_>) -> Option<String> {
    if name == ctx.inv.namespace {
        return Some(format!(
            "namespace still in use: it holds this project's inventory {}",
            ctx.inv.name
        ));
    }
    if let Some(o) = ctx.desired.iter().find(|o| o.namespace == name) {
        return Some(format!(
            "namespace still in use: {o} of this commit is in it"
        ));
    }
    if let Some(group) = cluster.unavailable().keys().next() {
        return Some(format!(
            "cannot tell whether it is empty while API group {group} is unavailable"
        ));
    }
    match cluster.foreign_objects(name, ctx.recorded).await {
        Ok(foreign) if foreign.is_empty() => None,
        Ok(foreign) => Some(format!(
            "namespace still in use: it holds {} objects this project does not own ({}{}); move or delete them, or remove the Namespace from the inventory",
            foreign.len(),
            foreign
                .iter()
                .take(3)
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            if foreign.len() > 3 { ", …" } else { "" }
        )),
        Err(e) => Some(format!("failed to list what it holds: {e}")),
    }
}

/// Where a project's repository lives: a full URL as given, or a path under `base_url`.
pub fn project_url(id: &str, base_url: &str) -> String {
    if id.contains("://") {
        id.to_string()
    } else {
        format!(
            "{}/{}.git",
            base_url.trim_end_matches('/'),
            id.trim_matches('/')
        )
    }
}

/// A default inventory id: `<agent>-<project>`, reduced to a valid label value. Ids longer
/// than a label allows end in 8 hex digits of the SHA-256 of `<agent>-<project>`: an id is
/// stored in the cluster and must stay the same in every release.
///
/// Two projects can reduce to the same id (`g/web_app`, `g/web-app`); the agent refuses to
/// run either until one is given its own (`--inventory-id`), see `agent::inventory_ids`.
pub fn inventory_id(agent: &str, project: &str) -> String {
    let raw = format!("{agent}-{project}");
    let mut id: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if id.len() > 63 {
        id = format!(
            "{}-{}",
            &id[..54],
            &sluice_model::object::sha256_hex(&raw)[..8]
        );
    }
    id.trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cm(name: &str) -> ObjRef {
        ObjRef {
            group: "".into(),
            kind: "ConfigMap".into(),
            namespace: "ns".into(),
            name: name.into(),
        }
    }

    #[test]
    fn pruning_is_held_for_each_reason_and_only_when_something_would_be_pruned() {
        let plan = |prune: &[&str]| plan::Plan {
            stages: Vec::new(),
            prune: prune.iter().map(|n| cm(n)).collect(),
        };
        let rendered: BTreeSet<ObjRef> = [cm("a"), cm("b")].into();
        let none = BTreeSet::new();
        assert!(hold_reasons(&plan(&["c"]), &rendered, &[], &none).is_empty());
        assert!(hold_reasons(&plan(&[]), &rendered, &["p".into()], &none).is_empty());
        let skipped = hold_reasons(&plan(&["c"]), &rendered, &["p".into()], &none);
        assert_eq!(skipped.len(), 1);
        assert!(skipped[0].starts_with("plugin p failed and was skipped"));
        let dropped = hold_reasons(&plan(&["b", "c"]), &rendered, &[], &none);
        assert_eq!(
            dropped,
            [
                "the plugins removed 1 objects that are still in git (ConfigMap/ns/b); a transformer must not drop objects it received"
            ]
        );
        let down: BTreeSet<&str> = ["API group x is unavailable"].into();
        assert_eq!(hold_reasons(&plan(&["c"]), &rendered, &[], &down).len(), 1);
    }

    #[test]
    fn agentk_ids_are_two_numbers() {
        assert!(is_agentk_id("17-42", None));
        assert!(is_agentk_id("17-42", Some("17")));
        assert!(!is_agentk_id("17-42", Some("18")));
        for id in ["17", "17-", "-42", "a-42", "17-42-1", "sluice-g-app"] {
            assert!(!is_agentk_id(id, None), "{id}");
        }
    }

    #[test]
    fn urls_and_ids() {
        assert_eq!(
            project_url("group/app", "https://gitlab.example.com/"),
            "https://gitlab.example.com/group/app.git"
        );
        assert_eq!(
            project_url("file:///srv/x.git", "https://h"),
            "file:///srv/x.git"
        );
        assert_eq!(
            inventory_id("agent1", "group/sub/app"),
            "agent1-group-sub-app"
        );
        // A fixed hash: this value is stored in clusters and must never change.
        assert_eq!(
            inventory_id("a", &"x".repeat(100)),
            format!("a-{}-debb3da3", "x".repeat(52))
        );
        assert_eq!(
            inventory_id("agent", "g/web_app"),
            inventory_id("agent", "g/web-app"),
            "reduces to the same id: the agent detects it"
        );
    }
}
