//! Host-side bindings of `wit/plugin.wit`, one per world, sharing the types.

#[allow(missing_docs)] // reason: generated from the WIT file, which documents every item
pub mod transformer {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "transformer",
    });
}

#[allow(missing_docs)] // reason: generated from the WIT file, which documents every item
pub mod validator {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "validator",
        with: {
            "sluice:plugin/types": super::transformer::sluice::plugin::types,
            "sluice:plugin/host": super::transformer::sluice::plugin::host,
        },
    });
}

pub use transformer::sluice::plugin::host::Level;
pub use transformer::sluice::plugin::types::{Context, Finding, Object, Origin, Severity};
