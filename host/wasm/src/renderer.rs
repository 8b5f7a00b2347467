//! Renderers: Kustomize and Helm, the Go libraries themselves compiled to WebAssembly
//! (`GOOS=wasip1`, `renderers/` in the repository), run in the plugins' sandbox.
//!
//! A renderer is a WASI preview 1 reactor (`go build -buildmode=c-shared`). The host writes
//! one JSON request into its memory (the files it may read, and what to render) and reads
//! one JSON response back: `{"documents": [{"source": <file>, "yaml": <one object>}]}` or
//! `{"error": <message>}`. It gets no preopened directory at all, so it reads only the
//! files in the request (the project's, or the chart's, at the commit); no environment, no
//! network (preview 1 has no sockets), deterministic clocks and randomness, a memory cap
//! and a deadline, as every plugin. What a Go program does at start-up (its runtime, every
//! package's `init`) is paid once per instance, which serves many renders ([`Warm`]); the
//! compiled module is loaded once per process, on first use.
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

use wasmtime::{InstancePre, Linker, Memory, Store, StoreLimits, TypedFunc};
use wasmtime_wasi::WasiCtxBuilder;
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;

use super::krm;
use super::{Limits, Runtime};

/// The renderers sluice ships.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Renderer {
    /// `kustomize build` (sigs.k8s.io/kustomize/api krusty).
    Kustomize = 0,
    /// `helm template --skip-tests` (helm.sh/helm/v4).
    Helm = 1,
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
    loaded: Mutex<BTreeMap<Renderer, Arc<InstancePre<Guest>>>>,
    /// One running instance per renderer, kept between renders ([`Warm`]).
    warm: [Mutex<Option<Warm>>; 2],
    /// The last renders' output by the SHA-256 of renderer and request, most recent last:
    /// a resync of an unchanged commit renders nothing.
    memo: Mutex<Memo>,
}

/// Renders by the SHA-256 of renderer and request, most recent last.
type Memo = VecDeque<([u8; 32], Arc<Vec<Document>>)>;

/// The state of a renderer's instance: WASI preview 1 with nothing granted, and its limits.
pub struct Guest {
    wasi: WasiP1Ctx,
    limits: StoreLimits,
}

/// Links a renderer (a reactor: `_initialize`, `sluice_alloc`, `sluice_render`) against
/// WASI preview 1.
fn prepare(
    engine: &wasmtime::Engine,
    module: &wasmtime::Module,
) -> Result<InstancePre<Guest>, String> {
    for export in ["_initialize", "sluice_alloc", "sluice_render", "memory"] {
        if module.get_export(export).is_none() {
            return Err(format!(
                "not a sluice renderer: no export {export} (build it with renderers/build.sh)"
            ));
        }
    }
    let mut linker: Linker<Guest> = Linker::new(engine);
    wasmtime_wasi::p1::add_to_linker_async(&mut linker, |g: &mut Guest| &mut g.wasi)
        .map_err(|e| format!("{e:#}"))?;
    linker.instantiate_pre(module).map_err(|e| format!("{e:#}"))
}

/// A renderer's running instance. Go's runtime and every package's `init` (for Kustomize,
/// the OpenAPI schema too) run once, in `_initialize`; each render is then one call. The
/// instance serves every project, one render at a time: a request carries all the files a
/// render may read, and a renderer keeps nothing between requests but its caches of what
/// it ships with (a previous request's data is garbage in its heap, readable only by the
/// renderer's own code, which is sluice's). It is dropped after a failure, after
/// [`MAX_RENDERS`] renders, and when its memory passed half its cap.
struct Warm {
    store: Store<Guest>,
    /// What the guest wrote to stderr (Go's panics), quoted when it fails.
    stderr: MemoryOutputPipe,
    alloc: TypedFunc<i32, i32>,
    render: TypedFunc<(), i64>,
    memory: Memory,
    renders: u32,
}

/// Renders one instance serves before it is started afresh.
const MAX_RENDERS: u32 = 256;

impl Warm {
    fn start(
        engine: &wasmtime::Engine,
        pre: &InstancePre<Guest>,
        limits: &Limits,
    ) -> wasmtime::Result<Warm> {
        let mut wasi = WasiCtxBuilder::new();
        // What Go prints when it panics, bounded.
        let stderr = MemoryOutputPipe::new(64 << 10);
        // klog's init reads os.Args[0].
        wasi.stderr(stderr.clone()).arg("renderer");
        super::sandbox::stand_ins(&mut wasi, &[]);
        let mut store = Store::new(
            engine,
            Guest {
                wasi: wasi.build_p1(),
                limits: wasmtime::StoreLimitsBuilder::new()
                    .memory_size(limits.memory_bytes)
                    .instances(1)
                    .tables(4)
                    .memories(1)
                    .trap_on_grow_failure(true)
                    .build(),
            },
        );
        store.limiter(|g| &mut g.limits);
        store.set_epoch_deadline(ticks(limits));
        store.epoch_deadline_trap();
        let started = super::finish(limits, async {
            let instance = pre.instantiate_async(&mut store).await?;
            let init = instance.get_typed_func::<(), ()>(&mut store, "_initialize")?;
            init.call_async(&mut store, ()).await?;
            let alloc = instance.get_typed_func::<i32, i32>(&mut store, "sluice_alloc")?;
            let render = instance.get_typed_func::<(), i64>(&mut store, "sluice_render")?;
            let memory = instance
                .get_memory(&mut store, "memory")
                .ok_or_else(|| wasmtime::format_err!("no memory"))?;
            Ok((alloc, render, memory))
        });
        match started {
            Ok((alloc, render, memory)) => Ok(Warm {
                store,
                stderr,
                alloc,
                render,
                memory,
                renders: 0,
            }),
            Err(e) => Err(with_stderr(e, &stderr)),
        }
    }

    /// One render: the request into the guest's memory, the response out of it.
    fn call(&mut self, request: &[u8], limits: &Limits) -> wasmtime::Result<Vec<u8>> {
        let len = i32::try_from(request.len())
            .map_err(|_| wasmtime::format_err!("the request is larger than 2 GiB"))?;
        self.store.set_epoch_deadline(ticks(limits));
        let Warm {
            store,
            alloc,
            render,
            memory,
            ..
        } = self;
        let packed = super::finish(limits, async {
            let at = alloc.call_async(&mut *store, len).await?;
            memory.write(&mut *store, at as u32 as usize, request)?;
            render.call_async(&mut *store, ()).await
        })
        .map_err(|e| with_stderr(e, &self.stderr))?;
        self.renders += 1;
        let (at, len) = (
            (packed as u64 >> 32) as usize,
            (packed as u64 & 0xffff_ffff) as usize,
        );
        if len > limits.max_output_bytes {
            wasmtime::bail!(
                "output is more than {} bytes, the limit",
                limits.max_output_bytes
            );
        }
        let data = self.memory.data(&self.store);
        data.get(at..at + len)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| wasmtime::format_err!("the response is outside the guest's memory"))
    }

    fn reusable(&self, limits: &Limits) -> bool {
        self.renders < MAX_RENDERS && self.memory.data_size(&self.store) <= limits.memory_bytes / 2
    }
}

/// `e` with the end of what the guest wrote to stderr (a Go panic says why it trapped).
fn with_stderr(e: wasmtime::Error, stderr: &MemoryOutputPipe) -> wasmtime::Error {
    let text = String::from_utf8_lossy(&stderr.contents()).into_owned();
    let text = text.trim();
    if text.is_empty() {
        return e;
    }
    let start = (text.len().saturating_sub(1024)..=text.len())
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(text.len());
    e.context(format!("stderr: {}", &text[start..]))
}

/// A render's deadline in epoch ticks.
fn ticks(limits: &Limits) -> u64 {
    (limits.timeout.as_millis() / super::TICK.as_millis()).max(1) as u64
}

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
            warm: Default::default(),
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

    fn load(&self, renderer: Renderer) -> Result<Arc<InstancePre<Guest>>, Error> {
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
        let pre = Arc::new(prepare(&self.runtime.engine, &module).map_err(fail)?);
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
        let failed_call =
            |e: wasmtime::Error| failed(without_backtrace(super::trap_message(&e, &limits)));
        let mut slot = self.warm[renderer as usize]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut warm = match slot.take() {
            Some(warm) => warm,
            None => Warm::start(&self.runtime.engine, &pre, &limits).map_err(failed_call)?,
        };
        let reply = warm.call(text.as_bytes(), &limits).map_err(failed_call)?;
        let response: Response =
            serde_json::from_slice(&reply).map_err(|e| failed(format!("no response ({e})")))?;
        // Kept for the next render only after a clean one: a trap leaves a Go runtime in no
        // state to run again, a refusal may have left goroutines behind (Kustomize trying
        // a remote base reaches Go's in-process network stand-in, and the next render in
        // that instance hung), and a heap grown by one large render is given back by
        // starting afresh.
        if response.error.is_none() && warm.reusable(&limits) {
            *slot = Some(warm);
        }
        drop(slot);
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
