"""The one place that talks to the Kubernetes API. Everything else takes data and returns data.

Calls are synchronous (the kopf handlers that use them run in kopf's thread pool).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

from kubernetes import client, config, dynamic
from kubernetes.client.exceptions import ApiException

from . import API_VERSION, GROUP, VERSION

log = logging.getLogger(__name__)
FIELD_MANAGER = "ragtune-operator"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"


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

    def warm(self, kinds: list[tuple[str, str]]) -> None:
        """Resolves resources ahead of the first reconcile, so the first objects after a start do not queue behind
        API discovery. A kind not served (KubeRay's RayService, say) is looked up again when first used."""
        for api_version, kind in kinds:
            try:
                self.resource(api_version, kind)
            except dynamic.exceptions.ResourceNotFoundError:
                log.debug("%s %s not served yet", api_version, kind)

    def resource(self, api_version: str, kind: str):
        key = (api_version, kind)
        if key not in self._resources:
            with self._lock:
                self._resources[key] = self.dynamic.resources.get(api_version=api_version, kind=kind)
        return self._resources[key]

    def request(self, method: str, api_version: str, kind: str, name: str | None = None,
                namespace: str | None = None, body: Any = None, query: list[tuple[str, str]] | None = None,
                content_type: str = "application/json") -> dict:
        """One API call returning plain JSON: the typed and dynamic clients' object models cost more CPU than
        the call itself at operator scale."""
        path = self.resource(api_version, kind).path(name=name, namespace=namespace)
        if path.endswith("/") and name is None:
            path = path.rstrip("/")
        request = self.api_client.param_serialize(
            method, path, query_params=query or [], header_params={"Accept": "application/json",
                                                                   "Content-Type": content_type},
            body=body, auth_settings=["BearerToken"])
        response = self.api_client.call_api(*request, _request_timeout=30)
        response.read()
        if not 200 <= response.status <= 299:
            self.api_client.response_deserialize(response, {})  # raises ApiException with the server's message
        return json.loads(response.data) if response.data else {}

    # ------------------------------------------------------------ reading

    def get(self, api_version: str, kind: str, name: str, namespace: str | None) -> dict | None:
        try:
            return self.request("GET", api_version, kind, name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, api_version: str, kind: str, namespace: str | None, labels: dict[str, str]) -> list[dict]:
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        return self.request("GET", api_version, kind, None, namespace,
                            query=[("labelSelector", selector)]).get("items", [])

    def get_custom(self, plural: str, name: str, namespace: str) -> dict | None:
        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def crd_installed(self, name: str, ttl: float = 30.0) -> bool:
        """Whether a CRD is installed and not being removed (cached briefly: discovery on every reconcile would be
        wasteful). A CRD being removed takes its objects with it and refuses new ones."""
        cached = self._crd_cache.get(name)
        if cached and time.monotonic() - cached[0] < ttl:
            return cached[1]
        crd = self.get("apiextensions.k8s.io/v1", "CustomResourceDefinition", name, None)
        present = crd is not None and not crd["metadata"].get("deletionTimestamp")
        self._crd_cache[name] = (time.monotonic(), present)
        return present

    def forget_crd(self, name: str) -> None:
        self._crd_cache.pop(name, None)

    # ------------------------------------------------------------ writing

    def ensure(self, obj: dict[str, Any]) -> str:
        """Creates the object, or brings the fields ragtune owns up to date with server-side apply.
        Returns created | configured | unchanged; an unchanged object is not written."""
        meta = obj["metadata"]
        api_version, kind, namespace = obj["apiVersion"], obj["kind"], meta.get("namespace")
        # Most calls create a new child: try that first and read only when it already exists.
        try:
            self.request("POST", api_version, kind, None, namespace, body=obj,
                         query=[("fieldManager", FIELD_MANAGER)])
            return "created"
        except ApiException as exc:
            if exc.status != 409:
                raise
        existing = self.request("GET", api_version, kind, meta["name"], namespace)
        holder = foreign_holder(obj, existing)
        if holder is not None:
            raise OwnershipConflict(obj, holder)
        # Labels or annotations ragtune set and no longer wants (an endpoint's Service annotation removed from its
        # spec), and a controller reference that changed: apply alone keeps what was set with POST, so they are
        # replaced explicitly.
        stale: dict[str, Any] = dropped_metadata(obj, existing)
        references = owner_references_patch(obj, existing)
        if references is not None:
            stale["ownerReferences"] = references
        if stale:
            self.request("PATCH", api_version, kind, meta["name"], namespace, body={"metadata": stale},
                         query=[("fieldManager", FIELD_MANAGER)], content_type="application/merge-patch+json")
        # A Job's pod template is immutable: a changed run gets a new Job name instead.
        if kind == "Job" or is_subset(obj, existing, ignore=("metadata.ownerReferences",)):
            return "configured" if stale else "unchanged"
        self.request("PATCH", api_version, kind, meta["name"], namespace, body=obj,
                     query=[("fieldManager", FIELD_MANAGER), ("force", "true")],
                     content_type="application/apply-patch+yaml")
        return "configured"

    def delete(self, api_version: str, kind: str, name: str, namespace: str | None,
               propagation: str = "Background") -> bool:
        try:
            self.request("DELETE", api_version, kind, name, namespace, body={"propagationPolicy": propagation})
            return True
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise

    def delete_controlled(self, api_version: str, kind: str, name: str, namespace: str, owner_uid: str) -> bool:
        """Deletes the object only while `owner_uid` controls it (an object of the same name that somebody else
        made is left alone); False when there was none of ragtune's to delete."""
        existing = self.get(api_version, kind, name, namespace)
        held = controller_of(existing) if existing else None
        if held is None or held.get("uid") != owner_uid:
            return False
        try:  # the uid precondition: not an object made again under the same name in between
            self.request("DELETE", api_version, kind, name, namespace,
                         body={"propagationPolicy": "Background",
                               "preconditions": {"uid": existing["metadata"]["uid"]}})
            return True
        except ApiException as exc:
            if exc.status in (404, 409):
                return False
            raise

    def patch_status(self, kind: str, name: str, namespace: str, status: dict[str, Any]) -> dict | None:
        path = self.resource(API_VERSION, kind).path(name=name, namespace=namespace) + "/status"
        try:
            request = self.api_client.param_serialize(
                "PATCH", path, header_params={"Accept": "application/json",
                                              "Content-Type": "application/merge-patch+json"},
                body={"status": status}, auth_settings=["BearerToken"])
            response = self.api_client.call_api(*request, _request_timeout=30)
            response.read()
            if not 200 <= response.status <= 299:
                self.api_client.response_deserialize(response, {})
            return json.loads(response.data)
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


class OwnershipConflict(Exception):
    """An object ragtune would write exists and is somebody else's: ragtune does not take it over."""

    def __init__(self, obj: dict[str, Any], holder: str):
        meta = obj["metadata"]
        self.kind, self.name, self.namespace, self.holder = obj["kind"], meta["name"], meta.get("namespace"), holder
        where = f"{self.namespace}/{self.name}" if self.namespace else self.name
        super().__init__(f"{self.kind} {where} already exists and {holder}: ragtune does not take over objects it "
                         f"did not make. Delete or rename that {self.kind}, or give this object another name")


def controller_of(obj: dict[str, Any]) -> dict[str, Any] | None:
    return next((ref for ref in (obj.get("metadata") or {}).get("ownerReferences") or [] if ref.get("controller")),
                None)


def same_controller(desired: dict[str, Any], actual: dict[str, Any]) -> bool:
    wanted, held = controller_of(desired), controller_of(actual)
    return (wanted or {}).get("uid") == (held or {}).get("uid")


def foreign_holder(desired: dict[str, Any], actual: dict[str, Any]) -> str | None:
    """Who holds `actual` when it is not ragtune's to write as `desired`; None when it is. Ragtune's own: controlled
    by the ragtune object `desired` is labelled with (the same uid, or an earlier object of that kind and name,
    whose children a re-created one takes over), or controlled by nothing and labelled as `desired` is (a volume
    kept when its index went, the workloads' namespace identity). Anything else is somebody's own: applying would
    take it over."""
    labels = (actual.get("metadata") or {}).get("labels") or {}
    mine = {key: value for key, value in ((desired.get("metadata") or {}).get("labels") or {}).items()
            if key.startswith(f"{GROUP}/") or key == MANAGED_BY_LABEL}
    held = controller_of(actual)
    if held is None:
        if mine and all(labels.get(key) == value for key, value in mine.items()):
            return None
        return "is not ragtune's (it has no owner and lacks the labels " + \
            ", ".join(f"{key}={value}" for key, value in sorted(mine.items())) + ")"
    wanted = controller_of(desired)
    if wanted is not None and held.get("uid") == wanted.get("uid"):
        return None
    if held.get("apiVersion", "").startswith(f"{GROUP}/") and \
            mine.get(f"{GROUP}/{held.get('kind', '').lower()}") == held.get("name"):
        return None
    return f"is controlled by {held.get('kind')} {held.get('name')}"


def owner_references_patch(desired: dict[str, Any], actual: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The owner references `actual` should have when its controller is not the one `desired` names (a re-created
    owner's, or none where a changed deletion policy keeps the object); None when it already is. Apply cannot do
    this: the reference was set when the object was created, and apply removes only what it applied itself."""
    if same_controller(desired, actual):
        return None
    others = [ref for ref in (actual.get("metadata") or {}).get("ownerReferences") or [] if not ref.get("controller")]
    wanted = controller_of(desired)
    return others + ([wanted] if wanted else [])


def dropped_metadata(desired: dict[str, Any], actual: dict[str, Any]) -> dict[str, dict[str, None]]:
    """A merge patch's `metadata` removing the labels and annotations ragtune's field manager set on `actual`
    (its managedFields say which) that `desired` no longer has; empty when there are none."""
    wanted = desired.get("metadata") or {}
    stale: dict[str, dict[str, None]] = {}
    for entry in (actual.get("metadata") or {}).get("managedFields") or []:
        if entry.get("manager") != FIELD_MANAGER:
            continue
        owned = ((entry.get("fieldsV1") or {}).get("f:metadata") or {})
        for field in ("labels", "annotations"):
            present = (actual["metadata"].get(field) or {})
            for key in owned.get(f"f:{field}") or {}:
                name = key.removeprefix("f:")
                if key.startswith("f:") and name in present and name not in (wanted.get(field) or {}):
                    stale.setdefault(field, {})[name] = None
    return stale


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
