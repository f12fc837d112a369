"""A run's hold on something no two runs may write at once, as a coordination.k8s.io Lease in the run's namespace.

Index runs on a Milvus server have no shared file to lock (milvus-lite's store has one): a scheduled run and the run
of a changed spec can overlap, would pick the same next version and drop each other's collection. The run that holds
the Lease writes; the other waits. The holder renews it every third of its duration; a holder that died stops
renewing, and its Lease counts as expired once it has stayed unchanged for a whole duration as this process saw it
(its own clock only, as client-go's leader election does: no two nodes' clocks are compared).
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from . import kubeapi

log = logging.getLogger(__name__)


def lease_name(prefix: str, key: str) -> str:
    """A valid object name for `key` (a collection name, say): readable where it can be, unique always."""
    readable = re.sub(r"[^a-z0-9-]+", "-", key.lower()).strip("-")[:40]
    return f"{prefix}-{readable}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def wait_for_turn(attempt: Callable[[], str | None], wait: float, on_wait: Callable[[str], None] | None = None,
                  poll: float = 2.0) -> None:
    """Calls `attempt` until it returns None (this run's turn), at most `wait` seconds, telling `on_wait` who holds
    the turn meanwhile; after that raises TimeoutError with the holder's name."""
    deadline = time.monotonic() + wait
    while (holder := attempt()) is not None:
        if time.monotonic() >= deadline:
            raise TimeoutError(holder)
        if on_wait:
            on_wait(holder)
        time.sleep(min(poll, max(0.0, deadline - time.monotonic())))


def micro_time() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class RunLease:
    def __init__(self, namespace: str, name: str, holder: str, duration: float = 30.0):
        self.namespace, self.name, self.holder = namespace, name, holder
        self.duration = duration
        self.path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
        self.lost_to: str | None = None  # set when another run took the Lease while this one held it
        self._seen: tuple[str, float] | None = None  # (resourceVersion, when first seen unchanged)
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def try_acquire(self) -> str | None:
        """None once this run holds the Lease; else who holds it."""
        try:
            lease = kubeapi.call("GET", f"{self.path}/{self.name}")
        except kubeapi.ApiError as exc:
            if exc.status != 404:
                raise
            return self._write("POST", self.path, self._body(None, transitions=0))
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity")
        if holder and holder != self.holder and not self._expired(lease):
            return holder
        transitions = (spec.get("leaseTransitions") or 0) + (holder != self.holder)
        return self._write("PUT", f"{self.path}/{self.name}", self._body(lease, transitions)) or None

    def _expired(self, lease: dict[str, Any]) -> bool:
        version = lease["metadata"]["resourceVersion"]
        now = time.monotonic()
        if self._seen is None or self._seen[0] != version:
            self._seen = (version, now)
        return now - self._seen[1] >= self.duration

    def _body(self, current: dict[str, Any] | None, transitions: int) -> dict[str, Any]:
        now = micro_time()
        metadata: dict[str, Any] = {"name": self.name, "namespace": self.namespace,
                                    "labels": {"app.kubernetes.io/managed-by": "ragtune"}}
        if current is not None:
            metadata["resourceVersion"] = current["metadata"]["resourceVersion"]
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata,
                "spec": {"holderIdentity": self.holder, "leaseDurationSeconds": max(1, round(self.duration)),
                         "acquireTime": now, "renewTime": now, "leaseTransitions": transitions}}

    def _write(self, method: str, path: str, body: dict[str, Any]) -> str | None:
        try:
            kubeapi.call(method, path, body)
        except kubeapi.ApiError as exc:
            if exc.status == 409:  # another run wrote it first
                return "another run"
            raise
        return None

    def acquire(self, wait: float, on_wait=None, poll: float = 2.0) -> None:
        """Waits up to `wait` seconds for the Lease (calling on_wait(holder) while it waits), then keeps it
        renewed until release()."""
        try:
            wait_for_turn(self.try_acquire, wait, on_wait, poll)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc} has held Lease {self.namespace}/{self.name} for over {wait:.0f}s") from None
        self._renewer = threading.Thread(target=self._renew, name=f"lease-{self.name}", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.duration / 3):
            try:
                lease = kubeapi.call("GET", f"{self.path}/{self.name}")
                holder = (lease.get("spec") or {}).get("holderIdentity")
                if holder != self.holder:
                    self.lost_to = holder or "nobody"
                    log.error("Lease %s/%s was taken by %s", self.namespace, self.name, self.lost_to)
                    return
                lease["spec"]["renewTime"] = micro_time()
                kubeapi.call("PUT", f"{self.path}/{self.name}", lease)
            except Exception as exc:  # a passing API error: the next renewal tries again, well within the duration
                log.warning("renewing Lease %s/%s failed: %s", self.namespace, self.name, exc)

    def release(self) -> None:
        """Stops renewing and deletes the Lease if this run still holds it (so the next run need not wait for it
        to expire)."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        try:
            lease = kubeapi.call("GET", f"{self.path}/{self.name}")
            if (lease.get("spec") or {}).get("holderIdentity") == self.holder:
                kubeapi.call("DELETE", f"{self.path}/{self.name}", {
                    "kind": "DeleteOptions", "apiVersion": "v1",
                    "preconditions": {"resourceVersion": lease["metadata"]["resourceVersion"]}})
        except Exception as exc:  # it expires by itself
            log.warning("releasing Lease %s/%s failed: %s", self.namespace, self.name, exc)
