"""Operator-wide settings, in one startup handler, and the metrics endpoint."""

from __future__ import annotations

import logging
import os
import random
from typing import Any

import kopf
from prometheus_client import start_http_server

from . import shared

PREFIX = "ragtune.io"
log = logging.getLogger(__name__)
_metrics_started = False


# Kinds with an immutable spec and one handler per cause (create, resume): nothing is learned from a stored copy
# of the handled spec, so none is written. The status ragtune writes (observedGeneration) marks the creation as
# handled instead, which saves one write to every new object.
STATUS_MARKED_KINDS = frozenset({"FineTuneJob"})


class DiffBaseStorage(kopf.AnnotationsDiffBaseStorage):
    """kopf's annotation diff-base, except for STATUS_MARKED_KINDS: an object whose status ragtune has written
    counts as handled in its current form. Until that status lands (a fraction of a second) another event runs the
    create handler again, which finds its children already there."""

    def fetch(self, *, body: kopf.Body) -> Any:
        stored = super().fetch(body=body)
        if stored is None and body.get("kind") in STATUS_MARKED_KINDS \
                and (body.get("status") or {}).get("observedGeneration"):
            return self.build(body=body)
        return stored

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: Any) -> None:
        if body.get("kind") not in STATUS_MARKED_KINDS:
            super().store(body=body, patch=patch, essence=essence)


class ProgressStorage(kopf.AnnotationsProgressStorage):
    """kopf's annotation progress, except that a handler of STATUS_MARKED_KINDS that succeeded leaves no record:
    it is the only handler of its cause, so the record would be purged in the same patch. Retries and permanent
    failures are recorded as usual."""

    def store(self, *, key: Any, record: Any, body: kopf.Body, patch: kopf.Patch) -> None:
        if body.get("kind") in STATUS_MARKED_KINDS and record.get("success"):
            return
        super().store(key=key, record=record, body=body, patch=patch)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Handler progress and the last handled spec live in annotations under our own prefix.
    settings.persistence.progress_storage = ProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = DiffBaseStorage(prefix=PREFIX, key="last-handled-configuration")
    settings.persistence.finalizer = f"{PREFIX}/finalizer"
    # ragtune posts its own events on condition transitions; kopf's per-handler chatter stays in the log.
    settings.posting.level = logging.WARNING
    # Handlers are I/O-bound but share one interpreter lock with the watch streams: a few threads go further
    # than many.
    settings.execution.max_workers = int(os.environ.get("RAGTUNE_WORKERS", "6"))
    settings.batching.worker_limit = None
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 30
    # Peering: several replicas elect one active operator (crds/kopf.dev_peerings.yaml); without those CRDs
    # each replica runs standalone.
    settings.peering.name = os.environ.get("RAGTUNE_PEERING", "ragtune")
    settings.peering.mandatory = False
    # kopf pauses every peer when several share one priority; a random priority per replica makes the highest
    # one active and the others its standbys, which take over once its peering record expires.
    settings.peering.priority = int(os.environ.get("RAGTUNE_PEERING_PRIORITY") or random.randint(1, 2**30))
    settings.peering.lifetime = int(os.environ.get("RAGTUNE_PEERING_LIFETIME", "60"))
    start_metrics()
    shared.warm_up()


def start_metrics() -> None:
    global _metrics_started
    port = int(os.environ.get("RAGTUNE_METRICS_PORT", "8080"))
    if _metrics_started or port == 0:
        return
    start_http_server(port, addr=os.environ.get("RAGTUNE_METRICS_ADDR", "0.0.0.0"))
    _metrics_started = True
    log.info("metrics on :%d/metrics", port)
