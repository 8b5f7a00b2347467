#!/usr/bin/env bash
# Builds sluice's renderers (Kustomize, Helm: the Go libraries compiled with GOOS=wasip1 as
# reactors, -buildmode=c-shared: sluice starts one once and calls it per render)
# from the Go module proxy, pinned by each renderer's go.sum, and caches each module under
# ~/.cache/sluice/renderers keyed by the SHA-256 of its sources and the Go version. Copies
# them into the directory given (default target/renderers) and prints that directory on its
# last line: point SLUICE_RENDERERS_DIR at it, or put it beside the sluice binary as
# `renderers/` (the container image's layout).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/../target/renderers}
cache=${SLUICE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/sluice}/renderers
mkdir -p "$out" "$cache"
goversion=$(go env GOVERSION)
for name in kustomize helm; do
  src="$here/$name"
  key=$( (cd "$src" && cat go.mod go.sum main.go; echo "$goversion") | sha256sum | cut -c1-16)
  module="$cache/$name-$key.wasm"
  if [ ! -f "$module" ]; then
    start=$(date +%s)
    printf '[renderers %s] building %s (%s)\n' "$(date +%H:%M:%S)" "$name" "$goversion" >&2
    (cd "$src" && GOOS=wasip1 GOARCH=wasm CGO_ENABLED=0 go build -buildmode=c-shared -trimpath -ldflags "-s -w" -o "$module.partial" .)
    mv "$module.partial" "$module"
    printf '[renderers %s] %s done in %s s (%s bytes)\n' "$(date +%H:%M:%S)" "$name" "$(($(date +%s) - start))" "$(stat -c %s "$module")" >&2
  fi
  # Copied only when it changed: a precompiled <name>.cwasm beside it stays valid while it
  # is newer than the module.
  if ! cmp -s "$module" "$out/$name.wasm"; then
    cp "$module" "$out/$name.wasm.partial"
    mv "$out/$name.wasm.partial" "$out/$name.wasm"
  fi
done
cd "$out" && pwd
