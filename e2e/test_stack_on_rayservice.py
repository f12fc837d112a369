"""The RayService runtime on kind: KubeRay's operator (built from its Go module, CRDs from the same version) runs
the HybridEndpoint's Ray cluster from ragtune's serve image, deploys the Serve application from the RayService's
serveConfigV2, and the endpoint answers through ragtune's Service with sources."""

from __future__ import annotations

import json

import pytest

import stack

pytestmark = [pytest.mark.timeout(3600), pytest.mark.serving]
KUBERAY_NAMESPACE = "kuberay-system"


@pytest.fixture(scope="module")
def kuberay(kind):
    info = json.loads(stack.hack("kuberay/build.sh"))
    # KubeRay's CRDs exceed the client-side apply annotation limit: server-side apply, as KubeRay documents.
    kind.kubectl("apply", "--server-side", "--force-conflicts", "-f", info["crds"], timeout=300)
    stack.load_images([info["image"]])
    if not kind.get("namespace", KUBERAY_NAMESPACE):
        kind.kubectl("create", "namespace", KUBERAY_NAMESPACE)
    kind.apply(stack.hack("kuberay/manifests.sh", info["image"], KUBERAY_NAMESPACE))
    kind.kubectl("rollout", "status", "deployment", "-n", KUBERAY_NAMESPACE, "--timeout=300s", "-l",
                 "app.kubernetes.io/name=kuberay", timeout=320)
    return info


def test_hybrid_endpoint_on_a_kuberay_rayservice_answers_with_sources(kind, namespace, kuberay):
    ftj = stack.sample("finetunejob.yaml", namespace)[0]
    ftj["metadata"]["name"] = "ray-v1"
    ftj["spec"]["output"]["pvc"]["path"] = f"{namespace}-ray-v1"
    index = stack.sample("vectorindex.yaml", namespace)[0]
    endpoint = stack.sample("hybridendpoint.yaml", namespace)[0]
    endpoint["spec"]["runtime"] = "rayservice"
    endpoint["spec"]["model"]["adapter"]["fineTuneJobRef"]["name"] = "ray-v1"
    kind.apply([ftj, index, endpoint])

    ready = stack.wait_ready(kind, "hybridendpoint", "faq", namespace, timeout=1500)
    assert stack.status(ready)["runtime"] == "rayservice"
    rayservice = kind.get("rayservice.ray.io", "faq", namespace)
    assert rayservice and rayservice["metadata"]["ownerReferences"][0]["kind"] == "HybridEndpoint"
    heads = kind.list("pods", namespace, "ray.io/node-type=head")
    assert heads and all(p["spec"]["containers"][0]["image"].startswith("ragtune/serve") for p in heads)

    url = stack.node_port_url(kind, "faq", namespace)
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120, max_retries=2)
    response = client.chat.completions.create(model="faq", max_tokens=16,
                                              messages=[{"role": "user", "content": "What does ragtune manage?"}])
    assert response.choices[0].message.content
    assert (response.model_extra or {}).get("sources"), response
