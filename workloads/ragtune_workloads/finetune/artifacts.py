"""What a run leaves on the output volume, and the digest the operator puts in status.

Layout under the output path:
  adapter/            adapter_config.json + adapter_model.safetensors: the directory vLLM (`--lora-modules
                      name=<dir>`) and Ray Serve LLM (one sub-directory per adapter under its
                      dynamic_lora_loading_path) load
  merged/             base model with the adapter folded in (output.merge)
  model-<quant>.gguf  llama.cpp export (output.gguf.enabled)
  checkpoints/        trainer checkpoints; a retried Job resumes from the last complete one
  metadata.json       base model and revision, dataset digest, config, metrics, digests

The digest is sha256 over the lines `<sha256 of file>  <relative path>\n`, sorted by path: the same text
`sha256sum` prints, so anyone can check it with
  (cd adapter && find . -type f -printf '%P\\n' | LC_ALL=C sort | xargs sha256sum) | sha256sum
The same training gives the same digest: the files depend on their content only (`sort_set_fields`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from ragtune_workloads import s3

from .errors import ConfigError, ExportError

ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
CHECKPOINT_DIR = "checkpoints"
METADATA_FILE = "metadata.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
CHUNK = 1 << 20

log = logging.getLogger(__name__)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_manifest(root: Path) -> list[tuple[str, str]]:
    """(relative posix path, sha256) of every file under `root`, sorted by the path's bytes."""
    if root.is_file():
        return [(root.name, file_sha256(root))]
    paths = sorted((p for p in root.rglob("*") if p.is_file()), key=lambda p: p.relative_to(root).as_posix()
                   .encode())
    return [(p.relative_to(root).as_posix(), file_sha256(p)) for p in paths]


def manifest_digest(manifest: list[tuple[str, str]]) -> str:
    text = "".join(f"{sha}  {path}\n" for path, sha in manifest)
    return f"sha256:{hashlib.sha256(text.encode()).hexdigest()}"


def tree_digest(root: Path) -> str:
    return manifest_digest(file_manifest(root))


OWNER_FILE = "owner"


def claim_checkpoints(checkpoint_dir: Path, owner: str) -> bool:
    """Checkpoints are resumed only by the run that wrote them: a retry of the same FineTuneJob (same owner id).
    Checkpoints another FineTuneJob left at the same output path are removed, not resumed — resuming them would
    skip training and publish that job's weights under this one's name. Returns whether a foreign set was dropped."""
    marker = checkpoint_dir / OWNER_FILE
    dropped = False
    if checkpoint_dir.is_dir() and (not marker.is_file() or marker.read_text().strip() != owner):
        shutil.rmtree(checkpoint_dir)
        dropped = True
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(owner + "\n")
    return dropped


def check_adapter_layout(adapter_dir: Path) -> None:
    missing = [name for name in ADAPTER_FILES if not (adapter_dir / name).is_file()]
    if missing:
        raise ExportError(f"the adapter in {adapter_dir} lacks {', '.join(missing)}")


def save_adapter(model: Any, adapter_dir: Path) -> Path:
    """Writes only the adapter (never the base weights) as safetensors; a retry replaces what a failed try left."""
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    model.save_pretrained(str(adapter_dir), safe_serialization=True)
    check_adapter_layout(adapter_dir)
    sort_set_fields(model, adapter_dir / "adapter_config.json")
    return adapter_dir


def sort_set_fields(model: Any, config_file: Path) -> None:
    """peft writes the config's sets (`target_modules` among them) as lists in the order the set iterates, which
    changes with every process's string-hash seed: the same training would get another digest each time. Sorted,
    the file depends on its content only (peft reads these fields back as sets, so their order means nothing)."""
    set_fields = {name for config in getattr(model, "peft_config", {}).values()
                  for name, value in vars(config).items() if isinstance(value, set)}
    written = json.loads(config_file.read_text())
    sorted_fields = {name: sorted(written[name], key=str) for name in set_fields
                     if isinstance(written.get(name), list)}
    if sorted_fields:
        config_file.write_text(json.dumps({**written, **sorted_fields}, indent=2, sort_keys=True))


def merge_adapter(base_model: str, adapter_dir: Path, merged_dir: Path, tokenizer: Any, dtype: Any,
                  revision: str | None = None) -> Path:
    """Folds the adapter into a freshly loaded base model. The base is reloaded in full precision on purpose: a
    4-bit base (qlora) merged in place would bake quantization error into the weights."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=dtype, revision=revision)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    if merged_dir.exists():
        shutil.rmtree(merged_dir)
    merged.save_pretrained(str(merged_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(merged_dir))
    return merged_dir


# ---------------------------------------------------------------- GGUF through llama.cpp

# Types llama.cpp's converter writes directly; the k-quants need its quantize tool on top of an f16 file.
CONVERTER_OUTTYPES = {"f16", "q8_0"}


def llama_cpp_tools(environ: dict[str, str] | None = None) -> tuple[Path | None, Path | None]:
    """llama.cpp's `convert_hf_to_gguf.py` and `llama-quantize`, from LLAMA_CPP_DIR or PATH."""
    environ = dict(os.environ if environ is None else environ)
    converter = quantizer = None
    root = environ.get("LLAMA_CPP_DIR")
    if root:
        candidate = Path(root) / "convert_hf_to_gguf.py"
        converter = candidate if candidate.is_file() else None
        for sub in ("build/bin/llama-quantize", "llama-quantize", "bin/llama-quantize"):
            if (Path(root) / sub).is_file():
                quantizer = Path(root) / sub
                break
    path = environ.get("PATH", "")
    converter = converter or _which("convert_hf_to_gguf.py", path)
    quantizer = quantizer or _which("llama-quantize", path)
    return converter, quantizer


def _which(name: str, path: str) -> Path | None:
    found = shutil.which(name, path=path)
    return Path(found) if found else None


def gguf_preflight(quantization: str, environ: dict[str, str] | None = None) -> None:
    """Fails before training, not after hours of it, when the GGUF export asked for cannot run in this image."""
    converter, quantizer = llama_cpp_tools(environ)
    if converter is None:
        raise ExportError(
            "output.gguf needs llama.cpp's convert_hf_to_gguf.py (and the gguf package) in the image; none was "
            "found on PATH or in LLAMA_CPP_DIR: use an image with llama.cpp, or set output.gguf.enabled: false")
    if quantization not in CONVERTER_OUTTYPES and quantizer is None:
        raise ExportError(
            f"output.gguf.quantization {quantization} needs llama.cpp's llama-quantize in the image; none was "
            "found on PATH or in LLAMA_CPP_DIR: use quantization f16 or q8_0, or an image with llama.cpp built")


def export_gguf(merged_dir: Path, output_dir: Path, quantization: str) -> Path:
    converter, quantizer = llama_cpp_tools()
    gguf_preflight(quantization)
    target = output_dir / f"model-{quantization}.gguf"
    outtype = quantization if quantization in CONVERTER_OUTTYPES else "f16"
    intermediate = target if outtype == quantization else output_dir / "model-f16.tmp.gguf"
    _run("convert_hf_to_gguf.py",
         [sys.executable, str(converter), str(merged_dir), "--outfile", str(intermediate), "--outtype", outtype])
    if intermediate != target:
        _run("llama-quantize", [str(quantizer), str(intermediate), str(target), quantization.upper()])
        intermediate.unlink(missing_ok=True)
    return target


def _run(tool: str, command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ExportError(f"GGUF export failed: {tool} exited {result.returncode}: {last[0]}")


# ---------------------------------------------------------------- metadata

def write_metadata(path: Path, metadata: dict[str, Any]) -> None:
    """Written to a temporary name and renamed, so a reader never sees half a file."""
    staging = path.with_suffix(".tmp")
    staging.write_text(json.dumps(metadata, indent=2, sort_keys=True, default=str) + "\n")
    staging.replace(path)


# ---------------------------------------------------------------- s3 output

def s3_preflight(destination: Any) -> None:
    """Refuses the run before training when the bucket is missing or the credentials are refused. A key that may
    write but not list the bucket cannot be checked here: the upload at the end tells."""
    try:
        s3.check_bucket(destination.uri, destination.endpoint, "output.s3", needs="s3:PutObject")
    except s3.S3LocationError as exc:
        if exc.code in s3.DENIED and s3.has_credentials():
            log.warning("cannot check output.s3 before training (%s); the upload at the end will tell", exc)
            return
        raise ConfigError(str(exc)) from None


def upload_to_s3(output: Path, destination: Any, uris: dict[str, Path | None]) -> dict[str, str | None]:
    """Uploads each artifact (and the metadata) under the destination folder, keeping the local layout; returns
    the s3:// URIs. Credentials come from the environment the operator sets from output.s3.credentialsSecret."""
    bucket, prefix = s3.s3_folder(destination.uri)
    uploaded: dict[str, str | None] = {}
    files: list[tuple[Path, str]] = []
    for name, local in {**uris, "metadata": output / METADATA_FILE}.items():
        if local is None:
            uploaded[name] = None
            continue
        local = Path(local)
        tree = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
        files += [(file, file.relative_to(output).as_posix()) for file in tree]
        uploaded[name] = f"s3://{bucket}/{prefix}{local.relative_to(output).as_posix()}"
    try:
        s3.upload_files(destination.uri, destination.endpoint, files, "output.s3")
    except s3.S3LocationError as exc:
        raise ExportError(f"the adapter trained but its upload failed: {exc}") from None
    return uploaded
