"""Shared building blocks of the three kinds' specs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel


class ApiModel(BaseModel):
    """Base of every API object: camelCase on the wire, snake_case in Python, unknown fields refused."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def cel(rule: str, message: str, field_path: str | None = None) -> dict[str, str]:
    """One `x-kubernetes-validations` entry; the message names the field and the fix."""
    entry = {"rule": rule, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    return entry


def validations(*rules: dict[str, str]) -> ConfigDict:
    return ConfigDict(json_schema_extra={"x-kubernetes-validations": list(rules)})


# Which arithmetic each embedding runtime runs: the one table behind the admission rules of a VectorIndex's
# embedding and a HybridEndpoint's query embedding, and the embedding workload's own check.
EMBEDDING_PRECISIONS: dict[str, tuple[str, ...]] = {
    "torch": ("fp32", "bf16"), "onnx": ("fp32", "int8"), "openvino": ("fp32", "bf16")}


def precision_rules(prefix: str, backend_field: str, precision_field: str) -> list[dict[str, str]]:
    """CEL rules refusing a precision on a runtime that does not run it (one per precision some runtime lacks),
    generated from EMBEDDING_PRECISIONS."""
    rules = []
    for precision in dict.fromkeys(p for runs in EMBEDDING_PRECISIONS.values() for p in runs):
        able = [backend for backend, runs in EMBEDDING_PRECISIONS.items() if precision in runs]
        if len(able) == len(EMBEDDING_PRECISIONS):
            continue
        names = " or ".join(able)
        rules.append(cel(
            f"self.{precision_field} != '{precision}' || self.{backend_field} in [{', '.join(repr(b) for b in able)}]",
            f"{prefix}.{precision_field} {precision} runs on {names}: set {prefix}.{backend_field} to {names}, or "
            f"{prefix}.{precision_field} to fp32"))
    return rules


class SecretKeyRef(ApiModel):
    """A key of a Secret in the object's namespace."""

    name: str = Field(min_length=1, max_length=253, description="Name of a Secret in the object's namespace.")
    key: str = Field(min_length=1, max_length=253, description="Key inside the Secret.")


class S3Location(ApiModel):
    """A prefix in an S3-compatible bucket, with its endpoint and credentials."""

    uri: str = Field(pattern=r"^s3://[^/]+(/.*)?$", description="s3://bucket/prefix")
    endpoint: str | None = Field(default=None, description="S3-compatible endpoint URL; AWS when empty.")
    credentials_secret: str | None = Field(
        default=None,
        description="Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and optionally AWS_SESSION_TOKEN, "
        "AWS_REGION), exposed to the workload as env.",
    )


class PvcLocation(ApiModel):
    """A path inside a PersistentVolumeClaim of the object's namespace."""

    claim_name: str = Field(min_length=1, max_length=253, description="PersistentVolumeClaim in the same namespace.")
    path: str = Field(default="", max_length=1024, description="Path inside the volume.")


class ObjectReference(ApiModel):
    """Another ragtune object in the same namespace."""

    name: str = Field(min_length=1, max_length=253, description="Its name.")


class Toleration(ApiModel):
    """A taint the workload's pod tolerates, as in a pod spec."""

    key: str | None = Field(default=None, description="Taint key; empty with operator Exists matches every taint.")
    operator: Literal["Exists", "Equal"] | None = Field(default=None, description="Equal (the default) or Exists.")
    value: str | None = Field(default=None, description="Taint value, for operator Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to match; every effect when empty.")
    toleration_seconds: int | None = Field(default=None, description="NoExecute: how long the pod stays once the "
                                           "taint appears.")


class ResourcesSpec(ApiModel):
    """What the workload's pod asks for, and where it may run."""

    gpu: int = Field(default=0, ge=0, le=64, description="GPUs per pod; 0 runs on CPU.")
    gpu_resource_name: str = Field(default="nvidia.com/gpu", description="Extended resource that counts GPUs.")
    cpu: str = Field(default="2", pattern=r"^([0-9]+m|[0-9]+(\.[0-9]+)?)$", description="CPU request, e.g. 2 or 500m.")
    memory: str = Field(default="8Gi", pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|K|M|G|T)?$",
                        description="Memory request and limit, e.g. 8Gi.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels the pod must run on.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Taints the pod tolerates (GPU nodes "
                                          "often carry one).")
    priority_class_name: str | None = Field(default=None, description="PriorityClass of the pod.")


Phase = Literal["Pending", "Running", "Succeeded", "Failed", "Ready", "Progressing", "Degraded"]


class Condition(ApiModel):
    """A Kubernetes API convention condition."""

    model_config = ConfigDict(extra="ignore")
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str = ""
    last_transition_time: str | None = None
    observed_generation: int | None = None
