"""VectorIndex → workload ConfigMap + batch/v1 Job (a new Job per spec version) + CronJob for a schedule."""

from __future__ import annotations

import re
from typing import Any

from ..api.vectorindex import VectorIndexSpec
from ..api.workload import CONFIG_FILE, CONFIG_MOUNT, IndexConfig, OwnerInfo
from . import common

COMPONENT = "index"
STORE_MOUNT = "/store"
SOURCES_MOUNT = "/sources"
MODEL_MOUNT = "/embedding-model"
# Fields that change what gets indexed; schedule, suspend and the deletion policy do not need a new run.
RUN_FIELDS = ("sources", "formats", "chunking", "embedding", "store")


def collection_name(owner: OwnerInfo, spec: VectorIndexSpec) -> str:
    if spec.store.collection:
        return spec.store.collection
    return re.sub(r"[^A-Za-z0-9_]", "_", f"{owner.namespace}_{owner.name}")


def store_claim(owner: OwnerInfo, spec: VectorIndexSpec) -> tuple[str, str] | None:
    """(claim name, path inside it) of the milvus-lite volume; None for a Milvus server."""
    if spec.store.backend == "milvus":
        return None
    if spec.store.pvc:
        return spec.store.pvc.claim_name, (spec.store.pvc.path or "").strip("/")
    return f"{owner.name}-store", ""


def store_uri(owner: OwnerInfo, spec: VectorIndexSpec) -> str:
    """A Milvus server's URL, or the milvus-lite root directory on the store volume (the workload keeps each
    collection's versions and its active-version pointer in <root>/<collection>/)."""
    if spec.store.backend == "milvus":
        return spec.store.uri
    path = store_claim(owner, spec)[1]
    return f"{STORE_MOUNT}/{path}".rstrip("/")


def run_digest(spec: VectorIndexSpec) -> str:
    wire = spec.to_wire()
    return common.digest({k: wire.get(k) for k in RUN_FIELDS}, 8)


def names(owner: OwnerInfo, spec: VectorIndexSpec) -> dict[str, str]:
    return {"config": f"{owner.name}-config", "job": f"{owner.name}-{run_digest(spec)}",
            "cronjob": f"{owner.name}-refresh"}


def workload_config(owner: OwnerInfo, spec: VectorIndexSpec) -> IndexConfig:
    paths: list[str | None] = []
    for i, source in enumerate(spec.sources):
        if source.pvc:
            paths.append(f"{SOURCES_MOUNT}/{i}/{source.pvc.path.lstrip('/')}".rstrip("/"))
        elif source.config_map:
            paths.append(f"{SOURCES_MOUNT}/{i}")
        elif source.s3:
            paths.append(f"/tmp/ragtune-sources/{i}")
        else:
            paths.append(None)
    model_path = None
    if spec.embedding.source == "pvc" and spec.embedding.pvc:
        model_path = f"{MODEL_MOUNT}/{spec.embedding.pvc.path.lstrip('/')}".rstrip("/")
    state = None
    if store_claim(owner, spec):
        state = f"{store_uri(owner, spec)}/{collection_name(owner, spec)}/state"
    return IndexConfig(owner=owner, spec=spec, source_paths=paths, model_path=model_path,
                       store_uri=store_uri(owner, spec), collection=collection_name(owner, spec), state_path=state)


def image(spec: VectorIndexSpec) -> str:
    return spec.image or common.IMAGES["index"]


def pod_template(owner: OwnerInfo, spec: VectorIndexSpec, config_name: str, config_digest: str) -> dict[str, Any]:
    volume, mount = common.config_volume(config_name)
    volumes, mounts = [volume], [mount]
    env = common.pod_env() + [{"name": "HF_HOME", "value": "/tmp/hf"}]
    for i, source in enumerate(spec.sources):
        if source.pvc:
            volumes.append({"name": f"source-{i}", "persistentVolumeClaim": {
                "claimName": source.pvc.claim_name, "readOnly": True}})
            mounts.append({"name": f"source-{i}", "mountPath": f"{SOURCES_MOUNT}/{i}", "readOnly": True})
        elif source.config_map:
            volumes.append({"name": f"source-{i}", "configMap": {"name": source.config_map}})
            mounts.append({"name": f"source-{i}", "mountPath": f"{SOURCES_MOUNT}/{i}", "readOnly": True})
        elif source.s3:
            env += common.s3_env(source.s3.credentials_secret, source.s3.endpoint)
    if spec.embedding.source == "pvc" and spec.embedding.pvc:
        volumes.append({"name": "embedding-model", "persistentVolumeClaim": {
            "claimName": spec.embedding.pvc.claim_name, "readOnly": True}})
        mounts.append({"name": "embedding-model", "mountPath": MODEL_MOUNT, "readOnly": True})
    claim = store_claim(owner, spec)
    if claim:
        volumes.append({"name": "store", "persistentVolumeClaim": {"claimName": claim[0]}})
        mounts.append({"name": "store", "mountPath": STORE_MOUNT})
    elif spec.store.token_secret:
        env.append(common.secret_env("MILVUS_TOKEN", spec.store.token_secret.name, spec.store.token_secret.key))
    volumes.append({"name": "tmp", "emptyDir": {}})
    mounts.append({"name": "tmp", "mountPath": "/tmp"})
    return {
        "metadata": {"labels": common.labels(owner, COMPONENT),
                     "annotations": {"ragtune.io/config-digest": config_digest}},
        "spec": {
            "restartPolicy": "Never",
            "serviceAccountName": common.WORKLOAD_SERVICE_ACCOUNT,
            "securityContext": common.restricted_pod_security(),
            "containers": [{
                "name": "index",
                "image": image(spec),
                "command": ["python", "-m", "ragtune_workloads.index", "--config", f"{CONFIG_MOUNT}/{CONFIG_FILE}"],
                "env": common.unique_env(env),
                "resources": common.container_resources(spec.resources),
                "volumeMounts": mounts,
                "securityContext": common.restricted_container_security(),
                "terminationMessagePolicy": "FallbackToLogsOnError",
            }],
            "volumes": volumes,
            **common.placement(spec.resources),
        },
    }


def build(body: dict[str, Any], spec: VectorIndexSpec) -> list[dict[str, Any]]:
    owner = common.owner_info(body)
    n = names(owner, spec)
    labels = common.labels(owner, COMPONENT)
    config = common.config_map(n["config"], owner, COMPONENT, workload_config(owner, spec))
    template = pod_template(owner, spec, n["config"], common.digest(config["data"]))
    job_spec: dict[str, Any] = {"backoffLimit": spec.backoff_limit, "template": template}
    if spec.active_deadline_seconds:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    children: list[dict[str, Any]] = []
    if spec.store.backend == "milvus-lite" and not spec.store.pvc:
        children.append(store_pvc(owner, spec))
    children += [
        config,
        {"apiVersion": "batch/v1", "kind": "Job",
         "metadata": {"name": n["job"], "namespace": owner.namespace,
                      "labels": {**labels, "ragtune.io/run": run_digest(spec)}},
         "spec": job_spec},
    ]
    if spec.schedule:
        children.append({
            "apiVersion": "batch/v1", "kind": "CronJob",
            "metadata": {"name": n["cronjob"], "namespace": owner.namespace, "labels": labels},
            "spec": {"schedule": spec.schedule, "suspend": spec.suspend, "concurrencyPolicy": "Forbid",
                     "successfulJobsHistoryLimit": 2, "failedJobsHistoryLimit": 2,
                     "jobTemplate": {"metadata": {"labels": labels}, "spec": job_spec}},
        })
    return children


def store_pvc(owner: OwnerInfo, spec: VectorIndexSpec) -> dict[str, Any]:
    """The milvus-lite volume the operator provides when the spec names none. Under deletion policy Retain it is
    not owned by the VectorIndex, so deleting the index keeps the data."""
    pvc: dict[str, Any] = {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": store_claim(owner, spec)[0], "namespace": owner.namespace,
                     "labels": common.labels(owner, COMPONENT),
                     "annotations": {"ragtune.io/deletion-policy": spec.deletion_policy}},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": spec.store.storage_size}}},
    }
    if spec.store.storage_class_name:
        pvc["spec"]["storageClassName"] = spec.store.storage_class_name
    return pvc
