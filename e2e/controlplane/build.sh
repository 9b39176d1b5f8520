#!/usr/bin/env bash
# Builds the test control plane from the Go modules pinned in this folder's go.mod into a cache
# folder keyed by the go.sum hash, and reuses it: kube-apiserver, kube-controller-manager, etcd and
# the scheduler-plugins scheduler (kube-scheduler with coscheduling).
# Usage: e2e/controlplane/build.sh  -> prints the bin folder.  CONTROLPLANE_CACHE overrides the cache root.
set -euo pipefail
cd "$(dirname "$0")"
K8S_VERSION=v1.34.4   # the k8s.io/kubernetes replace target in go.mod
KEY=$(sha256sum go.mod go.sum cmd/etcd/main.go build.sh | sha256sum | cut -c1-12)
ROOT=${CONTROLPLANE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rlhf-operator/controlplane}
BIN="$ROOT/$K8S_VERSION-$KEY"
if [ -x "$BIN/kube-apiserver" ] && [ -x "$BIN/kube-controller-manager" ] && [ -x "$BIN/etcd" ] \
   && [ -x "$BIN/kube-scheduler" ]; then
  echo "$BIN"; exit 0
fi
export CGO_ENABLED=0 GOFLAGS=-mod=mod
V=k8s.io/component-base/version
MINOR=$(echo "$K8S_VERSION" | cut -d. -f2)
LDFLAGS="-s -w -X $V.gitVersion=$K8S_VERSION -X $V.gitMajor=1 -X $V.gitMinor=$MINOR -X $V.gitTreeState=clean"
LDFLAGS="$LDFLAGS -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION"
TMP="$BIN.tmp.$$"
mkdir -p "$TMP"
trap 'rm -rf "$TMP"' EXIT
build() { go build -trimpath -ldflags "$LDFLAGS" -o "$TMP/$1" "$2" >&2; }
build kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver
build kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager
build kube-scheduler sigs.k8s.io/scheduler-plugins/cmd/scheduler
build etcd ./cmd/etcd
rm -rf "$BIN"; mv "$TMP" "$BIN"; trap - EXIT
echo "$BIN"
