#!/usr/bin/env bash
# Smoke test of the static binary (scripts/build-static.sh): it must need nothing from the
# machine, as in a `FROM scratch` image. Checks the ELF headers (no program interpreter, no
# shared libraries), then runs it in an empty root directory (chroot; as root) holding only
# the binary, a CA bundle and the example manifests: --version, generate, render of the
# README demo, plugin inspect of a WebAssembly component (wasmtime compiles it there), and
# with the renderers beside the binary (the image's layout, precompiled when the tests left
# their .cwasm there) a Kustomize overlay and a Helm chart rendered.
#
#   scripts/smoke-static.sh BINARY COMPONENT.wasm RENDERERS_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$1
component=$2
renderers=$3

fail() { echo "static smoke test: $*" >&2; exit 1; }

headers=$(readelf -lW "$bin")
if grep -q "Requesting program interpreter" <<<"$headers"; then
  fail "$bin asks for a program interpreter (dynamically linked)"
fi
if readelf -dW "$bin" | grep -q "(NEEDED)"; then
  fail "$bin needs shared libraries: $(readelf -dW "$bin" | grep NEEDED)"
fi

[ "$(id -u)" = 0 ] || fail "the chroot part needs root (CI runs as root)"
root=$(mktemp -d)
chmod 755 "$root"
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/etc/ssl/certs" "$root/input/nginx" "$root/tmp"
chmod 1777 "$root/tmp"
cp "$bin" "$root/sluice"
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/" 2>/dev/null || true
cp examples/config.yaml "$root/input/config.yaml"
cp examples/nginx/deployment.yaml "$root/input/nginx/"
cp "$component" "$root/input/plugin.wasm"
mkdir -p "$root/renderers"
cp "$renderers"/*.wasm "$root/renderers/"
cp "$renderers"/*.cwasm "$root/renderers/" 2>/dev/null || true
mkdir -p "$root/input/kust/base" "$root/input/kust/prod" "$root/input/chart/templates"
printf 'resources: [cm.yaml]\n' >"$root/input/kust/base/kustomization.yaml"
printf 'apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cm}\n' >"$root/input/kust/base/cm.yaml"
printf 'namePrefix: prod-\nresources: [../base]\n' >"$root/input/kust/prod/kustomization.yaml"
printf 'gitops:\n  manifest_projects:\n  - paths: [{glob: "prod/**"}]\n' >"$root/input/kust.yaml"
printf 'apiVersion: v2\nname: c\nversion: 0.1.0\n' >"$root/input/chart/Chart.yaml"
printf 'apiVersion: v1\nkind: ConfigMap\nmetadata: {name: "{{ .Release.Name }}-cm"}\n' >"$root/input/chart/templates/cm.yaml"

run() { chroot --userspec=65532:65532 "$root" /sluice "$@"; }

version=$(run --version)
[ "$version" = "sluice $(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)" ] || fail "--version printed: $version"
# (Outputs are captured before they are searched: `grep -q` would close the pipe early.)
generated=$(run generate --config-repo https://gitlab.example.com/ops/agents.git --agent-name smoke)
grep -q "^kind: Deployment" <<<"$generated" || fail "generate printed no Deployment"
rendered=$(run render /input/nginx --config /input/config.yaml -o json)
grep -q '"kind": "Deployment"' <<<"$rendered" || fail "render: $rendered"
inspected=$(run plugin inspect /input/plugin.wasm -o json)
grep -q '"world"' <<<"$inspected" || fail "plugin inspect printed: $inspected"
kustomized=$(run render /input/kust --config /input/kust.yaml -o json)
grep -q '"name": "prod-cm"' <<<"$kustomized" || fail "render of a Kustomize overlay: $kustomized"
charted=$(run render /input/chart -o json)
grep -q '"name": "release-name-cm"' <<<"$charted" || fail "render of a Helm chart: $charted"
echo "static smoke test passed: $bin ($(du -h "$bin" | cut -f1)) runs in an empty root as uid 65532" >&2
