#!/usr/bin/env bash
# Builds the pinned KubeRay operator from the Go module github.com/ray-project/kuberay/ray-operator (no registry
# needed, only the Go module proxy): the operator binary, the module's own CRDs (RayCluster, RayJob, RayService) and
# an image FROM scratch with the binary at /manager, all in a cache directory keyed by this script, the pin and the
# Go version. Prints one line of JSON on stdout: {"bin": ..., "crds": <dir>, "image": <name>}.
# A second run with the same pins builds nothing.
#   KUBERAY_IMAGE=0   skip the image ("image": null), e.g. to run the binary out of cluster where no engine runs
# The module's go.mod has no replace directives, so `go install module@version` builds it exactly as pinned upstream
# (its own go.sum, checked against the checksum database); no wrapper module is needed.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
kuberay_version="v1.5.0"
module="github.com/ray-project/kuberay/ray-operator"
cache_root="${RAGTUNE_CACHE:-$HOME/.cache/ragtune}"
want_image="${KUBERAY_IMAGE:-1}"

log() { echo "build-kuberay: $*" >&2; }
die() { log "$*"; exit 1; }
command -v go >/dev/null || die "'go' not found; install Go >= 1.24 and retry"

key="$(cat "$here/build.sh" | { cat; echo "$module $kuberay_version $(go env GOVERSION)"; } | sha256sum | cut -c1-12)"
out="$cache_root/kuberay/$kuberay_version-$key"
bin="$out/manager"
crds="$out/crds"
crd_files=(ray.io_rayclusters.yaml ray.io_rayjobs.yaml ray.io_rayservices.yaml)
image="ragtune.local/kuberay-operator:$kuberay_version-$key"

json_str() { local s="${1//\\/\\\\}"; printf '"%s"' "${s//\"/\\\"}"; }
emit() {
  local img=null
  [[ "$want_image" == 0 ]] || img="$(json_str "$image")"
  printf '{"bin": %s, "crds": %s, "image": %s}\n' "$(json_str "$bin")" "$(json_str "$crds")" "$img"
}

files_present() {
  local f
  [[ -x "$bin" ]] || return 1
  for f in "${crd_files[@]}"; do [[ -s "$crds/$f" ]] || return 1; done
}
image_present() { [[ "$want_image" == 0 ]] || docker image inspect "$image" >/dev/null 2>&1; }

if files_present && image_present; then
  emit
  exit 0
fi

mkdir -p "$out"
start=$(date +%s)

if [[ ! -x "$bin" ]]; then
  log "building kuberay-operator $kuberay_version (a cold build takes a few minutes on 2 cores)"
  tmp="$out/.gobin"
  rm -rf "$tmp" && mkdir -p "$tmp"
  # The main package is the module root (main.go); go install names the binary after the last path element.
  (cd "$out" && GOBIN="$tmp" CGO_ENABLED=0 GOFLAGS=-trimpath go install -ldflags "-s -w" "$module@$kuberay_version")
  mv "$tmp/ray-operator" "$bin"
  rmdir "$tmp"
fi

if ! files_present; then
  log "copying the CRDs of $module@$kuberay_version"
  dir="$(cd "$out" && go mod download -json "$module@$kuberay_version" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')"
  [[ -n "$dir" && -d "$dir/config/crd/bases" ]] || die "no config/crd/bases in $module@$kuberay_version ($dir)"
  rm -rf "$crds.tmp" && mkdir -p "$crds.tmp"
  for f in "${crd_files[@]}"; do
    [[ -s "$dir/config/crd/bases/$f" ]] || die "$module@$kuberay_version has no config/crd/bases/$f"
    install -m 0644 "$dir/config/crd/bases/$f" "$crds.tmp/$f"   # the module cache is read-only
  done
  rm -rf "$crds" && mv "$crds.tmp" "$crds"
fi

if ! image_present; then
  docker info >/dev/null 2>&1 || die "no Docker engine answers (run: bash hack/docker/engine.sh up, or set KUBERAY_IMAGE=0)"
  log "building $image"
  ctx="$(mktemp -d "$out/.image.XXXXXX")"
  trap 'rm -rf "$ctx"' EXIT
  ln "$bin" "$ctx/manager" 2>/dev/null || cp "$bin" "$ctx/manager"
  cat >"$ctx/Dockerfile" <<EOF
FROM scratch
COPY manager /manager
USER 65532:65532
LABEL org.opencontainers.image.source="https://github.com/ray-project/kuberay" \\
      org.opencontainers.image.version="$kuberay_version" \\
      org.opencontainers.image.title="kuberay-operator" \\
      dev.ragtune.cache-key="$key"
ENTRYPOINT ["/manager"]
EOF
  DOCKER_BUILDKIT=0 docker build -q -t "$image" "$ctx" >/dev/null 2>"$ctx/log" \
    || { tail -30 "$ctx/log" >&2; die "building $image failed"; }
fi

log "built in $(( $(date +%s) - start ))s into $out"
emit
