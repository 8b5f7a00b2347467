#!/usr/bin/env bash
# Builds a native reference CLI from the Go module proxy at the version versions.env pins and
# caches it per version outside the repository: `kustomize` and `helm`, whose output the
# renderer tests compare sluice's with, `sops`, which encrypts the fixtures sluice
# decrypts, `registry` (CNCF distribution), which the OCI tests push to, and `fluxpush`,
# `flux push artifact`'s push path (tests/tools/fluxpush), which pushes artifacts as GitLab's
# CI tutorial does, `cosign`, which signs them, and `opa`, which compiles policies to
# WebAssembly and evaluates them natively, and `gator`, Gatekeeper's CLI, whose `gator verify`
# verdicts on Suite files the Gatekeeper plugin's are compared with. Usage: build-cli.sh
# kustomize|helm|sops|registry|fluxpush|cosign|opa|gator. Prints the binary's path on its
# last line.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
. "$here/versions.env"

case "${1:-}" in
  kustomize) version=$KUSTOMIZE_VERSION pkg="sigs.k8s.io/kustomize/kustomize/v5@$KUSTOMIZE_VERSION" bin=kustomize ;;
  helm) version=$HELM_VERSION pkg="helm.sh/helm/v4/cmd/helm@$HELM_VERSION" bin=helm ;;
  sops) version=$SOPS_VERSION pkg="github.com/getsops/sops/v3/cmd/sops@$SOPS_VERSION" bin=sops ;;
  opa) version=$OPA_VERSION pkg="github.com/open-policy-agent/opa@$OPA_VERSION" bin=opa ;;
  gator) version=$GATEKEEPER_VERSION pkg="github.com/open-policy-agent/gatekeeper/v3/cmd/gator@$GATEKEEPER_VERSION" bin=gator ;;
  cosign) version=$COSIGN_VERSION pkg="github.com/sigstore/cosign/v3/cmd/cosign@$COSIGN_VERSION" bin=cosign ;;
  registry) version=$DISTRIBUTION_VERSION pkg="github.com/distribution/distribution/v3/cmd/registry@$DISTRIBUTION_VERSION" bin=registry ;;
  # The flux CLI embeds manifests its Makefile generates, so it cannot be built from the
  # module proxy: tests/tools/fluxpush runs its push path (go.sum pins every dependency).
  fluxpush) version=$FLUX_OCI_VERSION-$(cat "$here/../tools/fluxpush/main.go" "$here/../tools/fluxpush/go.sum" | sha256sum | cut -c1-12) pkg=. bin=fluxpush ;;
  *) echo "usage: $0 kustomize|helm|sops|registry|fluxpush|cosign|opa|gator" >&2; exit 2 ;;
esac
cache=${SLUICE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/sluice}
out="$cache/$1-$version"
if [ -x "$out/$1" ]; then
  echo "$out/$1"
  exit 0
fi
start=$(date +%s)
printf '[%s %s] building %s\n' "$1" "$(date +%H:%M:%S)" "$pkg" >&2
rm -rf "$out.partial" && mkdir -p "$out.partial"
if [ "$1" = fluxpush ]; then
  grep -q "github.com/fluxcd/pkg/oci $FLUX_OCI_VERSION" "$here/../tools/fluxpush/go.mod" \
    || { echo "tests/tools/fluxpush/go.mod does not pin fluxcd/pkg/oci $FLUX_OCI_VERSION" >&2; exit 1; }
  (cd "$here/../tools/fluxpush" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$out.partial/fluxpush" "$pkg") >&2
else
  GOBIN="$out.partial" CGO_ENABLED=0 go install -trimpath -ldflags "-s -w" "$pkg" >&2
fi
if [ "$bin" != "$1" ]; then mv "$out.partial/$bin" "$out.partial/$1"; fi
rm -rf "$out"
mv "$out.partial" "$out"
printf '[%s %s] done in %s s\n' "$1" "$(date +%H:%M:%S)" "$(($(date +%s) - start))" >&2
echo "$out/$1"
