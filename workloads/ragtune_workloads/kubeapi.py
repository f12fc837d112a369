"""The Kubernetes API as a workload's pod reaches it: the pod's ServiceAccount token and CA, the service address
Kubernetes puts in every pod's environment. Standard library only (workloads never import a Kubernetes client).

RAGTUNE_SERVICEACCOUNT_DIR points elsewhere than the mounted token (a test against a local API server).
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status


def serviceaccount_dir() -> Path:
    return Path(os.environ.get("RAGTUNE_SERVICEACCOUNT_DIR", "/var/run/secrets/kubernetes.io/serviceaccount"))


def in_cluster() -> bool:
    """A pod with a ServiceAccount token and the API's address: the API can be called."""
    return (serviceaccount_dir() / "token").exists() and bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def call(method: str, path: str, body: Any = None, content_type: str = "application/json",
         timeout: float = 5.0) -> dict[str, Any]:
    """One call; the decoded JSON answer. An error answer raises ApiError with its status and the API's message."""
    host = os.environ.get("KUBERNETES_SERVICE_HOST", "kubernetes.default.svc")
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    sa_dir = serviceaccount_dir()
    request = urllib.request.Request(
        f"https://{host}:{port}{path}", method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {(sa_dir / 'token').read_text().strip()}",
                 "Content-Type": content_type, "Accept": "application/json"})
    context = ssl.create_default_context(cafile=str(sa_dir / "ca.crt"))
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            data = response.read()
    except urllib.error.HTTPError as exc:
        raw = exc.read().decode(errors="replace")
        try:
            message = json.loads(raw).get("message") or raw
        except ValueError:
            message = raw
        raise ApiError(exc.code, message) from None
    return json.loads(data) if data else {}
