"""What an index run remembers for the next one: vectors by chunk content, and the rows it published.

The vectors of unchanged chunks come from here rather than from the published store, so an incremental run never
has to open a version a reader may be using. Losing this directory costs one full re-embedding, nothing else.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CACHE_FILE = "vectors.npz"
MANIFEST_FILE = "manifest.json"


def content_key(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def keys_array(keys: list[bytes]) -> np.ndarray:
    # Raw bytes rows, not numpy "S32" strings: those drop trailing NUL bytes and would corrupt some digests.
    return np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), 32)


@dataclass
class VectorCache:
    """Vectors keyed by sha256 of the embedded text, valid for one vectors fingerprint (model, backend, …) and one
    set of model files (`model_files`, their digest: a model replaced under the same name). A cache from before
    the files were recorded is kept."""

    fingerprint: str
    vectors: dict[bytes, np.ndarray] = field(default_factory=dict)
    model_files: str = ""
    model_replaced: bool = False  # the cache was dropped because the model's files changed

    @classmethod
    def load(cls, directory: Path, fingerprint: str, model_files: str = "") -> VectorCache:
        path = directory / CACHE_FILE
        try:
            with np.load(path, allow_pickle=False) as data:
                if str(data["fingerprint"]) != fingerprint:
                    return cls(fingerprint, model_files=model_files)
                recorded = str(data["model_files"]) if "model_files" in data.files else ""
                if recorded and model_files and recorded != model_files:
                    return cls(fingerprint, model_files=model_files, model_replaced=True)
                keys, vectors = data["keys"], data["vectors"]
        except (FileNotFoundError, KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile):
            # missing or damaged (a node that died mid-write): losing it costs a re-embedding, nothing more
            return cls(fingerprint, model_files=model_files)
        return cls(fingerprint, {key.tobytes(): vector for key, vector in zip(keys, vectors)}, model_files)

    def get(self, key: bytes) -> np.ndarray | None:
        return self.vectors.get(key)

    def save(self, directory: Path, keys: list[bytes], vectors: np.ndarray) -> None:
        """Keeps exactly the given keys: vectors of chunks no longer indexed are forgotten."""
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".vectors.", suffix=".npz", delete=False) as tmp:
            np.savez(tmp, fingerprint=np.array(self.fingerprint), model_files=np.array(self.model_files),
                     keys=keys_array(keys),
                     vectors=vectors.astype(np.float32))
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp.name, directory / CACHE_FILE)


@dataclass(frozen=True)
class Manifest:
    """The rows of the version this index run last published."""

    version: int = 0
    row_ids: frozenset[str] = frozenset()

    @classmethod
    def load(cls, directory: Path) -> Manifest:
        try:
            data = json.loads((directory / MANIFEST_FILE).read_text())
        except (FileNotFoundError, ValueError):
            return cls()
        return cls(int(data.get("version", 0)), frozenset(data.get("rowIds", [])))

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=directory, prefix=".manifest.", delete=False) as tmp:
            json.dump({"version": self.version, "rowIds": sorted(self.row_ids)}, tmp)
        os.replace(tmp.name, directory / MANIFEST_FILE)
