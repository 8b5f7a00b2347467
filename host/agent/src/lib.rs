//! sluice's agent: from configuration and git to the engine, for every manifest project.
//!
//! One sync takes one path, one module per stage, each handing a plain value to the next:
//!
//! [`config`] → [`source`] → [`select`] → [`decode`] → plugins (`sluice-wasm`) → [`limits`] →
//! the engine (`sluice-engine`: plan, apply, inventory, prune, wait) → [`report`]
//!
//! [`sync`] is that path for one commit; [`agent`] runs it per project whenever the commit
//! changes, a webhook arrives, an object drifts or the re-apply timer fires, for the
//! projects of the [`shards`] this replica owns, and records each outcome with [`history`]
//! (Events, last sync).
//! [`source`] reads git, and through [`oci`] artifacts and plugin modules in OCI registries,
//! whose signatures [`cosign`] checks.
//! [`moves`] lets an object leave one project for another of the same repository without
//! a delete.
//! [`webhook`] (push receivers) and [`observability`] (metrics, probes) serve the agent's
//! HTTP endpoints, each on a port of its own ([`http`]).
//!
//! Must not know: how the CLI prints (the `sluice` crate). Start reading at [`agent`].
#![deny(missing_docs)]

pub mod agent;
pub mod config;
pub mod cosign;
pub mod decode;
pub mod history;
pub mod http;
pub mod limits;
pub mod moves;
pub mod observability;
pub mod oci;
pub mod render;
pub mod report;
pub mod select;
pub mod shards;
pub mod sops;
pub mod source;
pub mod sync;
pub mod webhook;
