#!/usr/bin/env bash
# The soak run (not part of CI): a local control plane and git server, PROJECTS manifest
# projects, the release `sluice run`, and a commit every SECONDS, round robin, for MINUTES.
# Every commit must be applied in order; the agent's memory growth is reported.
#   scripts/soak.sh [MINUTES=30] [PROJECTS=4] [SECONDS=10]
set -euo pipefail
cd "$(dirname "$0")/.."
tests/cluster/build.sh >/dev/null
cargo build --quiet --release -p sluice --bin sluice
SLUICE_BIN="$(pwd)/target/release/sluice" exec cargo run --quiet --release -p sluice-testenv --bin sluice-soak -- "${1:-30}" "${2:-4}" "${3:-10}"
