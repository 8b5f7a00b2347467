#!/usr/bin/env bash
# Builds the example plugins of every language into target/example-plugins/:
#
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
WIT_BINDGEN_VERSION=0.57.1
WASM_TOOLS_VERSION=1.254.2
# The adapter of the wasmtime release the host is built on (wasmtime 48).
ADAPTER_VERSION=48.0.8
ADAPTER_SHA256=d3a1674fffec103c1d4367d4417a3bd5423cde3cfd56ff3b326b5fc72c0a8ebd

log() { printf '%s\n' "$*" >&2; }

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
    bash -c "cd '$dir' && '$py/bin/componentize-py' -d '$(wit_dir "$dir/app.py")' -w $world componentize app -o '$out/$name.wasm' >&2"
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
    --wit "$(wit_dir "$dir/plugin.js")" --world-name "$world" -o "$out/$name.wasm" "$dir/plugin.js"
done

# Go: KRM functions (WASI preview 1 commands), with the machine's Go toolchain.
for dir in "$here"/go/*/; do
  plugin=$(basename "$dir")
  name="go_${plugin//-/_}"
  build "$name" "$(stamp "go-$(go env GOVERSION)" "$dir"/*.go "$dir/go.mod" "$dir/go.sum")" \
    bash -c "cd '$dir' && GOOS=wasip1 GOARCH=wasm go build -o '$out/$name.wasm' ."
done

# C: clang for wasm32-wasi, bindings from wit-bindgen, a component from wasm-tools.
if ! command -v clang >/dev/null || [ ! -f /usr/lib/wasm32-wasi/libc.a ] ||
  ! ls /usr/lib/llvm-*/lib/clang/*/lib/wasi/libclang_rt.builtins-wasm32.a >/dev/null 2>&1; then
  packages="clang lld wasi-libc libclang-rt-dev-wasm32"
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing $packages (Debian)"
    # shellcheck disable=SC2086 # a list of packages
    apt-get install -y --no-install-recommends $packages >&2 ||
      { apt-get update >&2 && apt-get install -y --no-install-recommends $packages >&2; }
  else
    log "error: the C plugins need $packages (Debian/Ubuntu: apt-get install $packages)"
    exit 1
  fi
fi
# cargo_tool CRATE VERSION BINARY [FEATURES]: installs a pinned crates.io tool once.
cargo_tool() {
  local dir="$cache/tools/$1-$2"
  if [ ! -x "$dir/bin/$3" ]; then
    log "installing $1 $2 (crates.io)"
    cargo install --quiet --locked --root "$dir" "$1@$2" --no-default-features --features "$4" >&2
  fi
  echo "$dir/bin/$3"
}
wit_bindgen=$(cargo_tool wit-bindgen-cli "$WIT_BINDGEN_VERSION" wit-bindgen c)
wasm_tools=$(cargo_tool wasm-tools "$WASM_TOOLS_VERSION" wasm-tools component)
adapter="$cache/tools/wasi_snapshot_preview1.reactor-$ADAPTER_VERSION.wasm"
if [ ! -f "$adapter" ]; then
  log "fetching the WASI preview 1 adapter $ADAPTER_VERSION (crates.io)"
  crate=$(mktemp)
  curl -sSfL --max-time 120 -o "$crate" \
    "https://static.crates.io/crates/wasi-preview1-component-adapter-provider/wasi-preview1-component-adapter-provider-$ADAPTER_VERSION.crate"
  echo "$ADAPTER_SHA256  $crate" | sha256sum -c --quiet >&2
  tar -xzOf "$crate" \
    "wasi-preview1-component-adapter-provider-$ADAPTER_VERSION/artefacts/wasi_snapshot_preview1.reactor.wasm" \
    >"$adapter.part"
  mv "$adapter.part" "$adapter"
  rm -f "$crate"
fi
build_c() { # build_c DIR WORLD NAME
  local gen="$out/c-bindings/$3"
  rm -rf "$gen" && mkdir -p "$gen"
  "$wit_bindgen" c "$(wit_dir "$1/plugin.c")" --world "$2" --out-dir "$gen" >/dev/null
  clang --target=wasm32-wasi -mexec-model=reactor -O2 -Wall -Wextra -Werror \
    -Wl,-z,stack-size=1048576 -I "$here/c/common" -I "$gen" -o "$gen/core.wasm" \
    "$1/plugin.c" "$here/c/common/json.c" "$gen/$2.c" "$gen/$2_component_type.o"
  "$wasm_tools" component new "$gen/core.wasm" --adapt "$adapter" -o "$out/$3.wasm"
}
for dir in "$here"/c/*/; do
  plugin=$(basename "$dir")
  [ "$plugin" = common ] && continue
  world=transformer
  grep -q "exports_validator_validate(" "$dir/plugin.c" && world=validator
  name="c_${plugin//-/_}"
  build "$name" "$(stamp "c-$WIT_BINDGEN_VERSION-$WASM_TOOLS_VERSION-$ADAPTER_VERSION-$(clang --version | head -1)" \
    "$dir"/*.c "$here"/c/common/* "$here/build.sh")" build_c "$dir" "$world" "$name"
done

echo "$out"
