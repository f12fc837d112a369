"""The one place that talks to the Kubernetes API. Everything else takes data and returns data.

Calls are synchronous (the kopf handlers that use them run in kopf's thread pool).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from kubernetes import client, config, dynamic
from kubernetes.client.exceptions import ApiException

from . import API_VERSION, GROUP, VERSION

log = logging.getLogger(__name__)
FIELD_MANAGER = "ragtune-operator"


class Api:
    def __init__(self, api_client: client.ApiClient | None = None):
        if api_client is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            api_client = client.ApiClient()
        self.api_client = api_client
        self.dynamic = dynamic.DynamicClient(api_client)
        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self._resources: dict[tuple[str, str], Any] = {}
        self._crd_cache: dict[str, tuple[float, bool]] = {}
        self._lock = threading.Lock()

    def resource(self, api_version: str, kind: str):
        key = (api_version, kind)
        if key not in self._resources:
            with self._lock:
                self._resources[key] = self.dynamic.resources.get(api_version=api_version, kind=kind)
        return self._resources[key]

    # ------------------------------------------------------------ reading

    def get(self, api_version: str, kind: str, name: str, namespace: str | None) -> dict | None:
        try:
            return self.resource(api_version, kind).get(name=name, namespace=namespace).to_dict()
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, api_version: str, kind: str, namespace: str | None, labels: dict[str, str]) -> list[dict]:
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        found = self.resource(api_version, kind).get(namespace=namespace, label_selector=selector)
        return [item.to_dict() for item in found.items]

    def get_custom(self, plural: str, name: str, namespace: str) -> dict | None:
        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def crd_installed(self, name: str, ttl: float = 30.0) -> bool:
        """Whether a CRD is installed (cached briefly: discovery on every reconcile would be wasteful)."""
        cached = self._crd_cache.get(name)
        if cached and time.monotonic() - cached[0] < ttl:
            return cached[1]
        present = self.get("apiextensions.k8s.io/v1", "CustomResourceDefinition", name, None) is not None
        self._crd_cache[name] = (time.monotonic(), present)
        return present

    # ------------------------------------------------------------ writing

    def ensure(self, obj: dict[str, Any]) -> str:
        """Creates the object, or brings the fields ragtune owns up to date with server-side apply.
        Returns created | configured | unchanged; an unchanged object is not written."""
        meta = obj["metadata"]
        res = self.resource(obj["apiVersion"], obj["kind"])
        # Most calls create a new child: try that first and read only when it already exists.
        try:
            res.create(body=obj, namespace=meta.get("namespace"), field_manager=FIELD_MANAGER)
            return "created"
        except ApiException as exc:
            if exc.status != 409:
                raise
        existing = res.get(name=meta["name"], namespace=meta.get("namespace")).to_dict()
        if is_subset(obj, existing, ignore=("metadata.ownerReferences",)):
            return "unchanged"
        if obj["kind"] == "Job":
            # A Job's pod template is immutable; a changed run gets a new Job name instead.
            return "unchanged"
        res.server_side_apply(body=obj, name=meta["name"], namespace=meta.get("namespace"),
                              field_manager=FIELD_MANAGER, force_conflicts=True)
        return "configured"

    def delete(self, api_version: str, kind: str, name: str, namespace: str | None,
               propagation: str = "Background") -> bool:
        try:
            self.resource(api_version, kind).delete(name=name, namespace=namespace,
                                                    body={"propagationPolicy": propagation})
            return True
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise

    def patch_status(self, plural: str, name: str, namespace: str, status: dict[str, Any]) -> dict | None:
        try:
            return self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, plural, name, {"status": status})
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def event(self, owner: dict[str, Any], type_: str, reason: str, message: str) -> None:
        meta = owner["metadata"]
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        body = client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name=f"{meta['name']}.", namespace=meta["namespace"]),
            involved_object=client.V1ObjectReference(
                api_version=owner.get("apiVersion", API_VERSION), kind=owner["kind"], name=meta["name"],
                namespace=meta["namespace"], uid=meta.get("uid")),
            type=type_, reason=reason, message=message[:1024], first_timestamp=now, last_timestamp=now, count=1,
            source=client.V1EventSource(component="ragtune-operator"), reporting_component="ragtune-operator",
        )
        try:
            self.core.create_namespaced_event(meta["namespace"], body)
        except ApiException as exc:  # an event is information; losing one must not fail a reconcile
            log.warning("event %s for %s not posted: %s", reason, meta["name"], exc.reason)


def is_subset(desired: Any, actual: Any, ignore: tuple[str, ...] = (), path: str = "") -> bool:
    """True when every field in `desired` has the same value in `actual` (which may hold more, e.g. defaults)."""
    if path in ignore:
        return True
    if isinstance(desired, dict):
        if not isinstance(actual, dict):
            return False
        return all(is_subset(v, actual.get(k), ignore, f"{path}.{k}" if path else k) for k, v in desired.items())
    if isinstance(desired, list):
        if not isinstance(actual, list) or len(desired) != len(actual):
            return False
        return all(is_subset(d, a, ignore, path) for d, a in zip(desired, actual))
    if isinstance(desired, (int, float)) and not isinstance(desired, bool) and isinstance(actual, str):
        return str(desired) == actual
    return desired == actual
