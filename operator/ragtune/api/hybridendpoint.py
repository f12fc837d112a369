"""HybridEndpoint: a Ray Serve application that retrieves from a VectorIndex and generates with vLLM."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import (
    ApiModel, Condition, ObjectReference, PvcLocation, ResourcesSpec, S3Location, cel, precision_rules, validations,
)

DEFAULT_RAG_SYSTEM_PROMPT = (
    "You are a helpful assistant. Answer the question using ONLY the context below. "
    "If the answer is not in the context, say that you don't know. Cite the sources you used."
)
DEFAULT_HYBRID_SYSTEM_PROMPT = (
    "You are an expert assistant writing for executives. Using the context below and your own domain training, "
    "give a concise executive summary that answers the question: lead with the answer, then the key points as "
    "short bullets. Rely on the context for facts; if the context does not support an answer, say so."
)
DEFAULT_TEMPLATE = "Context:\n{context}\n\nQuestion: {question}"


class AdapterSpec(ApiModel):
    """The LoRA adapter served: a FineTuneJob's, or one at a URI."""

    model_config = validations(
        cel("has(self.fineTuneJobRef) != has(self.uri)",
            "model.adapter sets exactly one of fineTuneJobRef (a FineTuneJob in this namespace) or uri"),
    )
    fine_tune_job_ref: ObjectReference | None = Field(default=None, description="A FineTuneJob in this namespace; "
                                                      "served once it is Ready (change it to promote a new one).")
    uri: str | None = Field(default=None, pattern=r"^(s3|pvc|file|hf)://.+$",
                            description="An adapter outside ragtune: s3://, pvc://claim/path, file:// or hf://")
    require_promotable: bool = Field(default=True, description="Refuse a FineTuneJob adapter marked not promotable.")


class EndpointModelSpec(ApiModel):
    """The base model served, and the adapter on it."""

    name: str = Field(default="mistralai/Mistral-7B-Instruct-v0.3", min_length=1, max_length=512,
                      description="Base model; must equal the adapter's base model.")
    source: Literal["hf", "pvc", "s3"] = Field(default="hf", description="Where the weights come from.")
    pvc: PvcLocation | None = None
    s3: S3Location | None = None
    served_name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._:/-]{1,128}$",
                                    description="Model name clients send; defaults to the endpoint's name.")
    adapter: AdapterSpec | None = None


class RetrievalSpec(ApiModel):
    """Retrieval from a VectorIndex: which one, how many chunks, and how queries are embedded."""

    model_config = validations(*precision_rules("retrieval", "queryBackend", "queryPrecision"))

    vector_index_ref: ObjectReference = Field(description="A VectorIndex in this namespace; its new versions are "
                                              "served without a restart.")
    top_k: int = Field(default=4, ge=1, le=100, description="Chunks retrieved per question (best first, packed "
                       "into the context as they fit).")
    score_threshold: float | None = Field(default=None, ge=-1.0, le=1.0, description="Chunks scoring below are not used; with none "
                                          "left the answer says it does not know.")
    default_mode: Literal["auto", "always", "never"] = Field(default="auto", description="Per-request override "
                                                             "possible with the retrieval field.")
    query_backend: Literal["onnx", "openvino", "torch"] = Field(
        default="onnx", description="Runtime that embeds queries with the index's model weights, whatever backend "
        "and precision the index was built with. onnx (onnxruntime) and openvino: exported once at start, about "
        "half torch's latency per query; a model that does not export falls back to torch (logged).")
    query_precision: Literal["fp32", "bf16", "int8"] = Field(
        default="fp32", description="Arithmetic of the query embedding. bf16 (openvino, torch): on CPUs with AMX "
        "the lowest latency, vectors within cosine 0.9999 of fp32 (the same recall on Cranfield); int8 (onnx): "
        "faster still but 2 points lower recall@10 on Cranfield — check on your data.")


class PromptSpec(ApiModel):
    """The system prompt and the user turn's template."""

    system: str | None = Field(default=None, max_length=16384, description="Defaults by mode: rag answers from "
                               "the context only; hybrid writes an executive summary.")
    template: str = Field(default=DEFAULT_TEMPLATE, max_length=16384,
                          description="User turn; {context} and {question} are filled in.")


class EngineSpec(ApiModel):
    """The generation engine: vLLM (LoRA enabled) or transformers + peft."""

    model_config = validations(
        cel("self.name != 'vllm' || self.gpuMemoryUtilization > 0.0", "engine.gpuMemoryUtilization must be > 0"),
    )
    name: Literal["auto", "vllm", "transformers"] = Field(default="auto", description="auto prefers vLLM.")
    max_model_len: int = Field(default=4096, ge=128, le=1048576, description="Context length in tokens (prompt "
                               "and completion); at most the model's own.")
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1, description="vLLM: share of GPU memory for "
                                          "weights and KV cache.")
    tensor_parallel_size: int = Field(default=1, ge=1, le=16, description="vLLM: GPUs one replica spans.")
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        default="auto", description="Weight and activation type; auto follows the model (on a CPU, half-precision "
        "weights run in bfloat16 where the CPU computes it natively, float32 otherwise).")
    quantization: Literal["none", "awq", "gptq", "fp8", "bitsandbytes"] = Field(
        default="none", description="vLLM: quantised weights (the model must be quantised that way, except fp8 "
        "and bitsandbytes).")
    max_lora_rank: int = Field(default=64, ge=1, le=1024, description="vLLM: the largest adapter rank served.")
    max_tokens: int = Field(default=512, ge=1, le=65536, description="Default completion length.")


class AutoscalingSpec(ApiModel):
    """Ray Serve autoscaling of the engine's deployment (RayService runtime)."""

    model_config = validations(
        cel("self.minReplicas <= self.maxReplicas", "autoscaling.minReplicas must be <= autoscaling.maxReplicas"),
    )
    min_replicas: int = Field(default=1, ge=0, le=100, description="Fewest replicas; 0 scales to zero.")
    max_replicas: int = Field(default=1, ge=1, le=100, description="Most replicas.")
    target_ongoing_requests: int = Field(default=8, ge=1, le=1000, description="Requests per replica Ray Serve "
                                         "scales to keep.")


class ServiceSpec(ApiModel):
    """The endpoint's Service: how clients reach it."""

    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = Field(
        default="ClusterIP", description="ClusterIP: inside the cluster (put an Ingress or Gateway in front); "
        "NodePort or LoadBalancer: outside it.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Annotations on the Service, e.g. a "
                                        "cloud's internal load balancer.")


class HybridEndpointSpec(ApiModel):
    model_config = validations(
        cel("self.mode == 'finetuned' || has(self.retrieval)",
            "mode rag and hybrid retrieve: set retrieval.vectorIndexRef.name, or use mode finetuned", ".retrieval"),
        cel("self.mode == 'rag' || (has(self.model.adapter))",
            "mode finetuned and hybrid serve an adapter: set model.adapter.fineTuneJobRef.name (or model.adapter.uri), "
            "or use mode rag", ".model"),
        cel("!has(self.autoscaling) || self.replicas >= self.autoscaling.minReplicas",
            "replicas must be >= autoscaling.minReplicas", ".replicas"),
    )
    mode: Literal["rag", "finetuned", "hybrid"] = Field(default="hybrid", description="rag: retrieve, base model; "
                                                        "finetuned: the adapter, no retrieval; hybrid: both.")
    model: EndpointModelSpec = Field(default_factory=EndpointModelSpec)
    retrieval: RetrievalSpec | None = None
    prompt: PromptSpec = Field(default_factory=PromptSpec)
    engine: EngineSpec = Field(default_factory=EngineSpec)
    replicas: int = Field(default=1, ge=0, le=100, description="Serving replicas: pods of the Deployment runtime, "
                          "Ray Serve replicas of the engine's deployment in a RayService; 0 scales to zero. The "
                          "scale subresource sets it: kubectl scale, an HPA or KEDA (on the endpoint's /metrics).")
    autoscaling: AutoscalingSpec | None = Field(default=None, description="Ray Serve autoscaling of the engine's "
                                                "deployment in a RayService (by ongoing requests per replica). The "
                                                "Deployment runtime runs spec.replicas pods: scale those with an "
                                                "HPA or KEDA through the scale subresource.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    api_key_secret: str | None = Field(default=None, max_length=253, description="Secret whose key 'api-key' "
                                       "holds the Bearer key clients must send; open when empty.")
    runtime: Literal["auto", "rayservice", "deployment"] = Field(
        default="auto", description="auto: a KubeRay RayService when its CRD is installed, otherwise a Deployment "
        "running Ray Serve in one pod; decided when the endpoint is first served and kept (status.runtime), "
        "except that removing KubeRay moves its endpoints to a Deployment.")
    topology: Literal["auto", "colocated", "split"] = Field(
        default="auto", description="colocated: retrieval and generation run inside the ingress replica, so a "
        "request crosses no deployment boundary (lowest latency at low and moderate load; everything scales "
        "together). split: Retriever and Generator are Ray Serve deployments of their own (more throughput when "
        "the CPUs are saturated; generation scales alone and can sit on GPU workers while the ingress stays on "
        "CPU). auto: colocated in runtime deployment, split in a RayService.")
    access_log: bool = Field(default=False, description="Ray Serve's access log: a line per request (and per "
                             "call between deployments) in the replicas' logs. Off by default: /metrics counts "
                             "requests and their latency by route and status, and on a small CPU pod writing and "
                             "forwarding a line per request costs loaded requests milliseconds each.")
    port: int = Field(default=8000, ge=1024, le=65535, description="Port of the endpoint's Service and server.")
    service: ServiceSpec = Field(default_factory=ServiceSpec)
    image: str | None = Field(default=None, description="Overrides the operator's serving image.")


def resolve_topology(topology: str, runtime: str) -> str:
    """The topology an endpoint runs with in `runtime` (rayservice or deployment)."""
    if topology != "auto":
        return topology
    return "colocated" if runtime == "deployment" else "split"


class ServedVersions(ApiModel):
    model_config = {"extra": "ignore"}
    adapter: str | None = None
    adapter_digest: str | None = None
    index: str | None = None
    index_version: str | None = None


class HybridEndpointStatus(ApiModel):
    model_config = {"extra": "ignore"}
    phase: str | None = None
    url: str | None = None
    runtime: str | None = None
    replicas: int | None = None
    ready_replicas: int | None = None
    selector: str | None = Field(default=None, description="The serving pods' label selector (the scale "
                                 "subresource's, for an HPA or KEDA).")
    served: ServedVersions | None = None
    observed_generation: int | None = None
    conditions: list[Condition] = Field(default_factory=list)


class HybridEndpoint(ApiModel):
    model_config = {"extra": "ignore"}
    spec: HybridEndpointSpec
    status: HybridEndpointStatus = Field(default_factory=HybridEndpointStatus)
