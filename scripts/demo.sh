#!/usr/bin/env bash
# The README demo: builds sluice, starts a local control plane and git server, creates a
# manifest repository from examples/nginx, runs `sluice run`, and commits a change that
# the cluster follows. The first run builds the control plane from the Go module proxy.
set -euo pipefail
cd "$(dirname "$0")/.."
tests/cluster/build.sh >/dev/null
cargo build --quiet -p sluice --bin sluice
SLUICE_BIN="$(pwd)/target/debug/sluice" exec cargo run --quiet -p sluice-testenv --bin sluice-demo
