"""HybridEndpoint → workload ConfigMap + (Deployment running Ray Serve in one pod | KubeRay RayService) + Service."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import yaml

from ..api.hybridendpoint import HybridEndpointSpec, resolve_topology
from ..api.workload import (CONFIG_FILE, CONFIG_MOUNT, MODEL_STAGING, AdapterRef, OwnerInfo, RetrievalTarget,
                            ServeConfig)
from . import common

COMPONENT = "serve"
PRESTOP_SECONDS = 5
SHM_SIZE = "1Gi"
ADAPTER_MOUNT = "/adapters"
STORE_MOUNT = "/store"
MODEL_MOUNT = "/model"
RAY_VERSION = "2.60.0"
SERVE_IMPORT_PATH = "ragtune_workloads.serve.app:build_app"
EMBEDDING_MOUNT = "/embedding-model"


@dataclass(frozen=True)
class ResolvedAdapter:
    """The adapter a FineTuneJob produced (or a URI), as the endpoint mounts it."""

    name: str
    uri: str
    digest: str | None
    base_model: str | None
    claim_name: str | None = None   # the volume that holds it, when it lives on a PVC
    sub_path: str = ""
    s3_endpoint: str | None = None   # where an s3:// adapter lives, and the Secret with its credentials
    s3_credentials_secret: str | None = None


@dataclass(frozen=True)
class ResolvedIndex:
    name: str
    collection: str
    store_uri: str
    embedding_model: str
    version: str | None
    claim_name: str | None = None
    sub_path: str = ""
    query_prefix: str = ""
    embedding_claim: str | None = None   # the volume holding the embedding model, when the index loads it from a PVC
    embedding_path: str = ""
    token_secret: tuple[str, str] | None = None  # (Secret, key) of a Milvus server's token


def names(owner: OwnerInfo) -> dict[str, str]:
    return {"config": f"{owner.name}-config", "deployment": owner.name, "service": owner.name,
            "rayservice": owner.name}


def served_name(owner: OwnerInfo, spec: HybridEndpointSpec) -> str:
    return spec.model.served_name or owner.name


def workload_config(owner: OwnerInfo, spec: HybridEndpointSpec, adapter: ResolvedAdapter | None,
                    index: ResolvedIndex | None) -> ServeConfig:
    adapter_ref = None
    if adapter:
        path = adapter.uri
        if adapter.claim_name:
            path = f"{ADAPTER_MOUNT}/{adapter.name}/{adapter.sub_path}".rstrip("/")
        adapter_ref = AdapterRef(name=adapter.name, path=path, digest=adapter.digest, base_model=adapter.base_model,
                                 s3_endpoint=adapter.s3_endpoint if path.startswith("s3://") else None)
    retrieval = None
    if index:
        uri = index.store_uri
        if index.claim_name:
            uri = f"{STORE_MOUNT}/{index.sub_path}".rstrip("/")
        # queries are embedded by the very model files the index was built with
        model_path = (f"{EMBEDDING_MOUNT}/{index.embedding_path.lstrip('/')}".rstrip("/")
                      if index.embedding_claim else None)
        retrieval = RetrievalTarget(store_uri=uri, collection=index.collection, embedding_model=index.embedding_model,
                                    model_path=model_path, query_prefix=index.query_prefix,
                                    query_backend=spec.retrieval.query_backend,
                                    query_precision=spec.retrieval.query_precision)
    model_path = None
    if spec.model.source == "pvc" and spec.model.pvc:
        model_path = f"{MODEL_MOUNT}/{spec.model.pvc.path.lstrip('/')}".rstrip("/")
    elif spec.model.source == "s3":
        model_path = MODEL_STAGING  # where the workload copies the model to, on the pod's scratch volume
    api_key_file = "/var/run/ragtune/api-key/api-key" if spec.api_key_secret else None
    return ServeConfig(owner=owner, spec=spec, model_path=model_path, adapter=adapter_ref, retrieval=retrieval,
                       api_key_file=api_key_file)


def image(spec: HybridEndpointSpec) -> str:
    return spec.image or common.IMAGES["serve-gpu" if spec.resources.gpu else "serve"]


def _volumes(spec: HybridEndpointSpec, config_name: str, adapter: ResolvedAdapter | None,
             index: ResolvedIndex | None) -> tuple[list[dict], list[dict]]:
    volume, mount = common.config_volume(config_name)
    volumes, mounts = [volume], [mount]
    claims: dict[str, dict] = {}

    def claim(name: str, claim_name: str, mount_path: str, read_only: bool) -> None:
        # One volume per claim: the kubelet never finishes mounting a claim that two volumes of a pod name
        # (the model and the embedding model often share one), so a second use is another mount of the first.
        existing = claims.get(claim_name)
        if existing is None:
            existing = {"name": name, "persistentVolumeClaim": {"claimName": claim_name, "readOnly": read_only}}
            claims[claim_name] = existing
            volumes.append(existing)
        elif not read_only:
            existing["persistentVolumeClaim"]["readOnly"] = False
        mounts.append({"name": existing["name"], "mountPath": mount_path, "readOnly": read_only})

    if adapter and adapter.claim_name:
        claim("adapter", adapter.claim_name, f"{ADAPTER_MOUNT}/{adapter.name}", True)
    if index and index.claim_name:
        claim("store", index.claim_name, STORE_MOUNT, False)
    if index and index.embedding_claim:
        claim("embedding-model", index.embedding_claim, EMBEDDING_MOUNT, True)
    if spec.model.source == "pvc" and spec.model.pvc:
        claim("model", spec.model.pvc.claim_name, MODEL_MOUNT, True)
    if spec.api_key_secret:
        volumes.append({"name": "api-key", "secret": {"secretName": spec.api_key_secret}})
        mounts.append({"name": "api-key", "mountPath": "/var/run/ragtune/api-key", "readOnly": True})
    volumes.append({"name": "tmp", "emptyDir": {}})
    mounts.append({"name": "tmp", "mountPath": "/tmp"})
    # vLLM's engine and Ray's object store share memory through /dev/shm; a container's default is 64 MiB.
    volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": SHM_SIZE}})
    mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    return volumes, mounts


def cpu_threads_env(cpu: str) -> list[dict[str, str]]:
    """Compute threads for a CPU engine, sized to the pod's CPU request. vLLM's CPU backend otherwise pins its
    threads to the node's cores by itself (`auto`): every endpoint pod on a node chooses the same core, and a
    rolling update's new pod starved beside the old one for minutes."""
    cores = int(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
    return [{"name": "OMP_NUM_THREADS", "value": str(max(1, math.ceil(cores)))},
            {"name": "VLLM_CPU_OMP_THREADS_BIND", "value": "nobind"}]


def workload_env(spec: HybridEndpointSpec, adapter: ResolvedAdapter | None,
                 index: ResolvedIndex | None) -> list[dict[str, Any]]:
    """What the serving workload reads from Secrets: S3 credentials for a model or adapter in S3 (the model's
    first: one environment holds one set), a Milvus server's token."""
    env = []
    if spec.model.source == "s3" and spec.model.s3:
        env += common.s3_env(spec.model.s3.credentials_secret, None)
    if adapter is not None and adapter.uri.startswith("s3://") and not adapter.claim_name:
        env += common.s3_env(adapter.s3_credentials_secret, None)
    if index is not None and index.token_secret:
        env.append(common.secret_env("MILVUS_TOKEN", *index.token_secret))
    return common.unique_env(env)


def serve_container(spec: HybridEndpointSpec, mounts: list[dict], command: list[str] | None,
                    env: list[dict[str, Any]]) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "serve",
        "image": image(spec),
        "env": common.pod_env() + env + [{"name": "HF_HOME", "value": "/tmp/hf"},
                                   {"name": "RAY_AUTH_MODE", "value": "disabled"},
                                   # Ray's workers (the replicas serving requests, vLLM's engine) at the default
                                   # priority instead of Ray's niceness 15 below its own services.
                                   {"name": "RAY_worker_niceness", "value": "0"}],
        "ports": [{"name": "http", "containerPort": spec.port}],
        "resources": common.container_resources(spec.resources),
        "volumeMounts": mounts,
        "securityContext": common.restricted_container_security(),
    }
    if not spec.resources.gpu:
        container["env"] += cpu_threads_env(spec.resources.cpu)
    if command:
        container["command"] = command
        container["readinessProbe"] = {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5}
        container["livenessProbe"] = {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 20,
                                      "failureThreshold": 6, "initialDelaySeconds": 120}
        # A pod leaving a rollout keeps serving until the Service has stopped sending it requests (endpoint
        # removal reaches every node's proxy within a few seconds); only then does SIGTERM drain Ray Serve.
        container["lifecycle"] = {"preStop": {"sleep": {"seconds": PRESTOP_SECONDS}}}
    return container


def build(body: dict[str, Any], spec: HybridEndpointSpec, runtime: str, adapter: ResolvedAdapter | None,
          index: ResolvedIndex | None) -> list[dict[str, Any]]:
    """`runtime` is already resolved: rayservice or deployment."""
    owner = common.owner_info(body)
    n = names(owner)
    labels = common.labels(owner, COMPONENT)
    config = common.config_map(n["config"], owner, COMPONENT, workload_config(owner, spec, adapter, index))
    config_digest = common.digest(config["data"])
    volumes, mounts = _volumes(spec, n["config"], adapter, index)
    env = workload_env(spec, adapter, index)
    children = [config]
    if runtime == "rayservice":
        children.append(rayservice(owner, spec, n, labels, volumes, mounts, config_digest, env))
    else:
        children.append(deployment(owner, spec, n, labels, volumes, mounts, config_digest, env))
    children.append(service(owner, spec, n, labels, runtime))
    if wants_disruption_budget(spec, runtime):
        children.append(disruption_budget(owner, n, labels))
    return children


def wants_disruption_budget(spec: HybridEndpointSpec, runtime: str) -> bool:
    """A Deployment of two or more replicas: a node drain then takes one serving pod at a time. (One replica
    gets none, which would block drains; a RayService's pods are KubeRay's.)"""
    return runtime == "deployment" and spec.replicas >= 2


def disruption_budget(owner: OwnerInfo, n: dict[str, str], labels: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": {"name": n["deployment"], "namespace": owner.namespace, "labels": labels},
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": serving_pods(owner, "deployment")}},
    }


def deployment(owner, spec, n, labels, volumes, mounts, config_digest, env) -> dict[str, Any]:
    command = ["python", "-m", "ragtune_workloads.serve", "--config", f"{CONFIG_MOUNT}/{CONFIG_FILE}",
               "--port", str(spec.port)]
    selector = serving_pods(owner, "deployment")
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": n["deployment"], "namespace": owner.namespace, "labels": labels},
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": selector},
            # A new adapter or index version rolls pods one at a time and never drops below the wanted count.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": labels, "annotations": {"ragtune.io/config-digest": config_digest}},
                "spec": {
                    "serviceAccountName": common.WORKLOAD_SERVICE_ACCOUNT,
                    "securityContext": common.restricted_pod_security(),
                    "containers": [serve_container(spec, mounts, command, env)],
                    "volumes": volumes,
                    **common.placement(spec.resources),
                },
            },
        },
    }


def scaled_deployment(spec: HybridEndpointSpec) -> str:
    """The Ray Serve deployment replicas/autoscaling apply to in a RayService: the one that holds the engine."""
    return "Ingress" if resolve_topology(spec.topology, "rayservice") == "colocated" else "Generator"


def serve_config_v2(owner: OwnerInfo, spec: HybridEndpointSpec) -> str:
    deployments = []
    scaled = scaled_deployment(spec)
    if spec.autoscaling:
        deployments.append({"name": scaled, "autoscaling_config": {
            "min_replicas": spec.autoscaling.min_replicas, "max_replicas": spec.autoscaling.max_replicas,
            "target_ongoing_requests": spec.autoscaling.target_ongoing_requests}})
    else:
        deployments.append({"name": scaled, "num_replicas": max(spec.replicas, 1)})
    app = {"name": owner.name, "route_prefix": "/", "import_path": SERVE_IMPORT_PATH,
           "args": {"config": f"{CONFIG_MOUNT}/{CONFIG_FILE}"}, "deployments": deployments}
    return yaml.safe_dump({"applications": [app]}, sort_keys=False)


def rayservice(owner, spec, n, labels, volumes, mounts, config_digest, env) -> dict[str, Any]:
    container = serve_container(spec, mounts, None, env)
    container["ports"] = [{"name": "gcs", "containerPort": 6379}, {"name": "dashboard", "containerPort": 8265},
                          {"name": "serve", "containerPort": 8000}]
    # Probes of our own: KubeRay only injects its defaults (wget exec probes) where a container has none, and the
    # serve image carries no wget. The head is ready and alive while its GCS answers through the dashboard;
    # whether it takes Serve traffic is KubeRay's ray.io/serve label, which ragtune's Service selects on.
    container["readinessProbe"] = {"httpGet": {"path": "/api/gcs_healthz", "port": "dashboard"},
                                   "periodSeconds": 5, "failureThreshold": 6}
    container["livenessProbe"] = {"httpGet": {"path": "/api/gcs_healthz", "port": "dashboard"},
                                  "periodSeconds": 10, "failureThreshold": 12, "initialDelaySeconds": 30}
    pod = {"metadata": {"labels": labels, "annotations": {"ragtune.io/config-digest": config_digest}},
           "spec": {"serviceAccountName": common.WORKLOAD_SERVICE_ACCOUNT,
                    "securityContext": common.restricted_pod_security(),
                    "containers": [container], "volumes": volumes, **common.placement(spec.resources)}}
    return {
        "apiVersion": "ray.io/v1", "kind": "RayService",
        "metadata": {"name": n["rayservice"], "namespace": owner.namespace, "labels": labels},
        "spec": {
            "serveConfigV2": serve_config_v2(owner, spec),
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                "headGroupSpec": {"rayStartParams": {"dashboard-host": "0.0.0.0"}, "template": pod},
            },
        },
    }


def serving_pods(owner: OwnerInfo, runtime: str) -> dict[str, str]:
    """The labels of the pods that serve the endpoint: its Service's selector, and its scale subresource's."""
    if runtime == "rayservice":
        # KubeRay labels the pods that serve traffic; ragtune's Service fronts them under the endpoint's name.
        return {"ray.io/serve": "true", "app.kubernetes.io/instance": owner.name}
    return {"app.kubernetes.io/instance": owner.name, "app.kubernetes.io/name": COMPONENT}


def service(owner, spec, n, labels, runtime: str) -> dict[str, Any]:
    selector = serving_pods(owner, runtime)
    return {
        "apiVersion": "v1", "kind": "Service",
        # Prometheus' annotation-based discovery (the chart's endpointsServiceMonitor for the Prometheus Operator)
        "metadata": {"name": n["service"], "namespace": owner.namespace, "labels": labels,
                     "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": str(spec.port),
                                     "prometheus.io/path": "/metrics", **spec.service.annotations}},
        "spec": {"type": spec.service.type, "selector": selector,
                 "ports": [{"name": "http", "port": spec.port, "targetPort": spec.port}]},
    }


def selector_text(owner: OwnerInfo, runtime: str) -> str:
    """status.selector: the serving pods' labels as a label selector string (the scale subresource's
    labelSelectorPath, which an HPA or KEDA reads to find the pods it measures)."""
    return ",".join(f"{key}={value}" for key, value in sorted(serving_pods(owner, runtime).items()))


def url(owner: OwnerInfo, spec: HybridEndpointSpec) -> str:
    return f"http://{owner.name}.{owner.namespace}.svc.cluster.local:{spec.port}/v1"
