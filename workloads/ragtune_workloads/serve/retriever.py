"""The retriever behind the endpoint: the index's `Retriever` (which follows the active version) plus caches of
query embeddings and results that belong to one index version.

Each call first looks at the published version (one small file read on milvus-lite, an alias lookup on a server);
when it changed, both caches are emptied before anything is looked up, so a request never sees the old version's
results once the new one is published.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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
# ... except a query that arrives alone while nothing else runs (no other query, no generation): it may use the
# cores that would otherwise idle (2 threads: -1.5 ms of ~6 ms cold; more do not pay for their wake-up at ~15 tokens).
WIDE_QUERY_THREADS = 2
RESULT_CACHE_ENTRIES = 4096


class CachingEmbedder:
    """An Embedder whose query vectors are cached for the index version `version_of()` returns."""

    def __init__(self, embedder: Embedder, cache: VersionedCache):
        self.inner = embedder
        self.cache = cache
        self.name = embedder.name
        self.dimension = embedder.dimension
        self.local = threading.local()  # the version the current thread's search runs against

    def embed_queries(self, queries: list[str]) -> np.ndarray:
        """Vectors of `queries`, cached by the query as asked: a query longer than the model's window is cut by the
        embedder's own tokenisation (the same vector as its cut text), so it is tokenised once, by the embedder."""
        version = getattr(self.local, "version", None)
        vectors: list[Any] = [self.cache.get(query, version) for query in queries]
        missing = [i for i, vector in enumerate(vectors) if vector is MISSING]
        if missing:
            fresh = self.inner.embed_queries([queries[i] for i in missing], getattr(self.local, "wide", False))
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
            wide = min(WIDE_QUERY_THREADS, len(os.sched_getaffinity(0)))
            embedder = Embedder(ref, backend=target.query_backend, precision=target.query_precision,
                                query_prefix=target.query_prefix, threads=QUERY_THREADS, wide_threads=wide)
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

    def retrieve_many(self, queries: list[str], k: int, wide: bool = False) -> list[dict[str, Any]]:
        """For each query: {"hits": [source dicts, best first], "version", "seconds", "cache"}. `wide`: the query
        embedding may use the runtime's wide threads (nothing else is running)."""
        started = time.perf_counter()
        version, metric = self.current_version()
        embedding_before = (self.embeddings.hits, self.embeddings.misses)
        cached = [self.results.get((query, k), version) for query in queries]
        missing = [i for i, hits in enumerate(cached) if hits is MISSING]
        if missing:
            self.embedder.local.version = version
            self.embedder.local.wide = wide
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


class QueryBatcher:
    """Retrieval off the event loop, batched without waiting for company: a request arriving while no batch runs
    starts one at once, in the caller's `submit` (so the embedding is already running while the caller goes on,
    e.g. rendering its prompt); requests arriving while a batch runs form the next batch by themselves (at most
    `max_batch`, grouped by k). One worker thread: batches run one after another, each using the runtime's threads.
    A batch of one query while `idle()` says nothing else runs (no generation) embeds with the wide threads.
    """

    def __init__(self, service: RetrievalService, max_batch: int, idle: Callable[[], bool] = lambda: True):
        self.service = service
        self.max_batch = max_batch
        self.idle = idle
        self.pending: list[tuple[str, int, asyncio.Future]] = []
        self.running = False
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retrieval")

    def submit(self, query: str, k: int) -> asyncio.Future:
        """Must be called on the event loop; the future resolves to `RetrievalService.retrieve_many`'s answer."""
        future = asyncio.get_running_loop().create_future()
        self.pending.append((query, k, future))
        if not self.running:
            self._start()
        return future

    def _start(self) -> None:
        waiting = [item for item in self.pending if not item[2].cancelled()]  # requests that went away
        batch, self.pending = waiting[:self.max_batch], waiting[self.max_batch:]
        if not batch:
            return
        self.running = True
        wide = len(batch) == 1 and not self.pending and self.idle()
        done = asyncio.get_running_loop().run_in_executor(self.executor, self._run, [(q, k) for q, k, _ in batch],
                                                          wide)
        done.add_done_callback(lambda finished: self._finish(batch, finished))

    def _run(self, requests: list[tuple[str, int]], wide: bool) -> list[dict[str, Any]]:
        answers: list[dict[str, Any] | None] = [None] * len(requests)
        for k in dict.fromkeys(k for _, k in requests):  # in order of arrival
            positions = [i for i, (_, want) in enumerate(requests) if want == k]
            found = self.service.retrieve_many([requests[i][0] for i in positions], k, wide)
            for i, answer in zip(positions, found):
                answers[i] = answer
        return answers

    def _finish(self, batch: list[tuple[str, int, asyncio.Future]], finished: asyncio.Future) -> None:
        self.running = False
        error = finished.exception() if not finished.cancelled() else asyncio.CancelledError()
        answers = None if error else finished.result()
        for i, (_, _, future) in enumerate(batch):
            if future.done():
                continue
            if error:
                future.set_exception(error)
            else:
                future.set_result(answers[i])
        if self.pending:
            self._start()

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
