//! One sync of one commit of one manifest project: the whole path, top to bottom.
//!
//! fetch → select → decode → (plugins) → plan → apply → inventory/prune → wait.
//!
//! Any failure before apply returns with nothing changed in the cluster. Apply itself
//! dry-runs everything first. Pruning only happens after a fully successful apply, and never
//! prunes everything because the selected file set happened to be empty.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

use crate::apply::{self, Action, ObjectResult};
use crate::cluster::Cluster;
use crate::config::{DryRunStrategy, ManifestProject, PropagationPolicy};
use crate::inventory::{self, INVENTORY_LABEL, InventoryRef, Ownership};
use crate::object::{ObjRef, Object};
use crate::plugins::{self as plugin_stage, Plugin};
use crate::source::Source;
use crate::wait::{self, Status};
use crate::{decode, plan, select};

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
    Discovery(#[from] crate::cluster::DiscoveryError),
    /// The inventory could not be read or written.
    #[error(transparent)]
    Inventory(#[from] inventory::Error),
    /// Apply failed (nothing changed for `Rejected`).
    #[error(transparent)]
    Apply(#[from] apply::Error),
    /// Some objects did not become healthy in time, or prunes failed.
    #[error("{0}")]
    Unhealthy(String),
    /// A plugin failed, refused the commit, or an enforce-mode validator reported errors.
    #[error(transparent)]
    Plugin(#[from] crate::plugins::Error),
    /// The blocking git task panicked or was cancelled.
    #[error("git task failed: {0}")]
    Task(String),
}

impl Error {
    /// True for errors only a new commit (or config) can fix; these are logged as
    /// decode failures and retried slowly.
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            Error::Select(_)
                | Error::Decode(_)
                | Error::Plan(_)
                | Error::InventoryObjects(_)
                | Error::EmptySet
        )
    }
}

/// What one sync did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// Commit id.
    pub commit: String,
    /// Per-object results (applies and prunes).
    pub results: Vec<ObjectResult>,
    /// Health of applied objects after the wait.
    pub health: Vec<wait::Health>,
    /// Plugin findings that did not block the commit (warnings, audit mode).
    pub findings: Vec<crate::plugins::Finding>,
}

/// How to sync, beyond the project's own configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Inventory id when the manifests carry no inventory object.
    pub inventory_id: String,
    /// Server-side apply field manager.
    pub field_manager: String,
    /// Concurrent applies per stage.
    pub concurrency: usize,
    /// Selection limits.
    pub limits: select::Limits,
    /// Allow pruning everything when no file is selected.
    pub allow_empty_prune: bool,
    /// Agent name (plugins see it in their context).
    pub agent: String,
    /// The plugins this project uses, in order, or why they could not be loaded.
    pub plugins: Result<Vec<Arc<Plugin>>, crate::plugins::Error>,
}

/// Fetches, selects and decodes `commit`: the offline part of the path.
///
/// # Errors
/// Source, selection and decode errors.
pub async fn render(
    source: &Source,
    project: &ManifestProject,
    commit: &str,
    limits: select::Limits,
) -> Result<Vec<Object>, Error> {
    let (source, commit, globs, id) = (
        source.clone(),
        commit.to_string(),
        project.paths.clone(),
        project.id.clone(),
    );
    // Fetch, select and decode are CPU and blocking I/O: all off the async workers.
    let task = tokio::task::spawn_blocking(move || -> Result<Vec<Object>, Error> {
        let snapshot = source.fetch(&commit)?;
        let files = select::select(&snapshot, &globs, &limits)?;
        Ok(decode::decode(&files, &id, &commit)?)
    });
    task.await.map_err(|e| Error::Task(e.to_string()))?
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
    let mut objects = render(source, project, commit, settings.limits).await?;

    let mut scopes = cluster.scopes();
    scopes.add_crds(&objects);
    decode::set_namespaces(&mut objects, &project.default_namespace, &scopes)?;
    let plugins = settings.plugins.clone()?;
    let (mut objects, findings) =
        transform(objects, plugins, &settings.agent, &project.id, commit).await?;
    // Plugins may add objects or kinds: the namespace rules hold for their output too.
    scopes.add_crds(&objects);
    decode::set_namespaces(&mut objects, &project.default_namespace, &scopes)?;

    let inv = locate_inventory(
        &mut objects,
        &settings.inventory_id,
        &project.default_namespace,
    )?;
    // What the ConfigMap holds (None: no ConfigMap yet); writes are skipped when it would
    // not change, so the 5-minute re-apply of an unchanged commit writes nothing.
    let mut recorded = inventory::load(cluster.client(), &inv).await?;
    let stored = recorded.clone().unwrap_or_default();
    if objects.is_empty() && project.prune && !stored.is_empty() && !settings.allow_empty_prune {
        return Err(Error::EmptySet);
    }
    let plan = plan::plan(objects, &stored)?;

    let opts = apply::Options {
        field_manager: settings.field_manager.clone(),
        concurrency: settings.concurrency,
        inventory_id: inv.id.clone(),
        inventory_policy: project.inventory_policy,
        dry_run: project.dry_run_strategy,
        ..apply::Options::new(&inv.id)
    };
    let dry_run = project.dry_run_strategy != DryRunStrategy::None;
    let checked = apply::check(cluster, &plan, &opts).await?;
    if !dry_run {
        // Record everything about to be written before the first write, so an agent killed
        // mid-apply still knows what it may have created (cli-utils' inventory-add step).
        let upcoming: BTreeSet<ObjRef> = checked.objects().map(Object::obj_ref).collect();
        record(
            cluster,
            &inv,
            &mut recorded,
            stored.union(&upcoming).cloned().collect(),
        )
        .await?;
    }
    let mut results = apply::apply(cluster, checked, &opts).await?;
    if dry_run {
        return Ok(Report {
            commit: commit.into(),
            results,
            health: Vec::new(),
            findings,
        });
    }

    // Already recorded before the writes (stored ∪ upcoming ⊇ stored ∪ applied).
    let desired = applied_refs(&results);

    let mut kept: BTreeSet<ObjRef> = desired.clone();
    let mut pruned = Vec::new();
    if project.prune {
        for r in &plan.prune {
            let result = prune_one(cluster, r, &inv, project).await;
            match result.action {
                Action::Pruned => pruned.push(r.clone()),
                Action::Failed => {
                    kept.insert(r.clone());
                }
                _ => {}
            }
            results.push(result);
        }
    } else {
        kept.extend(plan.prune.iter().cloned());
    }
    record(cluster, &inv, &mut recorded, kept).await?;

    let applied: Vec<ObjRef> = desired.into_iter().collect();
    let (health, gone) = tokio::join!(
        wait::wait_current(cluster, &applied, project.reconcile_timeout),
        wait::wait_gone(cluster, &pruned, project.prune_timeout)
    );
    let failed_prunes = results
        .iter()
        .filter(|r| r.action == Action::Failed)
        .count();
    let not_ready: Vec<String> = health
        .iter()
        .chain(gone.iter())
        .filter(|h| {
            !matches!(h.status, Status::Current | Status::NotFound)
                || (h.status == Status::NotFound && applied.contains(&h.obj))
        })
        .map(|h| {
            format!(
                "{} is {:?}{}",
                h.obj,
                h.status,
                h.message
                    .as_ref()
                    .map(|m| format!(" ({m})"))
                    .unwrap_or_default()
            )
        })
        .collect();
    if failed_prunes > 0 || !not_ready.is_empty() {
        let mut parts = Vec::new();
        if failed_prunes > 0 {
            parts.push(format!("{failed_prunes} resources failed to prune"));
        }
        if !not_ready.is_empty() {
            parts.push(format!(
                "{} resources failed to reconcile before timeout: {}",
                not_ready.len(),
                not_ready.join("; ")
            ));
        }
        return Err(Error::Unhealthy(parts.join("; ")));
    }
    Ok(Report {
        commit: commit.into(),
        results,
        health,
        findings,
    })
}

/// The plugin stage: transformers, then validators, off the async workers.
///
/// # Errors
/// [`Error::Plugin`] when a plugin fails or the commit is denied.
pub async fn transform(
    objects: Vec<Object>,
    plugins: Vec<Arc<Plugin>>,
    agent: &str,
    project: &str,
    commit: &str,
) -> Result<(Vec<Object>, Vec<plugin_stage::Finding>), Error> {
    if plugins.is_empty() {
        return Ok((objects, Vec::new()));
    }
    let subject = plugin_stage::Subject {
        agent: agent.into(),
        project: project.into(),
        commit: commit.into(),
    };
    let outcome =
        tokio::task::spawn_blocking(move || plugin_stage::run(&plugins, &subject, objects))
            .await
            .map_err(|e| Error::Task(e.to_string()))??;
    Ok((outcome.objects, outcome.findings))
}

/// Writes `set` as the inventory unless that is what it already holds.
async fn record(
    cluster: &Cluster,
    inv: &InventoryRef,
    recorded: &mut Option<BTreeSet<ObjRef>>,
    set: BTreeSet<ObjRef>,
) -> Result<(), Error> {
    if recorded.as_ref() != Some(&set) {
        inventory::store(cluster.client(), inv, &set).await?;
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
/// it is then used instead of the default and is not applied as a normal object.
fn locate_inventory(
    objects: &mut Vec<Object>,
    default_id: &str,
    namespace: &str,
) -> Result<InventoryRef, Error> {
    let is_inventory = |o: &Object| {
        o.kind() == "ConfigMap" && o.value["metadata"]["labels"][INVENTORY_LABEL].is_string()
    };
    let found: Vec<Object> = objects
        .iter()
        .filter(|o| is_inventory(o))
        .cloned()
        .collect();
    match found.as_slice() {
        [] => Ok(InventoryRef::default_for(default_id, namespace)),
        [o] => {
            objects.retain(|x| !is_inventory(x));
            Ok(InventoryRef {
                name: o.name().to_string(),
                namespace: o.namespace().unwrap_or(namespace).to_string(),
                id: o.value["metadata"]["labels"][INVENTORY_LABEL]
                    .as_str()
                    .unwrap_or(default_id)
                    .to_string(),
            })
        }
        many => Err(Error::InventoryObjects(many.len())),
    }
}

async fn prune_one(
    cluster: &Cluster,
    r: &ObjRef,
    inv: &InventoryRef,
    project: &ManifestProject,
) -> ObjectResult {
    let result = |action, message: Option<String>| ObjectResult {
        obj: r.clone(),
        origin: None,
        action,
        message,
    };
    let Some(api) = cluster.api_for_ref(r) else {
        // The kind is gone (its CRD was removed): so is the object.
        return result(Action::Pruned, Some("kind no longer served".into()));
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
    if !inventory::may_prune(project.inventory_policy, Ownership::of(&live, &inv.id)) {
        return result(Action::Skipped, Some("not owned by this inventory".into()));
    }
    let propagation = match project.prune_propagation_policy {
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

/// A default inventory id: `<agent>-<project>`, reduced to a valid label value.
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
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        raw.hash(&mut h);
        id = format!("{}-{:08x}", &id[..54], h.finish() as u32);
    }
    id.trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string()
}

/// Where git caches live by default.
pub fn default_cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("sluice")
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
        assert!(inventory_id("a", &"x".repeat(100)).len() <= 63);
    }
}
