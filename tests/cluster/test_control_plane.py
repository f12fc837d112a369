"""The local control plane is a real Kubernetes: scheduling, controllers, garbage collection and CEL admission."""

from __future__ import annotations

import json

import pytest

CPU_NODE, GPU_NODE = "kwok-cpu-0", "kwok-gpu-0"


def pod(name: str, gpus: int | None = None) -> dict:
    container = {"name": "main", "image": "busybox"}
    if gpus is not None:
        container["resources"] = {"limits": {"nvidia.com/gpu": str(gpus)}}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"containers": [container]}}


def test_version_is_stamped(kube):
    server = json.loads(kube.kubectl("version", "-o", "json").stdout)
    assert server["serverVersion"]["gitVersion"].startswith("v1.34.")
    assert server["clientVersion"]["gitVersion"].startswith("v1.34.")


def test_both_fake_nodes_are_ready_and_the_gpu_node_advertises_two_gpus(kube):
    nodes = {n["metadata"]["name"]: n for n in kube.list("v1", "Node")}
    assert {CPU_NODE, GPU_NODE} <= set(nodes)
    for name in (CPU_NODE, GPU_NODE):
        assert kube.condition(nodes[name], "Ready")["status"] == "True"
    assert nodes[GPU_NODE]["status"]["allocatable"]["nvidia.com/gpu"] == "2"
    assert "nvidia.com/gpu" not in nodes[CPU_NODE]["status"]["allocatable"]


def test_job_pod_is_scheduled_and_the_job_completes(kube, namespace):
    kube.apply({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "hello"},
                "spec": {"backoffLimit": 0, "template": {"spec": {
                    "restartPolicy": "Never", "containers": [{"name": "main", "image": "busybox"}]}}}},
               namespace)
    job = kube.wait_condition("batch/v1", "Job", "hello", namespace, "Complete", timeout=60)
    assert job["status"]["succeeded"] == 1
    pods = kube.list("v1", "Pod", namespace, label_selector="job-name=hello")
    assert len(pods) == 1 and pods[0]["spec"]["nodeName"] in (CPU_NODE, GPU_NODE)


def test_a_failing_job_pod_fails_the_job(kube, namespace):
    kube.apply({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "broken"},
                "spec": {"backoffLimit": 0, "template": {"spec": {
                    "restartPolicy": "Never", "containers": [{"name": "main", "image": "kwok.ragtune.io/fail"}]}}}},
               namespace)
    job = kube.wait_condition("batch/v1", "Job", "broken", namespace, "Failed", timeout=60)
    assert kube.condition(job, "Failed")["reason"] == "BackoffLimitExceeded"


def test_gpu_requests_land_on_the_gpu_node_and_too_many_stay_pending(kube, namespace):
    kube.apply([pod("one-gpu", 1), pod("three-gpus", 3)], namespace)
    placed = kube.wait_for(lambda: (kube.get("v1", "Pod", "one-gpu", namespace) or {}).get("spec", {}).get("nodeName"),
                           "one-gpu to be scheduled")
    assert placed == GPU_NODE

    def unschedulable():
        p = kube.get("v1", "Pod", "three-gpus", namespace)
        cond = kube.condition(p, "PodScheduled")
        return cond if cond and cond.get("reason") == "Unschedulable" else None
    cond = kube.wait_for(unschedulable, "three-gpus to be marked Unschedulable")
    assert "nvidia.com/gpu" in cond["message"]
    assert not kube.get("v1", "Pod", "three-gpus", namespace)["spec"].get("nodeName")


def test_deployment_becomes_available(kube, namespace):
    kube.apply({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
                "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                         "template": {"metadata": {"labels": {"app": "web"}},
                                      "spec": {"containers": [{"name": "main", "image": "nginx"}]}}}}, namespace)
    deployment = kube.wait_condition("apps/v1", "Deployment", "web", namespace, "Available", timeout=60)
    kube.wait_for(lambda: (kube.get("apps/v1", "Deployment", "web", namespace)["status"].get("readyReplicas") == 2),
                  "2 ready replicas")
    assert deployment["spec"]["replicas"] == 2


def test_deleting_an_owner_garbage_collects_its_children(kube, namespace):
    kube.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner"}, "data": {}}, namespace)
    owner = kube.get("v1", "ConfigMap", "owner", namespace)
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner["metadata"]["uid"],
           "blockOwnerDeletion": True}
    kube.apply({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "child", "ownerReferences": [ref]}, "data": {}}, namespace)
    assert kube.get("v1", "ConfigMap", "child", namespace) is not None
    kube.kubectl("delete", "-n", namespace, "configmap", "owner")
    kube.wait_gone("v1", "ConfigMap", "child", namespace, timeout=60)


CEL_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.test.ragtune.io"},
    "spec": {"group": "test.ragtune.io", "scope": "Namespaced",
             "names": {"kind": "Widget", "plural": "widgets", "singular": "widget"},
             "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                 "type": "object", "properties": {"spec": {
                     "type": "object",
                     "properties": {"min": {"type": "integer"}, "max": {"type": "integer"}},
                     "x-kubernetes-validations": [{"rule": "self.min <= self.max",
                                                   "message": "spec.min must be <= spec.max: lower spec.min"}]}}}}}]}}


@pytest.fixture
def widget_crd(kube):
    kube.apply(CEL_CRD)
    kube.wait_condition("apiextensions.k8s.io/v1", "CustomResourceDefinition", "widgets.test.ragtune.io", None,
                        "Established")
    yield
    kube.kubectl("delete", "crd", "widgets.test.ragtune.io", "--wait=false")


def test_crd_cel_rule_rejects_a_bad_object_with_its_message(kube, namespace, widget_crd):
    good = {"apiVersion": "test.ragtune.io/v1", "kind": "Widget", "metadata": {"name": "good"},
            "spec": {"min": 1, "max": 2}}
    bad = {**good, "metadata": {"name": "bad"}, "spec": {"min": 5, "max": 2}}
    kube.wait_for(lambda: kube.apply(good, namespace, check=False).returncode == 0, "the Widget kind to be served")
    result = kube.apply(bad, namespace, check=False)
    assert result.returncode != 0
    assert "spec.min must be <= spec.max: lower spec.min" in result.stderr
    assert kube.get("test.ragtune.io/v1", "Widget", "bad", namespace) is None
