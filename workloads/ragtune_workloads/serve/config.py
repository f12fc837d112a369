"""The endpoint's ServeConfig, read from the mounted file, and what each part of the app derives from it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ragtune.api.workload import MODEL_STAGING, ServeConfig

from .engines import EngineSettings, local_adapter_path


class ConfigError(RuntimeError):
    """The config cannot be served; the message names the field and the fix."""


def load_config(path: str | Path) -> ServeConfig:
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"config {path} cannot be read: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config {path} is not JSON: {exc}") from None
    return parse_config(data)


def parse_config(data: dict[str, Any]) -> ServeConfig:
    try:
        config = ServeConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ConfigError(f"config field {where}: {first['msg']}") from None
    check_consistent(config)
    return config


def check_consistent(config: ServeConfig) -> None:
    mode = config.spec.mode
    if mode in ("finetuned", "hybrid") and config.adapter is None:
        raise ConfigError(f"mode {mode} serves an adapter but the config has none (adapter.path)")
    if mode in ("rag", "hybrid") and (config.retrieval is None or config.spec.retrieval is None):
        raise ConfigError(f"mode {mode} retrieves but the config has no retrieval target")


@dataclass(frozen=True)
class EndpointSettings:
    served_model: str
    base_model: str  # what the model is loaded from: a local directory or a hub id
    mode: str
    uses_adapter: bool
    has_index: bool
    system: str | None
    template: str
    top_k: int
    score_threshold: float | None
    default_retrieval: str
    default_max_tokens: int


def endpoint_settings(config: ServeConfig) -> EndpointSettings:
    spec = config.spec
    retrieval = spec.retrieval
    return EndpointSettings(
        served_model=spec.model.served_name or config.owner.name,
        base_model=config.model_path or spec.model.name,
        mode=spec.mode,
        uses_adapter=spec.mode in ("finetuned", "hybrid") and config.adapter is not None,
        has_index=spec.mode in ("rag", "hybrid") and config.retrieval is not None,
        system=spec.prompt.system,
        template=spec.prompt.template,
        top_k=retrieval.top_k if retrieval else 0,
        score_threshold=retrieval.score_threshold if retrieval else None,
        default_retrieval=retrieval.default_mode if retrieval else "never",
        default_max_tokens=spec.engine.max_tokens,
    )


def model_context_length(model: str, configured: int) -> int:
    """engine.maxModelLen, capped by what the model was trained for (vLLM refuses more; HF degrades)."""
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(model)
    trained = getattr(model_config, "max_position_embeddings", None)
    return min(configured, trained) if trained else configured


# Where an adapter in S3 is copied to (the pod's scratch volume).
ADAPTER_STAGING = "/tmp/ragtune-adapters"


def stage_files(config: ServeConfig) -> ServeConfig:
    """The config with a base model or adapter in S3 copied into the pod and named by its local directory. Each
    process that loads them calls this; the copy is made once per pod (`stage_folder`)."""
    from ragtune_workloads.s3 import S3LocationError, stage_folder, stage_model

    model, adapter, update = config.spec.model, config.adapter, {}
    try:
        if model.source == "s3" and model.s3 is not None:
            path = stage_model(model.s3.uri, model.s3.endpoint, Path(config.model_path or MODEL_STAGING))
            update["model_path"] = str(path)
        if adapter is not None and adapter.path.startswith("s3://"):
            path = Path(ADAPTER_STAGING) / adapter.name
            stage_folder(adapter.path, adapter.s3_endpoint, path, "model.adapter")
            update["adapter"] = adapter.model_copy(update={"path": str(path)})
    except S3LocationError as exc:
        raise ConfigError(str(exc)) from None
    return config.model_copy(update=update) if update else config


def verify_adapter(config: ServeConfig) -> None:
    """A FineTuneJob adapter comes with the digest of its files: serve exactly that adapter or refuse to start."""
    adapter = config.adapter
    if adapter is None or not adapter.digest or not adapter.digest.startswith("sha256:"):
        return
    path = Path(local_adapter_path(adapter.path))
    if not path.is_dir():
        raise ConfigError(f"adapter {adapter.name}: directory {path} does not exist (is its volume mounted?)")
    from ragtune_workloads.finetune.artifacts import tree_digest

    found = tree_digest(path)
    if found != adapter.digest:
        raise ConfigError(f"adapter {adapter.name} at {path} has digest {found}, expected {adapter.digest}: "
                          "the files changed after the FineTuneJob finished")


def engine_settings(config: ServeConfig, context_length: int) -> EngineSettings:
    spec = config.spec
    settings = endpoint_settings(config)
    adapter = config.adapter if settings.uses_adapter else None
    return EngineSettings(
        model=settings.base_model,
        adapter_name=adapter.name if adapter else None,
        adapter_path=adapter.path if adapter else None,
        max_model_len=context_length,
        dtype=spec.engine.dtype,
        quantization=spec.engine.quantization,
        max_lora_rank=spec.engine.max_lora_rank,
        tensor_parallel_size=spec.engine.tensor_parallel_size,
        gpu_memory_utilization=spec.engine.gpu_memory_utilization,
        gpus=spec.resources.gpu,
    )
