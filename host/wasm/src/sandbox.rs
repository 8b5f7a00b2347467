//! What a plugin instance can reach: the per-call store state, the memory and time limits,
//! and a linker holding only the capabilities its configuration grants.
//!
//! Every plugin gets the `sluice:plugin/host` import (logging) and the parts of WASI that
//! carry no authority: streams, exit, an empty environment, no preopened directories, stdin
//! empty and stdout/stderr forwarded to the log. A plugin granted `files:` gets one
//! preopened directory, `/`, read-only, holding exactly those files of the configuration
//! repository (the host copied them out of git; nothing else of the host's disk is there).
//!
//! Clocks and randomness are always linked, because language runtimes read them at
//! start-up (CPython seeds its `random` module, hash tables take a seed): without the
//! capability they are deterministic stand-ins, so a plugin's output stays a function of its
//! input and configuration and `sluice render` shows what the cluster gets. The wall clock
//! reads [`FIXED_WALL_CLOCK`], the monotonic clock advances 1 µs per reading, and random
//! bytes are a fixed SHA-256 stream (see [`stand_in_bytes`]). The `clocks` and `random`
//! capabilities give the real ones. Sockets are linked only when granted; an ungranted socket
//! function is defined as a trap, so calling it fails the call with a message naming the
//! import.

use wasmtime::Engine;
use wasmtime::component::{HasData, HasSelf, Linker, ResourceTable};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::Capability;
use super::bindings::{self, Level};

/// State of one plugin call.
pub struct State {
    wasi: WasiCtx,
    table: ResourceTable,
    /// Memory and table caps ([`Budget`]).
    pub limits: Budget,
    plugin: String,
    logged: usize,
    /// The objects of a `sluice:plugin@0.2.0` call (`handles.rs`).
    pub objects: super::handles::Objects,
}

/// Host resources (streams, pollables, sockets, …) one call may hold at once: language
/// runtimes hold a handful; without a cap a guest that creates them in a loop and never
/// drops them grows the host's table until the deadline.
pub const MAX_RESOURCES: usize = 1 << 16;

/// Log lines per call; a plugin cannot flood the agent's log.
const MAX_LOG_LINES: usize = 1000;
/// Bytes per log line.
const MAX_LOG_LINE: usize = 4096;

impl State {
    /// Fresh state for one call of `plugin` with `memory_bytes` of linear memory at most.
    pub fn new(
        plugin: &str,
        memory_bytes: usize,
        capabilities: &[Capability],
        files: Option<&std::path::Path>,
    ) -> State {
        let mut wasi = WasiCtx::builder();
        // Granted files (`files:`): one directory, read-only, seen as `/`. `run` fails a
        // call whose directory is gone; one that cannot be opened otherwise is logged.
        if let Some(dir) = files
            && let Err(e) = wasi.preopened_dir(dir, "/", wasmtime_wasi::FsPerms::ReadOnly)
        {
            tracing::warn!(plugin, dir = %dir.display(), error = %e, "granted files could not be opened");
        }
        // WasiCtxBuilder starts with no env, no args, no preopens, every socket address
        // denied and TCP, UDP and name lookups off; only the network capability opens them.
        if capabilities.contains(&Capability::Network) {
            wasi.inherit_network()
                .allow_ip_name_lookup(true)
                .allow_tcp(true)
                .allow_udp(true);
        }
        if capabilities.contains(&Capability::Environment) {
            wasi.inherit_env();
        }
        stand_ins(&mut wasi, capabilities);
        let mut table = ResourceTable::new();
        table.set_max_capacity(MAX_RESOURCES);
        State {
            wasi: wasi.build(),
            table,
            limits: Budget::new(memory_bytes),
            plugin: plugin.to_string(),
            logged: 0,
            objects: super::handles::Objects::default(),
        }
    }
}

/// The memory and table caps of one call. The memory cap covers every linear memory of the
/// instance together: a component has one per core instance (up to 16 here), and a cap per
/// memory, as `StoreLimits` has, would let one call use 16 times `limits.memory_mib`.
/// Growing past a cap traps (rather than failing `memory.grow`), so the call fails with a
/// message naming the limit instead of the guest aborting obscurely.
#[derive(Debug)]
pub struct Budget {
    memory_bytes: usize,
    /// Bytes of linear memory the instance's memories hold now.
    used: usize,
    table_elements: usize,
}

/// Elements per table: far above what any language runtime's function tables need, far
/// below what would let `table.grow` take the host's memory.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

impl Budget {
    /// A budget of `memory_bytes` of linear memory, all memories together.
    pub fn new(memory_bytes: usize) -> Budget {
        Budget {
            memory_bytes,
            used: 0,
            table_elements: MAX_TABLE_ELEMENTS,
        }
    }
}

impl wasmtime::ResourceLimiter for Budget {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let after = (self.used - current.min(self.used)).saturating_add(desired);
        if after > self.memory_bytes || maximum.is_some_and(|max| desired > max) {
            wasmtime::bail!(
                "forcing trap when growing memory to {desired} bytes: the call's memories would hold {after} bytes"
            );
        }
        self.used = after;
        Ok(true)
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        Err(error.context("forcing a memory growth failure to be a trap"))
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.table_elements || maximum.is_some_and(|max| desired > max) {
            wasmtime::bail!("forcing trap when growing table to {desired} elements");
        }
        Ok(true)
    }

    fn table_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        Err(error.context("forcing a table growth failure to be a trap"))
    }

    fn instances(&self) -> usize {
        64
    }

    fn tables(&self) -> usize {
        64
    }

    fn memories(&self) -> usize {
        16
    }
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl bindings::transformer::sluice::plugin::host::Host for State {
    fn log(&mut self, level: Level, message: String) {
        if self.logged >= MAX_LOG_LINES {
            return;
        }
        self.logged += 1;
        let mut message = message;
        if message.len() > MAX_LOG_LINE {
            let mut cut = MAX_LOG_LINE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        let plugin = self.plugin.as_str();
        match level {
            Level::Debug => tracing::debug!(plugin, "{message}"),
            Level::Info => tracing::info!(plugin, "{message}"),
            Level::Warn => tracing::warn!(plugin, "{message}"),
            Level::Error => tracing::error!(plugin, "{message}"),
        }
    }
}

/// Gives `wasi` the deterministic clocks and randomness, unless `capabilities` grant the
/// real ones.
pub fn stand_ins(wasi: &mut wasmtime_wasi::WasiCtxBuilder, capabilities: &[Capability]) {
    if !capabilities.contains(&Capability::Random) {
        wasi.secure_random(wasmtime_wasi::Deterministic::new(stand_in_bytes()))
            .insecure_random(wasmtime_wasi::Deterministic::new(stand_in_bytes()))
            .insecure_random_seed(STAND_IN_SEED);
    }
    if !capabilities.contains(&Capability::Clocks) {
        wasi.wall_clock(FixedWallClock)
            .monotonic_clock(SteppingClock(std::sync::atomic::AtomicU64::new(0)));
    }
}

/// What the wall clock of a plugin without the `clocks` capability reads:
/// 2024-01-01T00:00:00Z, in seconds since the Unix epoch.
pub const FIXED_WALL_CLOCK: u64 = 1_704_067_200;

/// `wasi:random/insecure-seed` without the `random` capability.
const STAND_IN_SEED: u128 = 0x736c_7569_6365_2d70_6c75_6769_6e2d_7365;

/// The byte stream `wasi:random` returns without the `random` capability: SHA-256 of
/// `sluice-plugin-random-<n>` for n = 0, 1, … (64 KiB, then it repeats). Fixed across
/// releases, so a plugin's output never changes with the host.
pub fn stand_in_bytes() -> Vec<u8> {
    use sha2::Digest;
    static BYTES: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BYTES
        .get_or_init(|| {
            (0..2048u32)
                .flat_map(|n| sha2::Sha256::digest(format!("sluice-plugin-random-{n}")).to_vec())
                .collect()
        })
        .clone()
}

/// The wall clock without the `clocks` capability.
struct FixedWallClock;

impl wasmtime_wasi::HostWallClock for FixedWallClock {
    fn resolution(&self) -> std::time::Duration {
        std::time::Duration::from_nanos(1)
    }
    fn now(&self) -> std::time::Duration {
        std::time::Duration::from_secs(FIXED_WALL_CLOCK)
    }
}

/// The monotonic clock without the `clocks` capability: 1 µs later at every reading, so a
/// runtime that waits for time to pass (or divides by elapsed time) still makes progress.
struct SteppingClock(std::sync::atomic::AtomicU64);

impl wasmtime_wasi::HostMonotonicClock for SteppingClock {
    fn resolution(&self) -> u64 {
        1_000
    }
    fn now(&self) -> u64 {
        self.0
            .fetch_add(1_000, std::sync::atomic::Ordering::Relaxed)
            + 1_000
    }
}

struct Io;
impl HasData for Io {
    type Data<'a> = &'a mut ResourceTable;
}

/// The capability an interface needs, for the interfaces that are not linked without one
/// (clocks and randomness always are: real, or deterministic stand-ins).
fn capability_of(import: &str) -> Option<Capability> {
    // wasi:http is never linked (componentize-js imports it by default): its functions trap
    // like those of sockets.
    if import.starts_with("wasi:sockets/") || import.starts_with("wasi:http/") {
        Some(Capability::Network)
    } else {
        None
    }
}

/// The resource type standing in for every resource of a denied interface (no value of it
/// can ever exist: the functions that would create one trap).
struct Denied;

/// Defines every function the component imports from an interface it was not granted as a
/// trap naming the import and the missing capability, so the component still loads and
/// fails only if it really calls one. (wasmtime's `define_unknown_imports_as_traps` matches
/// names exactly, without the semver matching the linker applies, so it would also shadow
/// granted interfaces imported at another 0.2.x version.)
pub fn deny_ungranted(
    linker: &mut Linker<State>,
    engine: &Engine,
    component: &wasmtime::component::Component,
    capabilities: &[Capability],
) -> wasmtime::Result<()> {
    use wasmtime::component::types::ComponentItem;
    // Resources from wasi:io, and those a denied interface already defined, are only
    // re-exported (`use`d) by the next ones: the linker resolves them, defining them again
    // would make them different types.
    let mut defined: Vec<String> = ["pollable", "input-stream", "output-stream", "error"]
        .map(String::from)
        .to_vec();
    for (name, item) in component.component_type().imports(engine) {
        let Some(cap) = capability_of(name).filter(|c| !capabilities.contains(c)) else {
            continue;
        };
        let ComponentItem::ComponentInstance(instance) = item.ty else {
            continue;
        };
        let mut li = linker.instance(name)?;
        for (export, export_item) in instance.exports(engine) {
            match export_item.ty {
                ComponentItem::ComponentFunc(_) => {
                    let message = format!(
                        "{name}#{export} needs the `{}` capability, which this plugin is not granted",
                        serde_json::to_value(cap)
                            .ok()
                            .and_then(|v| v.as_str().map(String::from))
                            .unwrap_or_default()
                    );
                    li.func_new(export, move |_, _, _, _| {
                        Err(wasmtime::format_err!("{message}"))
                    })?;
                }
                ComponentItem::Resource(_) if !defined.iter().any(|d| d == export) => {
                    li.resource(
                        export,
                        wasmtime::component::ResourceType::host::<Denied>(),
                        |_, _| Ok(()),
                    )?;
                    defined.push(export.to_string());
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// A linker with the host import and the WASI interfaces `capabilities` allow.
pub fn linker(engine: &Engine, capabilities: &[Capability]) -> wasmtime::Result<Linker<State>> {
    use wasmtime_wasi::cli::{WasiCli, WasiCliView as _};
    use wasmtime_wasi::clocks::{WasiClocks, WasiClocksView as _};
    use wasmtime_wasi::filesystem::{WasiFilesystem, WasiFilesystemView as _};
    use wasmtime_wasi::p2::bindings::{cli, clocks, filesystem, io, random, sockets};
    use wasmtime_wasi::random::WasiRandom;
    use wasmtime_wasi::sockets::{WasiSockets, WasiSocketsView as _};

    let mut l = Linker::new(engine);
    bindings::transformer::sluice::plugin::host::add_to_linker::<State, HasSelf<State>>(
        &mut l,
        |s| s,
    )?;
    // 0.2.0: its host interface, and the object handles (`handles.rs`).
    {
        use bindings::v2::transformer::sluice::plugin::{host, types};
        host::add_to_linker::<State, HasSelf<State>>(&mut l, |s| s)?;
        types::add_to_linker::<State, HasSelf<State>>(&mut l, |s| s)?;
    }

    // No authority: streams, exit, stdio, terminals, an empty environment, a filesystem
    // without preopens (or the granted files' one read-only directory).
    // The async implementations throughout: a call that waits (poll, a blocking read) is a
    // future the host drops at the plugin's deadline (`plugins::finish`).
    io::error::add_to_linker::<State, Io>(&mut l, |s| &mut s.table)?;
    io::poll::add_to_linker::<State, Io>(&mut l, |s| &mut s.table)?;
    io::streams::add_to_linker::<State, Io>(&mut l, |s| &mut s.table)?;
    cli::exit::add_to_linker::<State, WasiCli>(&mut l, State::cli)?;
    cli::environment::add_to_linker::<State, WasiCli>(&mut l, State::cli)?;
    cli::stdin::add_to_linker::<State, WasiCli>(&mut l, State::cli)?;
    cli::stdout::add_to_linker::<State, WasiCli>(&mut l, State::cli)?;
    cli::stderr::add_to_linker::<State, WasiCli>(&mut l, State::cli)?;
    cli::terminal_input::add_to_linker::<State, WasiCli>(&mut l, State::cli)?;
    cli::terminal_output::add_to_linker::<State, WasiCli>(&mut l, State::cli)?;
    cli::terminal_stdin::add_to_linker::<State, WasiCli>(&mut l, State::cli)?;
    cli::terminal_stdout::add_to_linker::<State, WasiCli>(&mut l, State::cli)?;
    cli::terminal_stderr::add_to_linker::<State, WasiCli>(&mut l, State::cli)?;
    filesystem::preopens::add_to_linker::<State, WasiFilesystem>(&mut l, State::filesystem)?;
    filesystem::types::add_to_linker::<State, WasiFilesystem>(&mut l, State::filesystem)?;

    // Real or stand-ins, as `State::new` built them.
    clocks::wall_clock::add_to_linker::<State, WasiClocks>(&mut l, State::clocks)?;
    clocks::monotonic_clock::add_to_linker::<State, WasiClocks>(&mut l, State::clocks)?;
    random::random::add_to_linker::<State, WasiRandom>(&mut l, |s| s.wasi.random())?;
    random::insecure::add_to_linker::<State, WasiRandom>(&mut l, |s| s.wasi.random())?;
    random::insecure_seed::add_to_linker::<State, WasiRandom>(&mut l, |s| s.wasi.random())?;
    if capabilities.contains(&Capability::Network) {
        let options = sockets::network::LinkOptions::default();
        sockets::tcp_create_socket::add_to_linker::<State, WasiSockets>(&mut l, State::sockets)?;
        sockets::instance_network::add_to_linker::<State, WasiSockets>(&mut l, State::sockets)?;
        sockets::network::add_to_linker::<State, WasiSockets>(&mut l, &options, State::sockets)?;
        sockets::ip_name_lookup::add_to_linker::<State, WasiSockets>(&mut l, State::sockets)?;
        sockets::tcp::add_to_linker::<State, WasiSockets>(&mut l, State::sockets)?;
        sockets::udp::add_to_linker::<State, WasiSockets>(&mut l, State::sockets)?;
        sockets::udp_create_socket::add_to_linker::<State, WasiSockets>(&mut l, State::sockets)?;
    }
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmtime::ResourceLimiter;

    #[test]
    fn the_memory_cap_covers_every_memory_of_a_call_together() {
        const MIB: usize = 1 << 20;
        let mut b = Budget::new(64 * MIB);
        assert!(b.memory_growing(0, 40 * MIB, None).expect("a first memory"));
        let second = b
            .memory_growing(0, 40 * MIB, None)
            .expect_err("past the cap");
        assert!(
            second.to_string().contains("growing memory"),
            "named as a memory limit: {second}"
        );
        assert!(
            b.memory_growing(0, 20 * MIB, None)
                .expect("a second, within")
        );
        assert!(
            b.memory_growing(40 * MIB, 44 * MIB, None)
                .expect("the first grows")
        );
        assert!(
            b.memory_growing(20 * MIB, 21 * MIB, None).is_err(),
            "65 MiB in all"
        );
        assert!(
            b.memory_growing(0, MIB, Some(0)).is_err(),
            "past its own maximum"
        );
        assert!(b.table_growing(0, 1 << 20, None).expect("a large table"));
        assert!(b.table_growing(0, (1 << 20) + 1, None).is_err());
    }

    #[test]
    fn a_call_holds_a_bounded_number_of_host_resources() {
        let mut state = State::new("p", 1 << 20, &[], None);
        for _ in 0..MAX_RESOURCES {
            state.table.push(()).expect("within the cap");
        }
        assert!(state.table.push(()).is_err(), "one past the cap");
    }
}
