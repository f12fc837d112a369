"""Choosing how to train: which engine, which precision, whether the method can run on this pod at all.

The decisions are pure functions of the spec and a `Hardware` description, so they are tested without a GPU;
`detect_hardware()` is the only part that looks at the machine.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ragtune.api.finetunejob import FineTuneJobSpec
from ragtune.api.workload import MODEL_STAGING, FineTuneConfig

from ragtune_workloads.s3 import S3LocationError, stage_model

from .errors import ConfigError, ModelNotFoundError

Engine = Literal["unsloth", "trl"]
Precision = Literal["fp32", "fp16", "bf16"]


@dataclass(frozen=True)
class Hardware:
    nvidia_gpu: bool = False
    gpu_name: str | None = None
    bf16_supported: bool = False
    unsloth_installed: bool = False
    bitsandbytes_installed: bool = False


@dataclass(frozen=True)
class TrainingPlan:
    engine: Engine
    method: Literal["lora", "qlora"]
    precision: Precision
    model_source: str  # a local directory or a hub id
    revision: str | None
    use_cpu: bool


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def detect_hardware() -> Hardware:
    import torch

    # ROCm builds of torch also answer torch.cuda; unsloth and bitsandbytes' 4-bit kernels here are NVIDIA's.
    nvidia = bool(torch.cuda.is_available() and torch.version.cuda and not getattr(torch.version, "hip", None))
    return Hardware(
        nvidia_gpu=nvidia,
        gpu_name=torch.cuda.get_device_name(0) if nvidia else None,
        bf16_supported=bool(nvidia and torch.cuda.is_bf16_supported()),
        unsloth_installed=_installed("unsloth"),
        bitsandbytes_installed=_installed("bitsandbytes"),
    )


def resolve_engine(spec: FineTuneJobSpec, hardware: Hardware) -> Engine:
    """`auto` takes unsloth only where it can run; an explicit choice that cannot run is refused, never swapped."""
    if spec.method == "qlora" and not hardware.nvidia_gpu:
        raise ConfigError("method qlora loads the base model in 4 bits, which needs an NVIDIA GPU, and this pod "
                          "sees none: set resources.gpu >= 1, or use method lora")
    if spec.engine == "unsloth":
        if not hardware.nvidia_gpu:
            raise ConfigError("engine unsloth runs on NVIDIA GPUs only and this pod sees none: set "
                              "resources.gpu >= 1, or use engine trl or auto")
        if not hardware.unsloth_installed:
            raise ConfigError("engine unsloth needs the unsloth package, which this image lacks: use the GPU "
                              "fine-tuning image (workloads/requirements-gpu.txt), or engine trl or auto")
        return "unsloth"
    if spec.engine == "auto" and hardware.nvidia_gpu and hardware.unsloth_installed:
        return "unsloth"
    if spec.method == "qlora" and not hardware.bitsandbytes_installed:
        raise ConfigError("method qlora with engine trl needs the bitsandbytes package, which this image lacks: "
                          "use the GPU fine-tuning image (workloads/requirements-gpu.txt)")
    return "trl"


def resolve_precision(requested: str, hardware: Hardware) -> Precision:
    if requested == "auto":
        if hardware.nvidia_gpu:
            return "bf16" if hardware.bf16_supported else "fp16"
        return "fp32"
    if requested == "fp16" and not hardware.nvidia_gpu:
        raise ConfigError("training.precision fp16 needs a GPU: use auto, fp32 or bf16 on CPU")
    if requested == "bf16" and hardware.nvidia_gpu and not hardware.bf16_supported:
        raise ConfigError(f"training.precision bf16 is not supported by this GPU ({hardware.gpu_name}): use auto "
                          "or fp16")
    return requested  # type: ignore[return-value]


def resolve_model_source(config: FineTuneConfig) -> str:
    """The local model directory when the config has one (it must hold a model), else the hub id. A model in S3 is
    copied into that directory first (the operator points it at the pod's scratch volume)."""
    model = config.spec.model
    if model.source == "s3" and model.s3 is not None:
        try:
            return str(stage_model(model.s3.uri, model.s3.endpoint, Path(config.model_path or MODEL_STAGING)))
        except S3LocationError as exc:
            raise ModelNotFoundError(str(exc)) from None
    if config.model_path:
        path = Path(config.model_path)
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"base model directory {path} holds no config.json (is the model volume "
                                     "mounted, and does model.pvc.path point at the model?)")
        return str(path)
    return config.spec.model.name


def plan_training(config: FineTuneConfig, hardware: Hardware) -> TrainingPlan:
    spec = config.spec
    return TrainingPlan(
        engine=resolve_engine(spec, hardware),
        method=spec.method,
        precision=resolve_precision(spec.training.precision, hardware),
        model_source=resolve_model_source(config),
        revision=None if config.model_path else spec.model.revision,
        use_cpu=not hardware.nvidia_gpu,
    )


def sft_arguments(spec: FineTuneJobSpec, plan: TrainingPlan, output_dir: Path, has_eval: bool) -> dict:
    """Keyword arguments of trl's SFTConfig for this spec."""
    training = spec.training
    return dict(
        output_dir=str(output_dir),
        num_train_epochs=training.epochs,
        max_steps=training.max_steps or -1,
        learning_rate=training.learning_rate,
        per_device_train_batch_size=training.batch_size,
        per_device_eval_batch_size=training.batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        max_length=training.max_seq_length,
        seed=training.seed,
        data_seed=training.seed,
        warmup_steps=training.warmup_ratio,  # a float below 1 is a share of the total steps
        lr_scheduler_type="linear",
        save_strategy="steps",
        save_steps=training.save_steps,
        save_total_limit=2,  # the newest to resume from, and one more in case the newest is cut short
        eval_strategy="steps" if has_eval else "no",
        eval_steps=training.save_steps,
        logging_steps=1,
        include_num_input_tokens_seen="non_padding",
        completion_only_loss=True,
        bf16=plan.precision == "bf16",
        fp16=plan.precision == "fp16",
        use_cpu=plan.use_cpu,
        # Recomputing activations saves GPU memory on large models; on CPU it only costs time.
        gradient_checkpointing=not plan.use_cpu,
        report_to="none",
        disable_tqdm=True,  # pod logs want lines, not carriage-return progress bars
    )
