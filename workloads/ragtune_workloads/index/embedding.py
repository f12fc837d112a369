"""Embedding with sentence-transformers, in batches, normalised, with the backend the spec asks for.

Texts are sorted by length before batching so each batch pads to similar lengths (the main cost on CPU is
padding tokens); results come back in the caller's order.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# Special tokens ([CLS] … [SEP]) take room in the model's window that chunk text cannot use.
SPECIAL_TOKENS = 2


class EmbeddingModelError(RuntimeError):
    """The embedding model cannot be loaded; the message names it and where it was looked for."""


@dataclass(frozen=True)
class ModelRef:
    name: str  # what the collection records, e.g. BAAI/bge-small-en-v1.5
    path: str | None = None  # local directory; loaded by name from the hub cache when None


def load_sentence_transformer(ref: ModelRef, backend: str = "torch", device: str | None = None):
    location = ref.path or ref.name
    if ref.path and not Path(ref.path).is_dir():
        raise EmbeddingModelError(f"embedding model {ref.name!r} not found: {ref.path} is not a directory")
    from sentence_transformers import SentenceTransformer  # after the cheap check: importing it takes seconds
    try:
        return SentenceTransformer(location, device=device or "cpu", backend=backend,
                                   local_files_only=bool(ref.path) or os.environ.get("HF_HUB_OFFLINE") == "1")
    except Exception as exc:  # the library raises many types (OSError, ValueError, HF errors) for the same cause
        raise EmbeddingModelError(f"embedding model {ref.name!r} could not be loaded from {location} "
                                  f"(backend {backend}): {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                                  ) from exc


class Embedder:
    def __init__(self, ref: ModelRef, backend: str = "torch", batch_size: int = 64, normalize: bool = True,
                 query_prefix: str = "", model=None):
        self.ref = ref
        self.backend = backend
        self.batch_size = batch_size
        self.normalize = normalize
        self.query_prefix = query_prefix
        self.model = model if model is not None else load_sentence_transformer(ref, backend)
        dimension = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dimension = int(dimension())
        self.tokenizer = self.model.tokenizer
        # Chunking tokenises whole documents; the model's own limit only matters per chunk.
        self.tokenizer.model_max_length = 10**9

    @property
    def name(self) -> str:
        return self.ref.name

    @property
    def max_chunk_tokens(self) -> int:
        return int(self.model.max_seq_length) - SPECIAL_TOKENS

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        vectors = self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=self.normalize,
                                    convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32).reshape(len(texts), self.dimension)

    def embed_documents(self, texts: Sequence[str], on_batch: Callable[[int], None] | None = None) -> np.ndarray:
        """Vectors of `texts` (row i for texts[i]); `on_batch(done)` after every batch, for progress."""
        out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
        for first in range(0, len(order), self.batch_size):
            rows = order[first:first + self.batch_size]
            out[rows] = self.encode([texts[i] for i in rows])
            if on_batch:
                on_batch(min(first + self.batch_size, len(order)))
        return out

    def embed_queries(self, queries: Sequence[str]) -> np.ndarray:
        return self.encode([self.query_prefix + query for query in queries])
