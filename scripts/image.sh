#!/usr/bin/env bash
# Builds the container image from the static binary (see Dockerfile):
#
#   scripts/image.sh registry.example.com/sluice:0.1.0
#
# With no container engine on the machine, prints the build context and the command to run
# where there is one.
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${1:-sluice:$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)}
bin=$(scripts/build-static.sh | tail -1)
ctx=target/image
rm -rf "$ctx" && mkdir -p "$ctx"
cp "$bin" "$ctx/sluice"
cp /etc/ssl/certs/ca-certificates.crt "$ctx/"
cp Dockerfile "$ctx/"
# The renderers, compiled ahead of time for this engine: an agent maps them instead of
# compiling (the modules stay, for a machine the precompiled code does not fit).
renderers/build.sh "$ctx/renderers" >/dev/null
"$bin" renderers compile --dir "$ctx/renderers"
if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
  docker build -t "$tag" "$ctx"
elif command -v podman >/dev/null; then
  podman build -t "$tag" "$ctx"
else
  echo "no container engine here; the build context is $ctx. Where there is one:" >&2
  echo "  docker build -t $tag $ctx" >&2
fi
