//! The files a commit stands for: the selected manifests as they are, Kustomize builds and
//! Helm charts rendered in the WebAssembly sandbox ([`sluice_wasm::renderer`]).
//!
//! - **Plain files**: what [`select`] selects is decoded as it is.
//! - **Kustomize**, as Flux and Argo CD detect it: a selected `kustomization.yaml`
//!   (`.yml`, `Kustomization`) makes its directory a build root. Its output replaces every
//!   selected file under that directory, and a root under another root is built only as
//!   part of the outer one. Kustomize sees the project's files at the commit (bases may be
//!   anywhere in it: `../../base`) and nothing else: no remote bases, no plugins.
//! - **Helm**: a project with a chart ([`Chart`]) renders that chart only, as
//!   `helm template --skip-tests` (with `--include-crds` unless turned off), the chart
//!   seeing its own directory only. Values files are read from the project at the commit.
//!
//! Every rendered object's origin names the template or resource file and the renderer. A
//! file that is a symlink is never given to a renderer, and a chart that holds one is
//! refused: sluice never follows symlinks.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde_json::{Value, json};
use sluice_model::Capabilities;
use sluice_wasm::renderer::{self, Document, Renderer, Renderers};

use crate::config::{Chart, ChartValues, ManifestProject};
use crate::select::{self, FileTree, SelectedFile};
use crate::source::EntryKind;

/// A render that failed. Not retryable: the commit or the configuration must change.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Selecting the files failed.
    #[error(transparent)]
    Select(#[from] select::Error),
    /// A renderer refused the input or failed.
    #[error("{root}: {renderer}: {source}")]
    Renderer {
        /// The kustomization's directory or the chart's.
        root: String,
        /// Which renderer, with its version.
        renderer: Renderer,
        /// What it said.
        #[source]
        source: renderer::Error,
    },
    /// A SOPS file does not decrypt.
    #[error(transparent)]
    Decrypt(#[from] crate::sops::Error),
    /// The input cannot be given to a renderer.
    #[error("{path}: {message}")]
    Input {
        /// The file or directory.
        path: String,
        /// Why.
        message: String,
    },
}

impl Error {
    /// True when the renderer could not run at all (not installed, does not load), which
    /// is the agent's problem, not the commit's.
    pub fn is_installation(&self) -> bool {
        matches!(
            self,
            Error::Renderer {
                source: renderer::Error::NotInstalled { .. } | renderer::Error::Load { .. },
                ..
            }
        )
    }
}

/// The renderers and what they need to know of the cluster.
#[derive(Debug, Clone, Default)]
pub struct Context {
    /// The renderers (`None`: none installed; a project that needs one fails).
    pub renderers: Option<std::sync::Arc<Renderers>>,
    /// The cluster's version and API versions, for Helm's `.Capabilities` (`None`: Helm's
    /// defaults, as `helm template` without `--kube-version`).
    pub capabilities: Option<std::sync::Arc<Capabilities>>,
    /// The age keys of the project's SOPS files (`None`: the project has none, and a SOPS
    /// file among its manifests fails the render).
    pub keys: Option<std::sync::Arc<crate::sops::Keys>>,
}

/// Kustomization file names, in kustomize's order of preference.
const KUSTOMIZATION_FILES: [&str; 3] = ["kustomization.yaml", "kustomization.yml", "Kustomization"];

/// The files of `project` at this commit, ready for decode: selected files, and renderers'
/// output in place of kustomizations and charts. Blocking (a renderer runs for up to its
/// deadline): call it off the async workers.
///
/// # Errors
/// See [`Error`].
pub fn render(
    tree: &impl FileTree,
    project: &ManifestProject,
    limits: &select::Limits,
    cx: &Context,
) -> Result<Vec<SelectedFile>, Error> {
    if let Some(chart) = &project.chart {
        return helm(tree, chart, limits, cx);
    }
    let files = select::select(tree, &project.paths, limits)?;
    let roots = kustomize_roots(&files);
    let mut out: Vec<SelectedFile> = files
        .into_iter()
        .filter(|f| !roots.iter().any(|r| under(&f.path, r)))
        .collect();
    for f in &mut out {
        decrypt(f, cx)?;
    }
    if roots.is_empty() {
        return Ok(out);
    }
    // Kustomize reads SOPS files decrypted, as Flux decrypts a build's sources: its output
    // then has no MAC to break. Without keys they stay encrypted, and an encrypted object
    // in the output is refused below.
    let mut input = project_files(tree, "", limits, false)?;
    if let Some(keys) = cx.keys.as_deref() {
        for (path, bytes) in &mut input {
            if crate::sops::is_encrypted(bytes) {
                *bytes = crate::sops::decrypt(path, bytes, keys)?;
            }
        }
    }
    let input = encode(input);
    for root in roots {
        let request = json!({"root": root, "files": input});
        let documents = run(cx, Renderer::Kustomize, &root, &request)?;
        if let Some(d) = documents
            .iter()
            .find(|d| crate::sops::is_encrypted(d.yaml.as_bytes()))
        {
            return Err(Error::Input {
                path: d.source.clone(),
                message: "is encrypted with SOPS, and no age key was given (the project's decryption.secret; --age-key-file for the CLI)".into(),
            });
        }
        out.extend(files_of(documents, Renderer::Kustomize));
    }
    Ok(out)
}

fn helm(
    tree: &impl FileTree,
    chart: &Chart,
    limits: &select::Limits,
    cx: &Context,
) -> Result<Vec<SelectedFile>, Error> {
    let files = project_files(tree, &chart.path, limits, true)?;
    if !files.keys().any(|p| p == "Chart.yaml") {
        return Err(Error::Input {
            path: chart.path.clone(),
            message: "no Chart.yaml: not a Helm chart".into(),
        });
    }
    let mut values = Vec::new();
    for v in &chart.values {
        values.push(match v {
            ChartValues::Inline(v) => v.to_string(),
            ChartValues::File(path) => {
                let entry = tree
                    .entries()
                    .iter()
                    .find(|e| e.path == *path)
                    .ok_or_else(|| Error::Input {
                        path: path.clone(),
                        message: "values file not found in the repository at this commit".into(),
                    })?;
                if entry.kind != EntryKind::File {
                    return Err(Error::Input {
                        path: path.clone(),
                        message:
                            "values file is not a regular file (sluice never follows symlinks)"
                                .into(),
                    });
                }
                let mut file = SelectedFile {
                    path: path.clone(),
                    bytes: read_bounded(tree, entry, limits)?,
                    renderer: None,
                };
                // Values files encrypted with SOPS, as helm-secrets users keep them.
                decrypt(&mut file, cx)?;
                String::from_utf8(file.bytes).map_err(|_| Error::Input {
                    path: path.clone(),
                    message: "values file is not UTF-8".into(),
                })?
            }
        });
    }
    let (kube_version, api_versions) = match cx.capabilities.as_deref() {
        Some(c) => (c.kube_version.clone(), c.api_versions.clone()),
        None => (String::new(), Vec::new()),
    };
    let request = json!({
        "chart": chart.path,
        "files": encode(files),
        "release_name": chart.release_name,
        "namespace": chart.namespace,
        "values": values,
        "include_crds": chart.include_crds,
        "kube_version": kube_version,
        "api_versions": api_versions,
    });
    let documents = run(cx, Renderer::Helm, &chart.path, &request)?;
    Ok(files_of(documents, Renderer::Helm))
}

fn run(
    cx: &Context,
    renderer: Renderer,
    root: &str,
    request: &Value,
) -> Result<Vec<Document>, Error> {
    let err = |source| Error::Renderer {
        root: root.to_string(),
        renderer,
        source,
    };
    let renderers = cx.renderers.as_ref().ok_or_else(|| {
        err(renderer::Error::NotInstalled {
            renderer,
            file: format!("{}.wasm", renderer.name()),
            dir: "(no renderers directory)".into(),
        })
    })?;
    renderers.render(renderer, request).map_err(err)
}

/// Decrypts `file` in place when it is a SOPS file, marking it as decrypted by `sops`.
fn decrypt(file: &mut SelectedFile, cx: &Context) -> Result<(), Error> {
    if !crate::sops::is_encrypted(&file.bytes) {
        return Ok(());
    }
    let no_keys = crate::sops::Keys::default();
    let keys = cx.keys.as_deref().unwrap_or(&no_keys);
    file.bytes = crate::sops::decrypt(&file.path, &file.bytes, keys)?;
    file.renderer = Some(SOPS.into());
    Ok(())
}

/// The origin's renderer of a decrypted file.
pub const SOPS: &str = "sops (age)";

/// The directories to build with Kustomize: those of selected kustomization files, minus
/// any inside another.
fn kustomize_roots(files: &[SelectedFile]) -> Vec<String> {
    let mut dirs: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let (dir, name) = f.path.rsplit_once('/').unwrap_or((".", &f.path));
            KUSTOMIZATION_FILES.contains(&name).then(|| dir.to_string())
        })
        .collect();
    dirs.sort();
    dirs.dedup();
    let all = dirs.clone();
    dirs.retain(|d| !all.iter().any(|o| o != d && under(d, o)));
    dirs
}

/// True when `path` is `dir` or inside it (`.` is the root).
fn under(path: &str, dir: &str) -> bool {
    dir == "."
        || path == dir
        || path
            .strip_prefix(dir)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// The regular files under `dir` (the whole project for `""`), by path relative to `dir`,
/// within the renderer input limits: 10 times the selection's file count and 4 times its
/// total. Symlinks are left out, or refused with `refuse_links` (a chart). Without
/// `hidden`, files inside dot-directories are left out, as selection leaves them.
fn project_files(
    tree: &impl FileTree,
    dir: &str,
    limits: &select::Limits,
    chart: bool,
) -> Result<BTreeMap<String, Vec<u8>>, Error> {
    let (max_files, max_total) = (limits.max_files * 10, limits.max_total_bytes * 4);
    let mut files = BTreeMap::new();
    let mut total = 0u64;
    for entry in tree.entries() {
        let rel = match dir {
            "" | "." => Some(entry.path.as_str()),
            d => entry.path.strip_prefix(d).and_then(|r| r.strip_prefix('/')),
        };
        let Some(rel) = rel else { continue };
        if !chart && rel.split('/').rev().skip(1).any(|p| p.starts_with('.')) {
            continue;
        }
        match entry.kind {
            EntryKind::File => {}
            EntryKind::Symlink if chart => {
                return Err(Error::Input {
                    path: entry.path.clone(),
                    message: "is a symbolic link in a chart; sluice never follows symlinks, commit the file itself".into(),
                });
            }
            EntryKind::Symlink | EntryKind::Submodule => continue,
        }
        let size = tree.size(entry)?;
        if size > limits.max_file_bytes {
            if chart {
                return Err(Error::Input {
                    path: entry.path.clone(),
                    message: format!(
                        "file is {size} bytes, the limit per file is {}",
                        limits.max_file_bytes
                    ),
                });
            }
            // Kustomize reads only what a kustomization names; a large file elsewhere in
            // the repository (an image, an archive) is not its input.
            continue;
        }
        total += size;
        if files.len() == max_files || total > max_total {
            return Err(Error::Input {
                path: if dir.is_empty() {
                    ".".into()
                } else {
                    dir.to_string()
                },
                message: format!(
                    "more than {max_files} files or {max_total} bytes to render from; split the repository or raise the limits"
                ),
            });
        }
        files.insert(rel.to_string(), tree.read(entry)?);
    }
    Ok(files)
}

fn read_bounded(
    tree: &impl FileTree,
    entry: &crate::source::TreeEntry,
    limits: &select::Limits,
) -> Result<Vec<u8>, Error> {
    let size = tree.size(entry)?;
    if size > limits.max_file_bytes {
        return Err(Error::Input {
            path: entry.path.clone(),
            message: format!(
                "file is {size} bytes, the limit per file is {}",
                limits.max_file_bytes
            ),
        });
    }
    Ok(tree.read(entry)?)
}

/// Files as Go's `encoding/json` reads `map[string][]byte`: base64 text.
fn encode(files: BTreeMap<String, Vec<u8>>) -> Value {
    let engine = base64::engine::general_purpose::STANDARD;
    Value::Object(
        files
            .into_iter()
            .map(|(path, bytes)| (path, Value::String(engine.encode(bytes))))
            .collect(),
    )
}

/// Rendered objects as files for decode: one per source file, in the order the renderer
/// wrote them, each carrying the renderer's name.
fn files_of(documents: Vec<Document>, renderer: Renderer) -> Vec<SelectedFile> {
    let by: sluice_model::object::Name = renderer.version().into();
    let mut files: Vec<SelectedFile> = Vec::new();
    let mut index: BTreeMap<String, usize> = BTreeMap::new();
    for d in documents {
        let at = *index.entry(d.source.clone()).or_insert_with(|| {
            files.push(SelectedFile {
                path: d.source.clone(),
                bytes: Vec::new(),
                renderer: Some(by.clone()),
            });
            files.len() - 1
        });
        let file = &mut files[at];
        if !file.bytes.is_empty() {
            file.bytes.extend_from_slice(b"\n---\n");
        }
        file.bytes.extend_from_slice(d.yaml.as_bytes());
    }
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str) -> SelectedFile {
        SelectedFile {
            path: path.into(),
            bytes: Vec::new(),
            renderer: None,
        }
    }

    #[test]
    fn kustomize_roots_are_the_outermost_kustomization_directories() {
        let files = [
            file("apps/web/kustomization.yaml"),
            file("apps/web/deploy.yaml"),
            file("apps/web/extra/kustomization.yml"),
            file("overlays/prod/Kustomization"),
            file("plain/cm.yaml"),
            file("apps/webhook/kustomization.yaml"),
        ];
        assert_eq!(
            kustomize_roots(&files),
            ["apps/web", "apps/webhook", "overlays/prod"]
        );
        assert_eq!(
            kustomize_roots(&[file("kustomization.yaml"), file("a/kustomization.yaml")]),
            ["."]
        );
        assert!(kustomize_roots(&[file("a/kustomization.json")]).is_empty());
        assert!(under("apps/web/x.yaml", "apps/web"));
        assert!(!under("apps/webhook/x.yaml", "apps/web"));
        assert!(under("anything", "."));
    }

    #[test]
    fn rendered_documents_are_grouped_by_source_in_order() {
        let doc = |s: &str, y: &str| Document {
            source: s.into(),
            yaml: y.into(),
        };
        let files = files_of(
            vec![
                doc("c/t/a.yaml", "a: 1\n"),
                doc("c/t/b.yaml", "b: 1\n"),
                doc("c/t/a.yaml", "a: 2\n"),
            ],
            Renderer::Helm,
        );
        assert_eq!(files.len(), 2);
        assert_eq!(files[0].path, "c/t/a.yaml");
        assert_eq!(files[0].bytes, b"a: 1\n\n---\na: 2\n");
        assert_eq!(files[1].renderer.as_deref(), Some("helm v4.3.2"));
    }
}
