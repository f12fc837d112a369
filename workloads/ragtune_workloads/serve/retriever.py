"""The retriever behind the endpoint: the index's `Retriever` (which follows the active version) plus caches of
query embeddings and results that belong to one index version.

Each call first looks at the published version (one small file read on milvus-lite, an alias lookup on a server);
when it changed, both caches are emptied before anything is looked up, so a request never sees the old version's
results once the new one is published.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np

from ragtune.api.workload import RetrievalTarget

from ragtune_workloads.index.embedding import EXPORTED_BACKENDS, PRECISIONS, Embedder, ModelRef
from ragtune_workloads.index.retrieval import Hit, Retriever

from .cache import MISSING, VersionedCache
from .routing import similarity

log = logging.getLogger(__name__)

EMBEDDING_CACHE_ENTRIES = 4096
QUERY_THREADS = 1  # runtime threads per query: concurrent requests run side by side instead
RESULT_CACHE_ENTRIES = 4096


class CachingEmbedder:
    """An Embedder whose query vectors are cached for the index version `version_of()` returns."""

    def __init__(self, embedder: Embedder, cache: VersionedCache):
        self.inner = embedder
        self.cache = cache
        self.name = embedder.name
        self.dimension = embedder.dimension
        self.local = threading.local()  # the version the current thread's search runs against

    def fit(self, query: str) -> str:
        """The query cut to what the embedding model reads: the shared Embedder lifts the tokenizer's length
        limit for chunking, and an untruncated long query would overflow the model's position embeddings."""
        limit = self.inner.max_chunk_tokens
        offsets = self.inner.tokenizer(query, add_special_tokens=False, return_offsets_mapping=True,
                                       verbose=False)["offset_mapping"]
        return query if len(offsets) <= limit else query[:offsets[limit - 1][1]]

    def embed_queries(self, queries: list[str]) -> np.ndarray:
        queries = [self.fit(query) for query in queries]
        version = getattr(self.local, "version", None)
        vectors: list[Any] = [self.cache.get(query, version) for query in queries]
        missing = [i for i, vector in enumerate(vectors) if vector is MISSING]
        if missing:
            fresh = self.inner.embed_queries([queries[i] for i in missing])
            for row, i in enumerate(missing):
                vectors[i] = fresh[row]
                self.cache.put(queries[i], fresh[row], version)
        return np.stack(vectors) if vectors else np.zeros((0, self.dimension), dtype=np.float32)


def hit_to_source(hit: Hit, metric: str) -> dict[str, Any]:
    meta = hit.metadata or {}
    return {"id": hit.id, "document": meta.get("path", ""), "title": meta.get("title", ""),
            "section": meta.get("section", ""), "chunk": meta.get("chunk"),
            "score": round(similarity(hit.score, metric), 6), "text": hit.text, "index_version": hit.version}


def query_embedder(target: RetrievalTarget) -> Embedder:
    """The endpoint's query embedder: target.query_backend at target.query_precision, else torch where the model
    does not export or the runtime does not start (the same weights either way, so the index's vectors fit both)."""
    ref = ModelRef(target.embedding_model, target.model_path)
    if target.query_backend in EXPORTED_BACKENDS:
        try:
            embedder = Embedder(ref, backend=target.query_backend, precision=target.query_precision,
                                query_prefix=target.query_prefix, threads=QUERY_THREADS)
            embedder.warm_up_queries()
            return embedder
        except Exception as exc:  # export and the runtimes fail in many ways; serving must not
            log.warning("queries embedded with torch: %s did not run in %s (%s)", target.embedding_model,
                        target.query_backend, exc)
    precision = target.query_precision if target.query_precision in PRECISIONS["torch"] else "fp32"
    return Embedder(ref, precision=precision, query_prefix=target.query_prefix)


class RetrievalService:
    def __init__(self, target: RetrievalTarget, embedder: Embedder | None = None,
                 embedding_cache: int = EMBEDDING_CACHE_ENTRIES, result_cache: int = RESULT_CACHE_ENTRIES):
        embedder = embedder or query_embedder(target)
        self.embeddings = VersionedCache(embedding_cache)
        self.results = VersionedCache(result_cache)
        self.embedder = CachingEmbedder(embedder, self.embeddings)
        self.retriever = Retriever.from_target(target, self.embedder)
        self._lock = threading.Lock()

    def current_version(self) -> tuple[str, str]:
        """(version name, metric) after following the published pointer; caches emptied when it moved."""
        self.retriever.refresh()
        info = self.retriever.active
        self.embeddings.switch(info.name)
        self.results.switch(info.name)
        return info.name, info.metric

    def retrieve_many(self, queries: list[str], k: int) -> list[dict[str, Any]]:
        """For each query: {"hits": [source dicts, best first], "version", "seconds", "cache"}."""
        started = time.perf_counter()
        version, metric = self.current_version()
        embedding_before = (self.embeddings.hits, self.embeddings.misses)
        cached = [self.results.get((query, k), version) for query in queries]
        missing = [i for i, hits in enumerate(cached) if hits is MISSING]
        if missing:
            self.embedder.local.version = version
            found = self.retriever.search_many([queries[i] for i in missing], k)
            for i, hits in zip(missing, found):
                sources = [hit_to_source(hit, metric) for hit in hits]
                cached[i] = sources
                # Results from a version published during the search belong to that version, not this one.
                if all(hit.version == version for hit in hits):
                    self.results.put((queries[i], k), sources, version)
        seconds = time.perf_counter() - started
        embedding_cache = {"hits": self.embeddings.hits - embedding_before[0],
                           "misses": self.embeddings.misses - embedding_before[1]}
        answers = []
        for i, hits in enumerate(cached):
            answers.append({
                "hits": hits, "version": hits[0]["index_version"] if hits else version,
                "seconds": seconds,
                "cache": {"retrieval": {"hits": int(i not in missing), "misses": int(i in missing)},
                          # shared by the batch: counted once, on its first query
                          "embedding": embedding_cache if i == 0 else {}},
            })
        return answers

    def close(self) -> None:
        self.retriever.close()
