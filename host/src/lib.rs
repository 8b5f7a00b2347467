//! sluice: a pull-mode GitOps agent for Kubernetes.
//!
//! sluice reads GitLab agentk's configuration (`.gitlab/agents/<name>/config.yaml`), fetches
//! the manifest repositories itself, passes every rendered object through WebAssembly
//! plugins and keeps the cluster equal to what git says.
//!
//! The pipeline stages (config → source → select → decode → plugins → plan → apply →
//! inventory → wait → report) arrive as modules with their issues; see
//! `docs/architecture.md` in the repository for the shape.
#![deny(missing_docs)]

/// The version of this build, as Cargo knows it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
