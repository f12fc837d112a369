"""Pieces every workload's pod shares: labels, security context, placement, config mount, images."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from .. import API_VERSION
from ..api.base import ResourcesSpec
from ..api.workload import CONFIG_FILE, CONFIG_MOUNT, OwnerInfo

MANAGED_BY = "ragtune"
WORKLOAD_SERVICE_ACCOUNT = "ragtune-workload"

IMAGES = {
    "finetune": os.environ.get("RAGTUNE_FINETUNE_IMAGE", "ragtune/finetune:0.1.0"),
    "finetune-gpu": os.environ.get("RAGTUNE_FINETUNE_GPU_IMAGE", "ragtune/finetune-gpu:0.1.0"),
    "index": os.environ.get("RAGTUNE_INDEX_IMAGE", "ragtune/index:0.1.0"),
    "serve": os.environ.get("RAGTUNE_SERVE_IMAGE", "ragtune/serve:0.1.0"),
    "serve-gpu": os.environ.get("RAGTUNE_SERVE_GPU_IMAGE", "ragtune/serve-gpu:0.1.0"),
}
# Secrets (in each namespace where ragtune objects run) to pull the workload images with: a private registry.
WORKLOAD_IMAGE_PULL_SECRETS = [name.strip() for name in
                               os.environ.get("RAGTUNE_WORKLOAD_IMAGE_PULL_SECRETS", "").split(",") if name.strip()]


def owner_info(body: dict[str, Any]) -> OwnerInfo:
    meta = body["metadata"]
    return OwnerInfo(kind=body["kind"], name=meta["name"], namespace=meta["namespace"], uid=meta.get("uid", ""),
                     generation=meta.get("generation", 0))


def labels(owner: OwnerInfo, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": component,
        "app.kubernetes.io/instance": owner.name,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "app.kubernetes.io/part-of": "ragtune",
        f"ragtune.io/{owner.kind.lower()}": owner.name,
    }


def owner_reference(body: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": body["kind"], "name": body["metadata"]["name"],
            "uid": body["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}


def digest(data: Any, length: int = 10) -> str:
    text = data if isinstance(data, str) else json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def config_map(name: str, owner: OwnerInfo, component: str, config: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": owner.namespace, "labels": labels(owner, component)},
        "data": {CONFIG_FILE: config.model_dump_json(by_alias=True, exclude_none=True, indent=2)},
    }


def restricted_pod_security() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
            "seccompProfile": {"type": "RuntimeDefault"}}


def restricted_container_security() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True}


def container_resources(res: ResourcesSpec) -> dict[str, Any]:
    requests = {"cpu": res.cpu, "memory": res.memory}
    limits: dict[str, str] = {"memory": res.memory}
    if res.gpu:
        requests[res.gpu_resource_name] = str(res.gpu)
        limits[res.gpu_resource_name] = str(res.gpu)
    return {"requests": requests, "limits": limits}


def placement(res: ResourcesSpec) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if res.node_selector:
        spec["nodeSelector"] = dict(res.node_selector)
    tolerations = [t.model_dump(by_alias=True, exclude_none=True) for t in res.tolerations]
    if res.gpu and not any(t.get("key") == res.gpu_resource_name for t in tolerations):
        # GPU nodes are commonly tainted with their resource name; a GPU pod tolerates that taint.
        tolerations.append({"key": res.gpu_resource_name, "operator": "Exists", "effect": "NoSchedule"})
    if tolerations:
        spec["tolerations"] = tolerations
    if res.priority_class_name:
        spec["priorityClassName"] = res.priority_class_name
    return spec


def pod_env() -> list[dict[str, Any]]:
    return [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]


def secret_env(name: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def s3_env(credentials_secret: str | None, endpoint: str | None) -> list[dict[str, Any]]:
    env = []
    if credentials_secret:
        env += [{"name": k, "valueFrom": {"secretKeyRef": {"name": credentials_secret, "key": k}}}
                for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]
        # temporary credentials and the region, where the Secret has them
        env += [{"name": k, "valueFrom": {"secretKeyRef": {"name": credentials_secret, "key": k, "optional": True}}}
                for k in ("AWS_SESSION_TOKEN", "AWS_REGION")]
    if endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": endpoint})
    return env


def unique_env(env: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The first entry of each name: locations that share a Secret or an endpoint give the same variables, and
    a pod spec should hold each name once. Locations with different Secrets cannot both be honoured through one
    environment; the first one given wins."""
    seen: set[str] = set()
    unique = []
    for entry in env:
        if entry["name"] not in seen:
            seen.add(entry["name"])
            unique.append(entry)
    return unique


def config_volume(config_map_name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    volume = {"name": "ragtune-config", "configMap": {"name": config_map_name}}
    mount = {"name": "ragtune-config", "mountPath": CONFIG_MOUNT, "readOnly": True}
    return volume, mount


def workload_rbac(namespace: str, pull_secrets: list[str] | None = None) -> list[dict[str, Any]]:
    """The workloads' identity in a namespace: it may read and annotate Pods there (its progress), and hold Leases
    there (an index run on a Milvus server holds one while it writes) — nothing else. Its pods pull their images
    with `pull_secrets` (default: the operator's RAGTUNE_WORKLOAD_IMAGE_PULL_SECRETS)."""
    pull_secrets = WORKLOAD_IMAGE_PULL_SECRETS if pull_secrets is None else pull_secrets
    meta = {"namespace": namespace, "labels": {"app.kubernetes.io/managed-by": MANAGED_BY,
                                               "app.kubernetes.io/part-of": "ragtune"}}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": WORKLOAD_SERVICE_ACCOUNT, **meta},
         **({"imagePullSecrets": [{"name": name} for name in pull_secrets]} if pull_secrets else {})},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": WORKLOAD_SERVICE_ACCOUNT, **meta},
         "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "patch"]},
                   {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                    "verbs": ["get", "create", "update", "delete"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": WORKLOAD_SERVICE_ACCOUNT, **meta},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": WORKLOAD_SERVICE_ACCOUNT},
         "subjects": [{"kind": "ServiceAccount", "name": WORKLOAD_SERVICE_ACCOUNT, "namespace": namespace}]},
    ]
