"""With KubeRay's CRD installed, an endpoint in runtime auto becomes a RayService, validated by KubeRay's own
schema (the CRD from the ray-operator Go module; no KubeRay controller runs here, so the test plays its part
by setting the RayService's Ready condition)."""

from __future__ import annotations

import json
import time

import pytest
import yaml
from ragtune_objects import API, endpoint, ready_references, wait_ready

KUBERAY = "github.com/ray-project/kuberay/ray-operator@v1.5.0"
pytestmark = pytest.mark.usefixtures("ragtune_operator")


@pytest.fixture
def kuberay_crd(kube):
    install_kuberay_crd(kube)
    yield
    kube.remove_crd("rayservices.ray.io")


def install_kuberay_crd(kube) -> None:
    kube.install_module_crd(KUBERAY, "config/crd/bases/ray.io_rayservices.yaml", "rayservices.ray.io")


def mark_rayservice_ready(kube, namespace: str, name: str) -> None:
    """What KubeRay's controller would do once the Ray cluster serves."""
    kube.kubectl("patch", "rayservice", name, "-n", namespace, "--subresource=status", "--type=merge", "-p",
                 json.dumps({"status": {"conditions": [{
                     "type": "Ready", "status": "True", "reason": "NonZeroServeEndpoints", "message": "serving",
                     "lastTransitionTime": "2026-01-01T00:00:00Z"}]}}))


def test_auto_runtime_serves_through_a_rayservice_when_kuberay_is_installed(kube, namespace, kuberay_crd):
    ready_references(kube, namespace, "ft", "sha256:" + "4" * 64)
    kube.apply(endpoint("chat", adapter="ft", index="docs"), namespace)

    rayservice = kube.wait_for(lambda: kube.get("ray.io/v1", "RayService", "chat", namespace), "the RayService")
    app = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"][0]
    assert app["import_path"] == "ragtune_workloads.serve.app:build_app"
    assert app["args"] == {"config": "/etc/ragtune/config.json"}
    assert kube.get("apps/v1", "Deployment", "chat", namespace) is None
    assert kube.get("v1", "Service", "chat", namespace)["spec"]["selector"]["ray.io/serve"] == "true"
    pending = wait_ready(kube, "HybridEndpoint", "chat", namespace, "False")
    assert pending["status"]["runtime"] == "rayservice"

    mark_rayservice_ready(kube, namespace, "chat")
    ready = wait_ready(kube, "HybridEndpoint", "chat", namespace)
    assert ready["status"]["served"]["adapterDigest"] == "sha256:" + "4" * 64
    assert kube.get(API, "HybridEndpoint", "chat", namespace)["status"]["readyReplicas"] == 1


def test_installing_kuberay_does_not_move_an_endpoint_a_deployment_serves(kube, namespace, request):
    """Moving it would delete the Deployment before a RayService serves: auto is decided when an endpoint is
    first served and kept after that (`runtime: rayservice` moves it on purpose)."""
    ready_references(kube, namespace, "ft", "sha256:" + "5" * 64)
    kube.apply(endpoint("chat", adapter="ft", index="docs"), namespace)
    assert wait_ready(kube, "HybridEndpoint", "chat", namespace, timeout=90)["status"]["runtime"] == "deployment"

    request.getfixturevalue("kuberay_crd")
    kube.apply(endpoint("chat", adapter="ft", index="docs", replicas=2), namespace)  # reconciled again
    kube.wait_for(lambda: (kube.get("apps/v1", "Deployment", "chat", namespace) or {}).get("spec", {})
                  .get("replicas") == 2, "the Deployment to be scaled to 2")
    ready = wait_ready(kube, "HybridEndpoint", "chat", namespace, timeout=90)
    assert ready["status"]["runtime"] == "deployment"
    assert kube.get("ray.io/v1", "RayService", "chat", namespace) is None


def test_removing_kuberay_serves_its_endpoints_from_a_deployment_again(kube, namespace, kuberay_crd):
    ready_references(kube, namespace, "ft", "sha256:" + "6" * 64)
    kube.apply(endpoint("chat", adapter="ft", index="docs"), namespace)
    kube.wait_for(lambda: kube.get("ray.io/v1", "RayService", "chat", namespace), "the RayService")
    mark_rayservice_ready(kube, namespace, "chat")
    assert wait_ready(kube, "HybridEndpoint", "chat", namespace)["status"]["runtime"] == "rayservice"

    # Removing the CRD removes every RayService with it.
    kube.kubectl("delete", "crd", "rayservices.ray.io", "--wait=true", timeout=120)
    kube.wait_for(lambda: kube.get("apps/v1", "Deployment", "chat", namespace), "a Deployment to serve the endpoint")
    ready = kube.wait_for(lambda: (lambda he: he if he["status"].get("runtime") == "deployment" and
                                   kube.condition(he, "Ready")["status"] == "True" else None)(
        kube.get(API, "HybridEndpoint", "chat", namespace)), "the endpoint Ready on its Deployment", timeout=90)
    assert ready["status"]["served"]["adapterDigest"] == "sha256:" + "6" * 64


def test_a_deleted_rayservice_is_made_again(kube, namespace, kuberay_crd):
    ready_references(kube, namespace, "ft", "sha256:" + "7" * 64)
    kube.apply(endpoint("chat", adapter="ft", index="docs"), namespace)
    first = kube.wait_for(lambda: kube.get("ray.io/v1", "RayService", "chat", namespace), "the RayService")
    mark_rayservice_ready(kube, namespace, "chat")
    wait_ready(kube, "HybridEndpoint", "chat", namespace)

    kube.kubectl("delete", "rayservice", "chat", "-n", namespace, "--wait=true")
    again = kube.wait_for(lambda: (lambda rs: rs if rs and rs["metadata"]["uid"] != first["metadata"]["uid"]
                                   else None)(kube.get("ray.io/v1", "RayService", "chat", namespace)),
                          "the RayService to be made again")
    assert again["spec"]["serveConfigV2"] == first["spec"]["serveConfigV2"]
    wait_ready(kube, "HybridEndpoint", "chat", namespace, "False")  # not serving until KubeRay says so
    mark_rayservice_ready(kube, namespace, "chat")
    wait_ready(kube, "HybridEndpoint", "chat", namespace)

    # edited by hand: read back within a resync (15 s once Ready) and put back as the endpoint says
    kube.kubectl("patch", "rayservice", "chat", "-n", namespace, "--type=merge", "-p",
                 '{"spec": {"serveConfigV2": "applications: []"}}')
    kube.wait_for(lambda: kube.get("ray.io/v1", "RayService", "chat", namespace)["spec"]["serveConfigV2"]
                  == first["spec"]["serveConfigV2"], "the RayService's serve config to be put back", timeout=60)


def test_installing_and_removing_kuberay_again_and_again_never_stops_the_operator(kube, ragtune_operator):
    """A watch of RayServices started just as their CRD goes (or before the API server serves a new one) fails
    with 404, and a failed watch stops a kopf operator: the operator reads RayServices back instead."""
    for _ in range(8):
        install_kuberay_crd(kube)
        time.sleep(1.5)  # long enough for a watch of RayServices to start
        kube.kubectl("delete", "crd", "rayservices.ray.io", "--wait=true", timeout=120)
        assert ragtune_operator.proc.poll() is None, f"the operator stopped:\n{ragtune_operator.log_tail(60)}"
    time.sleep(2)
    assert ragtune_operator.proc.poll() is None and ragtune_operator.healthy()
