#!/usr/bin/env bash
# Fills a wheelhouse with every wheel the images install (one resolve per image, pinned by hack/constraints.txt,
# CPU torch from ../shared/wheels where present), cached by a key of its inputs; prints its directory.
# `make images` serves it on 127.0.0.1 so image builds install offline and identically to the resolve made here.
#   hack/wheelhouse.sh gpu   the GPU images' wheelhouse instead: workloads/requirements-gpu.txt (finetune-gpu) and
#                            workloads/requirements-serve-gpu.txt plus the index extra (serve-gpu), CUDA torch
#                            from the package index; several GB.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache_root="${RAGTUNE_CACHE:-$HOME/.cache/ragtune}"
python="${PYTHON:-python3}"
log() { echo "wheelhouse: $*" >&2; }
floor_python="3.11.2"   # Debian bookworm's python3, the local base image's interpreter

mode="${1:-cpu}"
[[ "$mode" == cpu || "$mode" == gpu ]] || { log "usage: wheelhouse.sh [cpu|gpu]"; exit 2; }

# requirement sets: image -> extras (self-references such as ragtune[index] are expanded); file:<path> -> a
# requirements file of its own
sets=("operator:operator" "finetune:finetune" "index:index" "serve:serve,vllm")
if [[ "$mode" == gpu ]]; then
  sets=("finetune-gpu:file:workloads/requirements-gpu.txt" "serve-gpu:file:workloads/requirements-serve-gpu.txt+index")
fi

wheels="$root/../shared/wheels"
torch_args=(--extra-index-url https://download.pytorch.org/whl/cpu)
if compgen -G "$wheels/torch-*+cpu-*.whl" >/dev/null; then torch_args=(--find-links "$wheels"); fi


requirements() {  # extras (comma-separated) or file:<path>[+extras] -> requirement lines
  if [[ "$1" == file:* ]]; then
    local spec="${1#file:}"
    grep -v '^\s*#' "$root/${spec%%+*}" | grep -v '^\s*$'
    [[ "$spec" == *+* ]] && "$python" "$root/hack/requirements.py" "$root/pyproject.toml" "${spec#*+}"
    return 0
  fi
  "$python" "$root/hack/requirements.py" "$root/pyproject.toml" "$1"
}

# keyed by what is resolved (not by the rest of pyproject.toml)
key="$( { for entry in "${sets[@]}"; do requirements "${entry#*:}"; done; cat "$root/hack/constraints.txt" "$0"
          "$python" -c 'import sys; print(sys.version_info[:2])'; } | sha256sum | cut -c1-12)"
out="$cache_root/wheels/$key"
[[ "$mode" == gpu ]] && out="$cache_root/wheels/gpu-$key"
if [[ -f "$out/.complete" ]]; then echo "$out"; exit 0; fi
mkdir -p "$out"
start=$(date +%s)

for entry in "${sets[@]}"; do
  image="${entry%%:*}" extras="${entry#*:}"
  requirements "$extras" >"$out/requirements-$image.txt"
  log "resolving $image ($extras)"
  extra=(-c "$root/hack/constraints.txt")
  [[ "$image" != operator ]] && extra+=("torch==2.13.0+cpu" "${torch_args[@]}")
  # The GPU sets carry their own bounds (unsloth and vLLM pin what they were built against); torch is PyPI's CUDA
  # build.
  [[ "$mode" == gpu ]] && extra=()
  "$python" -m pip wheel -q -w "$out" -r "$out/requirements-$image.txt" ${extra[@]+"${extra[@]}"} >&2
done
# build requirements of the ragtune package itself (installed from source in the images)
"$python" -m pip wheel -q -w "$out" "setuptools>=77" wheel >&2
# The local base image has Debian's Python ($floor_python), older than this interpreter may be: where a wheel
# asks for a newer Python, also keep the newest release that the older one accepts (pip in the image picks it).
"$python" - "$out" "$floor_python" <<'PY' | while read -r req; do
import sys, zipfile
from pathlib import Path
from packaging.specifiers import SpecifierSet
out, floor = Path(sys.argv[1]), sys.argv[2]
for wheel in sorted(out.glob("*.whl")):
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode("utf-8", "replace").splitlines()
    requires = next((l.split(":", 1)[1].strip() for l in lines if l.startswith("Requires-Python:")), "")
    if requires and floor not in SpecifierSet(requires):
        print(wheel.name.split("-")[0])
PY
  log "adding a release of $req for Python $floor_python"
  "$python" -m pip download -q --no-deps --only-binary=:all: --python-version "$floor_python" -d "$out" "$req" >&2
done
touch "$out/.complete"
log "$(ls "$out"/*.whl | wc -l) wheels, $(du -sh "$out" | cut -f1), in $(( $(date +%s) - start ))s: $out"
echo "$out"
