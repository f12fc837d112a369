#!/usr/bin/env bash
# Fills a wheelhouse with every wheel the images install (one resolve per image, pinned by hack/constraints.txt,
# CPU torch from ../shared/wheels where present), cached by a key of its inputs; prints its directory.
# `make images` serves it on 127.0.0.1 so image builds install offline and identically to the resolve made here.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache_root="${RAGTUNE_CACHE:-$HOME/.cache/ragtune}"
python="${PYTHON:-python3}"
log() { echo "wheelhouse: $*" >&2; }

# requirement sets: image -> extras (self-references such as ragtune[index] are expanded)
sets=("operator:operator" "finetune:finetune" "index:index" "serve:serve,vllm")

wheels="$root/../shared/wheels"
torch_args=(--extra-index-url https://download.pytorch.org/whl/cpu)
if compgen -G "$wheels/torch-*+cpu-*.whl" >/dev/null; then torch_args=(--find-links "$wheels"); fi

key="$( { cat "$root/pyproject.toml" "$root/hack/constraints.txt" "$0"; "$python" -c 'import sys; print(sys.version_info[:2])'; } \
        | sha256sum | cut -c1-12)"
out="$cache_root/wheels/$key"
if [[ -f "$out/.complete" ]]; then echo "$out"; exit 0; fi
mkdir -p "$out"
start=$(date +%s)

requirements() {  # extras (comma-separated) -> requirement lines
  "$python" - "$root/pyproject.toml" "$1" <<'PY'
import re, sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
extras, seen, out = project["optional-dependencies"], set(), list(project["dependencies"])
def add(name):
    if name in seen:
        return
    seen.add(name)
    for req in extras[name]:
        m = re.fullmatch(r"ragtune\[([^\]]+)\]", req.strip())
        if m:
            for sub in m.group(1).split(","):
                add(sub.strip())
        else:
            out.append(req)
for name in sys.argv[2].split(","):
    add(name)
print("\n".join(out))
PY
}

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
touch "$out/.complete"
log "$(ls "$out"/*.whl | wc -l) wheels, $(du -sh "$out" | cut -f1), in $(( $(date +%s) - start ))s: $out"
echo "$out"
