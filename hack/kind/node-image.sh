#!/usr/bin/env bash
# Builds, without any container registry, the images a kind cluster for Kubernetes v1.34 needs, and prints the node
# image's name. Every stage is cached by a key of its inputs (an image already present is not rebuilt):
#   ragtune.local/debian:bookworm-<key>     debootstrapped Debian minbase with python3: the local base image of
#                                           every ragtune image where no registry is reachable
#   ragtune.local/kind-base:<key>           kind's base image (systemd, containerd, runc, CNI plugins) from Debian
#                                           packages and the base files inside the sigs.k8s.io/kind module
#   registry.k8s.io/{kube-*,etcd,coredns,pause}  component images from the binaries of build-k8s.sh/build-bins.sh
#   ragtune.local/local-path-provisioner:<version>-<key>  the default StorageClass's provisioner (and its helper pod)
#   ragtune.local/kind-node:v1.34.4-<key>   the node: base + kubelet/kubeadm/kubectl + preloaded component images
# `node-image.sh --debian-base` builds and prints only the local base image.
# Needs root, a Docker engine (hack/docker/engine.sh up) and debootstrap (installed with apt when missing).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
k8s_version="v1.34.4"
kind_version="v0.30.0"
suite="bookworm"
mirror="${RAGTUNE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
cache_root="${RAGTUNE_CACHE:-$HOME/.cache/ragtune}"
work="$cache_root/kind/work"
log() { echo "kind-node-image: $*" >&2; }
die() { log "$*"; exit 1; }
has_image() { docker image inspect "$1" >/dev/null 2>&1; }

node_packages=(
  systemd systemd-sysv dbus conntrack iptables nftables iproute2 ethtool util-linux mount kmod libseccomp2 pigz
  bash ca-certificates curl jq procps containerd runc containernetworking-plugins
)

self_key="$(cat "$0" "$here/node/cni.conflist" "$here/node/default-storage.yaml" | sha256sum | cut -c1-12)"
# rancher/local-path-provisioner, the default StorageClass kind's own node images carry
storage_version="v0.0.30"  # the node image is assembled again when this script changes
# The local base changes only with the suite and mirror (bump the trailing tag to force a rebuild).
debian_packages="ca-certificates,python3,python3-venv"
debian_image="ragtune.local/debian:$suite-$(echo "$suite $mirror $debian_packages 1" | sha256sum | cut -c1-12)"

ensure_debootstrap() {
  command -v debootstrap >/dev/null && return 0
  [[ $(id -u) -eq 0 ]] || die "debootstrap is missing; as root run: apt-get install -y debootstrap"
  log "installing debootstrap"
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends debootstrap >/dev/null
}

# debootstrap SUITE into a fresh directory and import it as an image. $1 image, $2 include list, $3.. import changes
bootstrap_image() {
  local image="$1" include="$2"; shift 2
  local root="$work/rootfs-${image##*:}"
  ensure_debootstrap
  rm -rf "$root"; mkdir -p "$root"
  log "debootstrap $suite -> $image (about a minute)"
  debootstrap --variant=minbase --include="$include" "$suite" "$root" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; die "debootstrap failed; see $work/debootstrap.log"; }
  printf 'deb %s %s main\n' "$mirror" "$suite" >"$root/etc/apt/sources.list"
  if [[ -n "${CUSTOMIZE:-}" ]]; then "$CUSTOMIZE" "$root"; fi
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
         "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/var/log/* "$root"/tmp/*
  local args=() change
  for change in "$@"; do args+=(--change "$change"); done
  tar -C "$root" -c . | docker import "${args[@]}" - "$image" >/dev/null
  rm -rf "$root"
}

# kind's base image steps (images/base/Dockerfile), applied to a rootfs made from Debian packages
customize_kind_base() {
  local root="$1" files
  files="$(cd "$work" && go mod download -json "sigs.k8s.io/kind@$kind_version" | jq -r .Dir)/images/base/files"
  [[ -d "$files" ]] || die "kind base files not found in the sigs.k8s.io/kind@$kind_version module"
  install -m 0755 "$files"/usr/local/bin/* "$root/usr/local/bin/"
  mkdir -p "$root/kind/bin" "$root/etc/containerd" "$root/etc/systemd/system/kubelet.service.d" "$root/etc/kubernetes/manifests"
  install -m 0644 "$files"/kind/README.txt "$root/kind/"
  install -m 0755 "$files"/kind/bin/* "$root/kind/bin/"
  install -m 0644 "$files"/etc/crictl.yaml "$root/etc/"
  install -m 0644 "$files"/etc/default/kubelet "$root/etc/default/"
  install -m 0644 "$files"/etc/sysctl.d/* "$root/etc/sysctl.d/"
  install -m 0644 "$files"/etc/systemd/system/*.service "$files"/etc/systemd/system/*.slice "$root/etc/systemd/system/"
  install -m 0644 "$files"/etc/systemd/system/kubelet.service.d/* "$root/etc/systemd/system/kubelet.service.d/"
  # Debian's containerd 1.6 reads the same version-2 config; its binaries live in /usr/bin; the pause image is the
  # one kubeadm $k8s_version names; the fuse-overlayfs proxy (rootless only) is left out.
  # restrict_oom_score_adj: lowering a process's oom_score_adj needs CAP_SYS_RESOURCE, which hosts without it in
  # their bounding set cannot grant; containerd then keeps pods at or above its own score instead of failing them.
  sed -e '/^\[proxy_plugins\]/,/^$/d' -e "s#\"registry.k8s.io/pause:[^\"]*\"#\"registry.k8s.io/pause:$pause_version\"#" \
      -e 's#restrict_oom_score_adj = false#restrict_oom_score_adj = true#' \
      "$files/etc/containerd/config.toml" >"$root/etc/containerd/config.toml"
  grep -q 'restrict_oom_score_adj = true' "$root/etc/containerd/config.toml" || die "containerd config: no restrict_oom_score_adj"
  sed -i 's#ExecStart=/usr/local/bin/containerd#ExecStart=/usr/bin/containerd#' "$root/etc/systemd/system/containerd.service"
  rm -f "$root/etc/systemd/system/containerd-fuse-overlayfs.service"
  chroot "$root" sh -c 'ctr oci spec' \
    | jq '.hooks.createContainer[.hooks.createContainer|length] |= . + {"path": "/kind/bin/mount-product-files.sh"}' \
    | jq 'del(.process.rlimits)' >"$root/etc/containerd/cri-base.json"
  mkdir -p "$root/opt/cni/bin" "$root/etc/cni/net.d"
  local plugin
  for plugin in bridge host-local loopback portmap ptp; do ln -sf "/usr/lib/cni/$plugin" "$root/opt/cni/bin/$plugin"; done
  install -m 0644 "$here/node/cni.conflist" "$root/etc/cni/net.d/10-ragtune-bridge.conflist"
  find "$root/lib/systemd/system/sysinit.target.wants/" -name "systemd-tmpfiles-setup.service" -delete
  rm -f "$root"/lib/systemd/system/multi-user.target.wants/* "$root"/etc/systemd/system/*.wants/* \
        "$root"/lib/systemd/system/local-fs.target.wants/* "$root"/lib/systemd/system/sockets.target.wants/*udev* \
        "$root"/lib/systemd/system/sockets.target.wants/*initctl* "$root"/lib/systemd/system/basic.target.wants/*
  echo "ReadKMsg=no" >>"$root/etc/systemd/journald.conf"
  chroot "$root" systemctl enable kubelet.service containerd.service undo-mount-hacks.service >/dev/null 2>&1
  chroot "$root" systemctl mask systemd-binfmt.service >/dev/null 2>&1
}

# The provisioner on the local base (its helper pods need a shell, mkdir and rm); prints the image.
storage_image() {
  local out="$cache_root/kind/local-path-provisioner-$storage_version-$(go env GOVERSION)"
  local image="ragtune.local/local-path-provisioner:$storage_version-$(echo "$debian_image" | sha256sum | cut -c1-12)"
  if ! has_image "$image"; then
    if [[ ! -x "$out/local-path-provisioner" ]]; then
      log "building local-path-provisioner $storage_version"
      mkdir -p "$out"
      GOBIN="$out" CGO_ENABLED=0 GOFLAGS=-trimpath go install -ldflags "-s -w" \
        "github.com/rancher/local-path-provisioner@$storage_version" >&2
    fi
    local ctx="$work/ctx-local-path-provisioner"
    rm -rf "$ctx"; mkdir -p "$ctx"
    cp "$out/local-path-provisioner" "$ctx/"
    printf 'FROM %s\nCOPY local-path-provisioner /usr/local/bin/local-path-provisioner\n' "$debian_image" >"$ctx/Dockerfile"
    log "image $image"
    DOCKER_BUILDKIT=0 docker build -q -t "$image" "$ctx" >/dev/null 2>"$work/build.log" \
      || { cat "$work/build.log" >&2; die "building $image failed"; }
    rm -rf "$ctx"
  fi
  echo "$image"
}

# A component image: one static binary at /usr/local/bin (or / for pause and coredns) on scratch or the local base.
component_image() {  # name binary path-in-image [base]
  local image="$1" binary="$2" target="$3" base="${4:-}"
  has_image "$image" && return 0
  local ctx="$work/ctx-$(basename "$binary")"
  rm -rf "$ctx"; mkdir -p "$ctx"
  cp "$binary" "$ctx/bin"
  {
    if [[ -n "$base" ]]; then
      echo "FROM $base"
      echo "RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends iptables nftables conntrack && rm -rf /var/lib/apt/lists/*"
    else
      echo "FROM scratch"
    fi
    echo "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    echo "COPY bin $target"
    echo "ENTRYPOINT [\"$target\"]"
  } >"$ctx/Dockerfile"
  log "image $image"
  DOCKER_BUILDKIT=0 docker build -q -t "$image" "$ctx" >/dev/null 2>"$work/build.log" \
    || { cat "$work/build.log" >&2; die "building $image failed"; }
  rm -rf "$ctx"
}

command -v docker >/dev/null && docker info >/dev/null 2>&1 || die "no Docker engine answers; run: bash hack/docker/engine.sh up"
[[ $(id -u) -eq 0 ]] || die "building the node image needs root (debootstrap, chroot)"
mkdir -p "$work"
debian_base() {
  has_image "$debian_image" || bootstrap_image "$debian_image" "$debian_packages" \
    'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' 'CMD ["/bin/bash"]'
}
if [[ "${1:-}" == --debian-base ]]; then debian_base; echo "$debian_image"; exit 0; fi
cp_bin="$(bash "$repo/hack/build-k8s.sh")"
node_bin="$(bash "$here/build-bins.sh")"
bins_key="$(basename "$node_bin")-$(basename "$(dirname "$cp_bin")")"
node_image="ragtune.local/kind-node:$k8s_version-$(echo "$self_key $bins_key $debian_image $storage_version" | sha256sum | cut -c1-12)"
if has_image "$node_image"; then echo "$node_image"; exit 0; fi
start=$(date +%s)

mapfile -t required < <("$node_bin/kubeadm" config images list --kubernetes-version "$k8s_version" 2>/dev/null)
[[ ${#required[@]} -ge 6 ]] || die "kubeadm config images list returned: ${required[*]}"
image_for() { printf '%s\n' "${required[@]}" | grep -E "/$1:" | head -1; }
pause_version="$(image_for pause)"; pause_version="${pause_version##*:}"

debian_base

base_image="ragtune.local/kind-base:$( { declare -f customize_kind_base bootstrap_image; cat "$here/node/cni.conflist";
  echo "${node_packages[*]} $suite $mirror $kind_version $pause_version"; } | sha256sum | cut -c1-12)"
if ! has_image "$base_image"; then
  CUSTOMIZE=customize_kind_base bootstrap_image "$base_image" "$(IFS=,; echo "${node_packages[*]}")" \
    'ENV container=docker' 'ENTRYPOINT ["/usr/local/bin/entrypoint", "/sbin/init"]'
fi

for component in kube-apiserver kube-controller-manager kube-scheduler; do
  component_image "$(image_for "$component")" "$cp_bin/$component" "/usr/local/bin/$component"
done
component_image "$(image_for etcd)" "$cp_bin/etcd" /usr/local/bin/etcd
component_image "$(image_for coredns)" "$node_bin/coredns" /coredns
component_image "$(image_for pause)" "$node_bin/pause" /pause
component_image "$(image_for kube-proxy)" "$node_bin/kube-proxy" /usr/local/bin/kube-proxy "$debian_image"
storage="$(storage_image)"

log "assembling $node_image"
# no volume on /var: the imported images must land in the committed image
cid="$(docker run -d --privileged --entrypoint=sleep "$base_image" infinity)"
trap 'docker rm -f -v "$cid" >/dev/null 2>&1 || true' EXIT
for b in "$node_bin/kubelet" "$node_bin/kubeadm" "$cp_bin/kubectl"; do
  docker cp "$b" "$cid:/usr/bin/$(basename "$b")"
done
docker cp "$node_bin/crictl" "$cid:/usr/local/bin/crictl"
docker exec "$cid" bash -c "chown root:root /usr/bin/kube* /usr/local/bin/crictl; chmod 0755 /usr/bin/kube* /usr/local/bin/crictl; echo $k8s_version >/kind/version"
# kind applies this manifest unless the cluster disables its default CNI; the pod network itself is the bridge
# configuration in /etc/cni/net.d (one node), so the manifest only records it.
docker exec -i "$cid" bash -c 'mkdir -p /kind/manifests && cat >/kind/manifests/default-cni.yaml' <<'YAML'
apiVersion: v1
kind: ConfigMap
metadata:
  name: ragtune-node-network
  namespace: kube-system
data:
  network: "bridge CNI with host-local IPAM, configured in the node image at /etc/cni/net.d/10-ragtune-bridge.conflist"
YAML
sed "s#@IMAGE@#$storage#g" "$here/node/default-storage.yaml" \
  | docker exec -i "$cid" bash -c 'cat >/kind/manifests/default-storage.yaml'
docker exec "$cid" bash -c 'nohup containerd >/tmp/containerd.log 2>&1 & for i in $(seq 1 100); do ctr version >/dev/null 2>&1 && exit 0; sleep 0.1; done; cat /tmp/containerd.log; exit 1'
docker save "${required[@]}" "$storage" \
  | docker exec -i "$cid" ctr --namespace=k8s.io images import --all-platforms --no-unpack --digests - >/dev/null
for image in "${required[@]}" "$storage"; do
  docker exec "$cid" ctr --namespace=k8s.io images label "$image" io.cri-containerd.pinned=pinned >/dev/null
done
docker exec "$cid" bash -c 'pkill containerd; for i in $(seq 1 50); do pgrep containerd >/dev/null || exit 0; sleep 0.1; done'
docker commit --change 'ENTRYPOINT [ "/usr/local/bin/entrypoint", "/sbin/init" ]' "$cid" "$node_image-assembled" >/dev/null
# systemd stops cleanly on SIGRTMIN+3; this engine's commit/import refuse STOPSIGNAL, a build step sets it
printf 'FROM %s\nSTOPSIGNAL SIGRTMIN+3\n' "$node_image-assembled" \
  | DOCKER_BUILDKIT=0 docker build -q -t "$node_image" - >/dev/null 2>"$work/build.log"
docker rmi "$node_image-assembled" >/dev/null
log "built $node_image in $(( $(date +%s) - start ))s"
echo "$node_image"
