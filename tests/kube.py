"""Test harness for the local control plane: apply YAML, read objects, wait for conditions, read events.

Written once here so every integration test speaks to the cluster the same way: `kubectl` for applying (exactly
what users run, including its error messages) and the Python client for reading.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from kubernetes import client, config, dynamic
from kubernetes.client.exceptions import ApiException

T = TypeVar("T")


class Kube:
    def __init__(self, kubeconfig: Path, kubectl_path: Path):
        self.kubeconfig = Path(kubeconfig)
        self.kubectl_path = Path(kubectl_path)
        self.api_client = config.new_client_from_config(str(kubeconfig))
        self.dynamic = dynamic.DynamicClient(self.api_client)
        self.core = client.CoreV1Api(self.api_client)
        self.batch = client.BatchV1Api(self.api_client)
        self.apps = client.AppsV1Api(self.api_client)

    # ------------------------------------------------------------ kubectl

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True,
                timeout: float = 60) -> subprocess.CompletedProcess:
        result = subprocess.run([str(self.kubectl_path), "--kubeconfig", str(self.kubeconfig), *args],
                                input=stdin, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return result

    def apply(self, manifest: str | dict | list, namespace: str | None = None,
              check: bool = True) -> subprocess.CompletedProcess:
        text = manifest if isinstance(manifest, str) else yaml.safe_dump_all(
            manifest if isinstance(manifest, list) else [manifest])
        ns = ["-n", namespace] if namespace else []
        return self.kubectl("apply", *ns, "-f", "-", stdin=text, check=check)

    # ------------------------------------------------------------ reading

    def resource(self, api_version: str, kind: str):
        return self.dynamic.resources.get(api_version=api_version, kind=kind)

    def get(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> dict | None:
        try:
            obj = self.resource(api_version, kind).get(name=name, namespace=namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return obj.to_dict()

    def list(self, api_version: str, kind: str, namespace: str | None = None,
             label_selector: str | None = None) -> list[dict]:
        items = self.resource(api_version, kind).get(namespace=namespace, label_selector=label_selector)
        return [item.to_dict() for item in items.items]

    def events(self, namespace: str, name: str | None = None) -> list[dict]:
        selector = f"involvedObject.name={name}" if name else None
        events = self.core.list_namespaced_event(namespace, field_selector=selector).items
        return [{"reason": e.reason, "message": e.message, "type": e.type,
                 "kind": e.involved_object.kind, "name": e.involved_object.name} for e in events]

    # ------------------------------------------------------------ waiting

    def wait_for(self, check: Callable[[], T], what: str, timeout: float = 60, interval: float = 0.2) -> T:
        """Polls `check` until it returns something truthy; fails naming `what` and the last value seen."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            last = check()
            if last:
                return last
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last value: {last!r}")
            time.sleep(interval)

    def condition(self, obj: dict | None, type_: str) -> dict | None:
        for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
            if cond.get("type") == type_:
                return cond
        return None

    def wait_condition(self, api_version: str, kind: str, name: str, namespace: str | None, type_: str,
                       status: str = "True", timeout: float = 60) -> dict:
        def check():
            obj = self.get(api_version, kind, name, namespace)
            cond = self.condition(obj, type_)
            return obj if cond and cond.get("status") == status else None
        return self.wait_for(check, f"{kind}/{name} condition {type_}={status}", timeout)

    def wait_gone(self, api_version: str, kind: str, name: str, namespace: str | None, timeout: float = 60) -> None:
        self.wait_for(lambda: self.get(api_version, kind, name, namespace) is None,
                      f"{kind}/{name} to be deleted", timeout)

    # ------------------------------------------------------------ other projects' CRDs

    def install_module_crd(self, module: str, path: str, name: str) -> None:
        """Applies the CRD `name` that the Go module `module` (name@version, from the Go module proxy) ships at
        `path`, and waits until it is served: another project's own definition, never a copy of it."""
        result = subprocess.run(["go", "mod", "download", "-json", module], capture_output=True, text=True)
        if result.returncode != 0:
            raise AssertionError(f"could not fetch {module} from the Go module proxy: {result.stderr}")
        self.kubectl("apply", "--server-side", "-f", str(Path(json.loads(result.stdout)["Dir"]) / path))
        self.wait_condition("apiextensions.k8s.io/v1", "CustomResourceDefinition", name, None, "Established")

    def remove_crd(self, name: str) -> None:
        self.kubectl("delete", "crd", name, "--wait=true", "--ignore-not-found", timeout=120)

    # ------------------------------------------------------------ namespaces

    def create_namespace(self, prefix: str = "t") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
        # Pods are refused until the namespace's default ServiceAccount exists.
        self.wait_for(lambda: self._has_default_sa(name), f"default ServiceAccount in {name}", timeout=30)
        return name

    def _has_default_sa(self, namespace: str) -> bool:
        try:
            self.core.read_namespaced_service_account("default", namespace)
            return True
        except ApiException:
            return False

    def delete_namespace(self, name: str) -> None:
        try:
            self.core.delete_namespace(name)
        except ApiException as exc:
            if exc.status != 404:
                raise


def as_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str)
