#!/usr/bin/env bash
# Builds helm from its Go module into a version-keyed cache and prints the binary's path (once per version).
set -euo pipefail
version="v3.19.0"
cache_root="${RAGTUNE_CACHE:-$HOME/.cache/ragtune}"
out="$cache_root/tools/helm-$version"
if [[ -x "$out/helm" ]]; then
  echo "$out/helm"
  exit 0
fi
command -v go >/dev/null || { echo "build-helm: 'go' not found; install Go >= 1.24 and retry" >&2; exit 1; }
mkdir -p "$out"
exec 9>"$out.lock"
flock 9
if [[ ! -x "$out/helm" ]]; then
  echo "build-helm: building helm $version (a few minutes on a cold machine)" >&2
  GOBIN="$out" CGO_ENABLED=0 go install -trimpath \
    -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$version" "helm.sh/helm/v3/cmd/helm@$version"
fi
echo "$out/helm"
