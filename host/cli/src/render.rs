//! The offline prefix of the path for the CLI: select → decode → plugins, from a directory
//! or a repository, with an optional agent configuration (paths, default namespace,
//! plugins). `sluice render` prints the result; `sluice validate` prints the findings.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sluice_agent::config::{self, AgentConfig, ManifestProject};
use sluice_agent::select::{self, Dir};
use sluice_agent::sops::Keys;
use sluice_agent::source::Source;
use sluice_agent::{decode, render, sync};
use sluice_model::object::Object;
use sluice_wasm::{self as plugins, Finding, Runtime};

/// Where the manifests come from.
#[derive(Debug, Clone)]
pub enum Input {
    /// A directory on disk.
    Dir(PathBuf),
    /// A repository URL and a ref (default branch when `None`).
    Repo(String, Option<String>),
}

/// A rendered set.
#[derive(Debug, Clone)]
pub struct Rendered {
    /// Objects after the plugins.
    pub objects: Vec<Object>,
    /// Non-blocking findings.
    pub findings: Vec<Finding>,
}

/// Kustomize and Helm for the CLI, with the compilation cache of `render` and `validate`
/// (`<cache dir>/wasm`), and Helm's default capabilities (no cluster is asked).
fn renderers(keys: Option<&Arc<Keys>>) -> render::Context {
    let cache = sluice_model::default_cache_dir().join("wasm");
    render::Context {
        renderers: sluice_wasm::renderer::Renderers::new(None, Some(&cache))
            .ok()
            .map(Arc::new),
        capabilities: None,
        keys: keys.cloned(),
    }
}

/// Renders `input` with the project entry `project` (by id, or the first) of `config`.
///
/// # Errors
/// A message naming what failed (file and line for decode errors; plugin and object for
/// findings).
pub async fn render(
    input: &Input,
    config_file: Option<&Path>,
    project: Option<&str>,
    keys: Option<&Arc<Keys>>,
) -> Result<Rendered, sync::Error> {
    let (cfg, base) = match config_file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                sync::Error::Task(format!("failed to read {}: {e}", path.display()))
            })?;
            let cfg = config::parse_with_origin(&text, "local", &path.display().to_string())
                .map_err(|e| sync::Error::Task(e.to_string()))?;
            (
                cfg,
                path.parent().map(Path::to_path_buf).unwrap_or_default(),
            )
        }
        None => (
            config::parse("", "local").map_err(|e| sync::Error::Task(e.to_string()))?,
            PathBuf::new(),
        ),
    };
    let mut entry = pick(&cfg, project)?;
    // A chart directory without a configuration renders as `helm template DIR` would
    // (release `release-name`, namespace `default`), with its CRDs as sluice applies them.
    if let (None, Input::Dir(dir)) = (config_file, input)
        && dir.join("Chart.yaml").is_file()
    {
        entry.chart = Some(config::Chart {
            path: ".".into(),
            release_name: "release-name".into(),
            namespace: entry.default_namespace.clone(),
            values: Vec::new(),
            include_crds: true,
        });
    }
    let (mut objects, commit) = match input {
        Input::Dir(dir) => {
            let (dir, project, cx) = (dir.clone(), entry.clone(), renderers(keys));
            let files = tokio::task::spawn_blocking(move || -> Result<_, sync::Error> {
                let tree = Dir::walk(&dir).map_err(|e| sync::Error::Task(e.to_string()))?;
                Ok(render::render(
                    &tree,
                    &project,
                    &select::Limits::default(),
                    &cx,
                )?)
            })
            .await
            .map_err(|e| sync::Error::Task(e.to_string()))??;
            (
                decode::decode(&files, &entry.id, "local")?,
                "local".to_string(),
            )
        }
        Input::Repo(url, git_ref) => {
            let source = Source::new(url, &std::env::temp_dir().join("sluice-render"), None);
            let git_ref = match git_ref {
                Some(r) if r.len() == 40 && r.bytes().all(|b| b.is_ascii_hexdigit()) => {
                    config::GitRef::Commit(r.clone())
                }
                Some(r) if sluice_agent::oci::is_digest(r) => config::GitRef::Commit(r.clone()),
                // An OCI repository has tags where git has branches.
                Some(r) if source.is_oci() => config::GitRef::Tag(r.clone()),
                Some(r) => config::GitRef::Branch(r.clone()),
                None => config::GitRef::DefaultBranch,
            };
            let resolver = source.clone();
            let commit = tokio::task::spawn_blocking(move || resolver.resolve(&git_ref))
                .await
                .map_err(|e| sync::Error::Task(e.to_string()))??;
            let (objects, commit, _) = sync::render(
                &source,
                &entry,
                &commit,
                select::Limits::default(),
                None,
                &renderers(keys),
            )
            .await?;
            (objects, commit)
        }
    };
    let scopes = sluice_model::scopes::Scopes::offline(&objects);
    decode::set_namespaces(&mut objects, &entry.default_namespace, &scopes)?;
    let plugins = load_plugins(&cfg, &entry, &base)?;
    let subject = sluice_wasm::Subject {
        agent: "local".into(),
        project: entry.id.as_str().into(),
        commit: commit.as_str().into(),
    };
    let outcome = sync::transform(objects, plugins, &subject, None).await?;
    let (mut objects, findings) = (outcome.objects, outcome.findings);
    let scopes = sluice_model::scopes::Scopes::offline(&objects);
    decode::set_namespaces(&mut objects, &entry.default_namespace, &scopes)?;
    Ok(Rendered { objects, findings })
}

fn pick(cfg: &AgentConfig, project: Option<&str>) -> Result<ManifestProject, sync::Error> {
    match project {
        Some(id) => cfg
            .manifest_projects
            .iter()
            .find(|p| p.id == id)
            .cloned()
            .ok_or_else(|| {
                sync::Error::Task(format!("no manifest project {id:?} in the configuration"))
            }),
        None => Ok(cfg.manifest_projects.first().cloned().unwrap_or_else(|| {
            let mut p = config::parse("gitops:\n  manifest_projects:\n  - id: local\n", "local")
                .expect("static config is valid")
                .manifest_projects;
            p.remove(0)
        })),
    }
}

fn load_plugins(
    cfg: &AgentConfig,
    entry: &ManifestProject,
    base: &Path,
) -> Result<Vec<Arc<plugins::Plugin>>, sync::Error> {
    let names: Vec<&String> = match &entry.plugins {
        Some(n) => n.iter().collect(),
        None => cfg.plugins.iter().map(|p| &p.name).collect(),
    };
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let runtime = Runtime::for_cli().map_err(sync::Error::Task)?;
    cfg.plugins
        .iter()
        .filter(|p| names.contains(&&p.name))
        .map(|spec| {
            let path = base.join(&spec.module);
            let bytes = std::fs::read(&path).map_err(|e| plugins::Error::Load {
                plugin: spec.name.clone(),
                message: format!("failed to read {}: {e}", path.display()),
            })?;
            let mut spec = spec.clone();
            spec.granted = sluice_agent::agent::grant_local_files(
                &spec,
                base,
                &sluice_model::default_cache_dir(),
            )
            .map_err(|message| plugins::Error::Load {
                plugin: spec.name.clone(),
                message,
            })?;
            Ok(Arc::new(runtime.load(&spec, &bytes)?))
        })
        .collect()
}

/// One object `sluice diff` reports.
#[derive(Debug, Clone)]
pub struct Change {
    /// `Kind/namespace/name`.
    pub obj: String,
    /// Where it is written in git.
    pub origin: String,
    /// The live object as YAML (empty when it would be created).
    pub live: String,
    /// The object as the server would store it, as YAML.
    pub desired: String,
}

/// Renders `input` and server-side dry-runs it against the cluster: what would change.
/// Nothing is written. Read-only fields the server manages (status, timestamps, uid, …)
/// are left out of both sides so only what git controls shows.
///
/// # Errors
/// Render errors, discovery, and objects the server would reject (all listed).
/// `inventory_id` is the agent's for this project: objects owned by it compare equal.
pub async fn diff(
    input: &Input,
    config_file: Option<&Path>,
    project: Option<&str>,
    inventory_id: &str,
    client: kube::Client,
    keys: Option<&Arc<Keys>>,
) -> Result<Vec<Change>, sync::Error> {
    let rendered = render(input, config_file, project, keys).await?;
    let cluster = sluice_engine::cluster::Cluster::connect(client).await?;
    let mut objects = rendered.objects;
    let mut scopes = cluster.scopes();
    scopes.add_crds(&objects);
    // render() set default namespaces already; this checks scopes against the real cluster.
    decode::set_namespaces(&mut objects, "default", &scopes)?;
    let plan = sluice_engine::plan::plan(objects, &Default::default())?;
    // Report as the agent would see it: its field manager, and any owner accepted.
    let opts = sluice_engine::apply::Options {
        inventory_policy: config::InventoryPolicy::AdoptAll,
        keep_views: true,
        ..sluice_engine::apply::Options::new(inventory_id)
    };
    let checked = sluice_engine::apply::check(&cluster, plan.stages, &opts).await?;
    let yaml = |v: &Option<serde_json::Value>| {
        v.as_ref()
            .map(|v| serde_saphyr::to_string(v).unwrap_or_default())
            .unwrap_or_default()
    };
    Ok(checked
        .changes()
        .into_iter()
        .map(|(o, live, dry)| {
            let mut live = live.as_ref().map(clean);
            let mut desired = clean(dry.as_ref().unwrap_or(&o.value()));
            if o.kind() == "Secret" && o.api_version() == "v1" {
                mask_secret(live.as_mut(), &mut desired);
            }
            Change {
                obj: o.obj_ref().to_string(),
                origin: o.origin.to_string(),
                live: yaml(&live),
                desired: yaml(&Some(desired)),
            }
        })
        .collect())
}

/// A diff must not print a Secret's values (it lands in CI logs): every value of `data` and
/// `stringData` becomes a marker that still shows whether it changed, like Flux's diff.
fn mask_secret(live: Option<&mut serde_json::Value>, desired: &mut serde_json::Value) {
    use serde_json::Value;
    const SAME: &str = "*** (unchanged)";
    const OLD: &str = "*** (old value)";
    const NEW: &str = "*** (new value)";
    let mut live = live;
    for field in ["data", "stringData"] {
        let before = live
            .as_deref()
            .and_then(|l| l[field].as_object().cloned())
            .unwrap_or_default();
        if let Some(after) = desired[field].as_object_mut() {
            for (k, v) in after.iter_mut() {
                let same = before.get(k) == Some(v);
                *v = Value::from(if same { SAME } else { NEW });
            }
        }
        if let Some(l) = live.as_deref_mut().and_then(|l| l[field].as_object_mut()) {
            let after = desired[field].as_object();
            for (k, v) in l.iter_mut() {
                let same = after.and_then(|a| a.get(k)).is_some_and(|a| a == SAME);
                *v = Value::from(if same { SAME } else { OLD });
            }
        }
    }
    // kubectl's client-side apply keeps the whole Secret in an annotation.
    for side in live.into_iter().chain(std::iter::once(desired)) {
        if let Some(a) = side
            .get_mut("metadata")
            .and_then(|m| m.get_mut("annotations"))
            .and_then(Value::as_object_mut)
        {
            a.remove("kubectl.kubernetes.io/last-applied-configuration");
        }
    }
}

/// Drops what the server owns, so a diff shows what git controls.
fn clean(v: &serde_json::Value) -> serde_json::Value {
    let mut v = v.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("status");
    }
    if let Some(meta) = v["metadata"].as_object_mut() {
        for k in [
            "uid",
            "creationTimestamp",
            "generation",
            "managedFields",
            "resourceVersion",
        ] {
            meta.remove(k);
        }
        if let Some(a) = meta.get_mut("annotations").and_then(|a| a.as_object_mut()) {
            a.remove(sluice_engine::inventory::OWNING_INVENTORY);
            a.remove("deployment.kubernetes.io/revision");
            if a.is_empty() {
                meta.remove("annotations");
            }
        }
    }
    v
}

/// Replaces every value of a decrypted Secret's `data` and `stringData` (a Secret from a
/// SOPS file, or any Secret when a key was given) with a marker: `render` prints no
/// decrypted value unless asked (`--show-secrets`).
pub fn mask_decrypted(objects: &[Object], decrypting: bool) -> Vec<serde_json::Value> {
    objects
        .iter()
        .map(|o| {
            let mut v = o.value();
            let decrypted = o.origin.renderer.as_deref() == Some(render::SOPS) || decrypting;
            if decrypted && o.kind() == "Secret" && o.api_version() == "v1" {
                for field in ["data", "stringData"] {
                    if let Some(m) = v[field].as_object_mut() {
                        for value in m.values_mut() {
                            *value = serde_json::Value::from(
                                "*** (decrypted; --show-secrets prints it)",
                            );
                        }
                    }
                }
            }
            v
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_secret_diff_shows_which_keys_changed_and_no_value() {
        let mut live = json!({"kind": "Secret", "data": {"same": "c2FtZQ==", "changed": "b2xk", "gone": "eA=="},
            "metadata": {"annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{\"data\":{\"same\":\"c2FtZQ==\"}}"}}});
        let mut desired = json!({"kind": "Secret", "data": {"same": "c2FtZQ==", "changed": "bmV3", "added": "eQ=="},
            "stringData": {"plain": "hunter2"}});
        mask_secret(Some(&mut live), &mut desired);
        assert_eq!(
            live["data"],
            json!({"same": "*** (unchanged)", "changed": "*** (old value)", "gone": "*** (old value)"})
        );
        assert_eq!(
            desired["data"],
            json!({"same": "*** (unchanged)", "changed": "*** (new value)", "added": "*** (new value)"})
        );
        assert_eq!(desired["stringData"], json!({"plain": "*** (new value)"}));
        let text = format!("{live}{desired}");
        for secret in ["c2FtZQ", "b2xk", "bmV3", "hunter2", "eA==", "eQ=="] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
    }
}
