#!/usr/bin/env bash
# Builds the example plugins of every language into target/example-plugins/:
#
#   rust_<name>.wasm         cargo and wit-bindgen (crates.io), target wasm32-wasip2
#   python_<name>.wasm       componentize-py (PyPI), in a venv under ~/.cache/sluice
#   javascript_<name>.wasm   componentize-js (npm), under ~/.cache/sluice
#   go_<name>.wasm           KRM functions: the standard Go toolchain, GOOS=wasip1
#                            GOARCH=wasm; modules (kyaml) from the Go module proxy, pinned
#                            by each go.mod/go.sum
#   c_<name>.wasm            Debian's clang, lld, wasi-libc and wasm32 compiler-rt
#                            (apt-get, when missing and running as root); wit-bindgen's C
#                            generator and wasm-tools from crates.io (cargo install, under
#                            ~/.cache/sluice/tools); WASI preview 1 adapter from the crate
#                            wasi-preview1-component-adapter-provider (crates.io, checksum
#                            pinned)
#
# An example names the contract it is built against by the WIT directory in its source's
# build line (`wit/v0.2` for sluice:plugin@0.2.0, `wit` for 0.1.0); `wit_dir` reads it.
#
# Tool versions are pinned in toolchain.sh, which builds each module. A component is rebuilt only when its source, the WIT
# package or the tool version changed (a stamp beside it). Prints the output directory on
# its last line.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out="$root/target/example-plugins"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/sluice"
mkdir -p "$out" "$cache"

# shellcheck source=toolchain.sh
. "$here/toolchain.sh"

# The stamp of a build: tool version, WIT packages, sources.
stamp() { { echo "$1"; cat "$root"/wit/*.wit "$root"/wit/v0.2/*.wit; cat "${@:2}"; } | sha256sum | cut -d' ' -f1; }

# wit_dir SOURCE: the contract's WIT directory the source is written against.
wit_dir() { if grep -q 'wit/v0.2' "$1"; then echo "$root/wit/v0.2"; else echo "$root/wit"; fi; }

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

# Rust: wit-bindgen alone (the plugins under plugins/ use sluice's SDK instead).
for dir in "$here"/rust/*/; do
  plugin=$(basename "$dir")
  name="rust_${plugin//-/_}"
  build "$name" "$(stamp "rust-$(rustc --version)" "$dir"/src/*.rs "$dir/Cargo.toml" "$dir/Cargo.lock")" \
    rust_component "$dir" "$out/$name.wasm"
done

# Python: componentize-py from PyPI.
for dir in "$here"/python/*/; do
  plugin=$(basename "$dir")
  name="python_${plugin//-/_}"
  build "$name" "$(stamp "py-$COMPONENTIZE_PY_VERSION" "$dir"/*.py)" \
    python_component "$dir" "$(wit_dir "$dir/app.py")" "$(world_of "$dir/app.py")" "$out/$name.wasm"
done

# JavaScript: componentize-js from npm.
for dir in "$here"/javascript/*/; do
  plugin=$(basename "$dir")
  name="javascript_${plugin//-/_}"
  build "$name" "$(stamp "js-$COMPONENTIZE_JS_VERSION" "$dir"/*.js)" \
    javascript_component "$dir/plugin.js" "$(wit_dir "$dir/plugin.js")" "$(world_of "$dir/plugin.js")" "$out/$name.wasm"
done

# Go: KRM functions (WASI preview 1 commands), with the machine's Go toolchain.
for dir in "$here"/go/*/; do
  plugin=$(basename "$dir")
  name="go_${plugin//-/_}"
  build "$name" "$(stamp "go-$(go env GOVERSION)" "$dir"/*.go "$dir/go.mod" "$dir/go.sum")" \
    go_function "$dir" "$out/$name.wasm"
done

# C: clang for wasm32-wasi, bindings from wit-bindgen, a component from wasm-tools.
for dir in "$here"/c/*/; do
  plugin=$(basename "$dir")
  [ "$plugin" = common ] && continue
  name="c_${plugin//-/_}"
  build "$name" "$(stamp "c-$WIT_BINDGEN_VERSION-$WASM_TOOLS_VERSION-$ADAPTER_VERSION-$(clang --version | head -1)" \
    "$dir"/*.c "$here"/c/common/* "$here/toolchain.sh")" \
    c_component "$dir" "$(wit_dir "$dir/plugin.c")" "$(world_of "$dir/plugin.c")" "$out/$name.wasm" "$here/c/common"
done

echo "$out"
