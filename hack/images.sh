#!/usr/bin/env bash
# Builds the ragtune images: operator, finetune, index, serve (CPU), tagged ragtune/<name>:<version>.
#   BASE_IMAGE   the base of every image. Unset: python:3.11-slim-bookworm when the engine already has it, otherwise
#                the Debian base debootstrapped by hack/kind/node-image.sh (no registry needed).
#   OFFLINE=0    install from the package index instead of the local wheelhouse (hack/wheelhouse.sh)
#   IMAGES       which images (default: operator finetune index serve). finetune-gpu and serve-gpu (several GB
#                each) build on GPU_BASE_IMAGE (default: the CUDA runtime image when the engine has it, else
#                BASE_IMAGE; torch's wheels carry the CUDA libraries) from the GPU wheelhouse (hack/wheelhouse.sh
#                gpu: PyPI's CUDA wheels), or with OFFLINE=0 from the package index with torch from
#                TORCH_GPU_INDEX_URL (default: PyTorch's cu128 index; set it empty for PyPI's CUDA wheels)
# Prints the image names.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
version="$(python3 -c 'import tomllib,sys; print(tomllib.load(open(sys.argv[1],"rb"))["project"]["version"])' "$root/pyproject.toml")"
images=(${IMAGES:-operator finetune index serve})
log() { echo "images: $*" >&2; }
die() { log "$*"; exit 1; }

docker info >/dev/null 2>&1 || die "no Docker engine answers; run: bash hack/docker/engine.sh up"

base="${BASE_IMAGE:-}"
if [[ -z "$base" ]]; then
  if docker image inspect python:3.11-slim-bookworm >/dev/null 2>&1; then
    base=python:3.11-slim-bookworm
  else
    base="$(bash "$root/hack/kind/node-image.sh" --debian-base)"
  fi
fi
log "base image $base"

log_file="$(mktemp)"
build_args=(--build-arg "BASE_IMAGE=$base")
gpu_base="${GPU_BASE_IMAGE:-nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04}"
if [[ -z "${GPU_BASE_IMAGE:-}" ]] && ! docker image inspect "$gpu_base" >/dev/null 2>&1; then gpu_base="$base"; fi
gpu_args=(--build-arg "GPU_BASE_IMAGE=$gpu_base")
if [[ -n "${TORCH_GPU_INDEX_URL+set}" ]]; then gpu_args+=(--build-arg "TORCH_GPU_INDEX_URL=$TORCH_GPU_INDEX_URL"); fi
server_pid=""
cpu_wheels_arg=() gpu_wheels_arg=()
if [[ "${OFFLINE:-1}" != 0 ]]; then
  wheels="$(bash "$root/hack/wheelhouse.sh")"
  if [[ " ${images[*]} " == *"-gpu "* ]]; then
    gpu_wheels="$(bash "$root/hack/wheelhouse.sh" gpu)"
    [[ "$(dirname "$gpu_wheels")" == "$(dirname "$wheels")" ]] || die "the two wheelhouses must share a directory"
  fi
  # A fixed address, and the wheelhouse's key in the URL: Docker's layer cache then holds exactly as long as the
  # wheelhouse does (build arguments are part of the cache key).
  port="${RAGTUNE_WHEELHOUSE_PORT:-36480}"
  url="http://127.0.0.1:$port/$(basename "$wheels")/"
  python3 -m http.server --bind 127.0.0.1 --directory "$(dirname "$wheels")" "$port" >/dev/null 2>&1 &
  server_pid=$!
  trap 'kill $server_pid 2>/dev/null || true; rm -f "$log_file"' EXIT
  for _ in $(seq 1 50); do python3 -c "import urllib.request; urllib.request.urlopen('$url')" 2>/dev/null && break; sleep 0.1; done
  kill -0 "$server_pid" 2>/dev/null || die "cannot serve the wheelhouse on 127.0.0.1:$port (set RAGTUNE_WHEELHOUSE_PORT)"
  build_args+=(--network host)
  cpu_wheels_arg=(--build-arg "PIP_FIND_LINKS=$url")
  # GPU targets: the CPU stages before them (the legacy builder runs them all) keep the CPU wheelhouse
  [[ -n "${gpu_wheels:-}" ]] && gpu_wheels_arg=("${cpu_wheels_arg[@]}"
                                                 --build-arg "GPU_PIP_FIND_LINKS=${url%/*/}/$(basename "$gpu_wheels")/")
fi

if [[ " ${images[*]} " == *" finetune"* ]]; then
  # The fine-tuning images carry llama.cpp's converter (output.gguf); the build context takes it from build/.
  converter="$(bash "$root/hack/llama-cpp.sh")"
  rm -rf "$root/build/llama.cpp"
  mkdir -p "$root/build"
  cp -r "$converter" "$root/build/llama.cpp"
fi

for image in "${images[@]}"; do
  case "$image" in
    operator) dockerfile="$root/operator/Dockerfile"; target=(${cpu_wheels_arg[@]+"${cpu_wheels_arg[@]}"}) ;;
    finetune|index|serve) dockerfile="$root/workloads/Dockerfile"
                          target=(--target "$image" ${cpu_wheels_arg[@]+"${cpu_wheels_arg[@]}"}) ;;
    finetune-gpu|serve-gpu) dockerfile="$root/workloads/Dockerfile"
                            target=(--target "$image" "${gpu_args[@]}" ${gpu_wheels_arg[@]+"${gpu_wheels_arg[@]}"}) ;;
    *) die "unknown image $image (operator finetune index serve finetune-gpu serve-gpu)" ;;
  esac
  tag="ragtune/$image:$version"
  previous="$(docker image inspect -f '{{.Id}}' "$tag" 2>/dev/null || true)"
  log "building $tag"
  start=$(date +%s)
  DOCKER_BUILDKIT=0 docker build -q "${build_args[@]}" "${target[@]}" -f "$dockerfile" -t "$tag" "$root" >/dev/null 2>"$log_file" \
    || { tail -30 "$log_file" >&2; die "building $tag failed"; }
  log "built $tag in $(( $(date +%s) - start ))s ($(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}'))"
  current="$(docker image inspect -f '{{.Id}}' "$tag")"
  # the image this tag named before is removed (the layers it shares with the new one stay)
  if [[ -n "$previous" && "$previous" != "$current" ]]; then docker rmi "$previous" >/dev/null 2>&1 || true; fi
  echo "$tag"
done
