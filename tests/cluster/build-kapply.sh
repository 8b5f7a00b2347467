#!/usr/bin/env bash
# Builds kapply, the reference CLI of sigs.k8s.io/cli-utils (the engine agentk's GitOps
# module ran), from the Go module proxy, and caches it per version outside the repository.
# The takeover tests use it to make state exactly as agentk made it. Prints the binary's
# path on its last line.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
. "$here/versions.env"

cache=${SLUICE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/sluice}
out="$cache/kapply-$CLI_UTILS_VERSION"
if [ -x "$out/kapply" ]; then
  echo "$out/kapply"
  exit 0
fi
start=$(date +%s)
printf '[kapply %s] building sigs.k8s.io/cli-utils/cmd@%s\n' "$(date +%H:%M:%S)" "$CLI_UTILS_VERSION" >&2
mkdir -p "$out.partial"
GOBIN="$out.partial" CGO_ENABLED=0 go install -trimpath -ldflags "-s -w" \
  "sigs.k8s.io/cli-utils/cmd@$CLI_UTILS_VERSION" >&2
mv "$out.partial/cmd" "$out.partial/kapply"
rm -rf "$out"
mv "$out.partial" "$out"
printf '[kapply %s] done in %s s\n' "$(date +%H:%M:%S)" "$(($(date +%s) - start))" >&2
echo "$out/kapply"
