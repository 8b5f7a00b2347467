# shellcheck shell=bash
# The toolchains sluice plugins are built with, pinned, installed from the package
# registries on first use and cached under ~/.cache/sluice. Sourced by
# examples/plugins/build.sh and by the build.sh of every project `sluice plugin new` writes
# (which carries a copy of this file). Each function builds one module:
#
#   rust_component DIR OUT                  cargo, target wasm32-wasip2 (rustup adds it)
#   python_component DIR WIT WORLD OUT      componentize-py (PyPI), DIR/app.py
#   javascript_component FILE WIT WORLD OUT componentize-js (npm)
#   c_component DIR WIT WORLD OUT [INCLUDE] Debian's clang, lld, wasi-libc and wasm32
#                                           compiler-rt; wit-bindgen's C generator and
#                                           wasm-tools (crates.io); the WASI preview 1
#                                           adapter (crates.io, checksum pinned)
#   go_function DIR OUT                     a KRM function: Go, GOOS=wasip1 GOARCH=wasm
#
# WIT is the contract's directory (wit/v0.2 for sluice:plugin@0.2.0); WORLD is validator
# or transformer.

COMPONENTIZE_PY_VERSION=0.25.1
COMPONENTIZE_JS_VERSION=0.23.0
WIT_BINDGEN_VERSION=0.57.1
WASM_TOOLS_VERSION=1.254.2
# The adapter of the wasmtime release the host is built on (wasmtime 48).
ADAPTER_VERSION=48.0.8
ADAPTER_SHA256=d3a1674fffec103c1d4367d4417a3bd5423cde3cfd56ff3b326b5fc72c0a8ebd

toolchain_cache="${XDG_CACHE_HOME:-$HOME/.cache}/sluice"

log() { printf '%s\n' "$*" >&2; }

rust_component() { # DIR OUT
  rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2 ||
    rustup target add wasm32-wasip2 >&2
  (cd "$1" && cargo build --quiet --locked --release --target wasm32-wasip2 >&2)
  local crate target
  crate=$(sed -n 's/^name = "\(.*\)"/\1/p' "$1/Cargo.toml" | head -1)
  target=$(cd "$1" && cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
  cp "$target/wasm32-wasip2/release/${crate//-/_}.wasm" "$2"
}

python_component() { # DIR WIT WORLD OUT
  local py="$toolchain_cache/componentize-py-$COMPONENTIZE_PY_VERSION"
  if [ ! -x "$py/bin/componentize-py" ]; then
    log "installing componentize-py $COMPONENTIZE_PY_VERSION (PyPI)"
    python3 -m venv "$py" >&2
    "$py/bin/pip" install --quiet "componentize-py==$COMPONENTIZE_PY_VERSION" >&2
  fi
  (cd "$1" && "$py/bin/componentize-py" -d "$2" -w "$3" componentize app -o "$4" >&2)
}

javascript_component() { # FILE WIT WORLD OUT
  local js="$toolchain_cache/componentize-js-$COMPONENTIZE_JS_VERSION"
  if [ ! -f "$js/node_modules/@bytecodealliance/componentize-js/src/cli.js" ]; then
    log "installing componentize-js $COMPONENTIZE_JS_VERSION (npm)"
    mkdir -p "$js"
    (cd "$js" && npm init -y >/dev/null && npm install --silent --no-audit --no-fund \
      "@bytecodealliance/componentize-js@$COMPONENTIZE_JS_VERSION" >&2)
  fi
  node "$js/node_modules/@bytecodealliance/componentize-js/src/cli.js" \
    --wit "$2" --world-name "$3" -o "$4" "$1" >&2
}

go_function() { # DIR OUT
  (cd "$1" && GOOS=wasip1 GOARCH=wasm go build -o "$2" .)
}

# cargo_tool CRATE VERSION BINARY [FEATURES]: installs a pinned crates.io tool once.
cargo_tool() {
  local dir="$toolchain_cache/tools/$1-$2"
  if [ ! -x "$dir/bin/$3" ]; then
    log "installing $1 $2 (crates.io)"
    cargo install --quiet --locked --root "$dir" "$1@$2" --no-default-features --features "$4" >&2
  fi
  echo "$dir/bin/$3"
}

c_tools() { # installs what c_component needs, once
  if ! command -v clang >/dev/null || [ ! -f /usr/lib/wasm32-wasi/libc.a ] ||
    ! ls /usr/lib/llvm-*/lib/clang/*/lib/wasi/libclang_rt.builtins-wasm32.a >/dev/null 2>&1; then
    local packages="clang lld wasi-libc libclang-rt-dev-wasm32"
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      log "installing $packages (Debian)"
      # shellcheck disable=SC2086 # a list of packages
      apt-get install -y --no-install-recommends $packages >&2 ||
        { apt-get update >&2 && apt-get install -y --no-install-recommends $packages >&2; }
    else
      log "error: C plugins need $packages (Debian/Ubuntu: apt-get install $packages)"
      return 1
    fi
  fi
  wit_bindgen=$(cargo_tool wit-bindgen-cli "$WIT_BINDGEN_VERSION" wit-bindgen c)
  wasm_tools=$(cargo_tool wasm-tools "$WASM_TOOLS_VERSION" wasm-tools component)
  adapter="$toolchain_cache/tools/wasi_snapshot_preview1.reactor-$ADAPTER_VERSION.wasm"
  if [ ! -f "$adapter" ]; then
    log "fetching the WASI preview 1 adapter $ADAPTER_VERSION (crates.io)"
    local crate
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
}

c_component() { # DIR WIT WORLD OUT [INCLUDE]: DIR's *.c (and INCLUDE's) into OUT
  c_tools
  local gen
  gen=$(mktemp -d)
  "$wit_bindgen" c "$2" --world "$3" --out-dir "$gen" >/dev/null
  local sources=("$1"/*.c)
  local include=()
  if [ -n "${5:-}" ]; then
    sources+=("$5"/*.c)
    include=(-I "$5")
  fi
  clang --target=wasm32-wasi -mexec-model=reactor -O2 -Wall -Wextra -Werror \
    -Wl,-z,stack-size=1048576 "${include[@]}" -I "$gen" -o "$gen/core.wasm" \
    "${sources[@]}" "$gen/$3.c" "$gen/$3_component_type.o"
  "$wasm_tools" component new "$gen/core.wasm" --adapt "$adapter" -o "$4"
  rm -rf "$gen"
}

# The world a source exports (a validator defines validate).
world_of() {
  if grep -qE 'def validate\(self|export function validate\(|exports_validator_validate\(|fn validate\(' "$1"; then
    echo validator
  else
    echo transformer
  fi
}
