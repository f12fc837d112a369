"""How a workload tells the operator how far it got and what it produced.

Progress goes to an annotation on the workload's own Pod (`ragtune.io/progress`, JSON), patched through the API
with the Pod's ServiceAccount token; the operator reads it when the Pod changes. The final result is also written
to the container's termination message, which Kubernetes keeps after the Pod ends. Outside a cluster (a laptop,
tests) progress can go to a file instead (RAGTUNE_PROGRESS_FILE). Standard library only.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from ragtune.api.workload import PROGRESS_ANNOTATION, RESULT_ANNOTATION

from . import kubeapi

log = logging.getLogger(__name__)
TERMINATION_LOG = Path(os.environ.get("RAGTUNE_TERMINATION_LOG", "/dev/termination-log"))


class Reporter:
    """Publishes progress at most every `interval` seconds (always the first and the final report)."""

    def __init__(self, interval: float = 10.0):
        self.interval = interval
        self._last_sent = 0.0
        self._lock = threading.Lock()
        self.pod = os.environ.get("POD_NAME")
        self.namespace = os.environ.get("POD_NAMESPACE")
        self.file = os.environ.get("RAGTUNE_PROGRESS_FILE")
        self.last: dict[str, Any] = {}

    def progress(self, force: bool = False, **fields: Any) -> None:
        with self._lock:
            self.last = {**fields, "updatedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            now = time.monotonic()
            if not force and now - self._last_sent < self.interval:
                return
            self._last_sent = now
            self._publish({PROGRESS_ANNOTATION: json.dumps(self.last, separators=(",", ":"))})

    def result(self, result: dict[str, Any]) -> None:
        """The final report: annotation and termination message."""
        text = json.dumps(result, separators=(",", ":"), default=str)
        self._publish({RESULT_ANNOTATION: text})
        try:
            if TERMINATION_LOG.parent.exists():
                TERMINATION_LOG.write_text(termination_text(result))
        except OSError as exc:
            log.debug("termination message not written: %s", exc)

    def _publish(self, annotations: dict[str, str]) -> None:
        if self.file:
            path = Path(self.file)
            current = json.loads(path.read_text()) if path.exists() else {}
            current.update(annotations)
            path.write_text(json.dumps(current))
        if self.pod and self.namespace and (kubeapi.serviceaccount_dir() / "token").exists():
            try:
                self._patch_pod(annotations)
            except Exception as exc:  # progress is best effort; the run must not fail because of it
                log.warning("could not publish progress to pod %s: %s", self.pod, exc)

    def _patch_pod(self, annotations: dict[str, str]) -> None:
        kubeapi.call("PATCH", f"/api/v1/namespaces/{self.namespace}/pods/{self.pod}",
                     {"metadata": {"annotations": annotations}}, content_type="application/merge-patch+json")


def termination_text(result: dict[str, Any], limit: int = 4000) -> str:
    """The result as JSON within Kubernetes' termination-message limit: long lists are shortened (their full
    length kept as <name>Total) rather than the JSON cut mid-way."""
    text = json.dumps(result, separators=(",", ":"), default=str)
    keep = 50
    while len(text) > limit and keep > 0:
        shortened = dict(result)
        for key, value in result.items():
            if isinstance(value, list) and len(value) > keep:
                shortened[key] = value[:keep]
                shortened[f"{key}Total"] = len(value)
        text = json.dumps(shortened, separators=(",", ":"), default=str)
        keep //= 2
    return text if len(text) <= limit else json.dumps({"truncated": True})
