#!/usr/bin/env bash
# Builds flux-ssa (fluxssa/: one kustomize-controller reconcile with Flux's apply engine,
# github.com/fluxcd/pkg/ssa, pinned in fluxssa/go.mod and go.sum) from the Go module proxy,
# and caches it per content of fluxssa/ outside the repository. The apply bench compares it
# with sluice. Prints the binary's path on its last line.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
src="$here/fluxssa"
key=$(cat "$src/go.mod" "$src/go.sum" "$src/main.go" | sha256sum | cut -c1-16)
cache=${SLUICE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/sluice}
out="$cache/flux-ssa-$key"
if [ -x "$out/flux-ssa" ]; then
  echo "$out/flux-ssa"
  exit 0
fi
start=$(date +%s)
printf '[flux-ssa %s] building fluxssa/ (fluxcd/pkg/ssa %s)\n' "$(date +%H:%M:%S)" \
  "$(awk '$1 == "github.com/fluxcd/pkg/ssa" {print $2}' "$src/go.mod")" >&2
mkdir -p "$out.partial"
(cd "$src" && CGO_ENABLED=0 go build -mod=readonly -trimpath -ldflags "-s -w" \
  -o "$out.partial/flux-ssa" .) >&2
rm -rf "$out"
mv "$out.partial" "$out"
printf '[flux-ssa %s] done in %s s\n' "$(date +%H:%M:%S)" "$(($(date +%s) - start))" >&2
echo "$out/flux-ssa"
