"""One indexing run: load → chunk → embed what is new → write a version if anything changed → switch readers."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ragtune.api.workload import IndexConfig

from .chunking import Chunk, chunk_document
from .embedding import Embedder, ModelRef
from .loaders import Document, LoadResult, load_sources
from .state import Manifest, VectorCache, content_key
from .store import Rows, VersionInfo, index_params, is_server_uri, now, open_store, validate_index

log = logging.getLogger(__name__)
CHUNKER_VERSION = 1  # bump when chunk boundaries change for the same settings
HEARTBEAT_SECONDS = 10.0


class IndexRunError(RuntimeError):
    """A run that cannot produce an index; the message is the one-line reason."""


def digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def vectors_fingerprint(model: str, backend: str, normalize: bool, dimension: int, precision: str = "fp32") -> str:
    # fp32 is left out so indexes built before precision existed keep their vectors.
    return digest("vectors", model, backend, normalize, dimension, *([precision] if precision != "fp32" else []))[:16]


def chunking_fingerprint(strategy: str, size: int, overlap: int) -> str:
    return digest("chunks", CHUNKER_VERSION, strategy, size, overlap)[:16]


def row_id(vectors_fp: str, chunks_fp: str, chunk: Chunk, embedded: str) -> str:
    """Same id ⇔ same text at the same place of the same document, embedded and chunked the same way."""
    return digest(vectors_fp, chunks_fp, chunk.doc_path, chunk.number, chunk.start, embedded)[:32]


TITLE_CONTEXT_CHARS = 300  # a title longer than this is cut: the model's window belongs to the chunk


def embedding_text(chunk: Chunk, context: str) -> str:
    """What the model reads for a chunk. A title header costs the chunk's last few tokens when the chunk fills the
    window; the overlap with the next chunk carries them."""
    if context == "title" and chunk.title.strip():
        return f"title: {' '.join(chunk.title.split())[:TITLE_CONTEXT_CHARS]}\n\n{chunk.text}"
    return chunk.text


@dataclass
class Progress:
    """Sends progress through the reporter and repeats the last report while a long step runs."""

    reporter: Any
    fields: dict = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self):
        self._thread = threading.Thread(target=self._beat, name="index-progress", daemon=True)
        self._thread.start()

    def update(self, force: bool = False, **fields: Any) -> None:
        self.fields.update(fields)
        self.reporter.progress(force=force, **self.fields)

    def waiting(self, holder: str) -> None:
        """Another run of this index holds the store: say whom this one waits for (at once the first time)."""
        self.update(force=self.fields.get("phase") != "Waiting", phase="Waiting", waitingFor=holder)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            self.reporter.progress(force=True, **self.fields)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclass(frozen=True)
class Plan:
    """Every chunk of the corpus, its row id and, where known, its cached vector."""

    chunks: list[Chunk]
    texts: list[str]  # what the model reads for each chunk
    ids: list[str]
    keys: list[bytes]
    missing: list[int]  # chunk positions that need embedding


def chunk_all(documents: list[Document], embedder: Embedder, config: IndexConfig, progress: Progress,
              ) -> tuple[list[Chunk], str]:
    spec = config.spec.chunking
    size = min(spec.size, embedder.max_chunk_tokens)
    if size < spec.size:
        log.warning("chunking.size %d exceeds what %s reads (%d tokens); using %d", spec.size, embedder.name,
                    embedder.max_chunk_tokens, size)
    overlap = min(spec.overlap, size - 1)
    chunks: list[Chunk] = []
    for done, document in enumerate(documents, 1):
        chunks.extend(chunk_document(document, embedder.tokenizer, spec.strategy, size, overlap))
        progress.update(documents=done, chunksTotal=len(chunks))
    return chunks, chunking_fingerprint(spec.strategy, size, overlap)


def reuse_stored_vectors(plan: Plan, cache: VectorCache, store, active: VersionInfo,
                         stored_ids: frozenset[str]) -> Plan:
    """The plan with the vectors of rows the active version already holds taken from it instead of embedded."""
    wanted = [plan.ids[i] for i in plan.missing if plan.ids[i] in stored_ids]
    if not wanted:
        return plan
    found = store.vectors(active, wanted)
    for position in plan.missing:
        vector = found.get(plan.ids[position])
        if vector is not None:
            cache.vectors[plan.keys[position]] = vector
    log.info("read %d unchanged rows' vectors back from %s", len(found), active.collection)
    return replace(plan, missing=[i for i in plan.missing if cache.get(plan.keys[i]) is None])


def embed_missing(plan: Plan, cache: VectorCache, embedder: Embedder, progress: Progress) -> np.ndarray:
    vectors = np.zeros((len(plan.chunks), embedder.dimension), dtype=np.float32)
    for position, key in enumerate(plan.keys):
        cached = cache.get(key)
        if cached is not None:
            vectors[position] = cached
    cached_count = len(plan.chunks) - len(plan.missing)
    progress.update(force=True, phase="Embedding", chunks=cached_count)
    if plan.missing:
        fresh = embedder.embed_documents([plan.texts[i] for i in plan.missing],
                                         on_batch=lambda done: progress.update(chunks=cached_count + done))
        vectors[plan.missing] = fresh
    return vectors


def run_index(config: IndexConfig, reporter: Any, embedder: Embedder | None = None) -> dict[str, Any]:
    """Runs one pass; returns the result the operator shows in the VectorIndex's status."""
    started = time.monotonic()
    spec = config.spec
    validate_index(config.store_uri, spec.store.index_type, spec.store.metric)  # before any slow work
    progress = Progress(reporter)
    try:
        progress.update(force=True, phase="Loading", documents=0, documentsTotal=0, chunks=0, chunksTotal=0)
        loaded = load_documents(config)
        store = open_store(config.store_uri, config.collection)
        with store.exclusive(on_wait=progress.waiting):
            progress.fields.pop("waitingFor", None)
            progress.update(force=True, phase="LoadingModel", documentsTotal=len(loaded.documents))
            embedder = embedder or Embedder(ModelRef(spec.embedding.model, config.model_path),
                                            spec.embedding.backend, spec.embedding.batch_size,
                                            spec.embedding.normalize, spec.embedding.query_prefix,
                                            precision=spec.embedding.precision)
            result = index_documents(config, loaded, embedder, store, progress)
        progress.update(force=True, phase="Done")
    finally:
        progress.stop()
    return {**result, "skipped": [s.to_wire() for s in loaded.skipped],
            "durationSeconds": round(time.monotonic() - started, 3)}


def load_documents(config: IndexConfig) -> LoadResult:
    loaded = load_sources(config.spec.sources, config.source_paths, config.spec.formats)
    for skipped in loaded.skipped:  # the Job log keeps the full list even where a status message is cut
        log.warning("skipped %s: %s", skipped.path, skipped.reason)
    if not loaded.documents:
        reasons = "; ".join(f"{s.path}: {s.reason}" for s in loaded.skipped[:3])
        raise IndexRunError(f"no documents could be loaded ({len(loaded.skipped)} skipped"
                            f"{': ' if reasons else ''}{reasons})")
    return loaded


def index_documents(config: IndexConfig, loaded: LoadResult, embedder: Embedder, store, progress: Progress,
                    ) -> dict[str, Any]:
    """Chunks and embeds what the cache lacks; writes and publishes a version only if the rows changed."""
    spec = config.spec
    state_dir = Path(config.state_path) if config.state_path else default_state_dir(config)
    vectors_fp = vectors_fingerprint(embedder.name, embedder.backend, embedder.normalize, embedder.dimension,
                                     embedder.precision)

    progress.update(force=True, phase="Chunking")
    chunks, chunks_fp = chunk_all(loaded.documents, embedder, config, progress)
    texts = [embedding_text(chunk, spec.embedding.context) for chunk in chunks]
    keys = [content_key(text) for text in texts]
    model_files = getattr(embedder, "files_digest", "")
    cache = VectorCache.load(state_dir, vectors_fp, model_files)
    if cache.model_replaced:
        log.warning("the embedding model's files changed since the last run (%s): every chunk is embedded again",
                    embedder.name)
    plan = Plan(chunks, texts, [row_id(vectors_fp, chunks_fp, c, t) for c, t in zip(chunks, texts)], keys,
                [i for i, key in enumerate(keys) if cache.get(key) is None])
    active = store.active()
    same_model = not cache.model_replaced and (not active or not active.model_files or not model_files
                                                or active.model_files == model_files)
    manifest = Manifest.load(state_dir)
    if active and manifest.version == active.version:
        previous_ids = manifest.row_ids
    elif active and hasattr(store, "row_ids"):
        # The state directory is gone (a Milvus server's lives in the pod): what the active version holds is read
        # back from the server, and its vectors serve unchanged rows (a row id names the text, the model and the
        # chunking), so a run over unchanged documents still embeds and publishes nothing.
        previous_ids = store.row_ids(active)
        if same_model:
            plan = reuse_stored_vectors(plan, cache, store, active, previous_ids)
    else:
        previous_ids = frozenset()
    vectors = embed_missing(plan, cache, embedder, progress)
    cache.save(state_dir, keys, vectors)

    current_ids = frozenset(plan.ids)
    layout_fp = digest(chunks_fp, spec.store.index_type, spec.store.metric)[:16]
    dropped: list[str] = []
    if (active is not None and previous_ids == current_ids and active.layout_fingerprint == layout_fp
            and active.vectors_fingerprint == vectors_fp and same_model):
        info = active  # nothing changed: readers keep the version they have
    else:
        info = VersionInfo(alias=config.collection, version=store.next_version(), embedding_model=embedder.name,
                           dimension=embedder.dimension, metric=spec.store.metric,
                           index_type=spec.store.index_type, chunks=len(chunks), documents=len(loaded.documents),
                           vectors_fingerprint=vectors_fp, layout_fingerprint=layout_fp,
                           search_params=index_params(spec.store.index_type, len(chunks))[1], created_at=now(),
                           model_files=model_files)
        progress.update(force=True, phase="Writing", chunks=len(chunks))
        store.write(info, Rows(plan.ids, vectors, [c.text for c in chunks], row_metadata(chunks)))
        progress.update(force=True, phase="Switching")
        store.publish(info)
        Manifest(info.version, current_ids).save(state_dir)
        dropped = store.prune(spec.store.retain_versions)
    kept = len(current_ids & previous_ids)
    progress.update(chunks=len(chunks))
    return {"documents": len(loaded.documents), "chunks": len(chunks), "dimension": embedder.dimension,
            "embeddingModel": embedder.name, "activeCollection": info.collection, "activeVersion": info.name,
            "added": len(current_ids) - kept, "kept": kept, "removed": len(previous_ids - current_ids),
            "embedded": len(plan.missing), "droppedVersions": dropped}


def row_metadata(chunks: list[Chunk]) -> list[dict]:
    return [chunk.metadata() for chunk in chunks]


def default_state_dir(config: IndexConfig) -> Path:
    """Next to the versions for milvus-lite; in the pod for a Milvus server (each run reads what it needs of the
    last one back from the server when this is gone)."""
    if is_server_uri(config.store_uri):
        return Path("/tmp/ragtune-index-state") / config.collection
    return Path(config.store_uri) / config.collection / "state"


