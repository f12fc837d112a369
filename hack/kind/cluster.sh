#!/usr/bin/env bash
# A kind cluster with real pods, built and run without any registry.
#   cluster.sh up          Docker engine (hack/docker/engine.sh), node image (node-image.sh, cached), cluster
#   cluster.sh down        delete the cluster, the shared data directory, and the engine if engine.sh started it
#   cluster.sh kubeconfig  print the cluster's kubeconfig (API server on 127.0.0.1)
#   cluster.sh load IMAGE… load local images into the node's containerd
# RAGTUNE_KIND_NODE_IMAGE uses another node image (e.g. kindest/node:v1.34.0 where a registry is reachable).
# The node mounts $RAGTUNE_KIND_DATA (default /tmp/ragtune-kind/data) at /ragtune-data for hostPath volumes.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
name="${RAGTUNE_KIND_CLUSTER:-ragtune}"
state="${RAGTUNE_KIND_STATE:-/tmp/ragtune-kind}"
data="${RAGTUNE_KIND_DATA:-$state/data}"
api_port="${RAGTUNE_KIND_API_PORT:-36643}"
log() { echo "kind: $*" >&2; }
die() { log "$*"; exit 1; }

kind_bin() { echo "$(bash "$here/build-bins.sh")/kind"; }
exists() { "$(kind_bin)" get clusters 2>/dev/null | grep -qx "$name"; }
node() { echo "$name-control-plane"; }

up() {
  bash "$repo/hack/docker/engine.sh" up
  local kind image
  kind="$(kind_bin)"
  image="${RAGTUNE_KIND_NODE_IMAGE:-}"
  if [[ -z "$image" ]]; then
    log "node image (built once and cached; a cold build takes several minutes)"
    image="$(bash "$here/node-image.sh")"
  fi
  mkdir -p "$state" "$data"
  chmod 0777 "$data"
  if exists; then
    if [[ "$(docker inspect -f '{{.Config.Image}}' "$(node)" 2>/dev/null)" == "$image" ]]; then
      log "cluster $name is up ($image)"
      kubeconfig >"$state/kubeconfig"
      return 0
    fi
    log "cluster $name runs another node image; recreating it"
    "$kind" delete cluster --name "$name" >&2
  fi
  cat >"$state/cluster.yaml" <<YAML
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
networking:
  apiServerAddress: 127.0.0.1
  apiServerPort: $api_port
  podSubnet: 10.244.0.0/16
nodes:
  - role: control-plane
    extraMounts:
      - hostPath: $data
        containerPath: /ragtune-data
YAML
  log "creating cluster $name from $image"
  "$kind" create cluster --name "$name" --image "$image" --config "$state/cluster.yaml" \
      --kubeconfig "$state/kubeconfig" --wait 120s >&2 \
    || { docker logs "$(node)" 2>&1 | tail -30 >&2 || true; die "kind create cluster failed"; }
  log "cluster $name is up; kubeconfig: $state/kubeconfig"
}

kubeconfig() {
  exists || die "no cluster $name; run: make kind-up"
  "$(kind_bin)" get kubeconfig --name "$name"
}

load() {
  exists || die "no cluster $name; run: make kind-up"
  [[ $# -gt 0 ]] || die "usage: cluster.sh load IMAGE..."
  log "loading $* into $(node)"
  # one archive holds the layers the images share once
  docker save "$@" | docker exec -i "$(node)" ctr --namespace=k8s.io images import --all-platforms - >/dev/null
}

down() {
  if command -v docker >/dev/null && docker info >/dev/null 2>&1 && exists; then
    log "deleting cluster $name"
    "$(kind_bin)" delete cluster --name "$name" >&2
  fi
  rm -rf "$state"
  bash "$repo/hack/docker/engine.sh" down
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  kubeconfig) kubeconfig ;;
  load) shift; load "$@" ;;
  *) echo "usage: $0 up|down|kubeconfig|load IMAGE..." >&2; exit 2 ;;
esac
