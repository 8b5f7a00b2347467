//! Host-side bindings of `wit/plugin.wit`, one per world, sharing the types.

#[allow(missing_docs)] // reason: generated from the WIT file, which documents every item
pub mod transformer {
    wasmtime::component::bindgen!({
        path: "../../wit",
        world: "transformer",
        // Called on an async store, so that a call ends at its deadline even while a host
        // call waits (see `plugins::finish`).
        exports: { default: async },
    });
}

#[allow(missing_docs)] // reason: generated from the WIT file, which documents every item
pub mod validator {
    wasmtime::component::bindgen!({
        path: "../../wit",
        world: "validator",
        exports: { default: async },
        with: {
            "sluice:plugin/types": super::transformer::sluice::plugin::types,
            "sluice:plugin/host": super::transformer::sluice::plugin::host,
        },
    });
}

pub use transformer::sluice::plugin::host::Level;
pub use transformer::sluice::plugin::types::{Context, Finding, Object, Origin, Severity};

/// `sluice:plugin@0.2.0` (`wit/v0.2`): the same worlds, with objects held by the host
/// (`handles.rs`) instead of passed as text.
pub mod v2 {
    #[allow(missing_docs)] // reason: generated from the WIT file, which documents every item
    pub mod transformer {
        wasmtime::component::bindgen!({
            path: "../../wit/v0.2",
            world: "transformer",
            exports: { default: async },
            with: { "sluice:plugin/types.object": crate::handles::Handle },
        });
    }

    #[allow(missing_docs)] // reason: generated from the WIT file, which documents every item
    pub mod validator {
        wasmtime::component::bindgen!({
            path: "../../wit/v0.2",
            world: "validator",
            exports: { default: async },
            with: {
                "sluice:plugin/types": super::transformer::sluice::plugin::types,
                "sluice:plugin/host": super::transformer::sluice::plugin::host,
            },
        });
    }

    pub use transformer::sluice::plugin::types::{Context, Finding, Origin};
}
