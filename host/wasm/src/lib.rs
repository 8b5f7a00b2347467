//! sluice's WebAssembly host: the plugin stage, where every rendered object passes through
//! WebAssembly components, transformers first (in configuration order), then validators.
//!
//! Owns loading, the sandbox, the compile and outcome caches, the WIT bindings
//! (`sluice:plugin@0.1.0` and `0.2.0`) and the KRM function ABI. Must not know: Kubernetes
//! clients, git, the cluster. A program with no Kubernetes client (a CI check, a test
//! runner) can load and run plugins with this crate and `sluice-model` alone.
//!
//! The contract is `wit/plugin.wit` (`sluice:plugin@0.1.0`). One [`Runtime`] per process
//! holds the wasmtime `Engine`; [`Runtime::load`] compiles a component once (compiled code
//! is cached on disk by wasmtime, keyed by the module's hash and the engine's settings and
//! version, so a restart does not recompile), checks its exports and builds an
//! `InstancePre`. [`run`] then gives every call a fresh `Store` with:
//!
//! - a wall-clock deadline (default 2 s per call) for guest code through epoch
//!   interruption (a ticker thread advances the epoch every [`TICK`]), and for what the
//!   host waits on for the guest by running the call on an async store whose future is
//!   dropped at the same deadline ([`finish`]),
//! - a memory cap for all of the call's linear memories together (`sandbox::Budget`,
//!   default 256 MiB; a KRM function is one core module with one memory, capped by
//!   `StoreLimits`),
//! - a maximum output size, objects and findings alike (default 64 MiB),
//! - only the capabilities its configuration grants (see `sandbox.rs`).
//!
//! Failures fail the commit closed (nothing is applied) unless the plugin's
//! `failure_policy` is `ignore`. Validators cannot change objects: their world has no way
//! to return any.

#![deny(missing_docs)]

mod bindings;
mod cache;
mod handles;
mod krm;
pub mod opa;
pub mod renderer;
mod sandbox;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use sha2::Digest;
use wasmtime::component::Component;
use wasmtime::{Engine, Store};

use bindings::transformer::TransformerPre;
use bindings::v2::transformer::TransformerPre as TransformerPreV2;
use bindings::v2::validator::ValidatorPre as ValidatorPreV2;
use bindings::validator::ValidatorPre;
use handles::Objects;
use sandbox::State;
use sluice_model::object::{Name, ObjRef, Object, Origin};

pub use cache::OutcomeCache;

/// How often the epoch advances; deadlines are multiples of it.
pub const TICK: Duration = Duration::from_millis(10);

/// A plugin failed. Never retryable for the same commit and plugin.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// The module could not be read, verified or compiled, or exports neither world.
    #[error("plugin {plugin}: failed to load: {message}")]
    Load {
        /// Plugin name.
        plugin: String,
        /// Why.
        message: String,
    },
    /// `validate-config` rejected the configuration.
    #[error("plugin {plugin}: invalid config: {message}")]
    Config {
        /// Plugin name.
        plugin: String,
        /// The plugin's message.
        message: String,
    },
    /// The call trapped, timed out or exceeded its memory.
    #[error("plugin {plugin} failed on project {project} commit {commit}: {message}")]
    Call {
        /// Plugin name.
        plugin: String,
        /// Project.
        project: String,
        /// Commit.
        commit: String,
        /// Why.
        message: String,
    },
    /// The plugin returned something that is not a valid object list.
    #[error(
        "plugin {plugin} returned invalid output on project {project} commit {commit}: {message}"
    )]
    InvalidOutput {
        /// Plugin name.
        plugin: String,
        /// Project.
        project: String,
        /// Commit.
        commit: String,
        /// What is wrong, naming the object.
        message: String,
    },
    /// A transformer refused, or enforce-mode validators reported errors.
    #[error("{} error findings, nothing was applied:\n{}", .0.len(), .0.iter().map(|f| f.to_string()).collect::<Vec<_>>().join("\n"))]
    Denied(Vec<Finding>),
}

/// A capability a plugin may be granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Capability {
    /// `wasi:clocks`.
    Clocks,
    /// `wasi:random`.
    Random,
    /// `wasi:sockets` with any address.
    Network,
    /// The agent's environment variables.
    Environment,
}

/// What happens when the plugin itself fails (trap, timeout, bad output).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailurePolicy {
    /// The commit is not applied (default).
    #[default]
    Fail,
    /// The plugin is skipped with a warning.
    Ignore,
}

/// What a validator's error findings do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Error findings block the commit (default).
    #[default]
    Enforce,
    /// Findings are reported only.
    Audit,
}

/// Limits of one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Wall-clock deadline. Default 2 s.
    pub timeout: Duration,
    /// Linear memory cap. Default 256 MiB.
    pub memory_bytes: usize,
    /// Maximum size of the returned objects and findings. Default 64 MiB.
    pub max_output_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            timeout: Duration::from_secs(2),
            memory_bytes: 256 << 20,
            max_output_bytes: 64 << 20,
        }
    }
}

/// A plugin's configuration, as given in the agent configuration.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Spec {
    /// Name, unique in the configuration.
    pub name: String,
    /// Where the module comes from (path or `https://` URL).
    pub module: String,
    /// Expected sha256 of the module (hex); required for URLs.
    pub sha256: Option<String>,
    /// The plugin's own configuration.
    pub config: serde_json::Value,
    /// Limits.
    pub limits: Limits,
    /// Granted capabilities.
    pub capabilities: Vec<Capability>,
    /// What a plugin failure does.
    pub failure_policy: FailurePolicy,
    /// Validators only: enforce or audit.
    pub mode: Mode,
    /// Files of the configuration repository the plugin may read (`files:`): paths of
    /// files or directories, as configured.
    pub files: Vec<String>,
    /// Those files, as the host put them on disk: the plugin sees this directory,
    /// read-only, as `/`. Set by whoever reads the configuration ([`Granted`]).
    pub granted: Option<Granted>,
}

/// A plugin's granted files on the host's disk.
#[derive(Debug, Clone, PartialEq)]
pub struct Granted {
    /// The directory holding them, under the repository-relative paths.
    pub dir: PathBuf,
    /// SHA-256 of every path and content (the render cache's key has it).
    pub sha256: String,
}

/// The world a component exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum World {
    /// Exports `transform`.
    Transformer,
    /// Exports `validate`.
    Validator,
    /// A KRM function: a WASI preview 1 command reading a ResourceList on stdin (see
    /// `krm.rs`). It runs with the transformers, in configuration order.
    Function,
}

/// A finding, with where it points in git.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Finding {
    /// The plugin that reported it.
    pub plugin: String,
    /// `error`, `warning` or `info`.
    pub severity: &'static str,
    /// Message.
    pub message: String,
    /// The object concerned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub object: Option<ObjRef>,
    /// Its origin in git.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin: Option<Origin>,
    /// Field path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// Proposed value (JSON).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proposed_value: Option<String>,
    /// Rule id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
}

/// `file:line: severity: message (plugin, object)`, as `sluice validate` prints it.
impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at = self
            .origin
            .as_ref()
            .map(|o| format!("{o}: "))
            .unwrap_or_default();
        let obj = self
            .object
            .as_ref()
            .map(|o| format!(", {o}"))
            .unwrap_or_default();
        let field = self
            .field
            .as_ref()
            .map(|p| format!(" at {p}"))
            .unwrap_or_default();
        write!(
            f,
            "{at}{}: {}{field} ({}{obj})",
            self.severity, self.message, self.plugin
        )
    }
}

/// The process's plugin runtime: one engine, one epoch ticker.
pub struct Runtime {
    engine: Engine,
    /// The compilation cache, when there is one (to tell a cache hit from a compile).
    cache: Option<wasmtime::Cache>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").finish_non_exhaustive()
    }
}

impl Runtime {
    /// Builds the engine; compiled code is cached under `cache_dir` when given.
    ///
    /// # Errors
    /// When the engine or its cache cannot be configured.
    pub fn new(cache_dir: Option<&Path>) -> Result<Runtime, String> {
        Runtime::with_config(cache_dir, |_| {})
    }

    /// [`Runtime::new`], with `tune` changing the engine's configuration last.
    pub(crate) fn with_config(
        cache_dir: Option<&Path>,
        tune: impl FnOnce(&mut wasmtime::Config),
    ) -> Result<Runtime, String> {
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true);
        // Epochs rather than fuel: a deadline in wall-clock time at a fraction of fuel's
        // cost. They interrupt guest code; a host call that waits (a sleep, a socket read)
        // is a future on the async store, dropped at the same deadline (`finish`).
        config.epoch_interruption(true);
        // One linear memory per core module: no language toolchain sluice supports needs
        // more, and the memory cap (`sandbox::Budget`) then counts one per core instance.
        config.wasm_multi_memory(false);
        let mut cached = None;
        if let Some(dir) = cache_dir {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("failed to create {}: {e}", dir.display()))?;
            let mut cache_config = wasmtime::CacheConfig::new();
            cache_config.with_directory(dir);
            let cache = wasmtime::Cache::new(cache_config)
                .map_err(|e| format!("failed to open the compilation cache: {e}"))?;
            config.cache(Some(cache.clone()));
            cached = Some(cache);
        }
        tune(&mut config);
        io()?;
        let engine = Engine::new(&config)
            .map_err(|e| format!("failed to build the WebAssembly engine: {e}"))?;
        // The ticker holds a weak reference: it stops when the last engine handle is gone.
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("sluice-epoch".into())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(TICK);
                }
            })
            .map_err(|e| format!("failed to start the epoch ticker: {e}"))?;
        Ok(Runtime {
            engine,
            cache: cached,
        })
    }

    /// The runtime of the CLI (`render`, `validate`, `diff`, `plugin inspect`): with the
    /// agent's default compilation cache (`<cache dir>/wasm`), or none when it cannot be used,
    /// so a plugin is compiled once, not on every command.
    ///
    /// # Errors
    /// When no engine can be built at all.
    pub fn for_cli() -> Result<Runtime, String> {
        let dir = sluice_model::default_cache_dir().join("wasm");
        Runtime::new(Some(&dir)).or_else(|e| {
            tracing::warn!(error = %e, "plugin compilation cache unavailable; compiling");
            Runtime::new(None)
        })
    }

    /// `hit`, `miss`, or `off`: where the last compilation came from, given the cache's
    /// hits and misses before it.
    fn cache_outcome(&self, before: Option<(usize, usize)>) -> &'static str {
        match (&self.cache, before) {
            (Some(c), Some((hits, _))) if c.cache_hits() > hits => "hit",
            (Some(_), _) => "miss",
            (None, _) => "off",
        }
    }

    fn cache_counts(&self) -> Option<(usize, usize)> {
        self.cache
            .as_ref()
            .map(|c| (c.cache_hits(), c.cache_misses()))
    }

    /// Compiles a module and describes it, without checking any configuration.
    ///
    /// # Errors
    /// [`Error::Load`] when it does not compile or exports neither world.
    pub fn inspect(&self, bytes: &[u8]) -> Result<Info, Error> {
        let load_err = |message: String| Error::Load {
            plugin: "inspect".into(),
            message,
        };
        let started = Instant::now();
        let before = self.cache_counts();
        if krm::is_core_module(bytes) {
            let module = krm::compile(&self.engine, bytes).map_err(load_err)?;
            let compile_ms = started.elapsed().as_secs_f64() * 1e3;
            let cache = self.cache_outcome(before);
            if opa::is_opa(&module) {
                let pre =
                    opa::prepare(&self.engine, &module, &Limits::default()).map_err(load_err)?;
                return Ok(Info {
                    world: World::Validator,
                    exports: pre.entrypoints.iter().map(|(n, _)| n.clone()).collect(),
                    imports: module
                        .imports()
                        .map(|i| format!("{}.{}", i.module(), i.name()))
                        .collect(),
                    wit_version: "none (OPA policy, opa build -t wasm)".into(),
                    size: bytes.len(),
                    sha256: hex::encode(sha2::Sha256::digest(bytes)),
                    compile_ms,
                    cache,
                });
            }
            // Checks `_start` and the imports, as a load would.
            krm::prepare(&self.engine, &module).map_err(load_err)?;
            let mut imports: Vec<String> =
                module.imports().map(|i| i.module().to_string()).collect();
            imports.dedup();
            return Ok(Info {
                world: World::Function,
                exports: module.exports().map(|e| e.name().to_string()).collect(),
                imports,
                wit_version: "none (KRM function, WASI preview 1)".into(),
                size: bytes.len(),
                sha256: hex::encode(sha2::Sha256::digest(bytes)),
                compile_ms,
                cache,
            });
        }
        let component = Component::from_binary(&self.engine, bytes)
            .map_err(|e| load_err(format!("failed to compile: {e:#}")))?;
        let compile_ms = started.elapsed().as_secs_f64() * 1e3;
        let cache = self.cache_outcome(before);
        let world = world_of(&self.engine, &component).map_err(load_err)?;
        let ty = component.component_type();
        let exports: Vec<String> = ty
            .exports(&self.engine)
            .map(|(n, _)| n.to_string())
            .collect();
        let imports: Vec<String> = ty
            .imports(&self.engine)
            .map(|(n, _)| n.to_string())
            .collect();
        // Every plugin imports the package's types interface, so its version is always there.
        let wit_version = imports
            .iter()
            .find_map(|i| {
                i.strip_prefix("sluice:plugin/")
                    .and_then(|r| r.split_once('@'))
                    .map(|(_, v)| v)
            })
            .unwrap_or("unknown")
            .to_string();
        Ok(Info {
            world,
            exports,
            imports,
            wit_version,
            size: bytes.len(),
            sha256: hex::encode(sha2::Sha256::digest(bytes)),
            compile_ms,
            cache,
        })
    }

    /// Verifies, compiles and type-checks a plugin, then checks its configuration.
    ///
    /// # Errors
    /// [`Error::Load`] for a module that does not match its sha256, does not compile or
    /// exports neither world; [`Error::Config`] when `validate-config` rejects the config.
    pub fn load(&self, spec: &Spec, bytes: &[u8]) -> Result<Plugin, Error> {
        let load_err = |message: String| Error::Load {
            plugin: spec.name.clone(),
            message,
        };
        let sha256 = hex::encode(sha2::Sha256::digest(bytes));
        if let Some(want) = &spec.sha256
            && !want.eq_ignore_ascii_case(&sha256)
        {
            return Err(load_err(format!(
                "sha256 mismatch: expected {want}, the module is {sha256}"
            )));
        }
        let started = Instant::now();
        if krm::is_core_module(bytes) {
            let module = krm::compile(&self.engine, bytes).map_err(load_err)?;
            if opa::is_opa(&module) {
                // A policy compiled by `opa build -t wasm`: a validator.
                let pre = opa::prepare(&self.engine, &module, &spec.limits).map_err(load_err)?;
                let plugin = Plugin {
                    spec: spec.clone(),
                    world: World::Validator,
                    sha256,
                    compile_time: started.elapsed(),
                    engine: self.engine.clone(),
                    pre: Pre::Opa(Box::new(pre)),
                };
                plugin.validate_config()?;
                return Ok(plugin);
            }
            // A KRM function: its configuration is its functionConfig, read at each call.
            let pre = krm::prepare(&self.engine, &module).map_err(load_err)?;
            return Ok(Plugin {
                spec: spec.clone(),
                world: World::Function,
                sha256,
                compile_time: started.elapsed(),
                engine: self.engine.clone(),
                pre: Pre::Function(pre),
            });
        }
        let component = Component::from_binary(&self.engine, bytes)
            .map_err(|e| load_err(format!("failed to compile: {e:#}")))?;
        let compile_time = started.elapsed();
        let world = world_of(&self.engine, &component).map_err(load_err)?;
        let mut linker = sandbox::linker(&self.engine, &spec.capabilities)
            .map_err(|e| load_err(format!("{e:#}")))?;
        // Ungranted WASI imports become traps that name themselves when called; any other
        // unknown import fails the load below.
        sandbox::deny_ungranted(&mut linker, &self.engine, &component, &spec.capabilities)
            .map_err(|e| load_err(format!("{e:#}")))?;
        let pre = linker
            .instantiate_pre(&component)
            .map_err(|e| load_err(format!("{e:#}")))?;
        let typed = |e: wasmtime::Error| load_err(format!("{e:#}"));
        let pre = match (world, holds_objects(&self.engine, &component)) {
            (World::Transformer, false) => {
                Pre::Transformer(TransformerPre::new(pre).map_err(typed)?)
            }
            (World::Validator, false) => Pre::Validator(ValidatorPre::new(pre).map_err(typed)?),
            (World::Transformer, true) => {
                Pre::TransformerV2(TransformerPreV2::new(pre).map_err(typed)?)
            }
            (World::Validator, true) => Pre::ValidatorV2(ValidatorPreV2::new(pre).map_err(typed)?),
            (World::Function, _) => unreachable!("world_of never returns Function"),
        };
        let plugin = Plugin {
            spec: spec.clone(),
            world,
            sha256,
            compile_time,
            engine: self.engine.clone(),
            pre,
        };
        plugin.validate_config()?;
        Ok(plugin)
    }
}

/// A loaded plugin, ready to run.
pub struct Plugin {
    spec: Spec,
    world: World,
    sha256: String,
    compile_time: Duration,
    engine: Engine,
    pre: Pre,
}

enum Pre {
    Transformer(TransformerPre<State>),
    Validator(ValidatorPre<State>),
    /// `sluice:plugin@0.2.0`: the objects stay in the host (`handles.rs`).
    TransformerV2(TransformerPreV2<State>),
    ValidatorV2(ValidatorPreV2<State>),
    Function(krm::FunctionPre),
    /// A policy compiled by `opa build -t wasm` (`opa.rs`).
    Opa(Box<opa::PolicyPre>),
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.spec.name)
            .field("world", &self.world)
            .field("sha256", &self.sha256)
            .finish()
    }
}

/// What `sluice plugin inspect` shows.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Info {
    /// World.
    pub world: World,
    /// Exported function names.
    pub exports: Vec<String>,
    /// Imported interfaces.
    pub imports: Vec<String>,
    /// Version of the `sluice:plugin` package it was built against.
    pub wit_version: String,
    /// Module size in bytes.
    pub size: usize,
    /// sha256 (hex).
    pub sha256: String,
    /// Compile (or cache load) time in milliseconds.
    pub compile_ms: f64,
    /// `hit`: loaded from the compilation cache; `miss`: compiled (and cached); `off`: no
    /// cache.
    pub cache: &'static str,
}

impl Plugin {
    /// The spec it was loaded with.
    pub fn spec(&self) -> &Spec {
        &self.spec
    }

    /// Its world.
    pub fn world(&self) -> World {
        self.world
    }

    /// sha256 of its module (hex).
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// How long compiling (or loading from the cache) took.
    pub fn compile_time(&self) -> Duration {
        self.compile_time
    }

    /// Whether it is built against `sluice:plugin@0.2.0`, whose objects stay in the host.
    fn holds_objects(&self) -> bool {
        matches!(self.pre, Pre::TransformerV2(_) | Pre::ValidatorV2(_))
    }

    /// The entrypoint an OPA policy is evaluated at: `config.entrypoint`, else its only
    /// one.
    fn opa_entrypoint<'a>(&self, pre: &'a opa::PolicyPre) -> Result<(&'a str, i32), Error> {
        let names = || {
            pre.entrypoints
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let found = match self.spec.config["entrypoint"].as_str() {
            Some(want) => pre.entrypoints.iter().find(|(n, _)| n == want),
            None if pre.entrypoints.len() == 1 => pre.entrypoints.first(),
            None => {
                return Err(Error::Config {
                    plugin: self.spec.name.clone(),
                    message: format!(
                        "the policy has several entrypoints ({}): name one in config.entrypoint",
                        names()
                    ),
                });
            }
        };
        found
            .map(|(n, i)| (n.as_str(), *i))
            .ok_or_else(|| Error::Config {
                plugin: self.spec.name.clone(),
                message: format!(
                    "config.entrypoint {:?} is not one of the policy's ({})",
                    self.spec.config["entrypoint"].as_str().unwrap_or_default(),
                    names()
                ),
            })
    }

    /// [`Error::Call`] for this plugin and subject.
    fn failed(&self, subject: &Subject, message: String) -> Error {
        Error::Call {
            plugin: self.spec.name.clone(),
            project: subject.project.to_string(),
            commit: subject.commit.to_string(),
            message,
        }
    }

    /// [`Error::InvalidOutput`] for this plugin and subject.
    fn invalid(&self, subject: &Subject, message: String) -> Error {
        Error::InvalidOutput {
            plugin: self.spec.name.clone(),
            project: subject.project.to_string(),
            commit: subject.commit.to_string(),
            message,
        }
    }

    fn store(&self) -> Store<State> {
        let mut store = Store::new(
            &self.engine,
            State::new(
                &self.spec.name,
                self.spec.limits.memory_bytes,
                &self.spec.capabilities,
                self.spec.granted.as_ref().map(|g| g.dir.as_path()),
            ),
        );
        store.limiter(|s| &mut s.limits);
        let ticks = (self.spec.limits.timeout.as_millis() / TICK.as_millis()).max(1) as u64;
        store.set_epoch_deadline(ticks);
        store.epoch_deadline_trap();
        store
    }

    fn validate_config(&self) -> Result<(), Error> {
        let config = self.spec.config.to_string();
        let mut store = self.store();
        let err = |message: String| Error::Load {
            plugin: self.spec.name.clone(),
            message,
        };
        let limits = &self.spec.limits;
        // The same call on each world's bindings (their types differ, so a macro).
        macro_rules! validate_config {
            ($pre:expr) => {
                finish(limits, async {
                    let i = $pre
                        .instantiate_async(&mut store)
                        .await
                        .map_err(Instantiate)?;
                    i.call_validate_config(&mut store, &config).await
                })
            };
        }
        let result = match &self.pre {
            Pre::Transformer(pre) => validate_config!(pre),
            Pre::Validator(pre) => validate_config!(pre),
            Pre::TransformerV2(pre) => validate_config!(pre),
            Pre::ValidatorV2(pre) => validate_config!(pre),
            Pre::Function(_) => return Ok(()),
            Pre::Opa(pre) => return self.opa_entrypoint(pre).map(|_| ()),
        };
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(Error::Config {
                plugin: self.spec.name.clone(),
                message,
            }),
            Err(e) if e.is::<Instantiate>() => Err(err(call_message(&e, limits))),
            Err(e) => Err(err(format!(
                "validate-config failed: {}",
                trap_message(&e, limits)
            ))),
        }
    }
}

/// Who is asking: goes into the plugin's context and into errors.
#[derive(Debug, Clone, Default)]
pub struct Subject {
    /// Agent name.
    pub agent: String,
    /// Project (shared with the origins of objects plugins return).
    pub project: Name,
    /// Commit.
    pub commit: Name,
}

/// The chain's result.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Objects after the transformers.
    pub objects: Vec<Object>,
    /// Every finding (warnings, audit-mode errors, ignored failures).
    pub findings: Vec<Finding>,
    /// Plugins that failed and were skipped (`failure_policy: ignore`), by name. A sync
    /// with a skipped plugin applies but never prunes: the set it would prune against is
    /// not the set the plugins were meant to produce.
    pub skipped: Vec<String>,
    /// Read from the [`OutcomeCache`]: no plugin ran.
    pub cached: bool,
}

/// An object as a tree, while plugins work on it: 0.2.0 handles and KRM functions read
/// and write values. A tree keeps the object's text until something writes it, and parses
/// that text when it is first read: an object a chain only reads is parsed once and never
/// written back ([`Tree::into_object`] hands back the text it came as), and one no plugin
/// reads is never parsed.
#[derive(Debug, Clone)]
pub(crate) struct Tree {
    /// The object as it came, while no write changed it.
    text: Option<Object>,
    /// Its value parsed from `text`, on the first read.
    read: std::cell::OnceCell<serde_json::Value>,
    /// Its value once written (or made by a plugin).
    written: Option<serde_json::Value>,
    pub(crate) origin: Origin,
}

impl Tree {
    fn of(o: Object) -> Tree {
        Tree {
            origin: o.origin.clone(),
            text: Some(o),
            read: std::cell::OnceCell::new(),
            written: None,
        }
    }

    /// A tree made by a plugin (or parsed from its text output).
    pub(crate) fn new(value: serde_json::Value, origin: Origin) -> Tree {
        Tree {
            text: None,
            read: std::cell::OnceCell::new(),
            written: Some(value),
            origin,
        }
    }

    /// Its value, parsed on the first read.
    pub(crate) fn value(&self) -> &serde_json::Value {
        match &self.written {
            Some(v) => v,
            None => self
                .read
                .get_or_init(|| self.text.as_ref().map(Object::value).unwrap_or_default()),
        }
    }

    /// Its value, to write: the text it came as no longer says what it is.
    pub(crate) fn value_mut(&mut self) -> &mut serde_json::Value {
        let text = self.text.take();
        let read = &mut self.read;
        self.written.get_or_insert_with(|| {
            read.take()
                .unwrap_or_else(|| text.as_ref().map(Object::value).unwrap_or_default())
        })
    }

    /// Its text for the contract's 0.1.0 form: the text it came as, if unwritten.
    fn json(&self) -> String {
        match &self.text {
            Some(o) => o.json().to_string(),
            None => self.value().to_string(),
        }
    }

    fn into_object(self) -> Object {
        let Tree {
            text,
            read,
            written,
            origin,
        } = self;
        match text {
            Some(mut o) => {
                o.origin = origin;
                o
            }
            None => Object::new(&written.or(read.into_inner()).unwrap_or_default(), origin),
        }
    }
}

/// Runs `plugins` over `objects`: transformers in order, then validators. Blocking: call
/// it from `spawn_blocking`.
///
/// # Errors
/// A failing plugin ([`Error::Call`], [`Error::InvalidOutput`]) unless its failure policy
/// is `ignore`; [`Error::Denied`] when a transformer refuses or an enforce-mode validator
/// reports errors.
pub fn run(
    plugins: &[Arc<Plugin>],
    subject: &Subject,
    objects: Vec<Object>,
) -> Result<Outcome, Error> {
    let mut batch = Batch::Objects(objects, None);
    let mut findings = Vec::new();
    let mut skipped = Vec::new();
    // Every validator runs, so a refused commit lists what all of them found.
    let mut blocking = Vec::new();
    let ordered = plugins
        .iter()
        .filter(|p| p.world != World::Validator)
        .chain(plugins.iter().filter(|p| p.world == World::Validator));
    for plugin in ordered {
        let mut ignore = |e: Error, findings: &mut Vec<Finding>| {
            if plugin.spec.failure_policy == FailurePolicy::Ignore {
                skipped.push(plugin.spec.name.clone());
                findings.push(Finding {
                    plugin: plugin.spec.name.clone(),
                    severity: "warning",
                    message: format!("plugin failed and was skipped (failure_policy: ignore): {e}"),
                    object: None,
                    origin: None,
                    field: None,
                    proposed_value: None,
                    rule: None,
                });
                Ok(())
            } else {
                Err(e)
            }
        };
        // Granted files that left the disk (a cache cleaned under the agent) fail the call:
        // a policy plugin that finds no policies would pass everything.
        if let Some(g) = &plugin.spec.granted
            && !g.dir.is_dir()
        {
            let e = plugin.failed(
                subject,
                format!("its granted files are gone from {}", g.dir.display()),
            );
            ignore(e, &mut findings)?;
            continue;
        }
        match plugin.world {
            World::Transformer if plugin.holds_objects() => {
                let objects = batch.take_values(subject)?;
                // The objects move into the call; a plugin whose failure is ignored must
                // leave the chain the objects it was given.
                let kept =
                    (plugin.spec.failure_policy == FailurePolicy::Ignore).then(|| objects.clone());
                match call_transform_v2(plugin, subject, objects) {
                    Ok(Ok(next)) => batch = Batch::Values(next),
                    Ok(Err(refusal)) => return Err(Error::Denied(refusal)),
                    Err(e) => {
                        batch = Batch::Values(kept.unwrap_or_default());
                        ignore(e, &mut findings)?;
                    }
                }
            }
            World::Transformer => match call_transform(plugin, subject, batch.texts()) {
                Ok(Ok(next)) => batch = Batch::Texts(next, plugin.clone()),
                Ok(Err(refusal)) => {
                    return Err(Error::Denied(
                        refusal
                            .into_iter()
                            .map(|f| finding(plugin, |i| batch.origin(i, subject), f))
                            .collect(),
                    ));
                }
                Err(e) => ignore(e, &mut findings)?,
            },
            World::Function => {
                let objects = batch.values(subject)?;
                match call_function(plugin, subject, objects) {
                    Ok(Ok((next, found))) => {
                        batch = Batch::Values(next);
                        findings.extend(found);
                    }
                    Ok(Err(refusal)) => return Err(Error::Denied(refusal)),
                    Err(e) => ignore(e, &mut findings)?,
                }
            }
            World::Validator => {
                let found = if let Pre::Opa(pre) = &plugin.pre {
                    let objects = batch.values(subject)?;
                    call_opa(plugin, pre, subject, objects)
                // Read-only: trees that came as text keep it (`Tree::into_object`).
                } else if plugin.holds_objects() {
                    let objects = batch.take_values(subject)?;
                    let (objects, found) = call_validate_v2(plugin, subject, objects);
                    batch = Batch::Values(objects);
                    found
                } else {
                    call_validate(plugin, subject, batch.texts()).map(|found| {
                        found
                            .into_iter()
                            .map(|f| finding(plugin, |i| batch.origin(i, subject), f))
                            .collect()
                    })
                };
                match found {
                    Ok(found) => {
                        let (errors, others): (Vec<Finding>, Vec<Finding>) =
                            found.into_iter().partition(|f| {
                                f.severity == "error" && plugin.spec.mode == Mode::Enforce
                            });
                        blocking.extend(errors);
                        findings.extend(others);
                    }
                    Err(e) => ignore(e, &mut findings)?,
                }
            }
        }
    }
    if !blocking.is_empty() {
        return Err(Error::Denied(blocking));
    }
    Ok(Outcome {
        objects: batch.into_objects(subject)?,
        findings,
        skipped,
        cached: false,
    })
}

/// The objects between two plugins of a chain, in the form the last stage left them: as
/// the sync passed them (compact JSON, with their contract text once a component asked
/// for it), values (parsed for a 0.2.0 plugin or a KRM function, or a KRM function's
/// output) or the JSON text a component returned and the host checked. A component
/// receives text, so a chain of components hands each one's output to the next as is and
/// parses the objects once, at the end; a chain of validators hands back the objects it
/// was given.
enum Batch {
    Objects(Vec<Object>, Option<Vec<bindings::Object>>),
    Values(Vec<Tree>),
    /// Checked by [`check_output`] (each is a JSON object with the required fields), and
    /// the plugin that returned them.
    Texts(Vec<bindings::Object>, Arc<Plugin>),
    /// Both forms of the same objects.
    Both(Vec<Tree>, Vec<bindings::Object>),
}

impl Batch {
    /// The objects as the contract's text, written once.
    fn texts(&mut self) -> &[bindings::Object] {
        if let Batch::Values(values) = self {
            let texts = wit_trees(values);
            *self = Batch::Both(std::mem::take(values), texts);
        }
        match self {
            Batch::Objects(objects, texts) => texts.get_or_insert_with(|| wit_objects(objects)),
            Batch::Texts(texts, _) | Batch::Both(_, texts) => texts,
            Batch::Values(_) => unreachable!("written above"),
        }
    }

    /// The objects as values, parsed once.
    fn values(&mut self, subject: &Subject) -> Result<&[Tree], Error> {
        if let Batch::Objects(objects, _) = self {
            *self = Batch::Values(std::mem::take(objects).into_iter().map(Tree::of).collect());
        }
        if let Batch::Texts(texts, plugin) = self {
            let values = parse_checked(texts, plugin, subject)?;
            *self = Batch::Both(values, std::mem::take(texts));
        }
        match self {
            Batch::Values(values) | Batch::Both(values, _) => Ok(values),
            Batch::Objects(..) | Batch::Texts(..) => unreachable!("parsed above"),
        }
    }

    /// The objects as values, moved out (the batch is left empty).
    fn take_values(&mut self, subject: &Subject) -> Result<Vec<Tree>, Error> {
        match std::mem::replace(self, Batch::Values(Vec::new())) {
            Batch::Objects(objects, _) => Ok(objects.into_iter().map(Tree::of).collect()),
            Batch::Values(values) | Batch::Both(values, _) => Ok(values),
            Batch::Texts(texts, plugin) => parse_checked(&texts, &plugin, subject),
        }
    }

    /// The objects as the sync passes them on.
    fn into_objects(self, subject: &Subject) -> Result<Vec<Object>, Error> {
        let values = match self {
            Batch::Objects(objects, _) => return Ok(objects),
            Batch::Values(values) | Batch::Both(values, _) => values,
            Batch::Texts(texts, plugin) => parse_checked(&texts, &plugin, subject)?,
        };
        Ok(values.into_iter().map(Tree::into_object).collect())
    }

    /// Where the object at `index` came from.
    fn origin(&self, index: usize, subject: &Subject) -> Option<Origin> {
        match self {
            Batch::Objects(objects, _) => objects.get(index).map(|o| o.origin.clone()),
            Batch::Values(values) | Batch::Both(values, _) => {
                values.get(index).map(|o| o.origin.clone())
            }
            Batch::Texts(texts, _) => texts.get(index).map(|o| origin(&o.origin, subject)),
        }
    }
}

/// Parses texts [`check_output`] accepted from `plugin`. The check reads the syntax and
/// the required fields; only building the values can refuse a number out of `f64`'s
/// range, which is then `plugin`'s invalid output (and fails the chain whatever its
/// failure policy, as the objects it replaced are gone).
fn parse_checked(
    texts: &[bindings::Object],
    plugin: &Plugin,
    subject: &Subject,
) -> Result<Vec<Tree>, Error> {
    texts
        .iter()
        .enumerate()
        .map(|(i, o)| {
            let value = serde_json::from_str(&o.json).map_err(|e| {
                plugin.invalid(subject, format!("{} is not JSON: {e}", at(i, &o.origin)))
            })?;
            Ok(Tree::new(value, origin(&o.origin, subject)))
        })
        .collect()
}

/// How an error names a component's output object: its index, and its origin when it has
/// one.
fn at(index: usize, origin: &bindings::Origin) -> String {
    if origin.path.is_empty() {
        format!("object {index}")
    } else {
        format!("object {index} ({}:{})", origin.path, origin.line)
    }
}

fn origin(o: &bindings::Origin, subject: &Subject) -> Origin {
    Origin {
        project: subject.project.clone(),
        commit: subject.commit.clone(),
        path: o.path.as_str().into(),
        doc_index: o.index as usize,
        line: u64::from(o.line),
        renderer: None,
    }
}

fn wit_objects(objects: &[Object]) -> Vec<bindings::Object> {
    objects
        .iter()
        .map(|o| bindings::Object {
            json: o.json().to_string(),
            origin: wit_origin(&o.origin),
        })
        .collect()
}

fn wit_trees(objects: &[Tree]) -> Vec<bindings::Object> {
    objects
        .iter()
        .map(|o| bindings::Object {
            json: o.json(),
            origin: wit_origin(&o.origin),
        })
        .collect()
}

fn wit_context(plugin: &Plugin, subject: &Subject) -> bindings::Context {
    bindings::Context {
        agent: subject.agent.clone(),
        project: subject.project.to_string(),
        commit: subject.commit.to_string(),
        config: plugin.spec.config.to_string(),
    }
}

/// Calls a transformer: its checked output, or the findings it refused the commit with.
#[allow(clippy::type_complexity)]
fn call_transform(
    plugin: &Plugin,
    subject: &Subject,
    objects: &[bindings::Object],
) -> Result<Result<Vec<bindings::Object>, Vec<bindings::Finding>>, Error> {
    let Pre::Transformer(pre) = &plugin.pre else {
        unreachable!("called only for transformers")
    };
    let mut store = plugin.store();
    let result = finish(&plugin.spec.limits, async {
        let instance = pre
            .instantiate_async(&mut store)
            .await
            .map_err(Instantiate)?;
        instance
            .call_transform(&mut store, &wit_context(plugin, subject), objects)
            .await
    })
    .map_err(|e| plugin.failed(subject, call_message(&e, &plugin.spec.limits)))?;
    match result {
        Ok(out) => check_output(plugin, subject, out).map(Ok),
        Err(found) => check_findings(plugin, subject, found).map(Err),
    }
}

/// What findings cost the host: every text they carry, and each record itself, so that
/// ten million empty findings count as what they are.
fn findings_size(found: &[bindings::Finding]) -> usize {
    let text = |s: &Option<String>| s.as_ref().map_or(0, String::len);
    found
        .iter()
        .map(|f| {
            std::mem::size_of::<bindings::Finding>()
                + f.message.len()
                + text(&f.field)
                + text(&f.proposed_value)
                + text(&f.rule)
                + f.object.as_ref().map_or(0, |o| {
                    o.api_version.len() + o.kind.len() + o.namespace.len() + o.name.len()
                })
        })
        .sum()
}

/// Refuses findings larger than the plugin's output limit ([`findings_size`]).
fn check_findings(
    plugin: &Plugin,
    subject: &Subject,
    found: Vec<bindings::Finding>,
) -> Result<Vec<bindings::Finding>, Error> {
    let size = findings_size(&found);
    if size > plugin.spec.limits.max_output_bytes {
        return Err(plugin.invalid(
            subject,
            format!(
                "findings are {size} bytes, the limit is {}",
                plugin.spec.limits.max_output_bytes
            ),
        ));
    }
    Ok(found)
}

fn call_validate(
    plugin: &Plugin,
    subject: &Subject,
    objects: &[bindings::Object],
) -> Result<Vec<bindings::Finding>, Error> {
    let Pre::Validator(pre) = &plugin.pre else {
        unreachable!("called only for validators")
    };
    let mut store = plugin.store();
    let found = finish(&plugin.spec.limits, async {
        let instance = pre
            .instantiate_async(&mut store)
            .await
            .map_err(Instantiate)?;
        instance
            .call_validate(&mut store, &wit_context(plugin, subject), objects)
            .await
    })
    .map_err(|e| plugin.failed(subject, call_message(&e, &plugin.spec.limits)))?;
    check_findings(plugin, subject, found)
}

/// The same finding in 0.1.0's type (the two packages' records are alike).
fn finding_of_v2(f: bindings::v2::Finding) -> bindings::Finding {
    use bindings::v2::transformer::sluice::plugin::types::Severity as V2;
    bindings::Finding {
        severity: match f.severity {
            V2::Error => bindings::Severity::Error,
            V2::Warning => bindings::Severity::Warning,
            V2::Info => bindings::Severity::Info,
        },
        message: f.message,
        object: f.object.map(
            |o| bindings::transformer::sluice::plugin::types::ObjectRef {
                index: o.index,
                api_version: o.api_version,
                kind: o.kind,
                namespace: o.namespace,
                name: o.name,
            },
        ),
        field: f.field,
        proposed_value: f.proposed_value,
        rule: f.rule,
    }
}

fn wit_context_v2(plugin: &Plugin, subject: &Subject) -> bindings::v2::Context {
    bindings::v2::Context {
        agent: subject.agent.clone(),
        project: subject.project.to_string(),
        commit: subject.commit.to_string(),
        config: plugin.spec.config.to_string(),
    }
}

/// Calls a `sluice:plugin@0.2.0` transformer: the objects move into the call's store, the
/// plugin changes fields through handles, and the objects whose handles it returns come
/// back, checked. Or the findings it refused the commit with.
#[allow(clippy::type_complexity)]
fn call_transform_v2(
    plugin: &Plugin,
    subject: &Subject,
    objects: Vec<Tree>,
) -> Result<Result<Vec<Tree>, Vec<Finding>>, Error> {
    let Pre::TransformerV2(pre) = &plugin.pre else {
        unreachable!("called only for 0.2.0 transformers")
    };
    let mut store = plugin.store();
    let limits = &plugin.spec.limits;
    let (held, handles) = Objects::hold(
        objects,
        false,
        limits.max_output_bytes,
        &subject.project,
        &subject.commit,
    );
    store.data_mut().objects = held;
    let result = finish(limits, async {
        let instance = pre
            .instantiate_async(&mut store)
            .await
            .map_err(Instantiate)?;
        instance
            .call_transform(&mut store, &wit_context_v2(plugin, subject), &handles)
            .await
    })
    .map_err(|e| plugin.failed(subject, call_message(&e, limits)))?;
    let held = &mut store.data_mut().objects;
    match result {
        Ok(returned) => {
            let mut out = Vec::with_capacity(returned.len());
            for (i, handle) in returned.iter().enumerate() {
                let (object, identity_written) = held.take(handle).ok_or_else(|| {
                    plugin.invalid(subject, format!("object {i} was returned twice"))
                })?;
                if let Some(problem) = identity_written
                    .then(|| identity_problem(object.value()))
                    .flatten()
                {
                    let at = at(i, &wit_origin(&object.origin));
                    return Err(plugin.invalid(subject, format!("{at} {problem}")));
                }
                out.push(object);
            }
            Ok(Ok(out))
        }
        Err(found) => {
            let found = check_findings(
                plugin,
                subject,
                found.into_iter().map(finding_of_v2).collect(),
            )?;
            Ok(Err(found
                .into_iter()
                .map(|f| finding(plugin, |i| held.origin(i), f))
                .collect()))
        }
    }
}

/// Calls a `sluice:plugin@0.2.0` validator on read-only objects; the objects come back
/// unchanged whatever the call did, with its findings or its failure.
fn call_validate_v2(
    plugin: &Plugin,
    subject: &Subject,
    objects: Vec<Tree>,
) -> (Vec<Tree>, Result<Vec<Finding>, Error>) {
    let Pre::ValidatorV2(pre) = &plugin.pre else {
        unreachable!("called only for 0.2.0 validators")
    };
    let mut store = plugin.store();
    let limits = &plugin.spec.limits;
    let (held, handles) = Objects::hold(objects, true, 0, &subject.project, &subject.commit);
    store.data_mut().objects = held;
    let found = finish(limits, async {
        let instance = pre
            .instantiate_async(&mut store)
            .await
            .map_err(Instantiate)?;
        instance
            .call_validate(&mut store, &wit_context_v2(plugin, subject), &handles)
            .await
    })
    .map_err(|e| plugin.failed(subject, call_message(&e, limits)))
    .and_then(|found| {
        check_findings(
            plugin,
            subject,
            found.into_iter().map(finding_of_v2).collect(),
        )
    });
    let held = std::mem::take(&mut store.data_mut().objects);
    let found = found.map(|found| {
        found
            .into_iter()
            .map(|f| finding(plugin, |i| held.origin(i), f))
            .collect()
    });
    (held.into_inputs(), found)
}

fn wit_origin(o: &Origin) -> bindings::Origin {
    bindings::Origin {
        path: o.path.to_string(),
        index: o.doc_index as u32,
        line: o.line as u32,
    }
}

/// Evaluates an OPA policy over every object (`opa.rs`): each message of its result is an
/// error finding on that object.
fn call_opa(
    plugin: &Plugin,
    pre: &opa::PolicyPre,
    subject: &Subject,
    objects: &[Tree],
) -> Result<Vec<Finding>, Error> {
    let (entrypoint, id) = plugin.opa_entrypoint(pre)?;
    let config = &plugin.spec.config;
    let inputs: Vec<serde_json::Value> = objects
        .iter()
        .map(|o| opa::input(entrypoint, o.value(), &config["parameters"]))
        .collect();
    let data = if config["data"].is_object() {
        config["data"].clone()
    } else {
        serde_json::json!({})
    };
    let limits = &plugin.spec.limits;
    let results = finish(
        limits,
        opa::eval_all(&plugin.engine, pre, id, &data, &inputs, limits),
    )
    .map_err(|e| plugin.failed(subject, trap_message(&e, limits)))?;
    Ok(objects
        .iter()
        .zip(results)
        .flat_map(|(o, result)| {
            opa::messages(entrypoint, &result)
                .into_iter()
                .map(move |message| Finding {
                    plugin: plugin.spec.name.clone(),
                    severity: "error",
                    message,
                    object: Some(ObjRef::of(o.value())),
                    origin: Some(o.origin.clone()),
                    field: None,
                    proposed_value: None,
                    rule: Some(entrypoint.to_string()),
                })
        })
        .collect())
}

/// Runs a KRM function: the objects go in as `items` (each marked with its index, to keep
/// its origin), `items` come back as the objects, `results` as findings; an `error` result
/// refuses the commit.
#[allow(clippy::type_complexity)]
fn call_function(
    plugin: &Plugin,
    subject: &Subject,
    objects: &[Tree],
) -> Result<Result<(Vec<Tree>, Vec<Finding>), Vec<Finding>>, Error> {
    let Pre::Function(pre) = &plugin.pre else {
        unreachable!("called only for functions")
    };
    let items: Vec<serde_json::Value> = objects
        .iter()
        .enumerate()
        .map(|(i, o)| {
            let mut v = o.value().clone();
            if let Some(meta) = v["metadata"].as_object_mut() {
                let annotations = meta
                    .entry("annotations")
                    .or_insert_with(|| serde_json::Value::Object(Default::default()));
                if let Some(a) = annotations.as_object_mut() {
                    a.insert(krm::ORIGIN_ANNOTATION.into(), i.to_string().into());
                }
            }
            v
        })
        .collect();
    let limits = &plugin.spec.limits;
    let out = krm::call(&plugin.engine, pre, items, &plugin.spec, TICK, |e| {
        trap_message(e, limits)
    })
    .map_err(|e| match e {
        krm::CallError::Failed(m) => plugin.failed(subject, m),
        krm::CallError::Invalid(m) => plugin.invalid(subject, m),
    })?;
    let mut next = Vec::with_capacity(out.items.len());
    for (i, mut value) in out.items.into_iter().enumerate() {
        let origin = krm::take_origin(&mut value).and_then(|n| objects.get(n));
        let has = |v: &serde_json::Value| v.as_str().is_some_and(|s| !s.is_empty());
        if !(has(&value["apiVersion"]) && has(&value["kind"]) && has(&value["metadata"]["name"])) {
            return Err(plugin.invalid(
                subject,
                format!(
                    "item {i} {} is missing apiVersion, kind or metadata.name",
                    ObjRef::of(&value)
                ),
            ));
        }
        next.push(Tree::new(
            value,
            origin.map(|o| o.origin.clone()).unwrap_or_else(|| Origin {
                project: subject.project.clone(),
                commit: subject.commit.clone(),
                ..Origin::default()
            }),
        ));
    }
    let findings: Vec<Finding> = out
        .results
        .iter()
        .map(|r| {
            let reference = &r["resourceRef"];
            let object = reference.is_object().then(|| ObjRef {
                group: sluice_model::object::group_of(
                    reference["apiVersion"].as_str().unwrap_or(""),
                )
                .into(),
                kind: reference["kind"].as_str().unwrap_or_default().into(),
                namespace: reference["namespace"].as_str().unwrap_or_default().into(),
                name: reference["name"].as_str().unwrap_or_default().into(),
            });
            let origin = object.as_ref().and_then(|want| {
                objects
                    .iter()
                    .find(|o| ObjRef::of(o.value()) == *want)
                    .map(|o| o.origin.clone())
            });
            Finding {
                plugin: plugin.spec.name.clone(),
                severity: krm::severity(r),
                message: r["message"].as_str().unwrap_or_default().into(),
                object,
                origin,
                field: r["field"]["path"].as_str().map(String::from),
                proposed_value: None,
                rule: None,
            }
        })
        .collect();
    // `mode: audit` reports a function's errors instead of refusing the commit, as for
    // validators.
    if plugin.spec.mode == Mode::Enforce && findings.iter().any(|f| f.severity == "error") {
        return Ok(Err(findings
            .into_iter()
            .filter(|f| f.severity == "error")
            .collect()));
    }
    Ok(Ok((next, findings)))
}

/// Checks a transformer's output: its size, and that each object is a JSON object with
/// `apiVersion`, `kind` and `metadata.name`. The text is only scanned (see [`Head`]);
/// [`Batch`] parses it when a stage needs values.
fn check_output(
    plugin: &Plugin,
    subject: &Subject,
    out: Vec<bindings::Object>,
) -> Result<Vec<bindings::Object>, Error> {
    let invalid = |message: String| plugin.invalid(subject, message);
    // Each record counts too: a million empty objects are not free.
    let size: usize = out
        .iter()
        .map(|o| std::mem::size_of::<bindings::Object>() + o.json.len() + o.origin.path.len())
        .sum();
    if size > plugin.spec.limits.max_output_bytes {
        return Err(invalid(format!(
            "output is {size} bytes, the limit is {}",
            plugin.spec.limits.max_output_bytes
        )));
    }
    for (i, o) in out.iter().enumerate() {
        if Head::complete(&o.json) {
            continue;
        }
        // The slow path, for the error only: parse it all to say what is wrong.
        let at = at(i, &o.origin);
        let value: serde_json::Value =
            serde_json::from_str(&o.json).map_err(|e| invalid(format!("{at} is not JSON: {e}")))?;
        if let Some(problem) = identity_problem(&value) {
            return Err(invalid(format!("{at} {problem}")));
        }
        // Valid after all (e.g. a required field given twice, which JSON allows and the
        // API server reads as the last one).
    }
    Ok(out)
}

/// What keeps `value` from being an object sluice can apply: not a JSON object, or
/// missing `apiVersion`, `kind` or `metadata.name` (each a non-empty string). Names the
/// object as far as it can.
fn identity_problem(value: &serde_json::Value) -> Option<String> {
    let has = |v: &serde_json::Value| v.as_str().is_some_and(|s| !s.is_empty());
    let missing: Vec<&str> = [
        ("apiVersion", has(&value["apiVersion"])),
        ("kind", has(&value["kind"])),
        ("metadata.name", has(&value["metadata"]["name"])),
    ]
    .into_iter()
    .filter(|(_, ok)| !ok)
    .map(|(n, _)| n)
    .collect();
    if !value.is_object() {
        return Some(format!("{} is not a JSON object", ObjRef::of(value)));
    }
    (!missing.is_empty())
        .then(|| format!("{} is missing {}", ObjRef::of(value), missing.join(", ")))
}

/// The fields every returned object needs, read without building the object: everything
/// else is skipped by serde (still checked as JSON syntax), and strings without escapes
/// are borrowed from the text.
#[derive(Deserialize)]
struct Head<'a> {
    #[serde(rename = "apiVersion", borrow, default)]
    api_version: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    kind: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    metadata: Option<HeadMetadata<'a>>,
}

#[derive(Deserialize)]
struct HeadMetadata<'a> {
    #[serde(borrow, default)]
    name: Option<std::borrow::Cow<'a, str>>,
}

impl Head<'_> {
    /// Whether `json` is one JSON object with a non-empty `apiVersion`, `kind` and
    /// `metadata.name`. False for anything else, including shapes serde would accept for a
    /// struct but that are not an object (an array).
    fn complete(json: &str) -> bool {
        if !json.trim_start().starts_with('{') {
            return false;
        }
        let filled =
            |s: &Option<std::borrow::Cow<'_, str>>| s.as_ref().is_some_and(|s| !s.is_empty());
        serde_json::from_str::<Head<'_>>(json).is_ok_and(|h| {
            filled(&h.api_version)
                && filled(&h.kind)
                && h.metadata.as_ref().is_some_and(|m| filled(&m.name))
        })
    }
}

/// A plugin's finding, with the origin of the input object it names (`origin_of` its
/// index).
fn finding(
    plugin: &Plugin,
    origin_of: impl Fn(usize) -> Option<Origin>,
    f: bindings::Finding,
) -> Finding {
    let origin = f.object.as_ref().and_then(|r| origin_of(r.index as usize));
    Finding {
        plugin: plugin.spec.name.clone(),
        severity: match f.severity {
            bindings::Severity::Error => "error",
            bindings::Severity::Warning => "warning",
            bindings::Severity::Info => "info",
        },
        message: f.message,
        object: f.object.as_ref().map(|r| ObjRef {
            group: sluice_model::object::group_of(&r.api_version).into(),
            kind: r.kind.as_str().into(),
            namespace: r.namespace.as_str().into(),
            name: r.name.as_str().into(),
        }),
        origin,
        field: f.field,
        proposed_value: f.proposed_value,
        rule: f.rule,
    }
}

/// The runtime that drives what plugins wait for (WASI's timers and sockets): one worker
/// thread for the process, whatever runtime, if any, the caller runs in.
fn io() -> Result<&'static tokio::runtime::Handle, String> {
    static IO: std::sync::LazyLock<Result<tokio::runtime::Runtime, String>> =
        std::sync::LazyLock::new(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("sluice-plugin-io")
                .enable_all()
                .build()
                .map_err(|e| format!("failed to start the plugins' I/O runtime: {e}"))
        });
    IO.as_ref()
        .map(tokio::runtime::Runtime::handle)
        .map_err(Clone::clone)
}

/// Drives one plugin call (instantiation included) to its end or the plugin's deadline,
/// whichever comes first. The epoch deadline traps guest code that runs too long; a host
/// call that waits (a sleep, a socket read) is a pending future, dropped here at the same
/// deadline, which ends it: no thread stays parked after the call returns. Blocks the
/// calling thread (call it from `spawn_blocking`, as [`run`] is).
pub(crate) fn finish<T>(
    limits: &Limits,
    call: impl std::future::Future<Output = wasmtime::Result<T>>,
) -> wasmtime::Result<T> {
    let _io = io().map_err(wasmtime::Error::msg)?.enter();
    futures::executor::block_on(async {
        tokio::time::timeout(limits.timeout, call)
            .await
            .unwrap_or_else(|_| Err(wasmtime::Trap::Interrupt.into()))
    })
}

/// Marks an error as the instantiation's, for [`call_message`].
#[derive(Debug, thiserror::Error)]
#[error("{0:#}")]
struct Instantiate(#[source] wasmtime::Error);

/// The message of a failed call: [`trap_message`], saying when it failed while
/// instantiating.
fn call_message(e: &wasmtime::Error, limits: &Limits) -> String {
    match e.downcast_ref::<Instantiate>() {
        Some(Instantiate(inner)) => {
            format!("failed to instantiate: {}", trap_message(inner, limits))
        }
        None => trap_message(e, limits),
    }
}

/// Names the limit a trap hit, or quotes the trap.
fn trap_message(e: &wasmtime::Error, limits: &Limits) -> String {
    if let Some(trap) = e.downcast_ref::<wasmtime::Trap>()
        && *trap == wasmtime::Trap::Interrupt
    {
        return format!("timed out after {:?} (limits.timeout)", limits.timeout);
    }
    let text = format!("{e:#}");
    if text.contains("growing memory")
        || text.contains("memory.grow")
        || text.contains("exceeds memory limits")
    {
        return format!(
            "exceeded its memory limit of {} MiB (limits.memory_mib): {text}",
            limits.memory_bytes >> 20
        );
    }
    format!("trapped: {text}")
}

/// Reads the world from the component's exports.
fn world_of(engine: &Engine, component: &Component) -> Result<World, String> {
    let exports: Vec<String> = component
        .component_type()
        .exports(engine)
        .map(|(n, _)| n.to_string())
        .collect();
    match (
        exports.iter().any(|e| e == "transform"),
        exports.iter().any(|e| e == "validate"),
    ) {
        (true, false) => Ok(World::Transformer),
        (false, true) => Ok(World::Validator),
        (true, true) => Err("exports both transform and validate; a plugin is one world".into()),
        (false, false) => Err(format!(
            "exports neither transform nor validate (exports: {}); is it built against wit/plugin.wit?",
            exports.join(", ")
        )),
    }
}

/// Whether a component is built against `sluice:plugin@0.2.0` (it imports that version's
/// `types`, where the object handle lives); otherwise 0.1.0.
fn holds_objects(engine: &Engine, component: &Component) -> bool {
    component
        .component_type()
        .imports(engine)
        .any(|(name, _)| name.starts_with("sluice:plugin/types@0.2."))
}

/// Plugins by name, as loaded for one configuration.
pub type Loaded = BTreeMap<String, Result<Arc<Plugin>, Error>>;

#[cfg(test)]
mod tests {
    use super::{Head, bindings, findings_size};

    #[test]
    fn findings_count_every_text_they_carry_and_each_record() {
        let empty = bindings::Finding {
            severity: bindings::Severity::Error,
            message: String::new(),
            object: None,
            field: None,
            proposed_value: None,
            rule: None,
        };
        let record = std::mem::size_of::<bindings::Finding>();
        assert!(record > 0);
        assert_eq!(findings_size(&vec![empty.clone(); 1000]), 1000 * record);
        let full = bindings::Finding {
            message: "m".repeat(10),
            field: Some("f".repeat(20)),
            proposed_value: Some("p".repeat(100)),
            rule: Some("r".repeat(5)),
            ..empty
        };
        assert_eq!(findings_size(&[full]), record + 135);
    }

    #[test]
    fn a_transformer_object_is_complete_only_with_its_identity_fields() {
        let complete = [
            r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"a"}}"#,
            r#" {"kind":"ConfigMap","data":{"x":[1,{"y":null}]},"metadata":{"labels":{},"name":"a"},"apiVersion":"v1"}"#,
            r#"{"apiVersion":"v1","kind":"Config\u004dap","metadata":{"name":"a"}}"#,
        ];
        for json in complete {
            assert!(Head::complete(json), "{json}");
        }
        let incomplete = [
            r#"["v1","ConfigMap",{"name":"a"}]"#,
            r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":""}}"#,
            r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":null}"#,
            r#"{"apiVersion":5,"kind":"ConfigMap","metadata":{"name":"a"}}"#,
            r#"{"apiVersion":"v1","kind":"ConfigMap"}"#,
            r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"a"}"#,
            r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"a"}} trailing"#,
            r#"{"apiVersion":"v1","apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"a"}}"#,
        ];
        for json in incomplete {
            assert!(!Head::complete(json), "{json}");
        }
    }
}
