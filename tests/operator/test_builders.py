"""Builders are pure: spec in, Kubernetes objects out."""

from __future__ import annotations

import json

import pytest
import yaml

from ragtune.api.finetunejob import FineTuneJobSpec
from ragtune.api.hybridendpoint import HybridEndpointSpec
from ragtune.api.vectorindex import VectorIndexSpec
from ragtune.api.workload import FineTuneConfig, IndexConfig, ServeConfig
from ragtune.builders import endpoint, finetune, index


def body(kind: str, name: str = "demo", namespace: str = "team-a") -> dict:
    return {"apiVersion": "ragtune.io/v1alpha1", "kind": kind,
            "metadata": {"name": name, "namespace": namespace, "uid": "u-1", "generation": 3}}


def ftj_spec(**overrides) -> FineTuneJobSpec:
    raw = {"dataset": {"source": "configMap", "configMap": {"name": "rows", "key": "train.jsonl"}},
           "output": {"pvc": {"claimName": "adapters", "path": "runs/demo"}}}
    raw.update(overrides)
    return FineTuneJobSpec.model_validate(raw)


def by_kind(objs: list[dict]) -> dict[str, dict]:
    return {o["kind"]: o for o in objs}


def test_finetune_job_runs_the_workload_with_its_config_and_restricted_security():
    objs = by_kind(finetune.build(body("FineTuneJob"), ftj_spec()))
    config = FineTuneConfig.model_validate_json(objs["ConfigMap"]["data"]["config.json"])
    assert config.dataset_path == "/data/train.jsonl"
    assert config.output_path == "/output/runs/demo"
    assert config.owner.name == "demo" and config.owner.generation == 3
    job = objs["Job"]
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"][-2:] == ["--config", "/etc/ragtune/config.json"]
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                                            "runAsNonRoot": True}
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] == 2
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/data"]["readOnly"] and "/output" in mounts
    env = {e["name"] for e in container["env"]}
    assert {"POD_NAME", "POD_NAMESPACE"} <= env


def test_gpu_finetune_asks_for_gpus_tolerates_their_taint_and_uses_the_gpu_image():
    spec = ftj_spec(resources={"gpu": 2, "nodeSelector": {"pool": "a100"}, "priorityClassName": "training"},
                    method="qlora", activeDeadlineSeconds=3600)
    job = by_kind(finetune.build(body("FineTuneJob"), spec))["Job"]
    pod = job["spec"]["template"]["spec"]
    limits = pod["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "2"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"] == {"pool": "a100"} and pod["priorityClassName"] == "training"
    assert "gpu" in pod["containers"][0]["image"]
    assert job["spec"]["activeDeadlineSeconds"] == 3600


def test_hub_token_and_image_override_reach_the_pod():
    spec = ftj_spec(model={"name": "org/m", "tokenSecret": {"name": "hf", "key": "token"}}, image="my/img:1")
    container = by_kind(finetune.build(body("FineTuneJob"), spec))["Job"]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "my/img:1"
    token = next(e for e in container["env"] if e["name"] == "HF_TOKEN")
    assert token["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "token"}


VIX = {"sources": [{"pvc": {"claimName": "docs", "path": "manuals"}, "glob": "**/*.md"},
                   {"inline": [{"name": "a.md", "text": "hi"}]}]}


def test_index_job_name_changes_with_what_is_indexed_not_with_the_schedule():
    base = VectorIndexSpec.model_validate(VIX)
    rechunked = VectorIndexSpec.model_validate({**VIX, "chunking": {"size": 128, "overlap": 16}})
    scheduled = VectorIndexSpec.model_validate({**VIX, "schedule": "0 3 * * *", "deletionPolicy": "Delete"})
    owner = finetune.common.owner_info(body("VectorIndex"))
    assert index.names(owner, base)["job"] != index.names(owner, rechunked)["job"]
    assert index.names(owner, base)["job"] == index.names(owner, scheduled)["job"]


def test_index_builds_a_store_claim_config_and_a_cronjob_for_a_schedule():
    spec = VectorIndexSpec.model_validate({**VIX, "schedule": "0 3 * * *", "suspend": True})
    objs = index.build(body("VectorIndex"), spec)
    kinds = [o["kind"] for o in objs]
    assert kinds == ["PersistentVolumeClaim", "ConfigMap", "Job", "CronJob"]
    pvc, config_map, job, cron = objs
    assert pvc["metadata"]["name"] == "demo-store"
    assert pvc["metadata"]["annotations"]["ragtune.io/deletion-policy"] == "Retain"
    config = IndexConfig.model_validate_json(config_map["data"]["config.json"])
    assert config.source_paths == ["/sources/0/manuals", None]
    assert config.store_uri == "/store" and config.collection == "team_a_demo"
    assert config.state_path == "/store/team_a_demo/state"
    assert cron["spec"]["suspend"] is True and cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert cron["spec"]["jobTemplate"]["spec"]["template"] == job["spec"]["template"]


def test_index_on_a_milvus_server_needs_no_claim_and_gets_its_token():
    spec = VectorIndexSpec.model_validate({**VIX, "store": {"backend": "milvus", "uri": "http://milvus:19530",
                                                            "tokenSecret": {"name": "milvus", "key": "token"}}})
    objs = by_kind(index.build(body("VectorIndex"), spec))
    assert "PersistentVolumeClaim" not in objs
    env = objs["Job"]["spec"]["template"]["spec"]["containers"][0]["env"]
    assert any(e["name"] == "MILVUS_TOKEN" for e in env)


HEP = {"mode": "hybrid", "model": {"name": "base/m", "adapter": {"fineTuneJobRef": {"name": "ft"}}},
       "retrieval": {"vectorIndexRef": {"name": "docs"}}, "apiKeySecret": "keys"}
ADAPTER = endpoint.ResolvedAdapter(name="ft", uri="pvc://adapters/ft/adapter", digest="sha256:abc",
                                   base_model="base/m", claim_name="adapters", sub_path="ft/adapter")
INDEX = endpoint.ResolvedIndex(name="docs", collection="ns_docs", store_uri="/store",
                               embedding_model="all-MiniLM-L6-v2", version="v2", claim_name="docs-store",
                               sub_path="", query_prefix="query: ")


def test_endpoint_deployment_mounts_adapter_index_and_key_and_rolls_without_downtime():
    spec = HybridEndpointSpec.model_validate(HEP)
    objs = by_kind(endpoint.build(body("HybridEndpoint"), spec, "deployment", ADAPTER, INDEX))
    config = ServeConfig.model_validate_json(objs["ConfigMap"]["data"]["config.json"])
    assert config.adapter.path == "/adapters/ft/ft/adapter" and config.adapter.digest == "sha256:abc"
    assert config.retrieval.store_uri == "/store" and config.retrieval.collection == "ns_docs"
    assert config.retrieval.query_prefix == "query: "
    assert config.retrieval.query_backend == "onnx"  # the endpoint's default, whatever the index ran
    assert config.retrieval.query_precision == "fp32"
    openvino_spec = HybridEndpointSpec.model_validate(
        {**HEP, "retrieval": {**HEP["retrieval"], "queryBackend": "openvino", "queryPrecision": "bf16"}})
    openvino_objs = by_kind(endpoint.build(body("HybridEndpoint"), openvino_spec, "deployment", ADAPTER, INDEX))
    target = ServeConfig.model_validate_json(openvino_objs["ConfigMap"]["data"]["config.json"]).retrieval
    assert (target.query_backend, target.query_precision) == ("openvino", "bf16")
    assert config.api_key_file == "/var/run/ragtune/api-key/api-key"
    deployment = objs["Deployment"]
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    pod = deployment["spec"]["template"]
    assert pod["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # the leaving pod serves until its endpoint is gone everywhere, within the default grace period
    pre_stop = pod["spec"]["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert 0 < pre_stop < pod["spec"].get("terminationGracePeriodSeconds", 30)
    assert objs["Service"]["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


def test_a_new_adapter_changes_the_pod_template_so_the_deployment_rolls():
    spec = HybridEndpointSpec.model_validate(HEP)
    first = by_kind(endpoint.build(body("HybridEndpoint"), spec, "deployment", ADAPTER, INDEX))["Deployment"]
    newer = endpoint.ResolvedAdapter(**{**ADAPTER.__dict__, "name": "ft2", "digest": "sha256:def"})
    second = by_kind(endpoint.build(body("HybridEndpoint"), spec, "deployment", newer, INDEX))["Deployment"]
    digest = lambda d: d["spec"]["template"]["metadata"]["annotations"]["ragtune.io/config-digest"]  # noqa: E731
    assert digest(first) != digest(second)
    assert first["metadata"]["name"] == second["metadata"]["name"]


def test_endpoint_embeds_queries_with_the_model_files_the_index_was_built_with():
    on_pvc = endpoint.ResolvedIndex(**{**INDEX.__dict__, "embedding_claim": "models", "embedding_path": "minilm"})
    objs = by_kind(endpoint.build(body("HybridEndpoint"), HybridEndpointSpec.model_validate(HEP), "deployment",
                                  ADAPTER, on_pvc))
    config = json.loads(objs["ConfigMap"]["data"]["config.json"])
    assert config["retrieval"]["modelPath"] == "/embedding-model/minilm"
    pod = objs["Deployment"]["spec"]["template"]["spec"]
    assert {"name": "embedding-model", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}} \
        in pod["volumes"]
    assert any(m["mountPath"] == "/embedding-model" for m in pod["containers"][0]["volumeMounts"])


def test_a_claim_used_twice_is_one_volume_mounted_twice():
    """The kubelet never mounts a pod whose two volumes name the same claim: base model and embedding model on
    one PVC must share a volume."""
    on_pvc = endpoint.ResolvedIndex(**{**INDEX.__dict__, "embedding_claim": "models", "embedding_path": "minilm"})
    spec = HybridEndpointSpec.model_validate({**HEP, "model": {**HEP["model"], "source": "pvc",
                                                               "pvc": {"claimName": "models", "path": "llama"}}})
    pod = by_kind(endpoint.build(body("HybridEndpoint"), spec, "deployment", ADAPTER, on_pvc))["Deployment"][
        "spec"]["template"]["spec"]
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert claims.count("models") == 1
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["/embedding-model"] == mounts["/model"]
    # vLLM needs more shared memory than a container's 64 MiB default
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}} in pod["volumes"]
    assert mounts["/dev/shm"] == "dshm"


@pytest.mark.parametrize(("cpu", "threads"), [("250m", "1"), ("1500m", "2"), ("4", "4"), ("2.5", "3")])
def test_a_cpu_engine_sizes_its_threads_to_the_cpu_request_without_pinning(cpu, threads):
    spec = HybridEndpointSpec.model_validate({**HEP, "resources": {"cpu": cpu, "memory": "4Gi"}})
    for runtime, kind in (("deployment", "Deployment"), ("rayservice", "RayService")):
        objs = by_kind(endpoint.build(body("HybridEndpoint"), spec, runtime, ADAPTER, INDEX))
        template = objs[kind]["spec"]["template"] if kind == "Deployment" else \
            objs[kind]["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
        env = {e["name"]: e.get("value") for e in template["spec"]["containers"][0]["env"]}
        assert env["OMP_NUM_THREADS"] == threads and env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
        assert env["RAY_worker_niceness"] == "0"  # the serving replicas not below Ray's own services


def test_an_endpoint_on_a_milvus_server_index_gets_the_index_token():
    spec = HybridEndpointSpec.model_validate(HEP)
    on_server = endpoint.ResolvedIndex(**{**INDEX.__dict__, "store_uri": "http://milvus:19530", "claim_name": None,
                                          "token_secret": ("milvus", "token")})
    for runtime, kind in (("deployment", "Deployment"), ("rayservice", "RayService")):
        for index_, expected in ((on_server, [{"secretKeyRef": {"name": "milvus", "key": "token"}}]), (INDEX, [])):
            objs = by_kind(endpoint.build(body("HybridEndpoint"), spec, runtime, ADAPTER, index_))
            template = objs[kind]["spec"]["template"] if kind == "Deployment" else \
                objs[kind]["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
            env = template["spec"]["containers"][0]["env"]
            assert [e["valueFrom"] for e in env if e["name"] == "MILVUS_TOKEN"] == expected


def test_an_endpoint_copies_a_model_and_adapter_in_s3_with_their_credentials():
    spec = HybridEndpointSpec.model_validate({**HEP, "model": {**HEP["model"], "source": "s3", "s3": {
        "uri": "s3://models/base-m", "endpoint": "http://minio:9000", "credentialsSecret": "model-s3"}}})
    in_s3 = endpoint.ResolvedAdapter(name="ft", uri="s3://adapters/ft/adapter", digest="sha256:abc",
                                     base_model="base/m", s3_endpoint="http://minio:9000",
                                     s3_credentials_secret="adapter-s3")
    objs = by_kind(endpoint.build(body("HybridEndpoint"), spec, "deployment", in_s3, INDEX))
    config = ServeConfig.model_validate_json(objs["ConfigMap"]["data"]["config.json"])
    assert config.model_path == endpoint.MODEL_STAGING
    assert (config.adapter.path, config.adapter.s3_endpoint) == ("s3://adapters/ft/adapter", "http://minio:9000")
    env = {e["name"]: e for e in objs["Deployment"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    # one environment holds one set of credentials: the model's (the same Secret serves both in practice)
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "model-s3"
    mounts = objs["Deployment"]["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert "/tmp" in {m["mountPath"] for m in mounts} and "/adapters" not in {m["mountPath"] for m in mounts}
    plain = by_kind(endpoint.build(body("HybridEndpoint"), HybridEndpointSpec.model_validate(HEP), "deployment",
                                   in_s3, INDEX))["Deployment"]["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {e["valueFrom"]["secretKeyRef"]["name"] for e in plain if e["name"].startswith("AWS_")} == {"adapter-s3"}


def test_a_gpu_engine_leaves_thread_placement_to_vllm():
    spec = HybridEndpointSpec.model_validate({**HEP, "resources": {"gpu": 1}})
    container = by_kind(endpoint.build(body("HybridEndpoint"), spec, "deployment", ADAPTER, INDEX))["Deployment"][
        "spec"]["template"]["spec"]["containers"][0]
    assert not {"OMP_NUM_THREADS", "VLLM_CPU_OMP_THREADS_BIND"} & {e["name"] for e in container["env"]}


def test_rayservice_runtime_renders_serve_config_v2_from_the_same_config():
    spec = HybridEndpointSpec.model_validate({**HEP, "autoscaling": {"minReplicas": 1, "maxReplicas": 4}})
    objs = by_kind(endpoint.build(body("HybridEndpoint"), spec, "rayservice", ADAPTER, INDEX))
    assert "Deployment" not in objs
    serve = yaml.safe_load(objs["RayService"]["spec"]["serveConfigV2"])
    app = serve["applications"][0]
    assert app["import_path"] == "ragtune_workloads.serve.app:build_app"
    assert app["args"] == {"config": "/etc/ragtune/config.json"}
    assert app["deployments"][0]["autoscaling_config"]["max_replicas"] == 4
    head = objs["RayService"]["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    assert any(v.get("configMap", {}).get("name") == "demo-config" for v in head["volumes"])
    # probes of its own, so KubeRay does not inject its wget-based ones (the image has no wget)
    ray = head["containers"][0]
    assert ray["readinessProbe"]["httpGet"]["port"] == "dashboard" and "exec" not in ray["livenessProbe"]


@pytest.mark.parametrize("topology, scaled", [("auto", "Generator"), ("split", "Generator"), ("colocated", "Ingress")])
def test_rayservice_scales_the_deployment_that_holds_the_engine(topology, scaled):
    spec = HybridEndpointSpec.model_validate({**HEP, "replicas": 3, "topology": topology})
    objs = by_kind(endpoint.build(body("HybridEndpoint"), spec, "rayservice", ADAPTER, INDEX))
    app = yaml.safe_load(objs["RayService"]["spec"]["serveConfigV2"])["applications"][0]
    assert app["deployments"] == [{"name": scaled, "num_replicas": 3}]


def test_s3_credentials_reach_the_pod_once_with_the_optional_session_token_and_region():
    s3 = {"uri": "s3://bucket/rows", "credentialsSecret": "s3-keys", "endpoint": "http://minio:9000"}
    spec = ftj_spec(dataset={"source": "s3", "s3": s3}, output={"s3": {**s3, "uri": "s3://bucket/out"}})
    container = by_kind(finetune.build(body("FineTuneJob"), spec))["Job"]["spec"]["template"]["spec"]["containers"][0]
    env = [e for e in container["env"] if e["name"].startswith("AWS_")]
    assert [e["name"] for e in env] == ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION",
                                        "AWS_ENDPOINT_URL"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in env if "valueFrom" in e}
    assert all(ref["name"] == "s3-keys" for ref in refs.values())
    assert [name for name, ref in refs.items() if ref.get("optional")] == ["AWS_SESSION_TOKEN", "AWS_REGION"]


def test_configs_round_trip_through_json_for_the_workloads():
    spec = ftj_spec()
    config = finetune.workload_config(finetune.common.owner_info(body("FineTuneJob")), spec)
    again = FineTuneConfig.model_validate(json.loads(config.model_dump_json(by_alias=True)))
    assert again == config


def test_the_workloads_service_account_pulls_with_the_configured_secrets():
    from ragtune.builders.common import workload_rbac

    account = next(o for o in workload_rbac("team-a", ["regcred", "mirror"]) if o["kind"] == "ServiceAccount")
    assert account["imagePullSecrets"] == [{"name": "regcred"}, {"name": "mirror"}]
    assert "imagePullSecrets" not in next(o for o in workload_rbac("team-a", []) if o["kind"] == "ServiceAccount")
