"""FineTuneJob → workload ConfigMap + batch/v1 Job."""

from __future__ import annotations

from typing import Any

from ..api.finetunejob import FineTuneJobSpec
from ..api.workload import CONFIG_FILE, CONFIG_MOUNT, MODEL_STAGING, FineTuneConfig, OwnerInfo
from . import common

COMPONENT = "finetune"
OUTPUT_MOUNT = "/output"
DATA_MOUNT = "/data"
MODEL_MOUNT = "/model"


def names(owner: OwnerInfo) -> dict[str, str]:
    return {"job": owner.name, "config": f"{owner.name}-config"}


def workload_config(owner: OwnerInfo, spec: FineTuneJobSpec) -> FineTuneConfig:
    dataset_path = None
    if spec.dataset.source == "configMap":
        key = spec.dataset.config_map.key if spec.dataset.config_map else None
        dataset_path = f"{DATA_MOUNT}/{key}" if key else DATA_MOUNT
    elif spec.dataset.source == "pvc":
        dataset_path = f"{DATA_MOUNT}/{spec.dataset.pvc.path.lstrip('/')}".rstrip("/")
    # dataset.s3: no path; the workload copies the rows onto the output volume (`.dataset`) itself
    model_path = None
    if spec.model.source == "pvc":
        model_path = f"{MODEL_MOUNT}/{spec.model.pvc.path.lstrip('/')}".rstrip("/")
    elif spec.model.source == "s3":
        model_path = MODEL_STAGING  # where the workload copies the model to, on the pod's scratch volume
    output_path = OUTPUT_MOUNT
    if spec.output.pvc and spec.output.pvc.path:
        output_path = f"{OUTPUT_MOUNT}/{spec.output.pvc.path.strip('/')}"
    return FineTuneConfig(owner=owner, spec=spec, model_path=model_path, dataset_path=dataset_path,
                          output_path=output_path)


def artifact_uri(owner: OwnerInfo, spec: FineTuneJobSpec) -> str:
    """Where the adapter ends up, as other resources reference it."""
    if spec.output.s3:
        return spec.output.s3.uri.rstrip("/") + "/adapter"
    path = (spec.output.pvc.path or "").strip("/")
    return f"pvc://{spec.output.pvc.claim_name}/{path + '/' if path else ''}adapter"


def image(spec: FineTuneJobSpec) -> str:
    if spec.image:
        return spec.image
    return common.IMAGES["finetune-gpu" if spec.resources.gpu else "finetune"]


def build(body: dict[str, Any], spec: FineTuneJobSpec) -> list[dict[str, Any]]:
    owner = common.owner_info(body)
    n = names(owner)
    config = common.config_map(n["config"], owner, COMPONENT, workload_config(owner, spec))
    return [config, job(owner, spec, n, common.digest(config["data"]))]


def job(owner: OwnerInfo, spec: FineTuneJobSpec, n: dict[str, str], config_digest: str) -> dict[str, Any]:
    labels = common.labels(owner, COMPONENT)
    volume, mount = common.config_volume(n["config"])
    volumes, mounts = [volume], [mount]
    env = common.pod_env() + [{"name": "HF_HOME", "value": "/tmp/hf"}]

    if spec.output.pvc:
        volumes.append({"name": "output", "persistentVolumeClaim": {"claimName": spec.output.pvc.claim_name}})
        mounts.append({"name": "output", "mountPath": OUTPUT_MOUNT})
    else:
        volumes.append({"name": "output", "emptyDir": {}})
        mounts.append({"name": "output", "mountPath": OUTPUT_MOUNT})
        env += common.s3_env(spec.output.s3.credentials_secret, spec.output.s3.endpoint)

    ds = spec.dataset
    if ds.source == "configMap":
        volumes.append({"name": "data", "configMap": {"name": ds.config_map.name}})
        mounts.append({"name": "data", "mountPath": DATA_MOUNT, "readOnly": True})
    elif ds.source == "pvc":
        volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": ds.pvc.claim_name, "readOnly": True}})
        mounts.append({"name": "data", "mountPath": DATA_MOUNT, "readOnly": True})
    elif ds.source == "s3":
        env += common.s3_env(ds.s3.credentials_secret, ds.s3.endpoint)

    m = spec.model
    if m.source == "pvc":
        volumes.append({"name": "model", "persistentVolumeClaim": {"claimName": m.pvc.claim_name, "readOnly": True}})
        mounts.append({"name": "model", "mountPath": MODEL_MOUNT, "readOnly": True})
    elif m.source == "s3":
        env += common.s3_env(m.s3.credentials_secret, m.s3.endpoint)
    if m.token_secret:
        env.append(common.secret_env("HF_TOKEN", m.token_secret.name, m.token_secret.key))
    volumes.append({"name": "tmp", "emptyDir": {}})
    mounts.append({"name": "tmp", "mountPath": "/tmp"})

    container = {
        "name": "finetune",
        "image": image(spec),
        "command": ["python", "-m", "ragtune_workloads.finetune", "--config", f"{CONFIG_MOUNT}/{CONFIG_FILE}"],
        "env": common.unique_env(env),
        "resources": common.container_resources(spec.resources),
        "volumeMounts": mounts,
        "securityContext": common.restricted_container_security(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    job_spec: dict[str, Any] = {
        "backoffLimit": spec.backoff_limit,
        "template": {
            "metadata": {"labels": labels, "annotations": {"ragtune.io/config-digest": config_digest}},
            "spec": {
                "restartPolicy": "Never",
                "serviceAccountName": common.WORKLOAD_SERVICE_ACCOUNT,
                "securityContext": common.restricted_pod_security(),
                "containers": [container],
                "volumes": volumes,
                **common.placement(spec.resources),
            },
        },
    }
    if spec.active_deadline_seconds:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": n["job"], "namespace": owner.namespace, "labels": labels},
            "spec": job_spec}
