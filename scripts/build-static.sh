#!/usr/bin/env bash
# Builds sluice as one static binary (x86_64-unknown-linux-musl, static-pie): no libc, no
# loader, no files needed at run time, so the container image can be `FROM scratch`.
#
#   scripts/build-static.sh            # release build (for images)
#   scripts/build-static.sh --debug    # debug build (what the tests smoke-test: faster)
#
# Needs musl-gcc (Debian's musl-tools) for the C parts of the dependencies (ring, aws-lc,
# zstd, wasmtime's helpers); it is installed with apt-get when missing and this runs as
# root. Prints the binary's path on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."

target=x86_64-unknown-linux-musl
profile=release
if [ "${1:-}" = "--debug" ]; then profile=debug; fi

if ! command -v musl-gcc >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing musl-tools (Debian) for musl-gcc" >&2
    apt-get install -y musl-tools >&2 || { apt-get update >&2 && apt-get install -y musl-tools >&2; }
  else
    echo "error: musl-gcc is required (Debian/Ubuntu: apt-get install musl-tools)" >&2
    exit 1
  fi
fi
rustup target add "$target" >&2

args=(build -p sluice --bin sluice --target "$target")
if [ "$profile" = release ]; then args+=(--release); fi
cargo "${args[@]}" >&2
echo "$PWD/target/$target/$profile/sluice"
