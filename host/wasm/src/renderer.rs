//! Renderers: Kustomize and Helm, the Go libraries themselves compiled to WebAssembly
//! (`GOOS=wasip1`, `renderers/` in the repository), run in the plugins' sandbox.
//!
//! A renderer is a WASI preview 1 command. The host writes one JSON request to its stdin
//! (the files it may read, and what to render) and reads one JSON response from its stdout:
//! `{"documents": [{"source": <file>, "yaml": <one object>}]}` or `{"error": <message>}`.
//! It gets no preopened directory at all, so it reads only the files in the request (the
//! project's, or the chart's, at the commit); no environment, no network (preview 1 has no
//! sockets), deterministic clocks and randomness, a memory cap and a deadline, as every
//! plugin. What a Go program does at start-up (its runtime, every package's `init`) is paid
//! per render; the compiled module is loaded once per process, on first use.
//!
//! Modules are found in a directory: `$SLUICE_RENDERERS_DIR`, else `renderers/` beside the
//! executable (the container image's layout). A module is compiled once and kept in the
//! compilation cache given to [`Renderers::new`]; the image ships that cache precompiled
//! (`sluice renderers compile`) so that an agent never compiles one (Helm's takes more
//! memory to compile than the agent's limit).

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use sha2::Digest;

use super::krm::{self, FunctionPre};
use super::{Limits, Runtime};

/// The renderers sluice ships.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Renderer {
    /// `kustomize build` (sigs.k8s.io/kustomize/api krusty).
    Kustomize,
    /// `helm template --skip-tests` (helm.sh/helm/v4).
    Helm,
}

impl Renderer {
    /// Every renderer.
    pub const ALL: [Renderer; 2] = [Renderer::Kustomize, Renderer::Helm];

    /// Its name: `kustomize` or `helm`; the module is `<name>.wasm`.
    pub fn name(self) -> &'static str {
        match self {
            Renderer::Kustomize => "kustomize",
            Renderer::Helm => "helm",
        }
    }

    /// The CLI whose output it reproduces, with the version (renderers/*/go.mod pins the
    /// libraries of that release).
    pub fn version(self) -> &'static str {
        match self {
            Renderer::Kustomize => "kustomize v5.8.2",
            Renderer::Helm => "helm v4.3.2",
        }
    }

    /// How long one render may take, and how much memory and output it may use: far more
    /// than a plugin's defaults, as the Go runtime alone starts at tens of MiB.
    pub fn limits(self) -> Limits {
        Limits {
            timeout: Duration::from_secs(60),
            memory_bytes: 256 << 20,
            max_output_bytes: 64 << 20,
        }
    }
}

impl std::fmt::Display for Renderer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.version())
    }
}

/// A rendered object: its YAML and the file it came from (a template, a resource file, or
/// the kustomization that generated it), relative to the project's root.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Document {
    /// The file, relative to the project's root.
    pub source: String,
    /// One object.
    pub yaml: String,
}

/// A render that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No module for this renderer was found.
    #[error(
        "not installed: no {file} in {dir} (set SLUICE_RENDERERS_DIR, or use sluice's container image)"
    )]
    NotInstalled {
        /// Which renderer.
        renderer: Renderer,
        /// The module's file name.
        file: String,
        /// Where it was looked for.
        dir: String,
    },
    /// The module did not compile or link.
    #[error("does not load: {message}")]
    Load {
        /// Which renderer.
        renderer: Renderer,
        /// Why.
        message: String,
    },
    /// The renderer said no: the input is wrong (the renderer's own message).
    #[error("{message}")]
    Refused {
        /// Which renderer.
        renderer: Renderer,
        /// Its message.
        message: String,
    },
    /// It trapped, timed out, ran out of memory or wrote something that is not a response.
    #[error("failed: {message}")]
    Failed {
        /// Which renderer.
        renderer: Renderer,
        /// Why.
        message: String,
    },
}

/// The renderers of one process: modules loaded on first use, shared by every project.
pub struct Renderers {
    runtime: Runtime,
    dir: Option<PathBuf>,
    loaded: Mutex<BTreeMap<Renderer, Arc<FunctionPre>>>,
    /// The last renders' output by the SHA-256 of renderer and request, most recent last:
    /// a resync of an unchanged commit renders nothing.
    memo: Mutex<Memo>,
}

/// Renders by the SHA-256 of renderer and request, most recent last.
type Memo = VecDeque<([u8; 32], Arc<Vec<Document>>)>;

/// The precompiled renderer at `compiled`, mapped from its file (its code is paged in as it
/// runs and shared, not copied into the agent's memory), when it is there, newer than the
/// module at `module`, and made by this engine.
fn mapped(engine: &wasmtime::Engine, module: &Path, compiled: &Path) -> Option<wasmtime::Module> {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if let (Some(source), Some(made)) = (modified(module), modified(compiled))
        && made < source
    {
        return None;
    }
    modified(compiled)?;
    // SAFETY: wasmtime runs the machine code in the file as it is, so the file must be one
    // wasmtime serialized. `<name>.cwasm` is written only by `Renderers::load` and
    // `sluice renderers compile` (`Module::serialize` of this very module) into the
    // renderers' directory, which is the agent's own installation: the container image's
    // read-only layer, or the build's output. wasmtime checks the engine's version and
    // configuration recorded in it and refuses a mismatch (then sluice compiles instead).
    #[allow(unsafe_code)]
    let module = unsafe { wasmtime::Module::deserialize_file(engine, compiled) };
    module
        .map_err(|e| tracing::warn!(path = %compiled.display(), error = %e, "precompiled renderer not usable; compiling"))
        .ok()
}

/// The WebAssembly stack a render may use.
const MAX_STACK: usize = 16 << 20;

/// Renders kept in memory ([`Renderers::render`]).
const MEMO_ENTRIES: usize = 64;

impl std::fmt::Debug for Renderers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Renderers")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct Response {
    #[serde(default)]
    documents: Vec<Document>,
    #[serde(default)]
    error: Option<String>,
}

impl Renderers {
    /// Renderers whose modules are in `dir` (`None`: [`Renderers::locate`]), compiled code
    /// cached under `cache_dir`.
    ///
    /// # Errors
    /// When the engine cannot be built.
    /// A `cache/` directory beside the modules (the image's, made by
    /// [`Renderers::compile_all`] at build time) is used instead of `cache_dir`.
    pub fn new(dir: Option<PathBuf>, cache_dir: Option<&Path>) -> Result<Renderers, String> {
        let dir = dir.or_else(Renderers::locate);
        let shipped = dir.as_ref().map(|d| d.join("cache")).filter(|c| c.is_dir());
        let runtime = |cache: Option<&Path>| {
            Runtime::with_config(cache, |c| {
                // Go's calls are WebAssembly calls: a template nested 1000 deep (Helm's own
                // limit) needs more than wasmtime's default 512 KiB of stack.
                c.max_wasm_stack(MAX_STACK);
                c.async_stack_size(MAX_STACK + (1 << 20));
            })
        };
        // A cache that cannot be used (a read-only home) is no reason to render nothing.
        let runtime = runtime(shipped.as_deref().or(cache_dir)).or_else(|e| {
            tracing::warn!(error = %e, "renderer compilation cache unavailable");
            runtime(None)
        })?;
        Ok(Renderers {
            runtime,
            dir,
            loaded: Mutex::default(),
            memo: Mutex::default(),
        })
    }

    /// Where the modules are: `$SLUICE_RENDERERS_DIR`, else `renderers/` beside the
    /// executable when it exists (`/renderers` in the image).
    pub fn locate() -> Option<PathBuf> {
        if let Some(dir) = std::env::var_os("SLUICE_RENDERERS_DIR") {
            return Some(dir.into());
        }
        // Without /proc (a bare chroot) the executable's path is what it was started as.
        let exe = std::env::current_exe()
            .ok()
            .or_else(|| std::env::args_os().next().map(PathBuf::from))?;
        let dir = exe.parent()?.join("renderers");
        dir.is_dir().then_some(dir)
    }

    /// Compiles (or takes from the cache) every installed renderer, returning how long each
    /// took: for an image build, so that agents never compile.
    ///
    /// # Errors
    /// The first renderer that does not load.
    pub fn compile_all(&self) -> Result<Vec<(Renderer, Duration)>, Error> {
        Renderer::ALL
            .into_iter()
            .map(|r| {
                let start = Instant::now();
                self.load(r).map(|_| (r, start.elapsed()))
            })
            .collect()
    }

    fn load(&self, renderer: Renderer) -> Result<Arc<FunctionPre>, Error> {
        // Held while compiling: two projects needing the same renderer compile it once.
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pre) = loaded.get(&renderer) {
            return Ok(pre.clone());
        }
        let file = format!("{}.wasm", renderer.name());
        let not_installed = || Error::NotInstalled {
            renderer,
            file: file.clone(),
            dir: self.dir.as_ref().map_or_else(
                || "(no renderers directory)".into(),
                |d| d.display().to_string(),
            ),
        };
        let dir = self.dir.as_ref().ok_or_else(not_installed)?;
        let (path, compiled) = (
            dir.join(&file),
            dir.join(format!("{}.cwasm", renderer.name())),
        );
        let fail = |message: String| Error::Load { renderer, message };
        let start = Instant::now();
        let module = match mapped(&self.runtime.engine, &path, &compiled) {
            Some(module) => module,
            None => {
                let bytes = std::fs::read(&path).map_err(|_| not_installed())?;
                tracing::warn!(
                    renderer = renderer.name(),
                    "compiling a renderer (no precompiled {}.cwasm beside it): this takes tens of seconds and, for Helm, more than a GiB of memory; run `sluice renderers compile` where it is installed",
                    renderer.name()
                );
                let module = krm::compile(&self.runtime.engine, &bytes).map_err(fail)?;
                drop(bytes);
                // Next time: mapped, not compiled. A directory that cannot be written (a
                // read-only image) is no error: the compilation cache still has it.
                if let Ok(code) = module.serialize() {
                    let partial = compiled.with_extension("cwasm.partial");
                    if std::fs::write(&partial, code).is_ok() {
                        let _ = std::fs::rename(&partial, &compiled);
                    }
                }
                module
            }
        };
        let pre = Arc::new(krm::prepare(&self.runtime.engine, &module).map_err(fail)?);
        tracing::info!(
            renderer = renderer.name(),
            elapsed_ms = start.elapsed().as_millis() as u64,
            "renderer loaded"
        );
        loaded.insert(renderer, pre.clone());
        Ok(pre)
    }

    /// Forgets the renders kept in memory, so the next render of a request runs (benches).
    pub fn forget(&self) {
        self.memo.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Runs `renderer` once over `request` (its JSON request), blocking: call it off the
    /// async workers.
    ///
    /// # Errors
    /// See [`Error`].
    pub fn render(
        &self,
        renderer: Renderer,
        request: &serde_json::Value,
    ) -> Result<Vec<Document>, Error> {
        let text = request.to_string();
        let key: [u8; 32] = sha2::Sha256::new()
            .chain_update(renderer.version())
            .chain_update([0])
            .chain_update(&text)
            .finalize()
            .into();
        let memo = || self.memo.lock().unwrap_or_else(|p| p.into_inner());
        let hit = {
            let mut m = memo();
            m.iter().position(|(k, _)| *k == key).and_then(|at| {
                let entry = m.remove(at)?;
                let documents = entry.1.clone();
                m.push_back(entry);
                Some(documents)
            })
        };
        if let Some(documents) = hit {
            return Ok(documents.as_ref().clone());
        }
        let pre = self.load(renderer)?;
        let limits = renderer.limits();
        let failed = |message: String| Error::Failed { renderer, message };
        let exited = krm::run(
            &self.runtime.engine,
            &pre,
            text.into_bytes(),
            &limits,
            &[],
            super::TICK,
            |e| without_backtrace(super::trap_message(e, &limits)),
        )
        .map_err(|e| match e {
            krm::CallError::Failed(m) | krm::CallError::Invalid(m) => failed(m),
        })?;
        let response: Response = serde_json::from_slice(&exited.stdout).map_err(|e| {
            failed(format!(
                "exited with code {} without a response ({e}): {}",
                exited.code, exited.stderr
            ))
        })?;
        if let Some(message) = response.error {
            return Err(Error::Refused {
                renderer,
                message: shortened(message),
            });
        }
        let documents = Arc::new(response.documents);
        {
            let mut m = memo();
            if m.len() == MEMO_ENTRIES {
                m.pop_front();
            }
            m.push_back((key, documents.clone()));
        }
        Ok(documents.as_ref().clone())
    }
}

/// A renderer's message, at most about 2 KiB: its start (where it failed) and its end (why).
/// Helm's error for a template that includes itself repeats the include chain a thousand
/// times.
fn shortened(message: String) -> String {
    const KEEP: usize = 1024;
    if message.len() <= 2 * KEEP + 64 {
        return message;
    }
    let head = (0..=KEEP)
        .rev()
        .find(|i| message.is_char_boundary(*i))
        .unwrap_or(0);
    let tail = (message.len() - KEEP..message.len())
        .find(|i| message.is_char_boundary(*i))
        .unwrap_or(message.len());
    format!(
        "{} … ({} bytes left out) … {}",
        &message[..head],
        tail - head,
        &message[tail..]
    )
}

/// A trap's message without the WebAssembly backtrace (function numbers of a Go program
/// help nobody): `trapped: call stack exhausted`.
fn without_backtrace(message: String) -> String {
    match (
        message.find("error while executing at wasm backtrace:"),
        message.rfind(": "),
    ) {
        (Some(a), Some(b)) if b > a => format!("{}{}", &message[..a], &message[b + 2..]),
        _ => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backtraces_are_cut_from_trap_messages() {
        assert_eq!(
            without_backtrace(
                "trapped: error while executing at wasm backtrace:\n    0: 0x1 - <unknown>!<wasm function 5>: wasm trap: call stack exhausted".into()
            ),
            "trapped: call stack exhausted"
        );
        assert_eq!(
            without_backtrace("timed out after 60s".into()),
            "timed out after 60s"
        );
        let long = format!("start{}end", "x".repeat(10_000));
        let short = shortened(long);
        assert!(
            short.starts_with("startxx") && short.ends_with("xxend"),
            "{short}"
        );
        assert!(
            short.len() < 2200 && short.contains("bytes left out"),
            "{short}"
        );
        assert_eq!(shortened("short".into()), "short");
    }
}
