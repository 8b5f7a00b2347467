//! sluice's model: the plain values every stage of the sync shares.
//!
//! Owns [`object::Object`] (a manifest as compact JSON text with its identity beside it),
//! [`object::Name`] (a shared string), [`object::ObjRef`] and [`object::Origin`] (project,
//! commit, file, document, line: where every error points), [`scopes::Scopes`] (which kinds
//! are namespaced) and the agentk [`policy`] values the engine acts on.
//!
//! Must not know: Kubernetes clients, git, WebAssembly, I/O of any kind. Every other sluice
//! crate depends on this one and on nothing above it.
#![deny(missing_docs)]

pub mod object;
pub mod policy;
pub mod scopes;

/// Where sluice keeps its caches by default (git checkouts, compiled plugins, render
/// outcomes): `$XDG_CACHE_HOME/sluice`, else `~/.cache/sluice`, else the temporary
/// directory.
pub fn default_cache_dir() -> std::path::PathBuf {
    use std::path::PathBuf;
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("sluice")
}

/// What a cluster offers, as Helm's `.Capabilities` reads it: the API server's version
/// (`v1.36.3`) and every served `group/version` and `group/version/Kind`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// The API server's `gitVersion`.
    pub kube_version: String,
    /// Served API versions, sorted.
    pub api_versions: Vec<String>,
}
