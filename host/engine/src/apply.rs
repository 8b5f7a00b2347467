//! Server-side apply of a plan, staged and checked before anything changes.
//!
//! [`apply`] reads top to bottom as the decisions it makes:
//!
//! 1. mark every object with the inventory's `config.k8s.io/owning-inventory` annotation;
//! 2. preflight every object whose kind the server knows: read the live object (one LIST
//!    per resource and namespace holding many of them, else a GET each), check the
//!    inventory policy, and server-side dry-run the apply. If *any* object fails, stop and
//!    return every failure: a bad commit changes nothing;
//! 3. for each stage: preflight the objects whose kinds just appeared (CRs of CRDs from the
//!    definitions stage), apply what would change with bounded concurrency, and record
//!    `Unchanged` for the rest without writing; after a stage with CRDs, wait until they are
//!    Established and refresh discovery.
//!
//! With `dry_run_strategy: client` nothing is sent but reads; with `server` step 3 sends
//! only dry-run requests.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::api::{DynamicObject, Patch, PatchParams};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::cluster::Cluster;
use crate::inventory::{self, OWNING_INVENTORY, Ownership};
use crate::plan::Stage;
use sluice_model::object::{ObjRef, Object, Origin};
use sluice_model::policy::{DryRunStrategy, InventoryPolicy};

/// What happened to one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// It did not exist and was created.
    Created,
    /// It existed and was changed.
    Configured,
    /// It already matched git; nothing was written.
    Unchanged,
    /// It left git and was deleted.
    Pruned,
    /// It left git but was kept (`on-remove: keep`) and released from the inventory.
    Abandoned,
    /// It was not touched (dry run, or not owned by this inventory).
    Skipped,
    /// It left git but was not deleted this time (a Namespace still in use, or pruning
    /// was held back); it stays in the inventory and the prune is tried again next sync.
    Retained,
    /// The operation failed.
    Failed,
}

/// The outcome for one object.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ObjectResult {
    /// Which object.
    pub obj: ObjRef,
    /// Where it was written in git (absent for pruned objects).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin: Option<Origin>,
    /// What happened.
    pub action: Action,
    /// Why, for failures and skips.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The resourceVersion this sync's write left the object at, when it wrote it: a
    /// reader of the agent's watches waits for that version (`live::caught_up`).
    #[serde(skip)]
    pub written: Option<Box<str>>,
}

impl ObjectResult {
    fn failed(o: &Object, message: String) -> ObjectResult {
        ObjectResult {
            obj: o.obj_ref(),
            origin: Some(o.origin.clone()),
            action: Action::Failed,
            message: Some(message),
            written: None,
        }
    }
}

/// Apply failed. Retryable with backoff, except that a [`Error::Rejected`] commit will be
/// rejected again until it changes.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Preflight (policy or server-side dry-run) failed for some objects; nothing was changed.
    #[error("{} of {total} objects failed server-side dry-run, nothing was applied: {}", .failures.len(), list(.failures))]
    Rejected {
        /// Every failing object.
        failures: Vec<ObjectResult>,
        /// How many objects were checked.
        total: usize,
    },
    /// A stage failed part way; `results` says what was done.
    #[error("{} objects failed to apply: {}", failed(.results).len(), list(&failed(.results)))]
    Partial {
        /// Results so far, failures included.
        results: Vec<ObjectResult>,
    },
    /// Discovery failed.
    #[error(transparent)]
    Discovery(#[from] crate::cluster::DiscoveryError),
}

fn failed(results: &[ObjectResult]) -> Vec<ObjectResult> {
    results
        .iter()
        .filter(|r| r.action == Action::Failed)
        .cloned()
        .collect()
}

fn list(results: &[ObjectResult]) -> String {
    results
        .iter()
        .map(|r| {
            let at = r
                .origin
                .as_ref()
                .map(|o| format!("{o}: "))
                .unwrap_or_default();
            format!("{at}{}: {}", r.obj, r.message.as_deref().unwrap_or(""))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// How to apply.
#[derive(Debug, Clone)]
pub struct Options {
    /// Field manager for server-side apply. Default `sluice`.
    pub field_manager: String,
    /// Objects applied at once within a stage. Default 8.
    pub concurrency: usize,
    /// The inventory id written into `config.k8s.io/owning-inventory`.
    pub inventory_id: String,
    /// Inventory ids being taken over (agentk's): live objects they own count as this
    /// inventory's.
    pub adopt_ids: Vec<String>,
    /// Objects this inventory takes over from another one of the same agent (a move
    /// between projects in one push): when the live object's owning inventory is the id
    /// given here, it counts as this inventory's. Empty by default.
    pub handoffs: BTreeMap<ObjRef, String>,
    /// Field managers whose entries are removed from `managedFields` after an apply, so
    /// this manager alone owns what git says (default: none; the agent passes `agentk`).
    pub cleanup_managers: Vec<String>,
    /// Which live objects may be taken over.
    pub inventory_policy: InventoryPolicy,
    /// `dry_run_strategy`.
    pub dry_run: DryRunStrategy,
    /// How long to wait for CRDs to become Established. Default 60 s.
    pub crd_timeout: Duration,
    /// Objects known to be in the cluster exactly as applied: the [`digest`] of each
    /// object the last successful sync applied, when nothing drifted since (the agent's
    /// watches say so). An object whose digest matches is Unchanged without a request; the
    /// others are read, dry-run and applied as usual. Empty (the default): check them all.
    pub known: Arc<BTreeMap<ObjRef, Digest>>,
    /// Keep the live object and the server's dry run of every object that would change,
    /// for [`Checked::changes`] (`sluice diff`). Off: a sync holds only its decisions.
    pub keep_views: bool,
}

/// A fixed digest (sha256) of an object as a project applies it, for [`Options::known`].
pub type Digest = [u8; 32];

/// The [`Digest`] of `o` as the inventory `inventory_id` applies it: of its text and the
/// inventory id its annotation will carry, so that an object the last sync left as it is
/// needs neither a request nor its annotated copy (in memory only; never persisted).
pub fn digest(o: &Object, inventory_id: &str) -> Digest {
    use sha2::{Digest as _, Sha256};
    let mut h = Sha256::new();
    h.update(inventory_id.as_bytes());
    h.update([0]);
    h.update(o.json().as_bytes());
    h.finalize().into()
}

impl Options {
    /// Defaults for an inventory id.
    #[must_use]
    pub fn new(inventory_id: &str) -> Options {
        Options {
            field_manager: "sluice".into(),
            concurrency: 8,
            inventory_id: inventory_id.into(),
            adopt_ids: Vec::new(),
            handoffs: BTreeMap::new(),
            cleanup_managers: Vec::new(),
            inventory_policy: InventoryPolicy::MustMatch,
            dry_run: DryRunStrategy::None,
            crd_timeout: Duration::from_secs(60),
            known: Arc::default(),
            keep_views: false,
        }
    }
}

/// Steps 1 and 2 of the module doc: annotates and preflights every object. Changes nothing.
///
/// # Errors
/// [`Error::Rejected`] listing every object that failed.
pub async fn check(
    cluster: &Cluster,
    stages: Vec<Stage>,
    opts: &Options,
) -> Result<Checked, Error> {
    let digests: BTreeMap<ObjRef, Digest> = stages
        .iter()
        .flat_map(|s| &s.objects)
        .map(|o| (o.obj_ref(), digest(o, &opts.inventory_id)))
        .collect();
    // What the last sync left as it is now needs no request (dry runs check everything).
    let skipped: BTreeSet<ObjRef> = if opts.dry_run == DryRunStrategy::None {
        digests
            .iter()
            .filter(|(r, d)| opts.known.get(*r) == Some(*d))
            .map(|(r, _)| r.clone())
            .collect()
    } else {
        BTreeSet::new()
    };
    // Only what will be sent is annotated (a copy of its text): at 10,000 objects a push
    // changes one.
    let stages: Vec<Vec<Object>> = stages
        .into_iter()
        .map(|s| {
            s.objects
                .into_iter()
                .map(|o| {
                    if skipped.contains(&o.obj_ref()) {
                        o
                    } else {
                        annotate(o, &opts.inventory_id)
                    }
                })
                .collect()
        })
        .collect();

    // Objects in a namespace this plan creates cannot be dry-run before it exists; like
    // CRs of new CRDs they are checked in their own stage, after the namespace is applied.
    let mut new_namespaces = std::collections::BTreeSet::new();
    for o in stages
        .iter()
        .flatten()
        .filter(|o| o.kind() == "Namespace" && o.api_version() == "v1")
    {
        if matches!(cluster.get(&o.obj_ref()).await, Ok(None)) {
            new_namespaces.insert(o.name().to_string());
        }
    }
    // A kind the server does not serve can only be a CR of a CRD this plan brings;
    // anything else is refused now, before the first write.
    let defined = crd_kinds(stages.iter().flatten());
    let undefined: Vec<ObjectResult> = stages
        .iter()
        .flatten()
        .filter(|o| cluster.serves(o.api_version(), o.kind()).is_none())
        .filter(|o| !defined.contains(&(o.api_version().to_string(), o.kind().to_string())))
        .map(|o| {
            ObjectResult::failed(
                o,
                format!(
                    "the server has no resource for {} {}, and no CustomResourceDefinition of this commit defines it",
                    o.api_version(),
                    o.kind()
                ),
            )
        })
        .collect();
    let known: Vec<&Object> = stages
        .iter()
        .flatten()
        .filter(|o| !skipped.contains(&o.obj_ref()))
        .filter(|o| cluster.serves(o.api_version(), o.kind()).is_some())
        .filter(|o| !o.namespace().is_some_and(|ns| new_namespaces.contains(ns)))
        .collect();
    let total = stages.iter().map(Vec::len).sum();
    let preflights = preflight_all(cluster, &known, opts).await;
    let mut failures = preflight_failures(&preflights);
    failures.extend(undefined);
    if !failures.is_empty() {
        return Err(Error::Rejected { failures, total });
    }
    Ok(Checked {
        stages,
        preflights,
        skipped,
        digests,
    })
}

/// The `(apiVersion, kind)` pairs the CustomResourceDefinitions among `objects` define:
/// one per served version.
fn crd_kinds<'a>(objects: impl Iterator<Item = &'a Object>) -> BTreeSet<(String, String)> {
    objects
        .filter(|o| {
            o.kind() == "CustomResourceDefinition"
                && sluice_model::object::group_of(o.api_version()) == "apiextensions.k8s.io"
        })
        .flat_map(|o| {
            let value = o.value();
            let spec = &value["spec"];
            let group = spec["group"].as_str().unwrap_or_default();
            let kind = spec["names"]["kind"].as_str().unwrap_or_default();
            spec["versions"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v["name"].as_str())
                .map(|version| (format!("{group}/{version}"), kind.to_string()))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// A plan that passed [`check`]: objects (annotated, except those [`Options::known`] says
/// are unchanged) and what preflight learned.
#[derive(Debug)]
pub struct Checked {
    stages: Vec<Vec<Object>>,
    preflights: Preflights,
    /// Objects [`Options::known`] says are unchanged: no request.
    skipped: BTreeSet<ObjRef>,
    /// Every object's [`digest`].
    digests: BTreeMap<ObjRef, Digest>,
}

impl Checked {
    /// Every object the plan applies.
    pub fn objects(&self) -> impl Iterator<Item = &Object> {
        self.stages.iter().flatten()
    }

    /// Every object's [`digest`] (what [`Options::known`] is made of), by identity.
    pub fn digests(&self) -> &BTreeMap<ObjRef, Digest> {
        &self.digests
    }

    /// The objects an apply would create or change: `(object, live, as the server would
    /// store it)`, both without managedFields and resourceVersion. Objects checked only
    /// in their stage (CRs of new CRDs, objects in new namespaces) come with no server
    /// view: they would be created. The views come only from a [`check`] with
    /// [`Options::keep_views`].
    pub fn changes(&self) -> Vec<(&Object, Option<Value>, Option<Value>)> {
        let preflights: BTreeMap<&ObjRef, _> =
            self.preflights.iter().map(|(k, p)| (k, p)).collect();
        self.objects()
            .filter(|o| !self.skipped.contains(&o.obj_ref()))
            .filter_map(|o| match preflights.get(&o.obj_ref()) {
                Some(Ok(p)) if p.unchanged => None,
                Some(Ok(p)) => {
                    let (live, dry) = p.views.as_ref().map_or((None, None), |(l, d)| {
                        (l.as_ref().map(strip), d.as_ref().map(strip))
                    });
                    Some((o, live, dry))
                }
                _ => Some((o, None, None)),
            })
            .collect()
    }
}

/// Applies the Namespace `namespace` of a [`check`]ed plan now, if the plan has it and it
/// does not exist yet, and takes it out of the plan: the inventory lives there and is
/// written before everything else (cli-utils applies the inventory's namespace first).
///
/// # Errors
/// [`Error::Partial`] when the Namespace cannot be applied.
pub async fn namespace_first(
    cluster: &Cluster,
    checked: &mut Checked,
    namespace: &str,
    opts: &Options,
) -> Result<Vec<ObjectResult>, Error> {
    let is_it =
        |o: &Object| o.kind() == "Namespace" && o.api_version() == "v1" && o.name() == namespace;
    let Some(o) = checked.objects().find(|o| is_it(o)).cloned() else {
        return Ok(Vec::new());
    };
    let preflight = match checked.preflights.iter().find(|(k, _)| *k == o.obj_ref()) {
        Some((_, Ok(p))) if !p.exists => p,
        _ => return Ok(Vec::new()),
    };
    let result = write(cluster, &o, preflight, opts).await;
    if result.action == Action::Failed {
        return Err(Error::Partial {
            results: vec![result],
        });
    }
    for stage in &mut checked.stages {
        stage.retain(|x| !is_it(x));
    }
    Ok(vec![result])
}

/// Step 3 of the module doc: applies a [`check`]ed plan stage by stage.
///
/// # Errors
/// [`Error::Partial`] with what was done when a stage fails.
pub async fn apply(
    cluster: &mut Cluster,
    checked: Checked,
    opts: &Options,
) -> Result<Vec<ObjectResult>, Error> {
    let Checked {
        stages,
        preflights,
        skipped,
        ..
    } = checked;
    // By object: a lookup per object, not a scan (10,000 objects).
    let mut preflights: BTreeMap<ObjRef, Result<Preflight, ObjectResult>> =
        preflights.into_iter().collect();
    let mut results = Vec::new();
    for stage in &stages {
        results.extend(
            stage
                .iter()
                .filter(|o| skipped.contains(&o.obj_ref()))
                .map(|o| ObjectResult {
                    obj: o.obj_ref(),
                    origin: Some(o.origin.clone()),
                    action: Action::Unchanged,
                    message: None,
                    written: None,
                }),
        );
        let stage: Vec<&Object> = stage
            .iter()
            .filter(|o| !skipped.contains(&o.obj_ref()))
            .collect();
        // CRs whose CRD arrived in an earlier stage are checked now that the kind exists.
        let late: Vec<&Object> = stage
            .iter()
            .copied()
            .filter(|o| !preflights.contains_key(&o.obj_ref()))
            .collect();
        if !late.is_empty() && opts.dry_run != DryRunStrategy::None {
            // Their namespace or kind would only exist after a real apply.
            results.extend(late.iter().map(|o| ObjectResult {
                obj: o.obj_ref(),
                origin: Some(o.origin.clone()),
                action: Action::Skipped,
                message: Some(
                    "dry run: depends on a namespace or kind this sync would create".into(),
                ),
                written: None,
            }));
        } else if !late.is_empty() {
            let more = preflight_all(cluster, &late, opts).await;
            let failures = preflight_failures(&more);
            if !failures.is_empty() {
                results.extend(failures);
                return Err(Error::Partial { results });
            }
            preflights.extend(more);
        }
        let work: Vec<(&Object, &Preflight)> = stage
            .iter()
            .copied()
            .filter_map(|o| {
                let p = preflights.get(&o.obj_ref())?.as_ref().ok()?;
                Some((o, p))
            })
            .collect();
        // (By index: a closure taking references here makes the worker future not `Send`.)
        let writes = (0..work.len()).map(|i| write(cluster, work[i].0, work[i].1, opts));
        let stage_results = bounded(writes, opts.concurrency).await;
        let stage_failed = stage_results.iter().any(|r| r.action == Action::Failed);
        results.extend(stage_results);
        if stage_failed {
            return Err(Error::Partial { results });
        }
        if opts.dry_run == DryRunStrategy::None
            && stage.iter().any(|o| o.kind() == "CustomResourceDefinition")
        {
            let crds: Vec<&Object> = stage
                .iter()
                .copied()
                .filter(|o| o.kind() == "CustomResourceDefinition")
                .collect();
            if let Err(message) = wait_established(cluster, &crds, opts.crd_timeout).await {
                results.extend(
                    crds.iter()
                        .map(|o| ObjectResult::failed(o, message.clone())),
                );
                return Err(Error::Partial { results });
            }
            cluster.refresh().await?;
        }
    }
    Ok(results)
}

/// How a live object relates to this inventory, counting an adopted id, and the inventory
/// an object is handed off from, as this one.
fn ownership(live: &Value, r: &ObjRef, opts: &Options) -> Ownership {
    match Ownership::of(live, &opts.inventory_id) {
        Ownership::NoMatch
            if sluice_model::object::annotation(live, OWNING_INVENTORY).is_some_and(|a| {
                opts.adopt_ids.iter().any(|id| id == a)
                    || opts.handoffs.get(r).is_some_and(|h| h == a)
            }) =>
        {
            Ownership::Match
        }
        own => own,
    }
}

/// kubectl reads `yes`/`no`/`on`/`off` as booleans too (YAML 1.1), so the API server's
/// complaint about a boolean in a string field is worth a hint.
fn with_hint(message: String) -> String {
    if message.contains("bool") && message.contains("string") {
        format!(
            "{message} (unquoted yes/no/on/off/y/n are booleans in YAML 1.1, as kubectl reads them: quote the value to make it a string)"
        )
    } else {
        message
    }
}

/// What preflight learned about an object.
#[derive(Debug)]
struct Preflight {
    /// The object exists.
    exists: bool,
    /// Applying it would change nothing ([`drifted`] compared the live object with the
    /// server's dry run). Never true with `dry_run_strategy: client`, which sends no dry
    /// run.
    unchanged: bool,
    /// The live object and the object as the server would store it, for `sluice diff`
    /// ([`Options::keep_views`]), of objects that would change. Not kept otherwise: two
    /// full copies of every object, held until the apply ends, were most of a large
    /// sync's memory.
    views: Option<(Option<Value>, Option<Value>)>,
}

/// Groups of at least this many objects of one resource in one namespace read their live
/// objects with one paged LIST instead of a GET each.
const LIST_AT: usize = 16;

/// How long one LIST page may take before the group falls back to GETs.
const LIST_TIMEOUT: Duration = Duration::from_secs(60);

/// Whether `members` objects of one resource and namespace are read with a LIST, given
/// what the first page says the LIST holds (`total`): only when it is not mostly other
/// people's objects, so a namespace with 100,000 ConfigMaps and 16 of ours costs 16 GETs,
/// not 200 pages.
fn list_pays(members: usize, total: usize) -> bool {
    members >= LIST_AT && total <= 4 * members + 500
}

async fn preflight_all(
    cluster: &Cluster,
    objects: &[&Object],
    opts: &Options,
) -> Vec<(ObjRef, Result<Preflight, ObjectResult>)> {
    let refs: Vec<ObjRef> = objects.iter().map(|o| o.obj_ref()).collect();
    // What a LIST told of each object: `Some(None)` is "listed, does not exist".
    let mut listed: Vec<Option<Option<Value>>> = vec![None; objects.len()];
    let (groups, _unserved) = cluster.by_resource(&refs);
    for g in groups.iter().filter(|g| g.members.len() >= LIST_AT) {
        if let Some(mut live) = list_live(cluster, g).await {
            for &i in &g.members {
                listed[i] = Some(live.remove(refs[i].name.as_str()));
            }
        }
    }
    let checks = listed
        .into_iter()
        .enumerate()
        .map(|(i, live)| preflight(cluster, objects[i], opts, live));
    let results = bounded(checks, opts.concurrency).await;
    refs.into_iter().zip(results).collect()
}

/// The live objects of one resource in one namespace by name, from a paged LIST; `None`
/// (the caller GETs each object instead) when the LIST fails, is slow, or holds too many
/// objects that are not the group's ([`list_pays`]).
async fn list_live(
    cluster: &Cluster,
    g: &crate::cluster::ResourceGroup,
) -> Option<std::collections::HashMap<String, Value>> {
    let api = cluster.api(&g.resource, &g.caps, &g.namespace);
    let mut params = kube::api::ListParams::default().limit(500);
    let mut live = std::collections::HashMap::new();
    loop {
        let page = match tokio::time::timeout(LIST_TIMEOUT, api.list(&params)).await {
            Ok(Ok(page)) => page,
            Ok(Err(e)) => {
                tracing::debug!(resource = %g.resource.plural, namespace = %g.namespace, error = %e, "listing failed; reading objects one by one");
                return None;
            }
            Err(_) => return None,
        };
        let remaining = page.metadata.remaining_item_count.unwrap_or(0);
        let total =
            live.len() + page.items.len() + usize::try_from(remaining).unwrap_or(usize::MAX);
        if !list_pays(g.members.len(), total) {
            return None;
        }
        for item in &page.items {
            if let Some(name) = &item.metadata.name {
                live.insert(name.clone(), crate::cluster::live_value(item, &g.resource));
            }
        }
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => return Some(live),
        }
    }
}

type Preflights = Vec<(ObjRef, Result<Preflight, ObjectResult>)>;

fn preflight_failures(preflights: &Preflights) -> Vec<ObjectResult> {
    preflights
        .iter()
        .filter_map(|(_, p)| p.as_ref().err().cloned())
        .collect()
}

/// Runs `futures` at most `limit` at a time, keeping their order. A future is made only
/// when a slot frees up: a write's future is about 2.7 KB, so making all 10,000 of a sync
/// up front held 27 MB at once.
pub(crate) async fn bounded<T, F: Future<Output = T>>(
    futures: impl IntoIterator<Item = F>,
    limit: usize,
) -> Vec<T> {
    use futures::stream::FuturesOrdered;
    let mut waiting = futures.into_iter();
    let mut running: FuturesOrdered<F> = waiting.by_ref().take(limit.max(1)).collect();
    let mut done = Vec::with_capacity(waiting.size_hint().0 + running.len());
    while let Some(out) = running.next().await {
        done.push(out);
        if let Some(next) = waiting.next() {
            running.push_back(next);
        }
    }
    done
}

/// Reads the live object (unless a LIST already did: `listed`), checks the inventory
/// policy, and dry-runs the apply.
async fn preflight(
    cluster: &Cluster,
    o: &Object,
    opts: &Options,
    listed: Option<Option<Value>>,
) -> Result<Preflight, ObjectResult> {
    let fail = |m: String| ObjectResult::failed(o, m);
    let (ar, caps) = cluster.resolve(o.api_version(), o.kind()).ok_or_else(|| {
        fail(format!(
            "no resource for {} {} on the server",
            o.api_version(),
            o.kind()
        ))
    })?;
    let api = cluster.api(&ar, &caps, o.namespace().unwrap_or_default());
    let live = match listed {
        Some(live) => live,
        None => api
            .get_opt(o.name())
            .await
            .map_err(|e| fail(format!("failed to read the live object: {e}")))?
            .map(|l| serde_json::to_value(l).unwrap_or_default()),
    };
    if let Some(live) = &live {
        inventory::may_apply(opts.inventory_policy, ownership(live, &o.obj_ref(), opts))
            .map_err(fail)?;
    }
    if opts.dry_run == DryRunStrategy::Client {
        // Client mode sends reads only: no dry-run PATCH (no patch RBAC, no webhooks).
        return Ok(Preflight {
            exists: live.is_some(),
            unchanged: false,
            views: opts.keep_views.then_some((live, None)),
        });
    }
    let params = PatchParams {
        dry_run: true,
        ..PatchParams::apply(&opts.field_manager).force()
    };
    let dry: DynamicObject = api
        .patch(o.name(), &params, &Patch::Apply(body(o)))
        .await
        .map_err(|e| fail(with_hint(api_message(&e))))?;
    let dry = serde_json::to_value(dry).unwrap_or_default();
    let unchanged = live.as_ref().is_some_and(|l| !drifted(l, &dry, opts));
    Ok(Preflight {
        exists: live.is_some(),
        unchanged,
        views: (opts.keep_views && !unchanged).then_some((live, Some(dry))),
    })
}

async fn write(cluster: &Cluster, o: &Object, p: &Preflight, opts: &Options) -> ObjectResult {
    let result = |action, message| ObjectResult {
        obj: o.obj_ref(),
        origin: Some(o.origin.clone()),
        action,
        message,
        written: None,
    };
    if p.unchanged {
        return result(Action::Unchanged, None);
    }
    let action = if p.exists {
        Action::Configured
    } else {
        Action::Created
    };
    match opts.dry_run {
        DryRunStrategy::Client => {
            return result(
                Action::Skipped,
                Some(format!("dry run (client): would be {action:?}").to_lowercase()),
            );
        }
        DryRunStrategy::Server => {
            return result(
                Action::Skipped,
                Some(format!("dry run (server): would be {action:?}").to_lowercase()),
            );
        }
        DryRunStrategy::None => {}
    }
    let Some((ar, caps)) = cluster.resolve(o.api_version(), o.kind()) else {
        return result(
            Action::Failed,
            Some("kind disappeared from the server".into()),
        );
    };
    let api = cluster.api(&ar, &caps, o.namespace().unwrap_or_default());
    let applied = match api
        .patch(
            o.name(),
            &PatchParams::apply(&opts.field_manager).force(),
            &Patch::Apply(body(o)),
        )
        .await
    {
        Ok(applied) => applied,
        Err(e) => return result(Action::Failed, Some(api_message(&e))),
    };
    match cleanup_managers(&api, o.name(), &applied, opts).await {
        Ok(version) => ObjectResult {
            written: version
                .or(applied.metadata.resource_version)
                .map(Into::into),
            ..result(action, None)
        },
        Err(e) => result(
            Action::Failed,
            Some(format!(
                "applied, but failed to remove the field managers {:?}: {}",
                opts.cleanup_managers,
                api_message(&e)
            )),
        ),
    }
}

/// Removes the `managedFields` entries of [`Options::cleanup_managers`] from an object
/// just applied (as Flux's ssa does for `kubectl` and its own old managers). A forced
/// server-side apply takes only the fields whose values conflict; fields with equal values
/// stay co-owned by the old manager, and a field later removed from git would stay live
/// under it. One merge patch, guarded by the resourceVersion the apply returned; the
/// resourceVersion it left, when it patched.
async fn cleanup_managers(
    api: &kube::Api<DynamicObject>,
    name: &str,
    applied: &DynamicObject,
    opts: &Options,
) -> Result<Option<String>, kube::Error> {
    let entries = applied.metadata.managed_fields.clone().unwrap_or_default();
    let is_old = |m: &Option<String>| {
        m.as_deref().is_some_and(|m| {
            m != opts.field_manager && opts.cleanup_managers.iter().any(|c| c == m)
        })
    };
    if !entries.iter().any(|e| is_old(&e.manager)) {
        return Ok(None);
    }
    let kept: Vec<_> = entries
        .into_iter()
        .filter(|e| !is_old(&e.manager))
        .collect();
    let patch = serde_json::json!({"metadata": {
        "resourceVersion": applied.metadata.resource_version,
        "managedFields": kept,
    }});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|o| o.metadata.resource_version)
}

/// True when applying would change the object, when our field manager does not own its
/// fields yet (taking over from agentk's `agentk` manager is a write), or when a manager
/// to clean up still owns some of them.
fn drifted(live: &Value, dry_run: &Value, opts: &Options) -> bool {
    let managers = live["metadata"]["managedFields"].as_array();
    let owned = managers.is_some_and(|m| {
        m.iter()
            .any(|f| f["manager"] == opts.field_manager.as_str() && f["operation"] == "Apply")
    });
    let foreign = managers.is_some_and(|m| {
        m.iter().any(|f| {
            f["manager"] != opts.field_manager.as_str()
                && opts
                    .cleanup_managers
                    .iter()
                    .any(|c| f["manager"] == c.as_str())
        })
    });
    !owned || foreign || strip(live) != strip(dry_run)
}

fn strip(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(m) = v["metadata"].as_object_mut() {
        m.remove("managedFields");
        m.remove("resourceVersion");
    }
    v
}

fn annotate(mut o: Object, inventory_id: &str) -> Object {
    o.edit(|v| {
        let meta = &mut v["metadata"];
        if !meta["annotations"].is_object() {
            meta["annotations"] = Value::Object(Default::default());
        }
        meta["annotations"][OWNING_INVENTORY] = Value::String(inventory_id.to_string());
    });
    o
}

/// The body of an apply: the object's text as it is, not parsed again.
fn body(o: &Object) -> &RawValue {
    // The text was written by serde_json: it is one JSON value.
    serde_json::from_str(o.json()).unwrap_or(RawValue::NULL)
}

async fn wait_established(
    cluster: &Cluster,
    crds: &[&Object],
    timeout: Duration,
) -> Result<(), String> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let api: kube::Api<CustomResourceDefinition> = kube::Api::all(cluster.client().clone());
    let waits: Vec<_> = crds
        .iter()
        .map(|o| {
            kube::runtime::wait::await_condition(
                api.clone(),
                o.name(),
                kube::runtime::wait::conditions::is_crd_established(),
            )
        })
        .collect();
    let all = futures::future::try_join_all(waits);
    tokio::time::timeout(timeout, all)
        .await
        .map_err(|_| format!("CustomResourceDefinition not Established within {timeout:?}"))?
        .map_err(|e| format!("failed to watch CustomResourceDefinitions: {e}"))?;
    Ok(())
}

/// The API server's message without kube's wrapping.
pub fn api_message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => s.message.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::{OWNING_INVENTORY, annotate, bounded, crd_kinds, digest, list_pays};
    use sluice_model::object::Object;

    #[test]
    fn a_digest_is_of_the_text_and_the_inventory_that_annotates_it() {
        let cm = |v: &str| {
            Object::new(
                &serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": "c", "namespace": "n"}, "data": {"k": v}}),
                Default::default(),
            )
        };
        let d = digest(&cm("1"), "inv");
        assert_eq!(d, digest(&cm("1"), "inv"), "fixed");
        assert_ne!(d, digest(&cm("2"), "inv"), "another text");
        assert_ne!(d, digest(&cm("1"), "other"), "another inventory");
        // The annotation it stands for is the one `annotate` adds.
        let a = annotate(cm("1"), "inv");
        assert_eq!(a.annotation(OWNING_INVENTORY).as_deref(), Some("inv"));
    }

    #[test]
    fn bounded_keeps_order_and_makes_a_future_only_when_a_slot_is_free() {
        use std::cell::Cell;
        let (made, finished) = (Cell::new(0), Cell::new(0));
        let (running, most) = (Cell::new(0), Cell::new(0));
        let futures = (0..100).map(|i| {
            made.set(made.get() + 1);
            // Made only when fewer than 4 are unfinished.
            assert!(i < 4 + finished.get(), "future {i} made early");
            let (running, most, finished) = (&running, &most, &finished);
            async move {
                running.set(running.get() + 1);
                most.set(most.get().max(running.get()));
                // Finish in an order other than the input's.
                for _ in 0..(i * 7) % 5 {
                    yield_once().await;
                }
                running.set(running.get() - 1);
                finished.set(finished.get() + 1);
                i
            }
        });
        async fn yield_once() {
            let mut yielded = false;
            futures::future::poll_fn(|cx| {
                if yielded {
                    return std::task::Poll::Ready(());
                }
                yielded = true;
                cx.waker().wake_by_ref();
                std::task::Poll::Pending
            })
            .await;
        }
        let out = futures::executor::block_on(bounded(futures, 4));
        assert_eq!(out, (0..100).collect::<Vec<_>>());
        assert_eq!(made.get(), 100);
        assert_eq!(most.get(), 4);
    }

    #[test]
    fn a_crd_of_the_plan_defines_its_kind_at_each_of_its_versions_only() {
        let crd = Object::new(
            &serde_json::json!({
                "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
                "metadata": {"name": "widgets.example.com"},
                "spec": {"group": "example.com", "names": {"kind": "Widget"},
                         "versions": [{"name": "v1"}, {"name": "v2beta1"}]}}),
            Default::default(),
        );
        let lookalike = Object::new(
            &serde_json::json!({
                "apiVersion": "example.com/v1", "kind": "CustomResourceDefinition",
                "metadata": {"name": "x"},
                "spec": {"group": "other.com", "names": {"kind": "Gadget"},
                         "versions": [{"name": "v1"}]}}),
            Default::default(),
        );
        let pair = |v: &str, k: &str| (v.to_string(), k.to_string());
        assert_eq!(
            crd_kinds([&crd, &lookalike].into_iter()),
            [
                pair("example.com/v1", "Widget"),
                pair("example.com/v2beta1", "Widget")
            ]
            .into()
        );
    }

    #[test]
    fn a_list_replaces_gets_only_for_many_objects_in_a_resource_that_is_mostly_ours() {
        // (members, objects the LIST holds, LIST?)
        let cases = [
            (1, 1, false),
            (15, 15, false),
            (16, 16, true),
            (500, 500, true),
            (500, 2500, true),
            (500, 2501, false),
            (16, 564, true),
            (16, 565, false),
            (16, 100_000, false),
        ];
        for (members, total, want) in cases {
            assert_eq!(list_pays(members, total), want, "{members} of {total}");
        }
    }
}
