"""Versioned Milvus collections and how readers are switched to a new version.

Every indexing run that changes anything writes a complete new version and only then points readers at it, so a
reader sees the old version or the new one, never a half-written or empty one.

- Milvus server (`http://…`): version N is the collection `<alias>_v<N>`; readers query the alias, and
  `alter_alias` moves it in one server-side step.
- milvus-lite (a local path): a milvus-lite file can be opened by one process at a time, so the index Job and the
  serving endpoint must never share one. Each version is its own file, `<root>/<alias>/v<N>/milvus.db` (holding
  collection `<alias>_v<N>` and the alias `<alias>`), written by the index Job alone and closed before it is
  published. Publishing is an atomic rename of `<root>/<alias>/current.json`. A published version file is never
  written again; readers copy it to private storage and open the copy (see `retrieval`), so any number of readers
  and the next index run never contend for a lock.

Two index runs of one store never write at once (`exclusive`): a lock file for milvus-lite, a Lease (see `lease`)
for a server.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .. import kubeapi
from ..lease import RunLease, lease_name, wait_for_turn

log = logging.getLogger(__name__)
SCHEMA_VERSION = 1
# What milvus-lite 3.2 really builds. It accepts IVF_PQ, DISKANN and SCANN, reports success and then fails in
# a background thread (falling back to brute force), so those are refused here before any work is done.
LITE_INDEX_TYPES = frozenset({"FLAT", "AUTOINDEX", "HNSW", "HNSW_SQ", "IVF_FLAT", "IVF_SQ8"})
SERVER_INDEX_TYPES = LITE_INDEX_TYPES | {"IVF_PQ", "DISKANN", "SCANN"}
METRICS = frozenset({"COSINE", "IP", "L2"})
MAX_TEXT_BYTES = 65535
POINTER_FILE = "current.json"
VERSION_FILE = "version.json"
VERSION_DIR = re.compile(r"^v(\d+)$")
INSERT_BATCH = 2000
READ_BATCH = 1000
# How long an index run waits for another run of the same index to finish (a scheduled run and the run of a changed
# spec can overlap); the Job's activeDeadlineSeconds bounds it too.
RUN_WAIT_SECONDS = 6 * 3600.0
LEASE_SECONDS = 30.0  # a dead run's Lease is taken over after this long unchanged
OnWait = Callable[[str], None]


class StoreError(RuntimeError):
    """The store cannot be used as configured; the message says why and what to change."""


@dataclass(frozen=True)
class VersionInfo:
    """What a published version holds; readers check it before they query."""

    alias: str
    version: int
    embedding_model: str
    dimension: int
    metric: str
    index_type: str
    chunks: int
    documents: int
    vectors_fingerprint: str  # model, backend, normalisation: queries must be embedded the same way
    layout_fingerprint: str  # chunking, index type and metric: a change needs a new version, not new vectors
    search_params: dict = field(default_factory=dict)
    created_at: str = ""
    schema_version: int = SCHEMA_VERSION
    model_files: str = ""  # digest of the embedding model's files ("" where unknown, or before it was recorded)

    @property
    def name(self) -> str:
        return f"v{self.version}"

    @property
    def collection(self) -> str:
        return f"{self.alias}_v{self.version}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> VersionInfo:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{key: value for key, value in data.items() if key in known})


@dataclass(frozen=True)
class Rows:
    ids: list[str]
    vectors: np.ndarray
    texts: list[str]
    metadata: list[dict]

    def __len__(self) -> int:
        return len(self.ids)


def is_server_uri(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "tcp://"))


def validate_index(uri: str, index_type: str, metric: str) -> None:
    supported = SERVER_INDEX_TYPES if is_server_uri(uri) else LITE_INDEX_TYPES
    backend = "Milvus" if is_server_uri(uri) else "milvus-lite"
    if index_type not in supported:
        raise StoreError(f"index type {index_type} is not supported by {backend}: use one of "
                         f"{', '.join(sorted(supported))}")
    if metric not in METRICS:
        raise StoreError(f"metric {metric} is not supported: use one of {', '.join(sorted(METRICS))}")


def index_params(index_type: str, rows: int) -> tuple[dict, dict]:
    """(build params, search params) sized for `rows` vectors."""
    if index_type in ("HNSW", "HNSW_SQ"):
        return {"M": 16, "efConstruction": 200}, {"ef": 128}
    if index_type in ("IVF_FLAT", "IVF_SQ8", "IVF_PQ", "SCANN"):
        nlist = max(1, min(rows, int(4 * math.sqrt(max(rows, 1)))))
        build = {"nlist": nlist} if index_type != "IVF_PQ" else {"nlist": nlist, "m": 8}
        return build, {"nprobe": min(nlist, 32)}
    return {}, {}


def fit_text(text: str) -> str:
    """Milvus VARCHAR is limited in bytes; a longer chunk is stored cut (its offsets still locate the source)."""
    data = text.encode()
    return text if len(data) <= MAX_TEXT_BYTES else data[:MAX_TEXT_BYTES].decode("utf-8", "ignore")


def create_version_collection(client, info: VersionInfo, rows: int) -> None:
    from pymilvus import DataType

    schema = client.create_schema(auto_id=False, enable_dynamic_field=False,
                                  description=f"ragtune {info.alias} {info.name}")
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=64)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=info.dimension)
    schema.add_field("text", DataType.VARCHAR, max_length=MAX_TEXT_BYTES)
    schema.add_field("metadata", DataType.JSON)
    client.create_collection(info.collection, schema=schema, properties={
        "ragtune.embeddingModel": info.embedding_model,
        "ragtune.dimension": str(info.dimension),
        "ragtune.version": json.dumps(info.to_dict(), separators=(",", ":")),
    })


def insert_rows(client, collection: str, rows: Rows) -> None:
    for first in range(0, len(rows), INSERT_BATCH):
        last = first + INSERT_BATCH
        client.insert(collection, [
            {"id": row_id, "vector": vector.tolist(), "text": fit_text(text), "metadata": meta}
            for row_id, vector, text, meta in zip(rows.ids[first:last], rows.vectors[first:last],
                                                  rows.texts[first:last], rows.metadata[first:last])])


def finish_collection(client, info: VersionInfo, rows: int, wait_for_index: bool = True) -> None:
    """flush, build the index, load, and check every row is there before anyone may read it. milvus-lite builds
    the index within the call and has no timestamp service to poll it with (waiting logs a server-side error)."""
    client.flush(info.collection)
    build, _ = index_params(info.index_type, rows)
    params = client.prepare_index_params()
    params.add_index("vector", index_type=info.index_type, metric_type=info.metric, params=build)
    client.create_index(info.collection, params, sync=wait_for_index)
    client.load_collection(info.collection)
    stored = client.query(info.collection, filter="", output_fields=["count(*)"])[0]["count(*)"]
    if stored != rows:
        raise StoreError(f"collection {info.collection} holds {stored} rows after flush, expected {rows}")


def write_version(client, info: VersionInfo, rows: Rows, wait_for_index: bool = True) -> None:
    create_version_collection(client, info, len(rows))
    insert_rows(client, info.collection, rows)
    finish_collection(client, info, len(rows), wait_for_index)


def atomic_write_json(path: Path, data: dict) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        json.dump(data, tmp, indent=1)
        tmp.flush()
        os.fsync(tmp.fileno())
    os.replace(tmp.name, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class LiteStore:
    """Versions as separate milvus-lite files under `<root>/<alias>/`, published through a pointer file."""

    def __init__(self, root: str | Path, alias: str):
        self.alias = alias
        self.dir = Path(root) / alias
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"milvus-lite store {root} is not writable: {exc.strerror or exc}") from None

    @contextmanager
    def exclusive(self, wait: float = RUN_WAIT_SECONDS, on_wait: OnWait | None = None) -> Iterator[None]:
        """Held for a whole index run: two runs would pick the same next version and delete each other's. A second
        run waits for the first to finish (up to `wait` seconds)."""
        with open(self.dir / ".index.lock", "w") as handle:
            def attempt() -> str | None:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return None
                except BlockingIOError:
                    return "another index run"
            try:
                wait_for_turn(attempt, wait, on_wait, poll=1.0)
            except TimeoutError:
                raise StoreError(f"another index run is writing {self.dir} and did not finish within {wait:.0f}s; "
                                 "try again when it has finished") from None
            yield

    @property
    def pointer(self) -> Path:
        return self.dir / POINTER_FILE

    def db_path(self, version: int) -> Path:
        return self.dir / f"v{version}" / "milvus.db"

    def active(self) -> VersionInfo | None:
        return read_pointer(self.dir)

    def versions(self) -> list[int]:
        return sorted(int(m.group(1)) for p in self.dir.iterdir() if (m := VERSION_DIR.match(p.name)))

    def next_version(self) -> int:
        active = self.active()
        return max([0, *self.versions(), active.version if active else 0]) + 1

    def write(self, info: VersionInfo, rows: Rows) -> None:
        from pymilvus import MilvusClient

        version_dir = self.dir / info.name
        if version_dir.exists():  # left by a run that failed before publishing; nobody reads it
            shutil.rmtree(version_dir)
        version_dir.mkdir()
        client = MilvusClient(str(self.db_path(info.version)))
        try:
            write_version(client, info, rows, wait_for_index=False)
            client.create_alias(info.collection, self.alias)
        finally:
            client.close()  # releases the file's lock: readers may only open it after this
        atomic_write_json(version_dir / VERSION_FILE, info.to_dict())

    def publish(self, info: VersionInfo) -> None:
        atomic_write_json(self.pointer, {**info.to_dict(), "path": f"{info.name}/milvus.db", "publishedAt": now()})

    def prune(self, retain: int) -> list[str]:
        """Deletes all but the newest `retain` published versions (the active one always stays), and any
        unpublished leftovers older than the active version."""
        active = self.active()
        if active is None:
            return []
        # only complete versions (their version.json written last) count: one a crash left half-written is no
        # version to go back to, and must not push a good one out
        complete = [v for v in self.versions()
                    if v <= active.version and (self.dir / f"v{v}" / VERSION_FILE).is_file()]
        keep = set(complete[-retain:]) | {active.version}
        dropped = []
        for version in self.versions():
            if version in keep or version > active.version:
                continue
            shutil.rmtree(self.dir / f"v{version}", ignore_errors=True)
            dropped.append(f"v{version}")
        return dropped


def read_pointer(directory: Path) -> VersionInfo | None:
    try:
        return VersionInfo.from_dict(json.loads((directory / POINTER_FILE).read_text()))
    except FileNotFoundError:
        return None


class ServerStore:
    """Versions as collections `<alias>_v<N>` on one Milvus, published by moving the alias."""

    def __init__(self, client, alias: str):
        self.client = client
        self.alias = alias
        self.lease: RunLease | None = None

    @contextmanager
    def exclusive(self, wait: float = RUN_WAIT_SECONDS, on_wait: OnWait | None = None) -> Iterator[None]:
        """Held for a whole index run (see LiteStore.exclusive). A server has no shared file to lock: in a cluster
        the run holds a Lease named after the collection in its namespace; outside one nothing else coordinates."""
        namespace, pod = os.environ.get("POD_NAMESPACE"), os.environ.get("POD_NAME")
        if not (namespace and pod and kubeapi.in_cluster()):
            yield
            return
        lease = RunLease(namespace, lease_name("ragtune-index", self.alias), pod, LEASE_SECONDS)
        try:
            lease.acquire(wait, on_wait)
        except TimeoutError as exc:
            raise StoreError(f"another index run is writing collection {self.alias}: {exc}; try again when it "
                             "has finished") from None
        except kubeapi.ApiError as exc:
            if exc.status != 403:
                raise
            # A Role from before Leases were granted: the run goes ahead, as runs did then, and says what to fix.
            log.warning("no Lease for collection %s (%s): overlapping index runs are not kept apart; let "
                        "ServiceAccount ragtune-workload in %s get, create, update and delete "
                        "coordination.k8s.io leases (the operator's Role does)", self.alias, exc, namespace)
            yield
            return
        self.lease = lease
        try:
            yield
        finally:
            self.lease = None
            lease.release()

    def active(self) -> VersionInfo | None:
        try:
            collection = self.client.describe_alias(self.alias)["collection_name"]
        except Exception:  # pymilvus raises MilvusException for a missing alias
            return None
        return collection_info(self.client, collection)

    def versions(self) -> list[int]:
        pattern = re.compile(rf"^{re.escape(self.alias)}_v(\d+)$")
        return sorted(int(m.group(1)) for name in self.client.list_collections() if (m := pattern.match(name)))

    def next_version(self) -> int:
        active = self.active()
        return max([0, *self.versions(), active.version if active else 0]) + 1

    def row_ids(self, info: VersionInfo) -> frozenset[str]:
        """Every row id of a published version (a run whose state directory is gone reads what it published
        from the server instead)."""
        iterator = self.client.query_iterator(info.collection, batch_size=READ_BATCH, filter="",
                                              output_fields=["id"])
        ids: set[str] = set()
        try:
            while batch := iterator.next():
                ids.update(row["id"] for row in batch)
        finally:
            iterator.close()
        return frozenset(ids)

    def vectors(self, info: VersionInfo, ids: list[str]) -> dict[str, np.ndarray]:
        """The stored vectors of these rows of a published version."""
        found: dict[str, np.ndarray] = {}
        for first in range(0, len(ids), READ_BATCH):
            for row in self.client.get(info.collection, ids=ids[first:first + READ_BATCH],
                                       output_fields=["vector"]):
                found[row["id"]] = np.asarray(row["vector"], dtype=np.float32)
        return found

    def write(self, info: VersionInfo, rows: Rows) -> None:
        if self.client.has_collection(info.collection):
            self.client.drop_collection(info.collection)
        write_version(self.client, info, rows)

    def publish(self, info: VersionInfo) -> None:
        if self.lease is not None and self.lease.lost_to:
            raise StoreError(f"index run {self.lease.lost_to} took over collection {self.alias} while this run "
                             f"wrote {info.collection} (this run could not renew its Lease in time): nothing "
                             "published")
        if self.active() is None:
            self.client.create_alias(info.collection, self.alias)
        else:
            self.client.alter_alias(info.collection, self.alias)

    def prune(self, retain: int) -> list[str]:
        active = self.active()
        if active is None:
            return []
        older = [v for v in self.versions() if v < active.version]
        dropped = []
        for version in older[:max(0, len(older) - (retain - 1))]:
            self.client.drop_collection(f"{self.alias}_v{version}")
            dropped.append(f"v{version}")
        return dropped


def collection_info(client, collection: str) -> VersionInfo | None:
    properties = client.describe_collection(collection).get("properties", {})
    raw = properties.get("ragtune.version")
    return VersionInfo.from_dict(json.loads(raw)) if raw else None


def server_token(token: str | None = None) -> str:
    """The token for a Milvus server: the one given, else MILVUS_TOKEN (the operator sets it from
    store.tokenSecret), else none."""
    return token or os.environ.get("MILVUS_TOKEN") or ""


def open_store(uri: str, alias: str, token: str | None = None) -> LiteStore | ServerStore:
    if not is_server_uri(uri):
        return LiteStore(uri, alias)
    from pymilvus import MilvusClient

    token = server_token(token)
    try:
        client = MilvusClient(uri=uri, token=token, timeout=10)
    except Exception as exc:  # pymilvus reports a refused token and a server that is not there alike
        fix = ("check store.uri, and that store.tokenSecret holds a valid user:password or API key" if token else
               "check store.uri, and set store.tokenSecret if the server requires authentication")
        raise StoreError(f"Milvus at {uri} is unreachable or refused the connection "
                         f"({'with' if token else 'without'} a token): {type(exc).__name__}: {exc}; {fix}") from None
    return ServerStore(client, alias)
