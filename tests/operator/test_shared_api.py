"""What the operator does once rather than per object, against the real API server: resource discovery at start,
and the workload identity of a namespace created by the first of many objects arriving together."""

from __future__ import annotations

import threading

from kubernetes import client

from ragtune.builders import common
from ragtune.controllers import shared
from ragtune.kube import Api


def test_warm_up_resolves_the_child_kinds_before_any_handler_runs(kube, monkeypatch):
    api = Api(kube.api_client)
    monkeypatch.setattr(shared, "_api", api)
    shared.warm_up()
    served = [kind for kind in shared.CHILD_KINDS if kind[0] != "ray.io/v1"]  # KubeRay is not installed here
    assert set(served) <= set(api._resources), sorted(set(served) - set(api._resources))

    def no_discovery(**lookup):
        raise AssertionError(f"API discovery after the warm-up: {lookup}")

    monkeypatch.setattr(api.dynamic.resources, "get", no_discovery)
    assert "items" in api.request("GET", "v1", "ConfigMap", namespace="default")  # from what the warm-up found


def test_objects_arriving_together_create_their_namespaces_identity_once(kube, namespace, monkeypatch):
    api = Api(kube.api_client)
    monkeypatch.setattr(shared, "_api", api)
    writes: list[str] = []
    ensure = api.ensure
    monkeypatch.setattr(api, "ensure", lambda obj: writes.append(obj["kind"]) or ensure(obj))
    start = threading.Barrier(12)
    errors: list[BaseException] = []

    def first_handler_of_an_object():
        start.wait()
        try:
            shared.ensure_workload_identity(namespace)
        except BaseException as exc:  # reported below: a thread's exception would otherwise vanish
            errors.append(exc)

    threads = [threading.Thread(target=first_handler_of_an_object) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert not errors, errors
    assert sorted(writes) == sorted(obj["kind"] for obj in common.workload_rbac(namespace))
    core, rbac = client.CoreV1Api(kube.api_client), client.RbacAuthorizationV1Api(kube.api_client)
    assert core.read_namespaced_service_account(common.WORKLOAD_SERVICE_ACCOUNT, namespace)
    assert rbac.read_namespaced_role_binding(common.WORKLOAD_SERVICE_ACCOUNT, namespace)
