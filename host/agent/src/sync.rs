//! One sync of one commit of one manifest project: the whole path, top to bottom.
//!
//! [`sync`] reads as the path: render (fetch, select, decode) → plugins (namespaces,
//! transformers and validators, limits) → inventory (locate, claim, agentk takeover) → plan →
//! apply → prune → wait → verdict. Each stage is one call handing a plain value to the next;
//! the engine (`sluice-engine`) does the cluster-facing work.
//!
//! Any failure before apply returns with nothing changed in the cluster. Apply itself
//! dry-runs everything first. Pruning only happens after a fully successful apply, and never
//! prunes everything because the selected file set happened to be empty.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use sluice_engine::apply::{self, Action, ObjectResult};
use sluice_engine::cluster::Cluster;
use sluice_engine::inventory::{self, INVENTORY_LABEL, InventoryRef};
use sluice_engine::live::Live;
use sluice_engine::wait::{self, Status};
use sluice_engine::{plan, prune, takeover};
use sluice_model::object::{ObjRef, Object, Origin};
use sluice_wasm::{self as plugin_stage, OutcomeCache, Plugin};

use crate::config::{DryRunStrategy, ManifestProject};
use crate::source::Source;
use crate::{decode, moves, render, select};

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
    /// Rendering (Kustomize, Helm) failed: a user error, unless no renderer is installed.
    #[error(transparent)]
    Render(render::Error),
    /// The project's decryption or verification keys could not be read (retried: the
    /// Secret may come).
    #[error("{what}: Secret {namespace}/{secret}: {message}")]
    Keys {
        /// `decryption keys` or `verification keys`.
        what: &'static str,
        /// The Secret's namespace.
        namespace: String,
        /// The Secret's name.
        secret: String,
        /// Why.
        message: String,
    },
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
    #[error(transparent)]
    InventoryClaimed(#[from] inventory::Claimed),
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

impl From<takeover::Error> for Error {
    fn from(e: takeover::Error) -> Self {
        match e {
            takeover::Error::Inventory(e) => Error::Inventory(e),
            takeover::Error::Ambiguous(c) => c.into(),
        }
    }
}

impl From<render::Error> for Error {
    fn from(e: render::Error) -> Self {
        match e {
            render::Error::Select(e) => Error::Select(e),
            e => Error::Render(e),
        }
    }
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
        if let Error::Render(e) = self {
            return !e.is_installation();
        }
        matches!(
            self,
            Error::Select(_)
                | Error::Decode(_)
                | Error::Plan(_)
                | Error::InventoryObjects(_)
                | Error::InventoryClaimed(_)
                | Error::Limits(_)
                | Error::Identity { .. }
                | Error::EmptySet
        )
    }
}

/// What one sync did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// Commit id (the full id, also when the configuration names a short one), or an OCI
    /// artifact's digest.
    pub commit: String,
    /// An OCI artifact's `org.opencontainers.image.revision` (the git revision CI built it
    /// from), shown beside its digest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
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
    /// Kustomize and Helm ([`render`](mod@crate::render)); `None`: none installed, and a project that needs
    /// one fails.
    pub renderers: Option<Arc<sluice_wasm::renderer::Renderers>>,
    /// The agent's own objects, which no project may create or change.
    pub protected: crate::limits::Protected,
    /// The agent's watches of the live objects ([`Live`]), which the health wait reads
    /// instead of listing the objects again each sync. `None`: each wait watches for
    /// itself.
    pub live: Option<Live>,
    /// Slots shared by every project's syncs: a sync holds one from its render to its
    /// prune (not during the health wait). None: no limit.
    pub slots: Option<Arc<tokio::sync::Semaphore>>,
    /// The agent's other projects that read the same repository ([`moves`]): an object
    /// moving to one of them in a commit is handed over, never deleted and re-created.
    pub siblings: Vec<moves::Sibling>,
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

/// How long one ref listing may take before the poll counts as failed.
pub const GIT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// Fetches, selects, renders and decodes `commit`: the offline part of the path. Returns
/// the objects, the full commit id (`commit` may be a short id), and an OCI artifact's
/// revision annotation (the git revision CI built it from).
///
/// # Errors
/// Source, selection, render and decode errors.
pub async fn render(
    source: &Source,
    project: &ManifestProject,
    commit: &str,
    limits: select::Limits,
    memo: Option<&decode::Memo>,
    cx: &render::Context,
) -> Result<(Vec<Object>, String, Option<String>), Error> {
    let (project, memo, cx) = (project.clone(), memo.cloned(), cx.clone());
    let id = project.id.clone();
    // Fetch (within its deadline), select, render and decode are blocking I/O and CPU:
    // all off the async workers.
    source
        .fetch_within(commit, FETCH_TIMEOUT, move |snapshot| {
            let files = render::render(&snapshot, &project, &limits, &cx)?;
            Ok((
                decode::decode_with(&files, &id, &snapshot.commit, memo.as_ref())?,
                snapshot.commit.clone(),
                snapshot.revision.clone(),
            ))
        })
        .await
}

/// Runs the whole path for `commit`: one stage after another, each handing a plain value to
/// the next (render → plugins → inventory → plan → apply → prune → wait → verdict).
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
    // 1,000 projects starting at once held 1,000 syncs' connections and buffers.
    let slot = match &settings.slots {
        Some(s) => s.clone().acquire_owned().await.ok(),
        None => None,
    };
    let mut laps = Laps::new(&project.id);
    let cx = render::Context {
        renderers: settings.renderers.clone(),
        capabilities: Some(cluster.capabilities()),
        keys: match &project.decryption {
            Some(d) => Some(Arc::new(decryption_keys(cluster, d).await?)),
            None => None,
        },
    };
    // An artifact that must be signed is fetched through a source holding the keys.
    let verified;
    let source = match &project.verify {
        Some(v) => {
            verified = source
                .clone()
                .with_keys(Arc::new(cosign_keys(cluster, v).await?));
            &verified
        }
        None => source,
    };
    let (objects, commit, revision) = render(
        source,
        project,
        commit,
        settings.limits,
        settings.decoded.as_ref(),
        &cx,
    )
    .await?;
    laps.lap("render");
    // Objects of API groups that did not answer discovery are not applied (and fail the
    // sync, naming the APIService); everything else goes on.
    let (objects, unserved) = split_unavailable(cluster, objects);
    let mut out = plugins(cluster, objects, project, &commit, settings).await?;
    laps.lap("plugins");
    let mut target = inventory(cluster, &mut out.objects, project, settings).await?;
    laps.lap("inventory");
    let plan = plan::plan(std::mem::take(&mut out.objects), &target.stored)?;
    let prune_held = prune::holds(cluster, &plan, &target.stored, &out.rendered, &out.skipped);
    laps.lap("plan");
    let here = moves::Here {
        project,
        source,
        commit: &commit,
        siblings: &settings.siblings,
        cx: &cx,
        limits: settings.limits,
    };
    let mut applied = apply(cluster, plan, &mut target, project, settings, here).await?;
    applied.results.extend(unserved.iter().cloned());
    laps.lap("apply");
    let mut report = Report {
        commit: commit.clone(),
        revision,
        results: std::mem::take(&mut applied.results),
        health: Vec::new(),
        findings: out.findings,
        prune_held,
        adopted: None,
        inventory: target.inv.clone(),
        applied: Arc::default(),
        plugins_cached: out.cached,
    };
    if project.dry_run_strategy != DryRunStrategy::None {
        return Ok(report);
    }
    let (desired, deleted) =
        prune_stage(cluster, &applied, &mut target, project, &mut report, here).await?;
    laps.lap("prune");
    drop(slot);
    let (health, gone) = wait_stage(
        &applied,
        project,
        settings,
        &report.results,
        &desired,
        &deleted,
    )
    .await;
    laps.lap("wait");
    verdict(report, health, gone, &unserved, &desired, &applied.digests)
}

/// The age identities in the keys ending `.agekey` of the project's decryption Secret
/// (Flux's convention), read with the project's identity.
pub(crate) async fn decryption_keys(
    cluster: &Cluster,
    d: &crate::config::Decryption,
) -> Result<crate::sops::Keys, Error> {
    use k8s_openapi::api::core::v1::Secret;
    let fail = |message: String| Error::Keys {
        what: "decryption keys",
        namespace: d.namespace.clone(),
        secret: d.secret.clone(),
        message,
    };
    let api: kube::Api<Secret> = kube::Api::namespaced(cluster.client().clone(), &d.namespace);
    let secret = tokio::time::timeout(KEYS_TIMEOUT, api.get_opt(&d.secret))
        .await
        .map_err(|_| fail(format!("no answer within {KEYS_TIMEOUT:?}")))?
        .map_err(|e| fail(sluice_engine::apply::api_message(&e)))?
        .ok_or_else(|| fail("not found".into()))?;
    let data = secret.data.unwrap_or_default();
    let keys = crate::sops::Keys::parse(
        data.iter()
            .filter(|(k, _)| k.ends_with(".agekey"))
            .map(|(k, v)| (k.as_str(), v.0.as_slice())),
    )
    .map_err(fail)?;
    if keys.is_empty() {
        return Err(fail("holds no key ending .agekey".into()));
    }
    Ok(keys)
}

/// The cosign public keys in the keys ending `.pub` of the project's `verify` Secret
/// (Flux's convention), read with the agent's identity.
async fn cosign_keys(
    cluster: &Cluster,
    v: &crate::config::Decryption,
) -> Result<crate::cosign::Keys, Error> {
    use k8s_openapi::api::core::v1::Secret;
    let fail = |message: String| Error::Keys {
        what: "verification keys",
        namespace: v.namespace.clone(),
        secret: v.secret.clone(),
        message,
    };
    let api: kube::Api<Secret> = kube::Api::namespaced(cluster.client().clone(), &v.namespace);
    let secret = tokio::time::timeout(KEYS_TIMEOUT, api.get_opt(&v.secret))
        .await
        .map_err(|_| fail(format!("no answer within {KEYS_TIMEOUT:?}")))?
        .map_err(|e| fail(sluice_engine::apply::api_message(&e)))?
        .ok_or_else(|| fail("not found".into()))?;
    let data = secret.data.unwrap_or_default();
    let keys = crate::cosign::Keys::parse(
        data.iter()
            .filter(|(k, _)| k.ends_with(".pub"))
            .map(|(k, v)| (k.as_str(), v.0.as_slice())),
    )
    .map_err(fail)?;
    if keys.is_empty() {
        return Err(fail("holds no key ending .pub".into()));
    }
    Ok(keys)
}

/// How long reading the decryption Secret may take.
const KEYS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The plugin stage's output, with what the prune rules need to know of its input.
struct Transformed {
    objects: Vec<Object>,
    findings: Vec<plugin_stage::Finding>,
    /// What git says, before any plugin: a plugin must not make the sync prune any of it.
    rendered: BTreeSet<ObjRef>,
    /// Plugins skipped under `failure_policy: ignore`.
    skipped: Vec<String>,
    cached: bool,
}

/// Namespaces (agentk's rules), the plugins, the namespace rules again for what plugins
/// made, and the project's limits: git and plugins alike, before any request.
async fn plugins(
    cluster: &Cluster,
    mut objects: Vec<Object>,
    project: &ManifestProject,
    commit: &str,
    settings: &Settings,
) -> Result<Transformed, Error> {
    let mut scopes = cluster.scopes();
    scopes.add_crds(&objects);
    decode::set_namespaces(&mut objects, &project.default_namespace, &scopes)?;
    let rendered: BTreeSet<ObjRef> = objects.iter().map(Object::obj_ref).collect();
    let subject = plugin_stage::Subject {
        agent: settings.agent.clone(),
        project: project.id.as_str().into(),
        commit: commit.into(),
    };
    let plugins = settings.plugins.clone()?;
    let outcome = transform(objects, plugins, &subject, settings.render_cache.as_ref()).await?;
    let mut objects = outcome.objects;
    scopes.add_crds(&objects);
    decode::set_namespaces(&mut objects, &project.default_namespace, &scopes)?;
    let refused = crate::limits::check(&objects, &project.limits, &settings.protected);
    if !refused.is_empty() {
        return Err(Error::Limits(refused));
    }
    Ok(Transformed {
        objects,
        findings: outcome.findings,
        rendered,
        skipped: outcome.skipped,
        cached: outcome.cached,
    })
}

/// Which inventory the sync records in, and what it holds.
struct Target {
    inv: InventoryRef,
    /// Where git has the inventory ConfigMap, when the commit brings its own.
    template: Option<Origin>,
    /// What the ConfigMap holds now (`None`: no ConfigMap yet); writes are skipped when they
    /// would not change it, so the 5-minute re-apply of an unchanged commit writes nothing.
    recorded: Option<BTreeSet<ObjRef>>,
    malformed: Vec<String>,
    /// Everything recorded, an adopted agentk inventory's objects included: the prune base.
    stored: BTreeSet<ObjRef>,
    /// The agentk inventory this sync adopts, if any.
    adopted: Option<(InventoryRef, inventory::Stored)>,
}

impl Target {
    /// Writes `set` as the inventory unless that is what it already holds.
    async fn record(
        &mut self,
        cluster: &Cluster,
        project: &str,
        set: BTreeSet<ObjRef>,
    ) -> Result<(), Error> {
        if self.recorded.as_ref() != Some(&set) {
            inventory::store(cluster.client(), &self.inv, project, &set, &self.malformed).await?;
            self.recorded = Some(set);
        }
        Ok(())
    }

    fn adopt_ids(&self) -> Vec<String> {
        self.adopted.iter().map(|(old, _)| old.id.clone()).collect()
    }
}

/// Locates the inventory (the commit's own ConfigMap or the default), reads it, checks it is
/// this project's, and finds the agentk inventory to take over when there is none yet.
async fn inventory(
    cluster: &Cluster,
    objects: &mut Vec<Object>,
    project: &ManifestProject,
    settings: &Settings,
) -> Result<Target, Error> {
    let (inv, template) =
        inventory::locate(objects, &settings.inventory_id, &project.default_namespace)
            .map_err(Error::InventoryObjects)?;
    let loaded = inventory::load(cluster.client(), &inv).await?;
    inventory::check_claim(&inv, loaded.as_ref(), &project.id, &settings.others)?;
    let adopted = match (&loaded, &settings.takeover) {
        (None, Takeover::Agentk { agent_id }) => {
            takeover::find(
                cluster,
                &inv,
                objects,
                agent_id.as_deref(),
                &settings.others,
            )
            .await?
        }
        _ => None,
    };
    let recorded = loaded.as_ref().map(|s| s.objects.clone());
    let malformed = loaded.map(|s| s.malformed).unwrap_or_default();
    let mut stored = recorded.clone().unwrap_or_default();
    if let Some((old, old_set)) = &adopted {
        tracing::info!(project_id = %project.id, inventory = %old.id, objects = old_set.objects.len(), "taking over agentk inventory");
        stored.extend(old_set.objects.iter().cloned());
    }
    if objects.is_empty() && project.prune && !stored.is_empty() && !settings.allow_empty_prune {
        return Err(Error::EmptySet);
    }
    Ok(Target {
        inv,
        template,
        recorded,
        malformed,
        stored,
        adopted,
    })
}

/// What the apply stage did, and what the stages after it need.
struct Applied {
    results: Vec<ObjectResult>,
    /// The plan's prune set, in prune order.
    prune: Vec<ObjRef>,
    /// Everything the plan applies.
    desired: BTreeSet<ObjRef>,
    digests: BTreeMap<ObjRef, apply::Digest>,
    /// The cluster as the project's identity (its `service_account`, else the agent's).
    actor: Cluster,
    /// When every write of the sync had returned (`live::caught_up`).
    wrote: std::time::Instant,
    concurrency: usize,
}

/// Dry-runs the whole plan, records everything about to be written, then applies it, as
/// the project's ServiceAccount when it names one (the inventory stays the agent's to write).
async fn apply(
    cluster: &mut Cluster,
    plan: plan::Plan,
    target: &mut Target,
    project: &ManifestProject,
    settings: &Settings,
    here: moves::Here<'_>,
) -> Result<Applied, Error> {
    let inv = &target.inv;
    let mut opts = apply::Options {
        field_manager: settings.field_manager.clone(),
        cleanup_managers: settings.cleanup_managers.clone(),
        concurrency: settings.concurrency,
        inventory_id: inv.id.clone(),
        adopt_ids: target.adopt_ids(),
        inventory_policy: project.inventory_policy,
        dry_run: project.dry_run_strategy,
        known: settings.known.clone(),
        ..apply::Options::new(&inv.id)
    };
    let desired = plan.desired();
    let plan::Plan { stages, prune } = plan;
    let mut actor = match &project.service_account {
        Some(sa) => cluster
            .acting_as(&sa.user(), &sa.groups())
            .map_err(|message| Error::Identity {
                project: project.id.clone(),
                message,
            })?,
        None => cluster.clone(),
    };
    // An object another project of the same repository let go in this commit is taken
    // over (`moves`); found on refusal only, so a sync without a move pays nothing.
    let again = (!settings.siblings.is_empty()).then(|| stages.clone());
    let checked = match (apply::check(&actor, stages, &opts).await, again) {
        (Err(apply::Error::Rejected { failures, total }), Some(stages)) => {
            opts.handoffs = moves::taken_over(cluster, here, &failures).await;
            if opts.handoffs.is_empty() {
                Err(apply::Error::Rejected { failures, total })
            } else {
                for (obj, from) in &opts.handoffs {
                    tracing::info!(project_id = %project.id, object = %obj, inventory = %from, "taking over an object another project of the repository let go");
                }
                apply::check(&actor, stages, &opts).await
            }
        }
        (checked, _) => checked,
    };
    let mut checked = checked.map_err(|e| name_the_template(e, inv, target.template.as_ref()))?;
    let digests = checked.digests().clone();
    let mut results = Vec::new();
    if project.dry_run_strategy == DryRunStrategy::None {
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
        let set = target.stored.union(&upcoming).cloned().collect();
        target.record(cluster, &project.id, set).await?;
    }
    // (namespace_first took its Namespace out of the plan: nothing is applied twice.)
    let applied = apply::apply(&mut actor, checked, &opts).await;
    let wrote = std::time::Instant::now();
    // The apply may have refreshed discovery (new CRDs): the agent's handle keeps it.
    cluster.take_discovery(&actor);
    let applied = applied?;
    // One buffer of the right size for every result of the sync (10,000 objects: an
    // ObjectResult is about 180 bytes, and a doubling Vec would copy them on the way).
    let mut all = Vec::with_capacity(results.len() + applied.len() + prune.len() + 1);
    all.append(&mut results);
    all.extend(applied);
    Ok(Applied {
        results: all,
        prune,
        desired,
        digests,
        actor,
        wrote,
        concurrency: settings.concurrency,
    })
}

/// Prunes (unless held back or off), records what stays, and retires an adopted agentk
/// inventory once sluice's records all of it. Returns what the sync applied and what it
/// deleted.
async fn prune_stage(
    cluster: &Cluster,
    applied: &Applied,
    target: &mut Target,
    project: &ManifestProject,
    report: &mut Report,
    here: moves::Here<'_>,
) -> Result<(BTreeSet<ObjRef>, Vec<ObjRef>), Error> {
    // Already recorded before the writes (stored ∪ upcoming ⊇ stored ∪ applied).
    let desired = applied_refs(&report.results);
    // Recorded objects of unavailable groups stay recorded (their kinds are not gone):
    // they are in the prune set, which `prune::holds` holds back.
    let mut kept: BTreeSet<ObjRef> = desired.clone();
    let mut deleted = Vec::new();
    if project.prune && report.prune_held.is_empty() {
        let adopt_ids = target.adopt_ids();
        let moving = moves::moving_out(cluster, here, &applied.prune).await;
        let rules = prune::Rules {
            inv: &target.inv,
            policy: project.inventory_policy,
            propagation: project.prune_propagation_policy,
            adopt_ids: &adopt_ids,
            recorded: &target.stored,
            desired: &applied.desired,
            moving: &moving,
        };
        let pruned =
            prune::prune(&applied.actor, &applied.prune, &rules, applied.concurrency).await;
        kept.extend(pruned.kept);
        deleted = pruned.deleted;
        report.results.extend(pruned.results);
    } else {
        kept.extend(applied.prune.iter().cloned());
        if project.prune {
            let why = report.prune_held.join("; ");
            tracing::warn!(project_id = %project.id, commit_id = %report.commit, reason = %why, "pruning held back");
            report.results.extend(prune::retain(&applied.prune, &why));
        }
    }
    target.record(cluster, &project.id, kept).await?;
    if let Some((old, _)) = &target.adopted {
        inventory::retire(cluster.client(), old).await?;
        tracing::info!(project_id = %project.id, inventory = %old.id, "agentk inventory retired");
        report.adopted = Some(old.id.clone());
    }
    Ok((desired, deleted))
}

/// Waits until what the sync applied is healthy (from the agent's watches when it has them)
/// and what it deleted is gone, each within the project's timeout.
async fn wait_stage(
    applied: &Applied,
    project: &ManifestProject,
    settings: &Settings,
    results: &[ObjectResult],
    desired: &BTreeSet<ObjRef>,
    deleted: &[ObjRef],
) -> (Vec<wait::Health>, Vec<wait::Health>) {
    let actor = &applied.actor;
    let desired: Vec<ObjRef> = desired.iter().cloned().collect();
    let current = async {
        match &settings.live {
            // The agent's watches: what the last sync left is not listed again.
            Some(live) => {
                let tracked = live.track(&project.id, actor, &desired);
                let written: HashMap<ObjRef, Box<str>> = results
                    .iter()
                    .filter_map(|r| Some((r.obj.clone(), r.written.clone()?)))
                    .collect();
                wait::wait_live(
                    live,
                    &tracked,
                    &desired,
                    &written,
                    applied.wrote,
                    project.reconcile_timeout,
                )
                .await
            }
            None => wait::wait_current(actor, &desired, project.reconcile_timeout).await,
        }
    };
    tokio::join!(
        current,
        wait::wait_gone(actor, deleted, project.prune_timeout)
    )
}

/// The sync's outcome: the report, or [`Error::Unhealthy`] naming every object not applied,
/// not pruned, or not healthy in time.
fn verdict(
    mut report: Report,
    health: Vec<wait::Health>,
    gone: Vec<wait::Health>,
    unserved: &[ObjectResult],
    applied: &BTreeSet<ObjRef>,
    digests: &BTreeMap<ObjRef, apply::Digest>,
) -> Result<Report, Error> {
    let failed_prunes: Vec<&ObjectResult> = report
        .results
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
        let origins: BTreeMap<&ObjRef, &Origin> = report
            .results
            .iter()
            .filter_map(|r| Some((&r.obj, r.origin.as_ref()?)))
            .collect();
        let mut problems = Vec::new();
        let mut parts = Vec::new();
        let mut part = |what: &str, items: Vec<Problem>| {
            let listed: Vec<String> = items
                .iter()
                .map(|p| format!("{}{}{}", p.obj, separator(&p.message), p.message))
                .collect();
            parts.push(format!("{} {what}: {}", items.len(), listed.join("; ")));
            problems.extend(items);
        };
        let failed = |r: &ObjectResult, origin| Problem {
            obj: r.obj.clone(),
            origin,
            message: r.message.clone().unwrap_or_default(),
        };
        if !unserved.is_empty() {
            let items = unserved
                .iter()
                .map(|r| failed(r, r.origin.clone()))
                .collect();
            part("resources not applied", items);
        }
        if !failed_prunes.is_empty() {
            part(
                "resources failed to prune",
                failed_prunes.iter().map(|r| failed(r, None)).collect(),
            );
        }
        if !not_ready.is_empty() {
            let items = not_ready
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
                .collect();
            part("resources failed to reconcile before timeout", items);
        }
        return Err(Error::Unhealthy {
            message: parts.join("; "),
            problems,
        });
    }
    report.applied = Arc::new(
        applied_refs(&report.results)
            .into_iter()
            .filter_map(|r| Some((r.clone(), *digests.get(&r)?)))
            .collect(),
    );
    report.health = health;
    Ok(report)
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
