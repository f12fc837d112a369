#!/usr/bin/env bash
# Builds what the offline kind node image needs from Go modules into a cache directory keyed by every pin, and prints
# that directory: kubelet, kubeadm, kube-proxy (hack/kind/node), crictl, coredns, the kind CLI and a pause program.
# The control-plane binaries come from hack/build-k8s.sh (same Kubernetes version).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
k8s_version="v1.34.4"
kind_version="v0.30.0"
crictl_version="v1.34.0"
coredns_version="v1.12.1"
cache_root="${RAGTUNE_CACHE:-$HOME/.cache/ragtune}"

command -v go >/dev/null || { echo "build-kind-bins: 'go' not found; install Go >= 1.24 and retry" >&2; exit 1; }

key="$(cat "$here/node/go.mod" "$here/node/go.sum" "$here/pause/main.go" "$0" \
        | { cat; echo "$kind_version $crictl_version $coredns_version $(go env GOVERSION)"; } | sha256sum | cut -c1-12)"
out="$cache_root/kind/bins-$k8s_version-$key"
binaries=(kubelet kubeadm kube-proxy crictl coredns kind pause)

all_present() {
  local b
  for b in "${binaries[@]}"; do [[ -x "$out/$b" ]] || return 1; done
}

if all_present; then
  echo "$out"
  exit 0
fi

mkdir -p "$out"
log() { echo "build-kind-bins: $*" >&2; }
start=$(date +%s)

minor="${k8s_version#v1.}"; minor="${minor%%.*}"
build_date="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
stamp=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  stamp+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  stamp+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$build_date -X $pkg.gitCommit=0000000000000000000000000000000000000000"
done

export CGO_ENABLED=0
for cmd in kubelet kubeadm kube-proxy; do
  if [[ ! -x "$out/$cmd" ]]; then
    log "building $cmd $k8s_version (cold builds take several minutes on 2 cores)"
    (cd "$here/node" && go build -trimpath -tags selinux,notest -ldflags "-s -w $stamp" \
        -o "$out/$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd") && mv "$out/$cmd.tmp" "$out/$cmd"
  fi
done

install_tool() {  # name package@version
  [[ -x "$out/$1" ]] && return 0
  log "building $1 (${2##*@})"
  local tmp="$out/.gobin-$1"
  mkdir -p "$tmp"
  GOBIN="$tmp" GOFLAGS=-trimpath go install -ldflags "-s -w" "$2"
  mv "$tmp/$(basename "${2%@*}")" "$out/$1"
  rmdir "$tmp"
}
install_tool crictl "sigs.k8s.io/cri-tools/cmd/crictl@$crictl_version"
install_tool kind "sigs.k8s.io/kind@$kind_version"
install_tool coredns "github.com/coredns/coredns@$coredns_version"

if [[ ! -x "$out/pause" ]]; then
  log "building pause"
  (cd "$here/pause" && go build -trimpath -ldflags "-s -w" -o "$out/pause.tmp" .) && mv "$out/pause.tmp" "$out/pause"
fi

log "built in $(( $(date +%s) - start ))s into $out"
echo "$out"
