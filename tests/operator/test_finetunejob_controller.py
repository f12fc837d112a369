"""FineTuneJob reconciliation against the real control plane, with the operator running as a process."""

from __future__ import annotations

import time

import pytest
from ragtune_objects import (API, adapter_result, annotate, bound_pvc, finetunejob, job_pod, reconciled,
                             report_result, resumable, status, wait_event, wait_ready)

pytestmark = pytest.mark.usefixtures("ragtune_operator")


@pytest.fixture
def adapters(kube, namespace):
    bound_pvc(kube, namespace, "adapters")


def test_finetunejob_runs_a_job_reports_progress_and_ends_ready_with_its_artifact(kube, namespace, adapters):
    kube.apply(finetunejob("ft"), namespace)
    job = kube.wait_for(lambda: kube.get("batch/v1", "Job", "ft", namespace), "the training Job")
    assert job["metadata"]["ownerReferences"][0]["kind"] == "FineTuneJob"
    config = kube.get("v1", "ConfigMap", "ft-config", namespace)
    assert '"kind": "FineTuneConfig"' in config["data"]["config.json"]
    pod = job_pod(kube, namespace, "ft")
    assert kube.wait_for(lambda: kube.get("v1", "Pod", pod["metadata"]["name"], namespace)["spec"].get("nodeName"),
                         "the pod to be scheduled") == "kwok-cpu-0"

    annotate(kube, namespace, pod, "ragtune.io/progress", {"step": 5, "totalSteps": 20, "loss": 1.7,
                                                          "etaSeconds": 30})
    progressed = kube.wait_for(lambda: status(kube, "FineTuneJob", "ft", namespace).get("progress", {}).get("step")
                               == 5 and status(kube, "FineTuneJob", "ft", namespace), "progress in status",
                               timeout=30)
    assert progressed["progress"]["loss"] == 1.7
    printed = kube.kubectl("get", "ftj", "ft", "-n", namespace).stdout
    assert "5/20 (25%)" in printed

    kube.wait_condition("batch/v1", "Job", "ft", namespace, "Complete")
    report_result(kube, namespace, "ft", adapter_result("ft", "sha256:" + "a" * 64))
    ready = wait_ready(kube, "FineTuneJob", "ft", namespace)
    st = ready["status"]
    assert st["phase"] == "Succeeded" and st["artifact"]["digest"] == "sha256:" + "a" * 64
    assert kube.condition(ready, "Promotable")["status"] == "True"
    assert kube.condition(ready, "Ready")["observedGeneration"] == ready["metadata"]["generation"]
    assert wait_event(kube, namespace, "ft", "JobSucceeded")["kind"] == "FineTuneJob"


def test_a_gpu_finetunejob_lands_on_the_gpu_node(kube, namespace, adapters):
    kube.apply(finetunejob("gpu", resources={"gpu": 1}), namespace)
    pod = job_pod(kube, namespace, "gpu")
    node = kube.wait_for(lambda: kube.get("v1", "Pod", pod["metadata"]["name"], namespace)["spec"].get("nodeName"),
                         "the GPU pod to be scheduled")
    assert node == "kwok-gpu-0"


def test_too_many_gpus_is_reported_as_unschedulable(kube, namespace, adapters):
    kube.apply(finetunejob("greedy", resources={"gpu": 3}), namespace)
    wait_ready(kube, "FineTuneJob", "greedy", namespace, "False", reason="Unschedulable")
    # The scheduler's message names what is missing (once the volume is bound, that is the GPUs).
    kube.wait_for(lambda: "Insufficient nvidia.com/gpu" in (kube.condition(
        kube.get(API, "FineTuneJob", "greedy", namespace), "Ready") or {}).get("message", ""),
        "the Ready message to name the missing GPUs")


def test_a_failing_job_ends_failed_with_the_reason(kube, namespace, adapters):
    kube.apply(finetunejob("broken", image="kwok.ragtune.io/fail", backoffLimit=0), namespace)
    obj = kube.wait_condition(API, "FineTuneJob", "broken", namespace, "Failed", timeout=60)
    failed = kube.condition(obj, "Failed")
    assert failed["reason"] == "BackoffLimitExceeded"
    assert "exit code 1" in failed["message"]
    assert obj["status"]["phase"] == "Failed"
    assert kube.condition(obj, "Ready")["status"] == "False"
    wait_event(kube, namespace, "broken", "BackoffLimitExceeded", "Warning")


def test_reapplying_identical_yaml_changes_nothing(kube, namespace, adapters):
    manifest = finetunejob("stable")
    kube.apply(manifest, namespace)
    kube.wait_condition("batch/v1", "Job", "stable", namespace, "Complete")
    report_result(kube, namespace, "stable", adapter_result("stable", "sha256:" + "b" * 64))
    wait_ready(kube, "FineTuneJob", "stable", namespace)
    time.sleep(1)  # let the last status write land before taking the snapshot

    def versions():
        return {kind: kube.get(api, kind, name, namespace)["metadata"]["resourceVersion"]
                for api, kind, name in [(API, "FineTuneJob", "stable"), ("batch/v1", "Job", "stable"),
                                        ("v1", "ConfigMap", "stable-config")]}
    before = versions()
    assert "unchanged" in kube.apply(manifest, namespace).stdout
    time.sleep(3)
    assert versions() == before


def test_a_job_deleted_before_it_finished_is_created_again(kube, namespace, adapters):
    kube.apply(finetunejob("resilient", resources={"gpu": 3}), namespace)  # unschedulable: it never finishes
    first = kube.wait_for(lambda: kube.get("batch/v1", "Job", "resilient", namespace), "the Job")
    kube.kubectl("delete", "job", "resilient", "-n", namespace, "--wait=true")
    again = kube.wait_for(lambda: (lambda j: j if j and j["metadata"]["uid"] != first["metadata"]["uid"] else None)(
        kube.get("batch/v1", "Job", "resilient", namespace)), "the Job to be created again")
    assert again["metadata"]["ownerReferences"][0]["name"] == "resilient"


def test_a_runs_config_deleted_or_edited_while_it_trains_is_put_back(kube, namespace, adapters):
    kube.apply(finetunejob("steady", resources={"gpu": 3}), namespace)  # unschedulable: it never finishes
    job = kube.wait_for(lambda: kube.get("batch/v1", "Job", "steady", namespace), "the Job")
    config = kube.wait_for(lambda: kube.get("v1", "ConfigMap", "steady-config", namespace), "the run's config")
    kube.kubectl("patch", "-n", namespace, "configmap", "steady-config", "--type=merge", "-p",
                 '{"data": {"config.json": "{}"}}')
    kube.wait_for(lambda: kube.get("v1", "ConfigMap", "steady-config", namespace)["data"] == config["data"],
                  "the config to be put back")
    kube.kubectl("delete", "-n", namespace, "configmap", "steady-config")
    again = kube.wait_for(lambda: (lambda cm: cm if cm and cm["metadata"]["uid"] != config["metadata"]["uid"]
                                   else None)(kube.get("v1", "ConfigMap", "steady-config", namespace)),
                          "the config to be made again")
    assert again["data"] == config["data"]
    assert kube.get("batch/v1", "Job", "steady", namespace)["metadata"]["uid"] == job["metadata"]["uid"]
    obj = kube.get(API, "FineTuneJob", "steady", namespace)
    assert kube.condition(obj, "Ready")["reason"] == "Unschedulable"  # what the run shows is unchanged


def test_a_finished_run_whose_job_is_gone_is_not_run_again_after_a_restart(kube, namespace, adapters,
                                                                            ragtune_operator):
    kube.apply(finetunejob("done"), namespace)
    kube.wait_condition("batch/v1", "Job", "done", namespace, "Complete")
    report_result(kube, namespace, "done", adapter_result("done", "sha256:" + "c" * 64))
    before = wait_ready(kube, "FineTuneJob", "done", namespace)["status"]
    kube.kubectl("delete", "job", "done", "-n", namespace, "--wait=true")
    time.sleep(1)  # the running operator sees the deletion and, the run being finished, creates nothing

    ragtune_operator.kill()
    runs = resumable(kube, "FineTuneJob")
    ragtune_operator.start()
    kube.wait_for(lambda: reconciled(ragtune_operator.metrics(), "FineTuneJob") >= runs,
                  f"the restarted operator to resume the {runs} FineTuneJobs")
    time.sleep(1)
    assert kube.get("batch/v1", "Job", "done", namespace) is None
    after = status(kube, "FineTuneJob", "done", namespace)
    assert after["phase"] == "Succeeded" and after["artifact"] == before["artifact"]


def test_the_workloads_identity_is_made_again_when_deleted(kube, namespace, adapters):
    """Without its ServiceAccount no pod of the Job can be created, and the run would wait forever."""
    kube.apply(finetunejob("waiting", resources={"gpu": 3}), namespace)  # unschedulable: it stays unfinished
    first = kube.wait_for(lambda: kube.get("v1", "ServiceAccount", "ragtune-workload", namespace),
                          "the workloads' ServiceAccount")
    kube.kubectl("delete", "serviceaccount", "ragtune-workload", "-n", namespace, "--wait=true")
    again = kube.wait_for(lambda: (lambda sa: sa if sa and sa["metadata"]["uid"] != first["metadata"]["uid"] else None)(
        kube.get("v1", "ServiceAccount", "ragtune-workload", namespace)), "the ServiceAccount to be made again",
        timeout=30)
    assert again["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "ragtune"
