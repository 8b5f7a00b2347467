#!/usr/bin/env bash
# Builds the example plugins of every language into target/example-plugins/:
#
#   python_<name>.wasm       componentize-py (PyPI), in a venv under ~/.cache/sluice
#   javascript_<name>.wasm   componentize-js (npm), under ~/.cache/sluice
#   go_<name>.wasm           KRM functions: the standard Go toolchain, GOOS=wasip1
#                            GOARCH=wasm; modules (kyaml) from the Go module proxy, pinned
#                            by each go.mod/go.sum
#
# Tool versions are pinned below. A component is rebuilt only when its source, the WIT
# package or the tool version changed (a stamp beside it). Prints the output directory on
# its last line.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out="$root/target/example-plugins"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/sluice"
mkdir -p "$out" "$cache"

COMPONENTIZE_PY_VERSION=0.25.1
COMPONENTIZE_JS_VERSION=0.23.0

log() { printf '%s\n' "$*" >&2; }

# The stamp of a build: tool version, WIT package, sources.
stamp() { { echo "$1"; cat "$root"/wit/*.wit; cat "${@:2}"; } | sha256sum | cut -d' ' -f1; }

# build NAME STAMP COMMAND...: runs COMMAND unless $out/NAME.wasm was built from STAMP.
build() {
  local name=$1 want=$2
  shift 2
  if [ -f "$out/$name.wasm" ] && [ "$(cat "$out/$name.stamp" 2>/dev/null)" = "$want" ]; then
    return
  fi
  log "building $name.wasm"
  local started=$SECONDS
  "$@"
  echo "$want" >"$out/$name.stamp"
  log "built $name.wasm in $((SECONDS - started)) s ($(du -h "$out/$name.wasm" | cut -f1))"
}

# Python: componentize-py from PyPI.
py="$cache/componentize-py-$COMPONENTIZE_PY_VERSION"
if [ ! -x "$py/bin/componentize-py" ]; then
  log "installing componentize-py $COMPONENTIZE_PY_VERSION (PyPI)"
  python3 -m venv "$py" >&2
  "$py/bin/pip" install --quiet "componentize-py==$COMPONENTIZE_PY_VERSION" >&2
fi
for dir in "$here"/python/*/; do
  plugin=$(basename "$dir")
  world=transformer
  grep -q "def validate(self" "$dir/app.py" && world=validator
  name="python_${plugin//-/_}"
  build "$name" "$(stamp "py-$COMPONENTIZE_PY_VERSION" "$dir"/*.py)" \
    bash -c "cd '$dir' && '$py/bin/componentize-py' -d '$root/wit' -w $world componentize app -o '$out/$name.wasm' >&2"
done

# JavaScript: componentize-js from npm.
js="$cache/componentize-js-$COMPONENTIZE_JS_VERSION"
if [ ! -f "$js/node_modules/@bytecodealliance/componentize-js/src/cli.js" ]; then
  log "installing componentize-js $COMPONENTIZE_JS_VERSION (npm)"
  mkdir -p "$js"
  (cd "$js" && npm init -y >/dev/null && npm install --silent --no-audit --no-fund \
    "@bytecodealliance/componentize-js@$COMPONENTIZE_JS_VERSION" >&2)
fi
for dir in "$here"/javascript/*/; do
  plugin=$(basename "$dir")
  world=transformer
  grep -q "export function validate(" "$dir/plugin.js" && world=validator
  name="javascript_${plugin//-/_}"
  build "$name" "$(stamp "js-$COMPONENTIZE_JS_VERSION" "$dir"/*.js)" \
    node "$js/node_modules/@bytecodealliance/componentize-js/src/cli.js" \
    --wit "$root/wit" --world-name "$world" -o "$out/$name.wasm" "$dir/plugin.js"
done

# Go: KRM functions (WASI preview 1 commands), with the machine's Go toolchain.
for dir in "$here"/go/*/; do
  plugin=$(basename "$dir")
  name="go_${plugin//-/_}"
  build "$name" "$(stamp "go-$(go env GOVERSION)" "$dir"/*.go "$dir/go.mod" "$dir/go.sum")" \
    bash -c "cd '$dir' && GOOS=wasip1 GOARCH=wasm go build -o '$out/$name.wasm' ."
done

echo "$out"
