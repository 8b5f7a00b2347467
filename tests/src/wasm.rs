//! Builds what tests run from the workspace's sources, once per test run: WebAssembly
//! components, and the `sluice` binary itself.
//!
//! Tests never use prebuilt modules: they ask for plugins by crate name and get freshly
//! built `.wasm` files (cargo rebuilds only what changed).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Every plugin crate the tests use: the first-party plugins and the hostile ones.
pub const CRATES: &[&str] = &[
    "set-namespace",
    "set-labels",
    "pin-images",
    "no-privileged",
    "require-resources",
    "allowed-registries",
    "no-latest-tag",
    "gatekeeper",
    "hostile",
    "hostile-validator",
    "hostile-v2",
    "hostile-validator-v2",
];

static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// The path of the component built from crate `name`.
///
/// # Panics
/// When the build fails; the message quotes cargo's output.
pub fn component(name: &str) -> PathBuf {
    let dir = BUILT
        .get_or_init(build)
        .as_ref()
        .unwrap_or_else(|e| panic!("building the test plugins failed: {e}"));
    dir.join(format!("{}.wasm", name.replace('-', "_")))
}

static AGENT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
static RELEASE_AGENT: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// The `sluice` binary, built from the workspace (debug profile), for tests that run the
/// agent as a real process.
///
/// # Panics
/// When the build fails; the message quotes cargo's output.
pub fn sluice_binary() -> PathBuf {
    AGENT
        .get_or_init(|| build_sluice(false))
        .clone()
        .unwrap_or_else(|e| panic!("building sluice failed: {e}"))
}

/// The `sluice` binary of the release profile, for benchmarks that measure the agent as a
/// process (CPU time, peak RSS).
///
/// # Panics
/// When the build fails; the message quotes cargo's output.
pub fn sluice_release_binary() -> PathBuf {
    RELEASE_AGENT
        .get_or_init(|| build_sluice(true))
        .clone()
        .unwrap_or_else(|e| panic!("building sluice failed: {e}"))
}

fn build_sluice(release: bool) -> Result<PathBuf, String> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace");
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace)
        .args(["build", "-p", "sluice", "--bin", "sluice"]);
    if release {
        cmd.arg("--release");
    }
    let out = cmd
        .env("CARGO_TARGET_DIR", workspace.join("target"))
        .output()
        .map_err(|e| format!("failed to run cargo: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let profile = if release { "release" } else { "debug" };
    Ok(workspace.join("target").join(profile).join("sluice"))
}

fn build() -> Result<PathBuf, String> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace");
    let target = workspace.join("target");
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace)
        .args(["build", "--release", "--target", "wasm32-wasip2"]);
    for c in CRATES {
        cmd.args(["-p", c]);
    }
    let out = cmd
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .map_err(|e| format!("failed to run cargo: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(target.join("wasm32-wasip2/release"))
}

static EXAMPLES: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// The example plugin `<language>_<name>.wasm` (e.g. `python_set_labels`), built by
/// `examples/plugins/build.sh` from `examples/plugins/<language>/<name>/` with the pinned
/// toolchains of that language (installed from PyPI, npm, crates.io and Debian on first
/// use, then cached).
///
/// # Panics
/// When the build fails; the script's output is on stderr.
pub fn example_plugin(name: &str) -> PathBuf {
    let dir = EXAMPLES
        .get_or_init(|| crate::cluster::run_script("../examples/plugins/build.sh"))
        .as_ref()
        .unwrap_or_else(|e| panic!("building the example plugins failed: {e}"));
    let path = dir.join(format!("{name}.wasm"));
    assert!(path.is_file(), "{} was not built", path.display());
    path
}
