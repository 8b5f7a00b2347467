//! sluice: a pull-mode GitOps agent for Kubernetes, and its command line.
//!
//! The `sluice` binary (`main.rs`) runs the agent (`sluice-agent`) and the offline and
//! cluster commands: [`render`] (render, validate, diff), [`status`], [`install`]
//! (`sluice generate`), [`plugin_test`] (`sluice plugin test`) and [`scaffold`]
//! (`sluice plugin new`). The crates below it, in the order data flows:
//! `sluice-model` (values) ← `sluice-wasm` (plugins) and `sluice-engine` (apply, prune,
//! wait) ← `sluice-agent` (config, git, sync, the agent loop) ← this crate.
#![deny(missing_docs)]

pub mod install;
pub mod plugin_test;
pub mod render;
pub mod scaffold;
pub mod status;

/// The version of this build, as Cargo knows it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
