#!/usr/bin/env bash
# Installs what the tests need and runs them all: formatting, lints, unit tests and the
# end-to-end tests against a real control plane and git server. CI (.ci/run) runs exactly
# this. Ends with the time each step took.
#
# Needs: rustup (the toolchain and wasm targets come from rust-toolchain.toml), Go >= 1.26
# (the control plane is built from the Go module proxy, once per version, cached under
# ~/.cache/sluice), git (its http-backend serves test repositories), and musl-gcc (Debian's
# musl-tools, installed by scripts/build-static.sh when missing) for the static binary.
# The example plugins' toolchains (componentize-py, componentize-js, and for C Debian's
# clang and wasi-libc plus wit-bindgen and wasm-tools from crates.io) are installed by
# examples/plugins/build.sh, which the tests run, and cached under ~/.cache/sluice.
#
# Caches, all under ~/.cache/sluice and keyed by version: the control plane, kapply, the
# native kustomize and helm, the renderers (Go modules compiled to WebAssembly), the
# example plugins' tools, and cargo's build directory. A clone without a `target/` gets a
# link to the build directory of this toolchain (cargo-target/rust-<version>), so a fresh
# clone rebuilds only the workspace's own crates, not its ~500 dependencies; cargo's own
# fingerprints decide what is stale. SLUICE_SHARED_TARGET=0 keeps a private `target/`.
# The end-to-end tests run two at a time (libtest's default on 2 cores): four at a time
# took 342 s against 295 s, since the plugin tests compile Python and JavaScript components
# and are bound by the CPU. They share one control plane per test binary, so a runner of
# one process per test (cargo-nextest) would start one control plane per test.
set -euo pipefail
cd "$(dirname "$0")/.."

started=$SECONDS
current="" current_start=$SECONDS
timings=()
step() {
  end_step
  current="$*" current_start=$SECONDS
  printf '\n==> %s\n' "$*" >&2
}
end_step() {
  if [ -n "$current" ]; then timings+=("$((SECONDS - current_start))|$current"); fi
  current=""
}
summary() {
  end_step
  printf '\n==> time per step\n' >&2
  for t in "${timings[@]}"; do
    printf '%5d s  %s\n' "${t%%|*}" "${t#*|}" >&2
  done
  printf '%5d s  total\n' "$((SECONDS - started))" >&2
}
trap summary EXIT

for tool in rustup cargo go git; do
  command -v "$tool" >/dev/null || { echo "error: $tool is required but not installed" >&2; exit 1; }
done

cache="${XDG_CACHE_HOME:-$HOME/.cache}/sluice"
# A link whose directory was removed (a cleared cache): make the directory again.
if [ -L target ] && [ ! -e target ]; then mkdir -p "$(readlink target)"; fi
if [ ! -e target ] && [ "${SLUICE_SHARED_TARGET:-1}" != 0 ]; then
  toolchain=$(sed -n 's/^channel = "\(.*\)"/\1/p' rust-toolchain.toml)
  shared="$cache/cargo-target/rust-$toolchain"
  mkdir -p "$shared"
  # Bounded: artefacts of old dependency versions pile up; start over past 40 GiB.
  if [ "$(du -s --block-size=1G "$shared" | cut -f1)" -gt 40 ]; then
    rm -rf "$shared" && mkdir -p "$shared"
  fi
  ln -s "$shared" target
  echo "target/ -> $shared (shared build directory; SLUICE_SHARED_TARGET=0 for a private one)" >&2
fi

step "Rust toolchain (rust-toolchain.toml)"
rustup toolchain install >&2
rustup target add wasm32-wasip2 wasm32-wasip1 x86_64-unknown-linux-musl >&2

step "control plane binaries (built once per version; the first build takes minutes)"
tests/cluster/build.sh >/dev/null

step "kapply, agentk's engine (sigs.k8s.io/cli-utils), for the takeover tests"
tests/cluster/build-kapply.sh >/dev/null

step "renderers: Kustomize and Helm compiled to WebAssembly (built once per version; cached)"
renderers/build.sh >/dev/null

step "kustomize, helm and sops: the native CLIs the renderers are compared with, and the SOPS fixtures' encrypter (built once per version)"
tests/cluster/build-cli.sh kustomize >/dev/null
tests/cluster/build-cli.sh helm >/dev/null
tests/cluster/build-cli.sh sops >/dev/null

step "registry, fluxpush and cosign: the OCI registry (CNCF distribution), flux push artifact's push path, and cosign (built once per version)"
tests/cluster/build-cli.sh registry >/dev/null
tests/cluster/build-cli.sh fluxpush >/dev/null
tests/cluster/build-cli.sh cosign >/dev/null

step "opa: compiles the OPA-ABI tests' policies to WebAssembly and is their reference (built once per version)"
tests/cluster/build-cli.sh opa >/dev/null

step "gator: Gatekeeper's CLI, whose gator verify the Gatekeeper plugin's Suite verdicts are compared with (built once per version)"
tests/cluster/build-cli.sh gator >/dev/null

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy --all-targets -- -D warnings (host)"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo clippy -- -D warnings (the plugins as WebAssembly)"
plugins=""
for d in plugins/*/ tests/plugins/*/; do
  n=$(basename "$d")
  if [ "$n" != sdk ]; then plugins="$plugins -p $n"; fi
done
# shellcheck disable=SC2086 # one -p per plugin crate
cargo clippy --release --target wasm32-wasip2 $plugins -- -D warnings

step "example plugins in Python, JavaScript, C and Go (toolchains installed and cached on first use)"
examples/plugins/build.sh >/dev/null

step "build the tests"
cargo test --workspace --no-run

step "cargo test (unit, integration, end-to-end)"
cargo test --workspace

step "static binary (musl) for the container image: build, then run it in an empty root"
static_bin=$(scripts/build-static.sh --debug | tail -1)
cargo build --release --target wasm32-wasip2 -p allowed-registries
scripts/smoke-static.sh "$static_bin" target/wasm32-wasip2/release/allowed_registries.wasm target/renderers
