"""One fine-tuning run, from config to result. Everything cheap that can refuse the run does so before the model
loads: the rows, the engine/method/hardware match, the exports asked for, the model's location."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ragtune.api.workload import FineTuneConfig

from ragtune_workloads.reporting import Reporter

from . import artifacts
from .data import LoadedDataset, load_examples, read_rows, split_examples
from .engine import Hardware, TrainingPlan, detect_hardware, plan_training

log = logging.getLogger(__name__)

DATASET_STAGING_DIR = ".dataset"
# Evaluation generates answers for this many held-out rows at a time.
EVAL_BATCH_SIZE = 8


@dataclass
class Prepared:
    """What the checks before training established."""

    plan: TrainingPlan
    hardware: Hardware
    dataset: LoadedDataset
    train: list = field(default_factory=list)
    validation: list = field(default_factory=list)


def prepare(config: FineTuneConfig, hardware: Hardware | None = None) -> Prepared:
    """Validates data, engine and exports; raises a FineTuneError naming the fix when the run cannot succeed."""
    spec = config.spec
    output = Path(config.output_path)
    dataset = load_examples(read_rows(spec.dataset, config.dataset_path, output / DATASET_STAGING_DIR),
                            spec.dataset)
    train, validation = split_examples(dataset.examples, spec.dataset.validation_split, spec.training.seed)
    hardware = hardware or detect_hardware()
    plan = plan_training(config, hardware)
    if spec.output.gguf.enabled:
        artifacts.gguf_preflight(spec.output.gguf.quantization)
    if spec.output.s3 is not None:
        artifacts.s3_preflight(spec.output.s3)
    return Prepared(plan, hardware, dataset, train, validation)


def run(config: FineTuneConfig, reporter: Reporter | None = None) -> dict[str, Any]:
    """Trains, evaluates and exports; returns the result (an `Artifact` as a camelCase dict)."""
    reporter = reporter or Reporter()
    output = Path(config.output_path)
    output.mkdir(parents=True, exist_ok=True)
    prepared = prepare(config)
    plan = prepared.plan
    log.info("engine %s, method %s, precision %s, %d training rows, %d validation rows, %d skipped",
             plan.engine, plan.method, plan.precision, len(prepared.train), len(prepared.validation),
             len(prepared.dataset.skipped))
    if plan.engine == "unsloth":
        import unsloth  # noqa: F401  (patches transformers and trl; must come before they are imported)
    from .progress import Heartbeat, ProgressCallback

    quiet_progress_bars()
    progress = ProgressCallback(reporter)
    # From the model load on: loading a 7B model or merging it takes minutes, and status should stay fresh.
    with Heartbeat(reporter, progress.snapshot):
        outcome = train_evaluate_export(config, prepared, progress)
    adapter_manifest = artifacts.file_manifest(outcome.adapter_dir)
    metadata = build_metadata(config, prepared, outcome, adapter_manifest, progress.resumed_from_step)
    artifacts.write_metadata(output / artifacts.METADATA_FILE, metadata)
    uris = {"uri": outcome.adapter_dir, "mergedUri": outcome.merged_dir, "ggufUri": outcome.gguf_path}
    if config.spec.output.s3 is not None:
        uris = artifacts.upload_to_s3(output, config.spec.output.s3, uris)
    result = build_result(config, metadata, uris)
    reporter.result(result)
    return result


@dataclass
class Outcome:
    adapter_dir: Path
    metrics: dict[str, float]
    promotable: bool
    not_promotable_reasons: list[str]
    merged_dir: Path | None = None
    gguf_path: Path | None = None


def train_evaluate_export(config: FineTuneConfig, prepared: Prepared, progress) -> Outcome:
    from .evaluate import promotion_verdict
    from .prompts import to_records
    from .trainers import build_trainer, last_complete_checkpoint, load_model_and_tokenizer

    spec, plan, output = config.spec, prepared.plan, Path(config.output_path)
    model, tokenizer = load_model_and_tokenizer(plan, spec)
    eval_records = to_records(tokenizer, prepared.validation)
    checkpoint_dir = output / artifacts.CHECKPOINT_DIR
    owner = config.owner.uid or f"{config.owner.namespace}/{config.owner.name}"
    if artifacts.claim_checkpoints(checkpoint_dir, owner):
        log.warning("removed checkpoints another FineTuneJob left in %s; training from the start", output)
    trainer = build_trainer(plan, spec, model, tokenizer, to_records(tokenizer, prepared.train), eval_records,
                            checkpoint_dir, [progress])
    resume_from = last_complete_checkpoint(checkpoint_dir)
    if resume_from:
        log.info("resuming from %s", resume_from.name)

    started = time.monotonic()
    train_output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    # Over the whole run: after a resume, the trainer's own training_loss covers this process's steps only (0.0
    # when it resumed at the last one); the log history, restored from the checkpoint, holds every step's loss.
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    train_loss = sum(losses) / len(losses) if losses else train_output.training_loss
    metrics = {"trainLoss": float(train_loss), "trainSeconds": time.monotonic() - started,
               "trainSteps": float(trainer.state.global_step)}
    if progress.tokens_per_second is not None:
        metrics["trainTokensPerSecond"] = progress.tokens_per_second
    adapter_dir = artifacts.save_adapter(trainer.model, output / artifacts.ADAPTER_DIR)
    if eval_records:
        metrics["evalLoss"] = float(trainer.evaluate()["eval_loss"])
        progress.record(evalLoss=metrics["evalLoss"])
        metrics.update(generation_metrics(trainer.model, tokenizer, prepared.validation[: spec.evaluation.max_samples],
                                          plan))
    promotable, reasons = promotion_verdict(metrics, spec.evaluation)
    outcome = Outcome(adapter_dir, metrics, promotable, reasons)

    if spec.output.merge or spec.output.gguf.enabled:
        del trainer, model  # the merge loads a second, full-precision copy: free the training one first
        outcome.merged_dir = merge(config, plan, adapter_dir, tokenizer)
        if spec.output.gguf.enabled:
            outcome.gguf_path = artifacts.export_gguf(outcome.merged_dir, output, spec.output.gguf.quantization)
    return outcome


def generation_metrics(model, tokenizer, held_out: list, plan: TrainingPlan) -> dict[str, float]:
    """Exact match, ROUGE-L and BLEU of greedy answers to the held-out prompts against their references."""
    from .evaluate import generate, score
    from .prompts import format_example

    formatted = [format_example(tokenizer, example) for example in held_out]
    references = [f.reference for f in formatted]
    if plan.engine == "unsloth":
        from unsloth import FastLanguageModel

        FastLanguageModel.for_inference(model)  # unsloth's generation kernels; training is over
    predictions = generate(model, tokenizer, [f.prompt for f in formatted], references, batch_size=EVAL_BATCH_SIZE)
    return {**score(predictions, references), "evalSamples": float(len(held_out))}


def merge(config: FineTuneConfig, plan: TrainingPlan, adapter_dir: Path, tokenizer) -> Path:
    from .trainers import torch_dtype

    # The training precision: 16-bit weights from a GPU run (what a server loads), fp32 from a CPU run.
    return artifacts.merge_adapter(plan.model_source, adapter_dir, Path(config.output_path) / artifacts.MERGED_DIR,
                                   tokenizer, torch_dtype(plan.precision), plan.revision)


def build_metadata(config: FineTuneConfig, prepared: Prepared, outcome: Outcome,
                   adapter_manifest: list[tuple[str, str]], resumed_from_step: int) -> dict[str, Any]:
    spec, plan, dataset = config.spec, prepared.plan, prepared.dataset
    return {
        "baseModel": spec.model.name,
        "baseModelSource": plan.model_source,
        "baseModelRevision": base_model_revision(plan, config),
        "engine": plan.engine,
        "method": plan.method,
        "precision": plan.precision,
        "hardware": {"nvidiaGpu": prepared.hardware.nvidia_gpu, "gpuName": prepared.hardware.gpu_name},
        "dataset": {
            "digest": dataset.digest,
            "rowsRead": dataset.rows_read,
            "trainRows": len(prepared.train),
            "validationRows": len(prepared.validation),
            "skippedRows": len(dataset.skipped),
            "skippedReasons": dataset.skipped[:20],
        },
        "config": spec.to_wire(),
        "owner": config.owner.to_wire(),
        "metrics": outcome.metrics,
        "promotable": outcome.promotable,
        "notPromotableReasons": outcome.not_promotable_reasons,
        "resumedFromStep": resumed_from_step,
        "digest": artifacts.manifest_digest(adapter_manifest),
        "files": [{"path": path, "sha256": sha} for path, sha in adapter_manifest],
        "merged": describe_tree(outcome.merged_dir),
        "gguf": describe_tree(outcome.gguf_path),
        "completedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def build_result(config: FineTuneConfig, metadata: dict[str, Any], uris: dict[str, Any]) -> dict[str, Any]:
    """The `Artifact` the operator copies into status (camelCase keys)."""
    return {
        "uri": str(uris["uri"]),
        "digest": metadata["digest"],
        "baseModel": config.spec.model.name,
        "baseModelRevision": metadata["baseModelRevision"],
        "mergedUri": str(uris["mergedUri"]) if uris["mergedUri"] else None,
        "ggufUri": str(uris["ggufUri"]) if uris["ggufUri"] else None,
        "metrics": metadata["metrics"],
        "promotable": metadata["promotable"],
    }


def quiet_progress_bars() -> None:
    """Pod logs keep every carriage-return redraw of a progress bar; the reporter carries progress instead."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def base_model_revision(plan: TrainingPlan, config: FineTuneConfig) -> str | None:
    """The revision asked for; for a hub model without one, the commit the hub cache resolved."""
    if plan.revision or config.model_path:
        return plan.revision
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(plan.model_source, local_files_only=True))
        return path.name
    except Exception:  # the revision is informative; its absence must not fail a finished run
        return None


def describe_tree(path: Path | None) -> dict[str, str] | None:
    if path is None:
        return None
    return {"path": str(path), "digest": artifacts.tree_digest(path)}
