"""VectorIndex reconciliation: runs per spec version, the active version stays Ready, deletion policies."""

from __future__ import annotations

import time

import pytest
from ragtune_objects import API, index_result, report_result, status, vectorindex, volume_for_claim, wait_ready

pytestmark = pytest.mark.usefixtures("ragtune_operator")


def index_job(kube, namespace: str, name: str, other_than: str | None = None) -> str:
    def find():
        jobs = [j["metadata"]["name"] for j in kube.list("batch/v1", "Job", namespace,
                                                          label_selector=f"ragtune.io/vectorindex={name}")]
        return next((j for j in jobs if j != other_than), None)
    return kube.wait_for(find, f"an indexing Job for {name}")


def test_vectorindex_indexes_then_reindexes_without_losing_readiness(kube, namespace):
    volume_for_claim(kube, namespace, "docs-store")
    kube.apply(vectorindex("docs"), namespace)
    pvc = kube.wait_for(lambda: kube.get("v1", "PersistentVolumeClaim", "docs-store", namespace), "the store claim")
    assert "ownerReferences" not in pvc["metadata"], "Retain: the data outlives the VectorIndex"
    first = index_job(kube, namespace, "docs")
    kube.wait_condition("batch/v1", "Job", first, namespace, "Complete")
    report_result(kube, namespace, first, index_result("v1", chunks=12))
    ready = wait_ready(kube, "VectorIndex", "docs", namespace)
    assert ready["status"]["activeVersion"] == "v1" and ready["status"]["chunks"] == 12
    assert ready["status"]["dimension"] == 384

    kube.apply(vectorindex("docs", chunking={"size": 128, "overlap": 16}), namespace)
    second = index_job(kube, namespace, "docs", other_than=first)
    # While the new version builds, and after its Job ends until it has reported, readers keep the active version.
    building = kube.wait_for(lambda: (lambda obj: obj if obj["status"].get("jobName") == second else None)(
        kube.get(API, "VectorIndex", "docs", namespace)), "status to follow the new Job")
    assert kube.condition(building, "Ready")["status"] == "True"
    assert kube.condition(building, "Ready")["reason"] == "Indexing"
    kube.wait_condition("batch/v1", "Job", second, namespace, "Complete")
    ended = kube.wait_for(lambda: (lambda obj: obj if kube.condition(obj, "Progressing")["reason"] == "AwaitingResult"
                                   else None)(kube.get(API, "VectorIndex", "docs", namespace)),
                          "status to see the Job end")
    assert kube.condition(ended, "Ready")["status"] == "True" and ended["status"]["activeVersion"] == "v1"
    report_result(kube, namespace, second, index_result("v2", chunks=20))
    kube.wait_for(lambda: status(kube, "VectorIndex", "docs", namespace).get("activeVersion") == "v2",
                  "version v2 to be active")
    assert kube.condition(kube.get(API, "VectorIndex", "docs", namespace), "Ready")["status"] == "True"


def test_a_schedule_creates_a_cronjob_and_suspend_pauses_it(kube, namespace):
    kube.apply(vectorindex("nightly", schedule="0 3 * * *"), namespace)
    cron = kube.wait_for(lambda: kube.get("batch/v1", "CronJob", "nightly-refresh", namespace), "the CronJob")
    assert cron["spec"]["schedule"] == "0 3 * * *" and cron["spec"]["suspend"] is False
    kube.apply(vectorindex("nightly", schedule="0 3 * * *", suspend=True), namespace)
    kube.wait_for(lambda: kube.get("batch/v1", "CronJob", "nightly-refresh", namespace)["spec"]["suspend"],
                  "the CronJob to be suspended")
    kube.apply(vectorindex("nightly"), namespace)
    kube.wait_gone("batch/v1", "CronJob", "nightly-refresh", namespace)


def test_deletion_policy_decides_whether_the_store_outlives_the_index(kube, namespace):
    kube.apply(vectorindex("kept"), namespace)
    kube.apply(vectorindex("dropped", deletionPolicy="Delete"), namespace)
    for name in ("kept", "dropped"):
        kube.wait_for(lambda: kube.get("v1", "PersistentVolumeClaim", f"{name}-store", namespace), f"{name}-store")
        index_job(kube, namespace, name)
    kube.kubectl("delete", "-n", namespace, "vix", "kept", "dropped")
    kube.wait_gone("v1", "PersistentVolumeClaim", "dropped-store", namespace, timeout=60)
    kube.wait_for(lambda: not kube.list("batch/v1", "Job", namespace, label_selector="ragtune.io/vectorindex"),
                  "the indexing Jobs to be garbage-collected")
    assert kube.get("v1", "PersistentVolumeClaim", "kept-store", namespace) is not None


def test_an_unreachable_milvus_server_never_blocks_deletion(kube, namespace):
    kube.apply(vectorindex("remote", deletionPolicy="Delete",
                           store={"backend": "milvus", "uri": "http://127.0.0.1:9"}), namespace)
    obj = kube.wait_for(lambda: (kube.get(API, "VectorIndex", "remote", namespace) or {}).get("metadata", {})
                        .get("finalizers"), "the finalizer")
    assert "ragtune.io/finalizer" in obj
    started = time.monotonic()
    kube.kubectl("delete", "-n", namespace, "vix", "remote", "--wait=false")
    kube.wait_gone(API, "VectorIndex", "remote", namespace, timeout=120)
    assert time.monotonic() - started < 120
    assert any(e["reason"] == "CollectionNotDropped" for e in kube.events(namespace, "remote"))


@pytest.fixture
def crd_older_than_the_operator(kube, crds):
    """The VectorIndex CRD as an older release might have left it (Helm never upgrades a chart's CRDs): any spec
    is admitted. The release's CRD is put back afterwards."""
    crd = kube.get("apiextensions.k8s.io/v1", "CustomResourceDefinition", "vectorindexes.ragtune.io")
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    schema["properties"]["spec"] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    for field in ("resourceVersion", "managedFields", "uid", "creationTimestamp", "generation"):
        crd["metadata"].pop(field, None)
    crd.pop("status", None)
    kube.apply(crd)
    yield
    kube.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crds / "ragtune.io_vectorindexes.yaml"))


def test_a_spec_admission_let_through_says_which_field_to_fix(kube, namespace, crd_older_than_the_operator):
    volume_for_claim(kube, namespace, "docs-store")
    kube.apply(vectorindex("docs"), namespace)
    job = index_job(kube, namespace, "docs")
    kube.wait_condition("batch/v1", "Job", job, namespace, "Complete")
    report_result(kube, namespace, job, index_result("v1"))
    wait_ready(kube, "VectorIndex", "docs", namespace)

    # An invalid change to a serving index: readers keep the active version, the object names the field.
    kube.apply(vectorindex("docs", chunking={"size": 4}), namespace)
    kept = wait_ready(kube, "VectorIndex", "docs", namespace, "True", reason="InvalidSpec")
    message = kube.condition(kept, "Ready")["message"]
    assert "spec.chunking.size" in message and "crds/" in message and "previous version keeps serving" in message
    assert kube.condition(kept, "Failed")["status"] == "True"
    assert kept["status"]["activeVersion"] == "v1"
    assert [j["metadata"]["name"] for j in kube.list("batch/v1", "Job", namespace)] == [job], "no run for it"

    # A new object that was never valid is not Ready; once fixed it indexes.
    volume_for_claim(kube, namespace, "fresh-store")
    kube.apply(vectorindex("fresh", chunking={"strategy": "sentences"}), namespace)
    refused = wait_ready(kube, "VectorIndex", "fresh", namespace, "False", reason="InvalidSpec")
    assert "spec.chunking.strategy" in kube.condition(refused, "Ready")["message"]
    assert refused["status"]["phase"] == "Failed"
    kube.apply(vectorindex("fresh"), namespace)
    index_job(kube, namespace, "fresh")
    kube.wait_for(lambda: kube.condition(kube.get(API, "VectorIndex", "fresh", namespace), "Ready")["reason"]
                  != "InvalidSpec", "the fixed spec to be reconciled")
