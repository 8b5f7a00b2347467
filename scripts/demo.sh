#!/usr/bin/env bash
# The README demo: builds sluice, starts a local control plane and git server, creates a
# manifest repository from examples/nginx, runs `sluice run`, and commits a change that
# the cluster follows. The first run builds the control plane from the Go module proxy
# and sluice itself (minutes on 2 cores); every step says what it is doing.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n\033[1m==> %s\033[0m\n' "$*" >&2; }
step "control plane binaries (built once per version and cached; the first build takes minutes)"
tests/cluster/build.sh >/dev/null
step "building sluice and the demo (cargo; the first build takes a few minutes, later ones seconds)"
cargo build -p sluice --bin sluice -p sluice-testenv --bin sluice-demo
step "starting the demo"
SLUICE_BIN="$(pwd)/target/debug/sluice" exec target/debug/sluice-demo
