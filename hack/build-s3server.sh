#!/usr/bin/env bash
# Builds the S3 server the tests run against (hack/s3server: gofakes3 in memory behind a Signature V4 check) into a
# cache keyed by its sources and the Go version, and prints the binary's path. A second run builds nothing.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache_root="${RAGTUNE_CACHE:-$HOME/.cache/ragtune}"

command -v go >/dev/null || { echo "build-s3server: 'go' not found; install Go >= 1.26 and retry" >&2; exit 1; }

key="$(cat "$here/s3server/go.mod" "$here/s3server/go.sum" "$here/s3server/main.go" "$0" \
        | { cat; go env GOVERSION; } | sha256sum | cut -c1-12)"
out="$cache_root/tools/s3server-$key"
if [[ -x "$out/s3server" ]]; then
  echo "$out/s3server"
  exit 0
fi

mkdir -p "$out"
exec 9>"$out.lock"
flock 9
if [[ ! -x "$out/s3server" ]]; then
  echo "build-s3server: building hack/s3server (gofakes3 from the Go module proxy on a cold machine)" >&2
  (cd "$here/s3server" && CGO_ENABLED=0 go build -trimpath -buildvcs=false -ldflags "-s -w" -o "$out/s3server.tmp" .) \
    && mv "$out/s3server.tmp" "$out/s3server"
fi
echo "$out/s3server"
