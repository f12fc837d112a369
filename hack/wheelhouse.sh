#!/usr/bin/env bash
# Fills a wheelhouse with every wheel the images install (one resolve per image, pinned by hack/constraints.txt,
# CPU torch from ../shared/wheels where present), cached by a key of its inputs; prints its directory.
# `make images` serves it on 127.0.0.1 so image builds install offline and identically to the resolve made here.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache_root="${RAGTUNE_CACHE:-$HOME/.cache/ragtune}"
python="${PYTHON:-python3}"
log() { echo "wheelhouse: $*" >&2; }
floor_python="3.11.2"   # Debian bookworm's python3, the local base image's interpreter

# requirement sets: image -> extras (self-references such as ragtune[index] are expanded)
sets=("operator:operator" "finetune:finetune" "index:index" "serve:serve,vllm")

wheels="$root/../shared/wheels"
torch_args=(--extra-index-url https://download.pytorch.org/whl/cpu)
if compgen -G "$wheels/torch-*+cpu-*.whl" >/dev/null; then torch_args=(--find-links "$wheels"); fi


requirements() {  # extras (comma-separated) -> requirement lines
  "$python" "$root/hack/requirements.py" "$root/pyproject.toml" "$1"
}

# keyed by what is resolved (not by the rest of pyproject.toml)
key="$( { for entry in "${sets[@]}"; do requirements "${entry#*:}"; done; cat "$root/hack/constraints.txt" "$0"
          "$python" -c 'import sys; print(sys.version_info[:2])'; } | sha256sum | cut -c1-12)"
out="$cache_root/wheels/$key"
if [[ -f "$out/.complete" ]]; then echo "$out"; exit 0; fi
mkdir -p "$out"
start=$(date +%s)

for entry in "${sets[@]}"; do
  image="${entry%%:*}" extras="${entry#*:}"
  requirements "$extras" >"$out/requirements-$image.txt"
  log "resolving $image ($extras)"
  extra=()
  [[ "$image" != operator ]] && extra=("torch==2.13.0+cpu" "${torch_args[@]}")
  "$python" -m pip wheel -q -w "$out" -c "$root/hack/constraints.txt" -r "$out/requirements-$image.txt" \
    "${extra[@]}" >&2
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
