"""With KubeRay's CRD installed, an endpoint in runtime auto becomes a RayService, validated by KubeRay's own
schema (the CRD from the ray-operator Go module; no KubeRay controller runs here, so the test plays its part
by setting the RayService's Ready condition)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from ragtune_objects import API, endpoint, ready_references, wait_ready

KUBERAY = "github.com/ray-project/kuberay/ray-operator@v1.5.0"
pytestmark = pytest.mark.usefixtures("ragtune_operator")


@pytest.fixture
def kuberay_crd(kube):
    result = subprocess.run(["go", "mod", "download", "-json", KUBERAY], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(f"could not fetch {KUBERAY} from the Go module proxy: {result.stderr}")
    crd = Path(json.loads(result.stdout)["Dir"]) / "config" / "crd" / "bases" / "ray.io_rayservices.yaml"
    kube.kubectl("apply", "--server-side", "-f", str(crd))
    kube.wait_condition("apiextensions.k8s.io/v1", "CustomResourceDefinition", "rayservices.ray.io", None,
                        "Established")
    yield
    kube.kubectl("delete", "crd", "rayservices.ray.io", "--wait=true", timeout=120)


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

    kube.kubectl("patch", "rayservice", "chat", "-n", namespace, "--subresource=status", "--type=merge", "-p",
                 json.dumps({"status": {"conditions": [{
                     "type": "Ready", "status": "True", "reason": "NonZeroServeEndpoints", "message": "serving",
                     "lastTransitionTime": "2026-01-01T00:00:00Z"}]}}))
    ready = wait_ready(kube, "HybridEndpoint", "chat", namespace)
    assert ready["status"]["served"]["adapterDigest"] == "sha256:" + "4" * 64
    assert kube.get(API, "HybridEndpoint", "chat", namespace)["status"]["readyReplicas"] == 1
