//! Test support for sluice's end-to-end tests: a real Kubernetes control plane
//! ([`cluster`]) and a real git server over smart HTTP ([`git`]), both started once per
//! test process and torn down with it; a real OCI registry ([`registry`]) per test that
//! needs one.
//!
//! ```no_run
//! # async fn example() {
//! let client = sluice_testenv::cluster::client().await;
//! let ns = sluice_testenv::cluster::namespace(&client, "demo").await;
//! let repo = sluice_testenv::git::shared().create_repo("group/app");
//! repo.commit("main", &[sluice_testenv::git::file("cm.yaml", "kind: ConfigMap")], "first");
//! # let _ = ns;
//! # }
//! ```

pub mod cluster;
pub mod git;
pub mod pki;
mod procs;
pub mod proxy;
pub mod registry;
pub mod wasm;

pub use procs::{log_tail, push_generic, usage};

/// The median wall time of `runs` calls of `f` (the benches' one measure).
pub fn median_time(runs: usize, mut f: impl FnMut()) -> std::time::Duration {
    let mut times: Vec<std::time::Duration> = (0..runs.max(1))
        .map(|_| {
            let start = std::time::Instant::now();
            f();
            start.elapsed()
        })
        .collect();
    times.sort();
    times[times.len() / 2]
}
