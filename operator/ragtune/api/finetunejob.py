"""FineTuneJob: LoRA / QLoRA supervised fine-tuning of a base model into an adapter."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from .base import (
    ApiModel, Condition, PvcLocation, ResourcesSpec, S3Location, SecretKeyRef, cel, validations,
)

DEFAULT_BASE_MODEL = "mistralai/Mistral-7B-Instruct-v0.3"


class BaseModelSpec(ApiModel):
    """The base model the adapter is trained on."""

    model_config = validations(
        cel("self.source != 'pvc' || has(self.pvc)", "model.pvc is required when model.source is pvc: "
            "set model.pvc.claimName (and model.pvc.path)"),
        cel("self.source != 's3' || has(self.s3)", "model.s3 is required when model.source is s3: set model.s3.uri"),
    )
    name: str = Field(default=DEFAULT_BASE_MODEL, min_length=1, max_length=512,
                      description="Model id on the hub, or a label for a model loaded from pvc/s3.")
    source: Literal["hf", "pvc", "s3"] = Field(default="hf", description="Where the weights come from.")
    revision: str | None = Field(default=None, max_length=128, description="Hub revision (branch, tag or commit).")
    token_secret: SecretKeyRef | None = Field(default=None, description="Secret key holding a hub token.")
    pvc: PvcLocation | None = None
    s3: S3Location | None = None


DatasetFormat = Literal["instruction", "prompt-completion", "chat"]


class FieldMapping(ApiModel):
    """Column names of the rows, when they differ from the format's defaults."""

    instruction: str = Field(default="instruction", description="format instruction: the task column.")
    input: str = Field(default="input", description="format instruction: the optional context column.")
    output: str = Field(default="output", description="format instruction: the answer column.")
    prompt: str = Field(default="prompt", description="format prompt-completion: the prompt column.")
    completion: str = Field(default="completion", description="format prompt-completion: the completion column.")
    messages: str = Field(default="messages", description="format chat: the column of {role, content} turns.")


class ConfigMapFiles(ApiModel):
    """A ConfigMap holding JSON or JSONL rows."""

    name: str = Field(min_length=1, max_length=253, description="ConfigMap in the same namespace.")
    key: str | None = Field(default=None, description="One key of the ConfigMap; every .json/.jsonl key when empty.")


class DatasetSpec(ApiModel):
    """The training rows: where they are and how they are laid out."""

    model_config = validations(
        cel("self.source != 'configMap' || has(self.configMap)",
            "dataset.configMap is required when dataset.source is configMap: set dataset.configMap.name"),
        cel("self.source != 'pvc' || has(self.pvc)",
            "dataset.pvc is required when dataset.source is pvc: set dataset.pvc.claimName and dataset.pvc.path"),
        cel("self.source != 's3' || has(self.s3)",
            "dataset.s3 is required when dataset.source is s3: set dataset.s3.uri"),
        cel("self.source != 'inline' || (has(self.rows) && size(self.rows) > 0)",
            "dataset.rows must hold at least one row when dataset.source is inline"),
    )
    source: Literal["configMap", "pvc", "s3", "inline"] = Field(description="Where the training rows come from.")
    format: DatasetFormat = Field(default="instruction", description="Row layout: instruction/input/output, "
                                  "prompt/completion, or chat messages.")
    config_map: ConfigMapFiles | None = None
    pvc: PvcLocation | None = None
    s3: S3Location | None = None
    rows: list[dict[str, Any]] | None = Field(default=None, max_length=2000,
                                              description="Rows given inline (small datasets and tests).")
    field_mapping: FieldMapping = Field(default_factory=FieldMapping)
    validation_split: float = Field(default=0.1, ge=0.0, lt=0.9, description="Share of rows held out for eval.")
    on_bad_row: Literal["fail", "skip"] = Field(default="fail", description="Refuse the dataset on the first bad "
                                                "row (with its line number), or skip and count bad rows.")


class LoraSpec(ApiModel):
    """The LoRA adapter's shape."""

    r: int = Field(default=16, ge=1, le=1024, description="LoRA rank.")
    alpha: int = Field(default=32, ge=1, le=4096, description="LoRA scaling numerator (alpha / r scales the "
                       "update).")
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA layers.")
    target_modules: list[str] = Field(default_factory=lambda: ["all-linear"], min_length=1,
                                      description="Module names, or all-linear.")


class TrainingSpec(ApiModel):
    """The supervised fine-tuning run's hyperparameters."""

    model_config = validations(
        cel("!has(self.maxSteps) || self.maxSteps > 0", "training.maxSteps must be positive; remove it to train "
            "for training.epochs"),
    )
    epochs: float = Field(default=2, gt=0, le=100, description="Passes over the training rows.")
    max_steps: int | None = Field(default=None, description="Stops after this many optimizer steps; overrides epochs.")
    learning_rate: float = Field(default=1e-4, gt=0, le=1, description="Peak learning rate.")
    batch_size: int = Field(default=2, ge=1, le=1024, description="Rows per device step.")
    gradient_accumulation_steps: int = Field(default=8, ge=1, le=1024, description="Device steps per optimizer "
                                             "step (effective batch: batchSize x this).")
    max_seq_length: int = Field(default=2048, ge=16, le=131072, description="Tokens kept of each row (longer rows "
                                "are truncated).")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(default="auto", description="auto: bf16 where the "
                                                               "GPU has it, fp16 on other GPUs, fp32 on CPU.")
    seed: int = Field(default=42, ge=0, description="Seed of shuffling, dropout and initialisation.")
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1, description="Share of steps warming up the learning "
                                "rate.")
    save_steps: int = Field(default=50, ge=1, description="Checkpoint interval; a retried Job resumes from the last.")


class GgufSpec(ApiModel):
    """A GGUF file of the merged model (llama.cpp, Ollama)."""

    enabled: bool = Field(default=False, description="Also write model-<quantization>.gguf.")
    quantization: Literal["f16", "q8_0", "q4_k_m", "q5_k_m"] = Field(default="q4_k_m", description="Weight type "
                                                                     "of the GGUF file.")


class OutputSpec(ApiModel):
    """Where the adapter (and the merged model, the GGUF file) are written: one of pvc or s3."""

    model_config = validations(
        cel("has(self.pvc) || has(self.s3)", "output needs a destination: set output.pvc.claimName or output.s3.uri"),
        cel("!(has(self.pvc) && has(self.s3))", "set only one of output.pvc and output.s3"),
    )
    pvc: PvcLocation | None = None
    s3: S3Location | None = None
    merge: bool = Field(default=False, description="Also write the base model merged with the adapter.")
    gguf: GgufSpec = Field(default_factory=GgufSpec)


class EvaluationSpec(ApiModel):
    """Evaluation on the held-out rows, and the thresholds that make the adapter promotable."""

    min_rouge_l: float | None = Field(default=None, ge=0, le=1,
                                      description="Below this ROUGE-L the adapter is marked not promotable.")
    max_eval_loss: float | None = Field(default=None, gt=0, description="Above this eval loss the adapter is "
                                        "marked not promotable.")
    max_samples: int = Field(default=64, ge=1, le=10000, description="Held-out rows generated and scored.")


class FineTuneJobSpec(ApiModel):
    model_config = validations(
        cel("self.method != 'qlora' || self.resources.gpu > 0",
            "method qlora needs an NVIDIA GPU: set resources.gpu >= 1, or use method lora", ".resources"),
        cel("self.engine != 'unsloth' || self.resources.gpu > 0",
            "engine unsloth runs on NVIDIA GPUs only: set resources.gpu >= 1, or use engine trl or auto", ".resources"),
        cel("self == oldSelf", "spec is immutable (a FineTuneJob is one training run): create a new FineTuneJob "
            "(a new name) for a new version"),
    )
    model: BaseModelSpec = Field(default_factory=BaseModelSpec)
    dataset: DatasetSpec
    method: Literal["lora", "qlora"] = Field(default="lora", description="qlora trains on a 4-bit base model "
                                             "(NVIDIA GPUs only).")
    lora: LoraSpec = Field(default_factory=LoraSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    engine: Literal["auto", "unsloth", "trl"] = Field(default="auto", description="auto picks unsloth on NVIDIA GPUs "
                                                      "when its image is used, trl + peft elsewhere.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    output: OutputSpec
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    backoff_limit: int = Field(default=2, ge=0, le=20, description="Job retries; each resumes from a checkpoint.")
    active_deadline_seconds: int | None = Field(default=None, ge=60, description="Fails the Job after this long.")
    image: str | None = Field(default=None, description="Overrides the operator's fine-tuning image.")


class Progress(ApiModel):
    model_config = {"extra": "ignore"}
    step: int = 0
    total_steps: int = 0
    epoch: float | None = None
    loss: float | None = None
    eval_loss: float | None = None
    eta_seconds: float | None = None
    tokens_per_second: float | None = None
    updated_at: str | None = None


class Artifact(ApiModel):
    model_config = {"extra": "ignore"}
    uri: str
    digest: str
    base_model: str
    base_model_revision: str | None = None
    merged_uri: str | None = None
    gguf_uri: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    promotable: bool = True


class FineTuneJobStatus(ApiModel):
    model_config = {"extra": "ignore"}
    phase: str | None = None
    job_name: str | None = None
    progress: Progress | None = None
    progress_text: str | None = None
    artifact: Artifact | None = None
    start_time: str | None = None
    completion_time: str | None = None
    observed_generation: int | None = None
    conditions: list[Condition] = Field(default_factory=list)


class FineTuneJob(ApiModel):
    model_config = {"extra": "ignore"}
    spec: FineTuneJobSpec
    status: FineTuneJobStatus = Field(default_factory=FineTuneJobStatus)
