"""The read side of a VectorIndex: embed a query, return the top-k chunks of the active version.

Used by the serving workload. A `Retriever` follows the published version: on a milvus-lite store it watches
`<root>/<alias>/current.json`, copies the version it names into private storage and opens the copy, so the
index Job (writing the next version) and any number of reader processes never contend for milvus-lite's
one-process lock. When a new version appears, the thread that notices copies and opens it while other queries
keep using the old one; then the new one replaces it in a single reference swap. Every query runs against
exactly one version. On a Milvus server the alias does the same job.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .embedding import Embedder, ModelRef
from .store import POINTER_FILE, VersionInfo, collection_info, is_server_uri, read_pointer, server_token

log = logging.getLogger(__name__)
COPY_ATTEMPTS = 5


class RetrievalError(RuntimeError):
    """The index cannot answer queries; the message says why."""


class ModelMismatchError(RetrievalError):
    """The query would be embedded with a different model than the index's vectors."""


class IndexNotReadyError(RetrievalError):
    """No version of the index has been published yet."""


@dataclass(frozen=True)
class Hit:
    id: str
    text: str
    score: float  # Milvus distance: higher is closer for COSINE/IP, lower is closer for L2
    metadata: dict[str, Any]
    version: str


def check_compatible(info: VersionInfo, model_name: str, dimension: int) -> None:
    if info.embedding_model != model_name or info.dimension != dimension:
        raise ModelMismatchError(
            f"index {info.alias} {info.name} was embedded with {info.embedding_model} ({info.dimension} dims); "
            f"queries here would be embedded with {model_name} ({dimension} dims): point the endpoint at the "
            f"same embedding model, or re-index with this one")


class OpenVersion:
    """One version opened for reading, closed when replaced and no query uses it any more."""

    def __init__(self, info: VersionInfo, client, collection: str, private_dir: Path | None = None):
        self.info = info
        self.client = client
        self.collection = collection
        self.private_dir = private_dir
        self.users = 0
        self.retired = False
        self._lock = threading.Lock()

    def acquire(self) -> None:
        with self._lock:
            self.users += 1

    def release(self) -> None:
        with self._lock:
            self.users -= 1
            done = self.retired and self.users == 0
        if done:
            self.close()

    def retire(self) -> None:
        with self._lock:
            self.retired = True
            done = self.users == 0
        if done:
            self.close()

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            if self.private_dir:
                shutil.rmtree(self.private_dir, ignore_errors=True)


# Values (rows x dimensions) of a version searched in memory: 64Mi float32 (256 MiB), e.g. ~175k chunks at 384.
MEMORY_SEARCH_MAX_VALUES = 64 * 1024 * 1024


class MemorySearch:
    """A published version's live rows held in memory and searched exactly: one matrix-vector product and a
    partial sort. milvus-lite's own search walks every row of a collection in Python before its index is used
    (measured: 2.3 ms at 1k rows, 17 ms at 10k, 104 ms at 50k; this: 0.06, 0.75, 6 ms at 384 dimensions, where
    reading the vectors from memory sets the time). A version never changes once published, so its rows are read
    once, after it is opened. Distances are milvus-lite's public ones: cosine similarity, inner product, squared
    L2."""

    def __init__(self, rows: list[dict], vector_field: str, pk_field: str, metric: str):
        self.metric = metric
        self.pks = [row[pk_field] for row in rows]
        self.entities = [{key: value for key, value in row.items() if key not in (vector_field, pk_field)}
                         for row in rows]
        vectors = np.asarray([row[vector_field] for row in rows], dtype=np.float32).reshape(len(rows), -1)
        if metric == "COSINE":  # a zero vector stays zero: similarity 0, as milvus-lite scores it
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = vectors / np.where(norms == 0, 1.0, norms)
        self.vectors = vectors
        self.squared_norms = (vectors * vectors).sum(axis=1) if metric == "L2" else None

    def search(self, queries: list, limit: int, output_fields: list[str] | None) -> list[list[dict]]:
        q = np.asarray(queries, dtype=np.float32).reshape(len(queries), -1)
        if self.metric == "COSINE":
            norms = np.linalg.norm(q, axis=1, keepdims=True)
            q = q / np.where(norms == 0, 1.0, norms)
        scores = q @ self.vectors.T
        if self.metric == "L2":  # |v - q|^2, smaller is closer
            scores = np.maximum(self.squared_norms[None, :] - 2 * scores + (q * q).sum(axis=1, keepdims=True), 0)
        order_key = scores if self.metric == "L2" else -scores
        k = min(limit, len(self.pks))
        results = []
        for row_scores, keys in zip(scores, order_key):
            top = np.argpartition(keys, k - 1)[:k] if k < len(keys) else np.arange(len(keys))
            top = top[np.lexsort((top, keys[top]))]  # best first; ties by row
            results.append([{"id": self.pks[i], "distance": float(row_scores[i]),
                             "entity": {name: self.entities[i].get(name) for name in (output_fields or [])}}
                            for i in top.tolist()])
        return results


class LiteReader:
    """A milvus-lite copy opened with milvus-lite's own API, searched with the keyword arguments of pymilvus'
    `MilvusClient.search`. Through pymilvus a search on a milvus-lite file travels over loopback gRPC to a server
    thread of this same process: measured, that round trip was ~90 % of a search (~2.2 ms back to back, ~4 ms
    inside a serving replica). Searches without a filter run on the version's rows in memory (`MemorySearch`)
    when it holds at most `MEMORY_SEARCH_MAX_VALUES`; filtered ones, and larger versions, on milvus-lite's
    engine. The rows are read in a thread of their own (milvus-lite reads 10-15k a second): the version is
    searched on the engine until they are in memory, so opening a version is not delayed by its size."""

    def __init__(self, data_dir: Path, collection: str, memory_max_values: int | None = None):
        from milvus_lite import DataType, MilvusLite

        self._db = MilvusLite(str(data_dir))
        self.name = collection
        self.memory: MemorySearch | None = None
        self.memory_loaded = threading.Event()  # set once the rows are in memory, or will not be
        self._closing = threading.Lock()
        self._closed = False
        try:
            self._collection = self._db.get_collection(collection)
            self._collection.load()  # a reopened milvus-lite collection starts released
            # The engine hands JSON fields back as their text; pymilvus gives them decoded.
            fields = self._collection.schema.fields
            self._json_fields = [f.name for f in fields if f.dtype == DataType.JSON]
            vectors = [f for f in fields if f.dtype == DataType.FLOAT_VECTOR]
            limit = MEMORY_SEARCH_MAX_VALUES if memory_max_values is None else memory_max_values
        except BaseException:
            self._db.close()
            raise
        if len(vectors) == 1 and self._collection.num_entities * (vectors[0].dim or 0) <= limit:
            threading.Thread(target=self._read_rows, args=([f.name for f in fields], vectors[0].name),
                             name=f"rows-{collection}", daemon=True).start()
        else:
            self.memory_loaded.set()

    def _read_rows(self, fields: list[str], vector_field: str) -> None:
        try:
            with self._closing:
                if self._closed:
                    return
                metric = (self._collection.get_index_info(vector_field) or {}).get("metric_type", "COSINE")
                pk_field = self._collection.pk_field
                rows = self._collection.query(output_fields=fields)
            self._decode(rows)
            self.memory = MemorySearch(rows, vector_field, pk_field, metric)
        except Exception:  # the engine still answers every search
            log.warning("searching %s on milvus-lite's engine: its rows could not be read", self.name,
                        exc_info=True)
        finally:
            self.memory_loaded.set()

    def _decode(self, entities: list[dict]) -> None:
        for entity in entities:
            for name in self._json_fields:
                if isinstance(entity.get(name), (str, bytes)):
                    entity[name] = json.loads(entity[name])

    def search(self, collection_name: str, data: list, limit: int, filter: str = "",
               output_fields: list[str] | None = None, search_params: dict | None = None) -> list[list[dict]]:
        params = search_params or {}
        memory = self.memory
        if memory is not None and not filter and params.get("metric_type") in (None, memory.metric):
            return memory.search(data, limit, output_fields)
        results = self._collection.search(query_vectors=data, top_k=limit, metric_type=params.get("metric_type"),
                                          expr=filter or None, output_fields=output_fields,
                                          search_params=params.get("params") or None)
        self._decode([hit.get("entity", {}) for hits in results for hit in hits])
        return results

    def close(self) -> None:
        with self._closing:  # after a read of the rows in progress: it uses the database
            self._closed = True
            self._db.close()


def open_lite_version(store_dir: Path, scratch: Path) -> OpenVersion:
    """Copies the published version into `scratch` and opens the copy. A version can be pruned while it is
    being copied (a newer one was published meanwhile): then the pointer is read again."""
    last_error: Exception | None = None
    for _ in range(COPY_ATTEMPTS):
        info = read_pointer(store_dir)
        if info is None:
            raise IndexNotReadyError(f"index {store_dir.name} has no published version yet ({store_dir / POINTER_FILE} "
                                     "is missing)")
        private = Path(tempfile.mkdtemp(prefix=f"{info.alias}-{info.name}-", dir=scratch))
        try:
            shutil.copytree(store_dir / info.name / "milvus.db", private / "milvus.db")
            client = LiteReader(private / "milvus.db", info.collection)
        except (OSError, shutil.Error) as exc:
            shutil.rmtree(private, ignore_errors=True)
            last_error = exc
            continue
        return OpenVersion(info, client, info.alias, private)
    raise RetrievalError(f"could not open the active version of {store_dir.name}: {last_error}")


class Retriever:
    """Top-k chunks of the active version of a VectorIndex's collection."""

    def __init__(self, store_uri: str, collection: str, embedder: Embedder | None = None, *,
                 embedding_model: str | None = None, model_path: str | None = None, query_prefix: str = "",
                 backend: str = "torch", token: str | None = None, scratch_dir: str | None = None):
        # Any backend or precision may embed queries for an index built with another: onnx runs the same weights,
        # bf16 and int8 come within cosine 0.9999 and 0.99 of them.
        if embedder is None:
            if not embedding_model:
                raise ValueError("a Retriever needs an embedder or an embedding_model")
            embedder = Embedder(ModelRef(embedding_model, model_path), backend=backend, query_prefix=query_prefix)
        self.embedder = embedder
        self.store_uri = store_uri
        self.alias = collection
        self._swap = threading.Lock()
        self._refreshing = threading.Lock()
        self._server_client = None
        self._scratch: Path | None = None
        self._pointer: tuple[tuple[int, int, int], VersionInfo | None] | None = None  # (file identity, contents)
        if is_server_uri(store_uri):
            from pymilvus import MilvusClient

            self._server_client = MilvusClient(uri=store_uri, token=server_token(token))
        else:
            self._store_dir = Path(store_uri) / collection
            self._scratch = Path(tempfile.mkdtemp(prefix="ragtune-retrieval-", dir=scratch_dir))
        self._current: OpenVersion | None = None
        self._refused: tuple[int, ModelMismatchError] | None = None
        try:
            self.refresh()
        except BaseException:
            self.close()  # a refused or missing index must not leave a scratch directory behind
            raise

    @classmethod
    def from_target(cls, target, embedder: Embedder | None = None, **kwargs) -> Retriever:
        """From the serving config's `RetrievalTarget`."""
        return cls(target.store_uri, target.collection, embedder, embedding_model=target.embedding_model,
                   model_path=target.model_path, **kwargs)

    # ---- following the active version ------------------------------------------------------------------------

    def _published(self) -> VersionInfo | None:
        if self._server_client is not None:
            try:
                name = self._server_client.describe_alias(self.alias)["collection_name"]
            except Exception:
                return None
            return collection_info(self._server_client, name)
        # Every query looks: a stat() tells whether the pointer file was replaced (publishing writes a new file and
        # renames it over the old one), so it is read and parsed only when it was.
        try:
            stat = (self._store_dir / POINTER_FILE).stat()
        except FileNotFoundError:
            return None
        seen = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if self._pointer is None or self._pointer[0] != seen:
            self._pointer = (seen, read_pointer(self._store_dir))
        return self._pointer[1]

    def _open(self) -> OpenVersion:
        if self._server_client is not None:
            info = self._published()
            if info is None:
                raise IndexNotReadyError(f"index {self.alias} has no published version yet (no alias {self.alias})")
            return OpenVersion(info, self._server_client, self.alias)
        return open_lite_version(self._store_dir, self._scratch)

    def refresh(self) -> bool:
        """Switches to the published version if it changed; True when it did. Other threads keep querying the
        version they have until the new one is open."""
        published = self._published()
        current = self._current
        if current is not None and published is not None and published.version == current.info.version:
            return False
        if published is not None and self._refused and self._refused[0] == published.version:
            raise self._refused[1]
        if not self._refreshing.acquire(blocking=current is None):
            return False
        try:
            if self._current is not None and published is not None and published.version == self._current.info.version:
                return False
            if published is None and self._current is not None:
                return False  # the pointer vanished (store being moved?): keep serving what we have
            opened = self._open()
            try:
                check_compatible(opened.info, self.embedder.name, self.embedder.dimension)
            except ModelMismatchError as exc:
                opened.close()
                self._refused = (opened.info.version, exc)
                raise
            with self._swap:
                previous, self._current = self._current, opened
            if previous is not None and previous.client is not opened.client:
                previous.retire()
            log.info("retrieval now reads %s %s", self.alias, opened.info.name)
            return True
        finally:
            self._refreshing.release()

    @contextmanager
    def _version(self):
        with self._swap:
            version = self._current
            if version is None:
                raise IndexNotReadyError(f"index {self.alias} has no published version yet")
            version.acquire()
        try:
            yield version
        finally:
            version.release()

    @property
    def active(self) -> VersionInfo:
        with self._version() as version:
            return version.info

    # ---- queries ---------------------------------------------------------------------------------------------

    def search(self, query: str, k: int = 10, filter: str = "") -> list[Hit]:
        return self.search_many([query], k, filter)[0]

    def search_many(self, queries: list[str], k: int = 10, filter: str = "") -> list[list[Hit]]:
        self.refresh()
        vectors = self.embedder.embed_queries(queries)
        with self._version() as version:
            info = version.info
            results = version.client.search(
                version.collection, data=[v.tolist() for v in vectors], limit=k, filter=filter,
                output_fields=["text", "metadata"],
                search_params={"metric_type": info.metric, "params": dict(info.search_params)})
        return [[Hit(str(hit["id"]), hit["entity"]["text"], float(hit["distance"]), hit["entity"]["metadata"],
                     info.name) for hit in hits] for hits in results]

    def close(self) -> None:
        with self._swap:
            current, self._current = self._current, None
        if current is not None and current.client is not self._server_client:
            current.retire()
        if self._server_client is not None:
            self._server_client.close()
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)

    def __enter__(self) -> Retriever:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
