"""HybridEndpoint reconciliation: waits for its references, serves them, rolls to a new adapter in place."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from ragtune_objects import (API, adapter_result, bound_pvc, endpoint, finetunejob, finish_finetune, finish_index,
                             ready_references, reconciled, report_result, resumable, status, vectorindex,
                             volume_for_claim, wait_ready)

pytestmark = pytest.mark.usefixtures("ragtune_operator")

HPA_EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hybridendpoint-hpa.yaml"


def served_config(kube, namespace, name):
    return json.loads(kube.get("v1", "ConfigMap", f"{name}-config", namespace)["data"]["config.json"])


def test_endpoint_waits_for_its_references_then_serves_them(kube, namespace):
    bound_pvc(kube, namespace, "adapters")
    volume_for_claim(kube, namespace, "docs-store")
    kube.apply(endpoint("chat", adapter="ft", index="docs"), namespace)
    missing = wait_ready(kube, "HybridEndpoint", "chat", namespace, "False", reason="ReferenceNotFound")
    assert "FineTuneJob ft not found" in kube.condition(missing, "Ready")["message"]

    kube.apply(finetunejob("ft"), namespace)
    kube.apply(vectorindex("docs"), namespace)
    waiting = wait_ready(kube, "HybridEndpoint", "chat", namespace, "False", reason="WaitingForFineTuneJob")
    assert kube.condition(waiting, "Progressing")["status"] == "True"
    assert kube.get("apps/v1", "Deployment", "chat", namespace) is None

    finish_finetune(kube, namespace, "ft", "sha256:" + "1" * 64)
    wait_ready(kube, "HybridEndpoint", "chat", namespace, "False", reason="WaitingForVectorIndex")
    finish_index(kube, namespace, "docs", "v1")

    ready = wait_ready(kube, "HybridEndpoint", "chat", namespace, timeout=90)
    deployment = kube.get("apps/v1", "Deployment", "chat", namespace)
    assert deployment["metadata"]["ownerReferences"][0]["kind"] == "HybridEndpoint"
    assert kube.get("v1", "Service", "chat", namespace)["spec"]["ports"][0]["port"] == 8000
    config = served_config(kube, namespace, "chat")
    assert config["adapter"]["digest"] == "sha256:" + "1" * 64
    # the alias readers follow across versions, not the versioned collection behind it
    assert config["retrieval"]["collection"] == f"{namespace}_docs".replace("-", "_")
    st = ready["status"]
    assert st["runtime"] == "deployment" and st["readyReplicas"] == 1
    assert st["url"] == f"http://chat.{namespace}.svc.cluster.local:8000/v1"
    assert st["served"] == {"adapter": "ft", "adapterDigest": "sha256:" + "1" * 64, "index": "docs",
                            "indexVersion": "v1"}


def test_changing_the_adapter_reference_rolls_the_endpoint_in_place(kube, namespace):
    ready_references(kube, namespace, "ft-v1", "sha256:" + "1" * 64)
    kube.apply(endpoint("chat", adapter="ft-v1", index="docs"), namespace)
    wait_ready(kube, "HybridEndpoint", "chat", namespace, timeout=90)
    before = kube.get("apps/v1", "Deployment", "chat", namespace)

    kube.apply(finetunejob("ft-v2"), namespace)
    kube.apply(endpoint("chat", adapter="ft-v2", index="docs"), namespace)
    # Until ft-v2 is Ready the endpoint keeps serving ft-v1.
    waiting = kube.wait_for(lambda: (lambda o: o if kube.condition(o, "ReferencesReady")["status"] == "False"
                                     else None)(kube.get(API, "HybridEndpoint", "chat", namespace)),
                            "the endpoint to wait for ft-v2")
    assert kube.condition(waiting, "Ready")["status"] == "True", (
        waiting["status"]["conditions"], kube.get("apps/v1", "Deployment", "chat", namespace).get("status"))
    assert waiting["status"]["served"]["adapter"] == "ft-v1"

    finish_finetune(kube, namespace, "ft-v2", "sha256:" + "2" * 64)
    kube.wait_for(lambda: status(kube, "HybridEndpoint", "chat", namespace).get("served", {}).get("adapter")
                  == "ft-v2", "ft-v2 to be served", timeout=90)
    after = kube.get("apps/v1", "Deployment", "chat", namespace)
    assert after["metadata"]["uid"] == before["metadata"]["uid"], "rolled in place, not deleted and recreated"
    digest = lambda d: d["spec"]["template"]["metadata"]["annotations"]["ragtune.io/config-digest"]  # noqa: E731
    assert digest(after) != digest(before)
    assert served_config(kube, namespace, "chat")["adapter"]["digest"] == "sha256:" + "2" * 64


def test_an_adapter_of_another_base_model_is_refused(kube, namespace):
    bound_pvc(kube, namespace, "adapters")
    kube.apply(finetunejob("other", model="org/other-model"), namespace)
    finish_finetune(kube, namespace, "other", "sha256:" + "3" * 64)
    kube.apply(endpoint("chat", adapter="other", index="docs", mode="finetuned"), namespace)
    refused = wait_ready(kube, "HybridEndpoint", "chat", namespace, "False", reason="BaseModelMismatch")
    message = kube.condition(refused, "Ready")["message"]
    assert "org/other-model" in message and "base/tiny" in message
    assert kube.get("apps/v1", "Deployment", "chat", namespace) is None


def test_an_adapter_below_its_evaluation_thresholds_is_served_only_when_asked(kube, namespace):
    bound_pvc(kube, namespace, "adapters")
    kube.apply(finetunejob("weak"), namespace)
    kube.wait_condition("batch/v1", "Job", "weak", namespace, "Complete")
    report_result(kube, namespace, "weak", adapter_result("weak", "sha256:" + "4" * 64, promotable=False))
    wait_ready(kube, "FineTuneJob", "weak", namespace)
    kube.apply(endpoint("chat", adapter="weak", index="docs", mode="finetuned"), namespace)
    refused = wait_ready(kube, "HybridEndpoint", "chat", namespace, "False", reason="AdapterNotPromotable")
    message = kube.condition(refused, "Ready")["message"]
    assert "FineTuneJob weak's adapter missed its evaluation thresholds" in message and "rougeL" in message
    assert "set model.adapter.requirePromotable=false to serve it anyway" in message
    assert kube.get("apps/v1", "Deployment", "chat", namespace) is None

    anyway = endpoint("chat", adapter="weak", index="docs", mode="finetuned")
    anyway["spec"]["model"]["adapter"]["requirePromotable"] = False
    kube.apply(anyway, namespace)
    kube.wait_for(lambda: kube.get("apps/v1", "Deployment", "chat", namespace), "the endpoint's Deployment")
    assert served_config(kube, namespace, "chat")["adapter"]["digest"] == "sha256:" + "4" * 64


def test_an_endpoint_referencing_a_failed_fine_tune_says_so_and_why(kube, namespace):
    bound_pvc(kube, namespace, "adapters")
    kube.apply(finetunejob("broken", image="kwok.ragtune.io/fail", backoffLimit=0), namespace)
    kube.apply(endpoint("chat", adapter="broken", index="docs", mode="finetuned"), namespace)
    refused = wait_ready(kube, "HybridEndpoint", "chat", namespace, "False", reason="ReferenceFailed", timeout=90)
    message = kube.condition(refused, "Ready")["message"]
    assert message.startswith("FineTuneJob broken failed: ") and "exit code 1" in message
    assert kube.condition(refused, "Progressing")["status"] == "False"  # nothing to wait for: kstatus Stalled
    assert kube.condition(refused, "Stalled")["reason"] == "ReferenceFailed"
    assert kube.get("apps/v1", "Deployment", "chat", namespace) is None


def test_a_restarted_operator_rolls_nothing(kube, namespace, ragtune_operator):
    """An operator restart (an upgrade, a rescheduled pod) resumes every endpoint and renders it again, in a
    process with another string-hash seed: what it applies must be what is there, or every endpoint would roll."""
    ready_references(kube, namespace, "ft", "sha256:" + "1" * 64)
    kube.apply(endpoint("chat", adapter="ft", index="docs"), namespace)
    wait_ready(kube, "HybridEndpoint", "chat", namespace, timeout=90)
    children = [("apps/v1", "Deployment", "chat"), ("v1", "ConfigMap", "chat-config"), ("v1", "Service", "chat")]
    before = [kube.get(api, kind, name, namespace) for api, kind, name in children]

    ragtune_operator.kill()
    endpoints = resumable(kube, "HybridEndpoint")  # the restart resumes each once
    ragtune_operator.start()
    kube.wait_for(lambda: reconciled(ragtune_operator.metrics(), "HybridEndpoint") >= endpoints,
                  f"the restarted operator to resume the {endpoints} endpoints")

    after = [kube.get(api, kind, name, namespace) for api, kind, name in children]
    assert after[0]["metadata"]["generation"] == before[0]["metadata"]["generation"]
    assert after[0]["spec"] == before[0]["spec"]
    assert after[1]["metadata"]["resourceVersion"] == before[1]["metadata"]["resourceVersion"]
    assert after[2]["spec"] == before[2]["spec"]


def test_the_endpoint_scales_through_its_scale_subresource(kube, namespace):
    """`kubectl scale` (or an HPA, or KEDA) sets spec.replicas through /scale; the Deployment follows, and /scale
    reports the replicas and the selector of the pods that serve."""
    ready_references(kube, namespace, "ft", "sha256:" + "1" * 64)
    # autoscaling is Ray Serve's, in a RayService: this endpoint's Deployment runs spec.replicas pods
    kube.apply(endpoint("chat", adapter="ft", index="docs", autoscaling={"minReplicas": 0, "maxReplicas": 3}),
               namespace)
    ready = wait_ready(kube, "HybridEndpoint", "chat", namespace, reason="Deployed", timeout=90)
    assert ready["status"]["runtime"] == "deployment" and ready["status"]["replicas"] == 1

    kube.kubectl("scale", "hybridendpoint", "chat", "-n", namespace, "--replicas=2")
    kube.wait_for(lambda: kube.get("apps/v1", "Deployment", "chat", namespace)["spec"]["replicas"] == 2,
                  "the Deployment to run 2 replicas")
    path = f"/apis/ragtune.io/v1alpha1/namespaces/{namespace}/hybridendpoints/chat/scale"
    scale = kube.wait_for(lambda: (lambda s: s if s["status"].get("replicas") == 2 else None)(
        json.loads(kube.kubectl("get", "--raw", path).stdout)), "/scale to report 2 replicas")
    assert scale["spec"]["replicas"] == 2
    deployment = kube.get("apps/v1", "Deployment", "chat", namespace)
    wanted = deployment["spec"]["selector"]["matchLabels"]
    assert dict(pair.split("=") for pair in scale["status"]["selector"].split(",")) == wanted
    assert wanted.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    # two replicas or more: a node drain takes one serving pod at a time
    budget = kube.wait_for(lambda: kube.get("policy/v1", "PodDisruptionBudget", "chat", namespace),
                           "a PodDisruptionBudget for 2 replicas")
    assert budget["spec"]["maxUnavailable"] == 1 and budget["spec"]["selector"]["matchLabels"] == wanted
    assert budget["metadata"]["ownerReferences"][0]["kind"] == "HybridEndpoint"

    # the HPA controller reads /scale and its selector (no metrics server here: it stops at the metrics)
    hpa = yaml.safe_load(HPA_EXAMPLE.read_text())
    hpa["spec"]["scaleTargetRef"]["name"] = "chat"
    kube.apply(hpa, namespace)
    conditions = kube.wait_for(lambda: (lambda o: o if kube.condition(o, "ScalingActive") else None)(
        kube.get("autoscaling/v2", "HorizontalPodAutoscaler", hpa["metadata"]["name"], namespace)),
        "the HPA to evaluate the endpoint", timeout=90)["status"]["conditions"]
    by_type = {cond["type"]: cond for cond in conditions}
    assert (by_type["AbleToScale"]["status"], by_type["AbleToScale"]["reason"]) == ("True", "SucceededGetScale")
    assert by_type["ScalingActive"]["reason"] == "FailedGetResourceMetric", by_type["ScalingActive"]
    kube.kubectl("delete", "hpa", hpa["metadata"]["name"], "-n", namespace)

    kube.kubectl("scale", "hybridendpoint", "chat", "-n", namespace, "--replicas=0")
    zero = wait_ready(kube, "HybridEndpoint", "chat", namespace, reason="ScaledToZero")
    assert zero["status"]["replicas"] == 0
    assert kube.get("apps/v1", "Deployment", "chat", namespace)["spec"]["replicas"] == 0
    kube.wait_gone("policy/v1", "PodDisruptionBudget", "chat", namespace)  # it would block drains below 2


def test_the_endpoint_service_can_be_reached_from_outside_and_brought_back_in(kube, namespace):
    ready_references(kube, namespace, "ft", "sha256:" + "1" * 64)
    outside = {"type": "NodePort", "annotations": {"example.com/internal-load-balancer": "true"}}
    kube.apply(endpoint("chat", adapter="ft", index="docs", service=outside), namespace)
    wait_ready(kube, "HybridEndpoint", "chat", namespace, timeout=90)
    service = kube.wait_for(lambda: (lambda s: s if s and s["spec"]["type"] == "NodePort" else None)(
        kube.get("v1", "Service", "chat", namespace)), "a NodePort Service")
    assert service["spec"]["ports"][0]["nodePort"] > 0  # allocated by the API server
    assert service["metadata"]["annotations"]["example.com/internal-load-balancer"] == "true"
    assert service["metadata"]["annotations"]["prometheus.io/scrape"] == "true"

    kube.apply(endpoint("chat", adapter="ft", index="docs"), namespace)  # back to the default, ClusterIP
    inside = kube.wait_for(lambda: (lambda s: s if s["spec"]["type"] == "ClusterIP" else None)(
        kube.get("v1", "Service", "chat", namespace)), "the Service to be ClusterIP again")
    assert "nodePort" not in inside["spec"]["ports"][0]
    # an annotation taken out of the spec goes too, whatever else is left as it was
    assert "example.com/internal-load-balancer" not in inside["metadata"]["annotations"]
    kube.kubectl("annotate", "service", "chat", "-n", namespace, "team.example.com/owner=platform")
    kube.apply(endpoint("chat", adapter="ft", index="docs", service={"annotations": {"example.com/a": "1"}}),
               namespace)
    kube.wait_for(lambda: "example.com/a" in kube.get("v1", "Service", "chat", namespace)["metadata"]["annotations"],
                  "the new annotation")
    kube.apply(endpoint("chat", adapter="ft", index="docs"), namespace)
    kube.wait_for(lambda: "example.com/a" not in kube.get("v1", "Service", "chat", namespace)["metadata"][
        "annotations"], "the annotation to go")
    kept = kube.get("v1", "Service", "chat", namespace)["metadata"]["annotations"]
    assert kept["team.example.com/owner"] == "platform" and kept["prometheus.io/scrape"] == "true"  # not ragtune's
    assert inside["metadata"]["uid"] == service["metadata"]["uid"]  # changed in place
