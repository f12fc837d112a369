"""Sample objects and steps the controller tests share: a bound volume, a workload reporting through its Pod."""

from __future__ import annotations

import json

API = "ragtune.io/v1alpha1"


def volume_for_claim(kube, namespace: str, name: str) -> str:
    """A hostPath volume reserved for the claim `name`, so it binds as soon as the claim exists (the test
    cluster has no dynamic provisioner)."""
    pv_name = f"{namespace}-{name}"
    kube.apply({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv_name},
                "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                         "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "",
                         "hostPath": {"path": f"/tmp/{pv_name}"},
                         "claimRef": {"namespace": namespace, "name": name}}})
    return pv_name


def bound_pvc(kube, namespace: str, name: str) -> None:
    pv_name = volume_for_claim(kube, namespace, name)
    kube.apply({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name},
                "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "", "volumeName": pv_name,
                         "resources": {"requests": {"storage": "1Gi"}}}}, namespace)


def finetunejob(name: str, model: str = "base/tiny", **spec) -> dict:
    return {"apiVersion": API, "kind": "FineTuneJob", "metadata": {"name": name},
            "spec": {"model": {"name": model},
                     "dataset": {"source": "inline", "rows": [{"instruction": "2+2?", "output": "4"}]},
                     "output": {"pvc": {"claimName": "adapters", "path": name}}, **spec}}


def vectorindex(name: str, **spec) -> dict:
    return {"apiVersion": API, "kind": "VectorIndex", "metadata": {"name": name},
            "spec": {"sources": [{"inline": [{"name": "faq.md", "text": "# FAQ\nragtune indexes documents."}]}],
                     **spec}}


def endpoint(name: str, adapter: str, index: str, model: str = "base/tiny", **spec) -> dict:
    return {"apiVersion": API, "kind": "HybridEndpoint", "metadata": {"name": name},
            "spec": {"mode": "hybrid", "model": {"name": model, "adapter": {"fineTuneJobRef": {"name": adapter}}},
                     "retrieval": {"vectorIndexRef": {"name": index}}, **spec}}


def job_pod(kube, namespace: str, job_name: str) -> dict:
    return kube.wait_for(lambda: (kube.list("v1", "Pod", namespace, label_selector=f"job-name={job_name}")
                                  or [None])[0], f"a pod of Job {job_name}")


def annotate(kube, namespace: str, pod: dict, key: str, value: dict) -> None:
    kube.kubectl("annotate", "-n", namespace, "--overwrite", f"pod/{pod['metadata']['name']}",
                 f"{key}={json.dumps(value)}")


def report_result(kube, namespace: str, job_name: str, result: dict) -> None:
    """What a workload does last: its result on its own Pod (the Job may already have completed)."""
    annotate(kube, namespace, job_pod(kube, namespace, job_name), "ragtune.io/result", result)


def adapter_result(name: str, digest: str, base: str = "base/tiny", promotable: bool = True) -> dict:
    return {"uri": f"pvc://adapters/{name}/adapter", "digest": digest, "baseModel": base,
            "metrics": {"rougeL": 0.5, "evalLoss": 1.2}, "promotable": promotable}


def index_result(version: str, chunks: int = 10) -> dict:
    return {"documents": 1, "chunks": chunks, "dimension": 384, "embeddingModel": "all-MiniLM-L6-v2",
            "activeCollection": f"docs_{version}", "activeVersion": version, "added": chunks, "kept": 0,
            "removed": 0, "skipped": [], "durationSeconds": 1.5}


def status(kube, kind: str, name: str, namespace: str) -> dict:
    return (kube.get(API, kind, name, namespace) or {}).get("status") or {}


def wait_ready(kube, kind: str, name: str, namespace: str, value: str = "True", reason: str | None = None,
               timeout: float = 60) -> dict:
    def check():
        obj = kube.get(API, kind, name, namespace)
        cond = kube.condition(obj, "Ready")
        if cond and cond["status"] == value and (reason is None or cond["reason"] == reason):
            return obj
        return None
    try:
        return kube.wait_for(check, f"{kind}/{name} Ready={value}" + (f" ({reason})" if reason else ""), timeout)
    except AssertionError as exc:
        conditions = ((kube.get(API, kind, name, namespace) or {}).get("status") or {}).get("conditions")
        raise AssertionError(f"{exc}; conditions: {conditions}") from None


def wait_event(kube, namespace: str, name: str, reason: str, type_: str | None = None) -> dict:
    """An event about `name` with this reason: the operator posts a transition's event just after writing the
    status, so a test that saw the status may still be a moment early for the event."""
    return kube.wait_for(lambda: next((e for e in kube.events(namespace, name) if e["reason"] == reason and
                                       (type_ is None or e["type"] == type_)), None),
                         f"event {reason} for {name}", timeout=20)


def finish_finetune(kube, namespace, name, digest):
    kube.wait_condition("batch/v1", "Job", name, namespace, "Complete")
    report_result(kube, namespace, name, adapter_result(name, digest))
    wait_ready(kube, "FineTuneJob", name, namespace)


def finish_index(kube, namespace, name, version):
    job = kube.wait_for(lambda: (kube.list("batch/v1", "Job", namespace,
                                           label_selector=f"ragtune.io/vectorindex={name}") or [None])[0],
                        "the indexing Job")["metadata"]["name"]
    kube.wait_condition("batch/v1", "Job", job, namespace, "Complete")
    report_result(kube, namespace, job, index_result(version))
    wait_ready(kube, "VectorIndex", name, namespace)


def ready_references(kube, namespace: str, adapter: str, digest: str, index: str = "docs",
                     version: str = "v1") -> None:
    """A Ready FineTuneJob and a Ready VectorIndex (with their volumes) for an endpoint to reference."""
    bound_pvc(kube, namespace, "adapters")
    volume_for_claim(kube, namespace, f"{index}-store")
    kube.apply(finetunejob(adapter), namespace)
    kube.apply(vectorindex(index), namespace)
    finish_finetune(kube, namespace, adapter, digest)
    finish_index(kube, namespace, index, version)


def reconciled(metrics: str, kind: str) -> float:
    """Successful reconciliations of `kind` in the operator's metrics."""
    line = f'ragtune_reconciles_total{{kind="{kind}",result="success"}} '
    return sum(float(row.removeprefix(line)) for row in metrics.splitlines() if row.startswith(line))


def resumable(kube, kind: str) -> int:
    """How many objects of `kind` a restarted operator resumes: those in namespaces still active (earlier tests
    leave theirs terminating, and objects there cannot be resumed)."""
    active = {n["metadata"]["name"] for n in kube.list("v1", "Namespace") if n["status"]["phase"] == "Active"}
    return sum(obj["metadata"]["namespace"] in active for obj in kube.list(API, kind))
