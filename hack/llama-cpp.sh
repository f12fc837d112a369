#!/usr/bin/env bash
# Fetches llama.cpp's HF-to-GGUF converter (convert_hf_to_gguf.py with its conversion/ and gguf-py/ packages) from
# the llama-cpp-python source distribution on PyPI, which vendors llama.cpp, into a cache keyed by version and
# prints the directory to use as LLAMA_CPP_DIR. Enough for GGUF f16 and q8_0; k-quants need llama-quantize, which
# would have to be compiled from the same tree. A second run downloads nothing.
set -euo pipefail

version="0.3.36"
sha256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
url="https://pypi.org/packages/ec/e9/e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/llama_cpp_python-$version.tar.gz"
cache_root="${RAGTUNE_CACHE:-$HOME/.cache/ragtune}"
out="$cache_root/tools/llama-cpp-python-$version"

if [[ -f "$out/convert_hf_to_gguf.py" ]]; then
  echo "$out"
  exit 0
fi
mkdir -p "$cache_root/tools"
exec 9>"$out.lock"
flock 9
if [[ ! -f "$out/convert_hf_to_gguf.py" ]]; then
  echo "llama-cpp: fetching llama-cpp-python $version's sources (77 MB) for llama.cpp's converter" >&2
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  curl -sSfL --retry 3 -o "$tmp/sdist.tar.gz" "$url"
  echo "$sha256  $tmp/sdist.tar.gz" | sha256sum -c --quiet - || { echo "llama-cpp: checksum mismatch for $url" >&2; exit 1; }
  top="llama_cpp_python-$version/vendor/llama.cpp"
  tar -xzf "$tmp/sdist.tar.gz" -C "$tmp" "$top/convert_hf_to_gguf.py" "$top/conversion" "$top/gguf-py" "$top/LICENSE"
  rm -rf "$out.partial"
  mv "$tmp/$top" "$out.partial"
  mv "$out.partial" "$out"
fi
echo "$out"
