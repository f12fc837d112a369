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
        artifacts.s3_preflight()
    return Prepared(plan, hardware, dataset, train, validation)


def run(config: FineTuneConfig, reporter: Reporter | None = None) -> dict[str, Any]:
    """Trains, evaluates and exports; returns the result (an `Artifact` as a camelCase dict)."""
    reporter = reporter or Reporter()
    spec = config.spec
    output = Path(config.output_path)
    output.mkdir(parents=True, exist_ok=True)
    prepared = prepare(config)
    plan = prepared.plan
    log.info("engine %s, method %s, precision %s, %d training rows, %d validation rows, %d skipped",
             plan.engine, plan.method, plan.precision, len(prepared.train), len(prepared.validation),
             len(prepared.dataset.skipped))

    if plan.engine == "unsloth":
        import unsloth  # noqa: F401  (patches transformers and trl; must come before they are imported)
    from .evaluate import generate, promotion_verdict, score
    from .progress import Heartbeat, ProgressCallback
    from .prompts import format_example, to_records
    from .trainers import build_trainer, last_complete_checkpoint, load_model_and_tokenizer, torch_dtype

    quiet_progress_bars()
    model, tokenizer = load_model_and_tokenizer(plan, spec)
    train_records = to_records(tokenizer, prepared.train)
    eval_records = to_records(tokenizer, prepared.validation)
    progress = ProgressCallback(reporter)
    checkpoint_dir = output / artifacts.CHECKPOINT_DIR
    trainer = build_trainer(plan, spec, model, tokenizer, train_records, eval_records, checkpoint_dir, [progress])
    resume_from = last_complete_checkpoint(checkpoint_dir)
    if resume_from:
        log.info("resuming from %s", resume_from.name)

    metrics: dict[str, float] = {}
    with Heartbeat(reporter, progress.snapshot):
        started = time.monotonic()
        train_output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        metrics["trainLoss"] = float(train_output.training_loss)
        metrics["trainSeconds"] = time.monotonic() - started
        metrics["trainSteps"] = float(trainer.state.global_step)
        if progress.tokens_per_second is not None:
            metrics["trainTokensPerSecond"] = progress.tokens_per_second
        adapter_dir = artifacts.save_adapter(trainer.model, output / artifacts.ADAPTER_DIR)

        if eval_records:
            metrics["evalLoss"] = float(trainer.evaluate()["eval_loss"])
            progress.record(evalLoss=metrics["evalLoss"])
            held_out = prepared.validation[: spec.evaluation.max_samples]
            formatted = [format_example(tokenizer, e) for e in held_out]
            references = [f.reference for f in formatted]
            model_for_eval = trainer.model
            if plan.engine == "unsloth":
                from unsloth import FastLanguageModel

                FastLanguageModel.for_inference(model_for_eval)
            predictions = generate(model_for_eval, tokenizer, [f.prompt for f in formatted], references,
                                   batch_size=EVAL_BATCH_SIZE)
            metrics.update(score(predictions, references))
            metrics["evalSamples"] = float(len(held_out))
        promotable, reasons = promotion_verdict(metrics, spec.evaluation)

        merged_dir = gguf_path = None
        if spec.output.merge or spec.output.gguf.enabled:
            # Free the training copy first: the merge loads a second, full-precision one.
            del trainer, model
            merged_dir = artifacts.merge_adapter(plan.model_source, adapter_dir, output / artifacts.MERGED_DIR,
                                                 tokenizer, torch_dtype(merge_precision(plan)), plan.revision)
            if spec.output.gguf.enabled:
                gguf_path = artifacts.export_gguf(merged_dir, output, spec.output.gguf.quantization)

    adapter_manifest = artifacts.file_manifest(adapter_dir)
    digest = artifacts.manifest_digest(adapter_manifest)
    metadata = {
        "baseModel": spec.model.name,
        "baseModelSource": plan.model_source,
        "baseModelRevision": base_model_revision(plan, config),
        "engine": plan.engine,
        "method": plan.method,
        "precision": plan.precision,
        "hardware": {"nvidiaGpu": prepared.hardware.nvidia_gpu, "gpuName": prepared.hardware.gpu_name},
        "dataset": {
            "digest": prepared.dataset.digest,
            "rowsRead": prepared.dataset.rows_read,
            "trainRows": len(prepared.train),
            "validationRows": len(prepared.validation),
            "skippedRows": len(prepared.dataset.skipped),
            "skippedReasons": prepared.dataset.skipped[:20],
        },
        "config": spec.to_wire(),
        "owner": config.owner.to_wire(),
        "metrics": metrics,
        "promotable": promotable,
        "notPromotableReasons": reasons,
        "resumedFromStep": progress.resumed_from_step,
        "digest": digest,
        "files": [{"path": path, "sha256": sha} for path, sha in adapter_manifest],
        "merged": describe_tree(merged_dir),
        "gguf": describe_tree(gguf_path),
        "completedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    artifacts.write_metadata(output / artifacts.METADATA_FILE, metadata)

    uris = {"uri": adapter_dir, "mergedUri": merged_dir, "ggufUri": gguf_path}
    if spec.output.s3 is not None:
        uris = artifacts.upload_to_s3(output, spec.output.s3, uris)
    result = {
        "uri": str(uris["uri"]),
        "digest": digest,
        "baseModel": spec.model.name,
        "baseModelRevision": metadata["baseModelRevision"],
        "mergedUri": str(uris["mergedUri"]) if uris["mergedUri"] else None,
        "ggufUri": str(uris["ggufUri"]) if uris["ggufUri"] else None,
        "metrics": metrics,
        "promotable": promotable,
    }
    reporter.result(result)
    return result


def quiet_progress_bars() -> None:
    """Pod logs keep every carriage-return redraw of a progress bar; the reporter carries progress instead."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def merge_precision(plan: TrainingPlan) -> str:
    # 16-bit training merges into 16-bit weights (what a server loads); a CPU run keeps fp32.
    return plan.precision


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
