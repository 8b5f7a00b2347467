#!/usr/bin/env bash
# Installs what the tests need and runs them all: formatting, lints, unit tests and the
# end-to-end tests against a real control plane and git server.
#
# Needs: rustup (the toolchain and wasm targets come from rust-toolchain.toml), Go >= 1.26
# (the control plane is built from the Go module proxy, once per version, cached under
# ~/.cache/sluice), git (its http-backend serves test repositories), and musl-gcc (Debian's
# musl-tools, installed by scripts/build-static.sh when missing) for the static binary.
# The example plugins' toolchains (componentize-py, componentize-js, and for C Debian's
# clang and wasi-libc plus wit-bindgen and wasm-tools from crates.io) are installed by
# examples/plugins/build.sh, which the tests run, and cached under ~/.cache/sluice.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*" >&2; }

for tool in rustup cargo go git; do
  command -v "$tool" >/dev/null || { echo "error: $tool is required but not installed" >&2; exit 1; }
done

step "Rust toolchain (rust-toolchain.toml)"
rustup toolchain install >&2
rustup target add wasm32-wasip2 wasm32-wasip1 x86_64-unknown-linux-musl >&2

step "control plane binaries (built once per version; the first build takes minutes)"
tests/cluster/build.sh >/dev/null

step "kapply, agentk's engine (sigs.k8s.io/cli-utils), for the takeover tests"
tests/cluster/build-kapply.sh >/dev/null

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy --all-targets -- -D warnings (host, and the plugins as WebAssembly)"
cargo clippy --workspace --all-targets -- -D warnings
plugins=""
for d in plugins/*/ tests/plugins/*/; do
  n=$(basename "$d")
  if [ "$n" != sdk ]; then plugins="$plugins -p $n"; fi
done
# shellcheck disable=SC2086 # one -p per plugin crate
cargo clippy --release --target wasm32-wasip2 $plugins -- -D warnings

step "example plugins in Python, JavaScript, C and Go (toolchains installed and cached on first use)"
examples/plugins/build.sh >/dev/null

step "cargo test (unit, integration, end-to-end)"
cargo test --workspace

step "static binary (musl) for the container image: build, then run it in an empty root"
static_bin=$(scripts/build-static.sh --debug | tail -1)
cargo build --release --target wasm32-wasip2 -p allowed-registries
scripts/smoke-static.sh "$static_bin" target/wasm32-wasip2/release/allowed_registries.wasm
