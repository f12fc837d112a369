"""In-process views of the objects the controllers watch, fed by watch events.

Status is computed from these instead of reading the API on every child event: a Job's pods change state several
times in a few seconds, and reading the Job, its Pods and the owner back for each change would dominate the
operator's work. Only the fields status needs are kept, so memory stays flat.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Any

from ..api.workload import PROGRESS_ANNOTATION, RESULT_ANNOTATION

OwnerKey = tuple[str, str, str]  # (kind, namespace, name)


def compact_pod(body: dict[str, Any]) -> dict[str, Any]:
    meta, st = body.get("metadata") or {}, body.get("status") or {}
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items()
                   if k in (PROGRESS_ANNOTATION, RESULT_ANNOTATION)}
    return {"metadata": {"name": meta.get("name"), "uid": meta.get("uid"),
                         "creationTimestamp": meta.get("creationTimestamp"),
                         "labels": {"job-name": (meta.get("labels") or {}).get("job-name")},
                         "annotations": annotations},
            "status": {"phase": st.get("phase"), "conditions": st.get("conditions") or [],
                       "containerStatuses": st.get("containerStatuses") or []}}


def compact_job(body: dict[str, Any]) -> dict[str, Any]:
    meta = body.get("metadata") or {}
    return {"metadata": {"name": meta.get("name"), "uid": meta.get("uid"),
                         "creationTimestamp": meta.get("creationTimestamp"),
                         "labels": dict(meta.get("labels") or {})},
            "status": dict(body.get("status") or {})}


class ChildCache:
    # Deleted children remembered per owner (their uids): enough for the few Jobs and pods an owner has.
    TOMBSTONES_PER_OWNER = 256

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[OwnerKey, dict[str, dict]] = defaultdict(dict)
        self._deleted: dict[OwnerKey, dict[str, None]] = defaultdict(dict)  # an ordered set of uids

    def put(self, owner: OwnerKey, name: str, value: dict) -> None:
        with self._lock:
            self._items[owner][name] = value

    def delete(self, owner: OwnerKey, name: str, uid: str | None) -> None:
        """The watch saw `name` deleted; `uid` is remembered so that an older read cannot bring it back."""
        with self._lock:
            self._items[owner].pop(name, None)
            if not self._items[owner]:
                del self._items[owner]
            if uid:
                deleted = self._deleted[owner]
                deleted[uid] = None
                while len(deleted) > self.TOMBSTONES_PER_OWNER:
                    del deleted[next(iter(deleted))]

    def fill(self, owner: OwnerKey, values: dict[str, dict]) -> None:
        """Adds what a read from the API found, except children the watch has already recorded or seen deleted:
        an event may have arrived between that read and now, and a newer state must not be overwritten by an
        older one (no further event would correct it once the child has stopped changing or is gone)."""
        with self._lock:
            known, deleted = self._items[owner], self._deleted.get(owner, {})
            for name, value in values.items():
                if value["metadata"].get("uid") not in deleted:
                    known.setdefault(name, value)
            if not known:
                del self._items[owner]

    def get(self, owner: OwnerKey) -> list[dict]:
        with self._lock:
            return list(self._items.get(owner, {}).values())

    def forget(self, owner: OwnerKey) -> None:
        with self._lock:
            self._items.pop(owner, None)
            self._deleted.pop(owner, None)


class StatusCache:
    """The last status ragtune wrote (or saw) per object: the base that decides whether a write is needed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[OwnerKey, tuple[int, dict]] = {}

    def get(self, key: OwnerKey) -> tuple[int, dict] | None:
        with self._lock:
            return self._items.get(key)

    def put(self, key: OwnerKey, generation: int, status: dict) -> None:
        with self._lock:
            self._items[key] = (generation, status)

    def forget(self, key: OwnerKey) -> None:
        with self._lock:
            self._items.pop(key, None)


JOBS = ChildCache()
PODS = ChildCache()
STATUS = StatusCache()


class OwnerCache:
    """The newest copy of each ragtune object seen (spec, metadata, status), by (kind, namespace, name)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[OwnerKey, dict] = {}

    def put(self, key: OwnerKey, body: dict | None) -> None:
        with self._lock:
            if body is None:
                self._items.pop(key, None)
            else:
                self._items[key] = body

    def get(self, key: OwnerKey) -> dict | None:
        with self._lock:
            return self._items.get(key)

    def items(self, kind: str) -> list[tuple[OwnerKey, dict]]:
        with self._lock:
            return [(key, body) for key, body in self._items.items() if key[0] == kind]


OWNERS = OwnerCache()
