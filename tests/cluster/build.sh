#!/usr/bin/env bash
# Builds the test control plane (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl, kwok) from the Go module proxy and caches the binaries
# per version outside the repository. Prints the binary directory on its last line.
#
# Why a wrapper module: k8s.io/kubernetes's go.mod requires its staging modules at
# v0.0.0 and replaces them with local paths, which `go install pkg@version` refuses.
# A throw-away module requiring k8s.io/kubernetes and replacing every staging module
# with its published v0.X.Y builds the same commands.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
. "$here/versions.env"

cache=${SLUICE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/sluice}
out="$cache/control-plane/k8s-v$K8S_VERSION-kwok-$KWOK_VERSION"
bins=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok)

cached=1
for b in "${bins[@]}"; do [ -x "$out/$b" ] || cached=0; done
if [ "$cached" = 1 ] && [ -s "$out/kwok-stages.yaml" ]; then
  echo "$out"
  exit 0
fi

log() { printf '[control-plane %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
start=$(date +%s)
staging="v0.${K8S_VERSION#1.}"
minor=$(echo "$K8S_VERSION" | cut -d. -f2)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out.partial"

log "building Kubernetes v$K8S_VERSION (staging $staging), kwok $KWOK_VERSION into $out"
log "step 1/5: reading k8s.io/kubernetes@v$K8S_VERSION go.mod from the module proxy"
mkdir "$work/probe" && cd "$work/probe"
kmod=$(go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
[ -s "$kmod" ] || { log "error: could not download k8s.io/kubernetes@v$K8S_VERSION"; exit 1; }
goline=$(sed -n 's/^go \([0-9.]*\)$/\1/p' "$kmod" | head -1)

mkdir "$work/cp" && cd "$work/cp"
printf 'module sluice.test/controlplane\n\ngo %s\n' "${goline:-1.26.0}" > go.mod
cat > tools.go <<'GO'
//go:build tools

package tools

import (
	_ "go.etcd.io/etcd/server/v3"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
n=0
for m in $(sed -n 's#^[[:space:]]*\(k8s\.io/[A-Za-z0-9._-]*\) => \./staging/.*#\1#p' "$kmod"); do
  go mod edit -replace="$m=$m@$staging"
  n=$((n + 1))
done
log "step 2/5: resolving modules ($n staging modules replaced with $staging)"
go get "k8s.io/kubernetes@v$K8S_VERSION" >&2
go mod tidy >&2

ldf="-s -w"
for kv in "gitVersion=v$K8S_VERSION" gitMajor=1 "gitMinor=$minor" gitTreeState=clean \
  "buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"; do
  ldf="$ldf -X k8s.io/component-base/version.$kv -X k8s.io/client-go/pkg/version.$kv"
done
for cmd in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
  log "step 3/5: go build $cmd (the first one is the slow one)"
  CGO_ENABLED=0 go build -trimpath -ldflags "$ldf" -o "$out.partial/$cmd" "k8s.io/kubernetes/cmd/$cmd"
done
log "step 4/5: go build etcd"
CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$out.partial/etcd" go.etcd.io/etcd/server/v3

log "step 5/5: go install kwok $KWOK_VERSION and its stage files"
GOBIN="$out.partial" CGO_ENABLED=0 go install "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
stages="$(go env GOMODCACHE)/sigs.k8s.io/kwok@$KWOK_VERSION/kustomize/stage"
for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
  pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
  echo '---'
  cat "$stages/$f"
done > "$out.partial/kwok-stages.yaml"

"$out.partial/kube-apiserver" --version >&2
"$out.partial/etcd" --version >&2 | head -1
rm -rf "$out"
mv "$out.partial" "$out"
log "done in $(($(date +%s) - start)) s"
echo "$out"
