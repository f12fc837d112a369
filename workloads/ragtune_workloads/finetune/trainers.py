"""Loading the base model and building the SFT trainer, for the two engines.

unsloth: FastLanguageModel loads the model (in 4 bits for qlora) and adds the LoRA layers with its fused kernels;
trl's SFTTrainer then trains it. trl: transformers loads the model (bitsandbytes 4-bit for qlora on a GPU) and
SFTTrainer adds the LoRA layers from a peft LoraConfig. Both take the same prompt/completion records, so the loss
covers the completion only in both.

When the engine is unsloth, `import unsloth` must run before transformers is imported (it patches it); the run
module does that before importing this one.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from ragtune.api.finetunejob import FineTuneJobSpec

from .engine import TrainingPlan, sft_arguments
from .errors import ModelNotFoundError

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_STATE = "trainer_state.json"


def torch_dtype(precision: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def linear_module_names(model: Any) -> list[str]:
    """Names of the linear layers LoRA can wrap ("all-linear"), without the output head: adapting lm_head would
    make the adapter as large as the vocabulary and is not what all-linear means in peft either."""
    import torch

    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")}
    return sorted(names)


def lora_targets(spec: FineTuneJobSpec) -> str | list[str]:
    targets = spec.lora.target_modules
    return "all-linear" if targets == ["all-linear"] else list(targets)


def _model_error(source: str, exc: Exception) -> ModelNotFoundError:
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ModelNotFoundError(f"base model {source} could not be loaded: {first_line}")


def load_tokenizer(plan: TrainingPlan):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(plan.model_source, revision=plan.revision)
    except (OSError, ValueError) as exc:
        raise _model_error(plan.model_source, exc) from None
    return _with_pad_token(tokenizer)


def _with_pad_token(tokenizer):
    if tokenizer.pad_token is None:  # batching (training and evaluation) needs one; eos is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_trl_model(plan: TrainingPlan):
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": torch_dtype(plan.precision), "revision": plan.revision}
    if plan.method == "qlora":
        from transformers import BitsAndBytesConfig

        compute = torch_dtype(plan.precision if plan.precision != "fp32" else "bf16")
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute)
        kwargs["device_map"] = {"": 0}
    try:
        model = AutoModelForCausalLM.from_pretrained(plan.model_source, **kwargs)
    except (OSError, ValueError) as exc:
        raise _model_error(plan.model_source, exc) from None
    if plan.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    return model


def load_unsloth_model(plan: TrainingPlan, spec: FineTuneJobSpec):
    """unsloth loads model and tokenizer together and adds the LoRA layers itself."""
    from unsloth import FastLanguageModel

    kwargs: dict[str, Any] = {"revision": plan.revision} if plan.revision else {}
    try:
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=plan.model_source,
            max_seq_length=spec.training.max_seq_length,
            # None lets unsloth pick bf16 or fp16 for the card; an explicit 16-bit precision is passed through.
            dtype=torch_dtype(plan.precision) if plan.precision != "fp32" else None,
            load_in_4bit=plan.method == "qlora",
            **kwargs,
        )
    except (OSError, ValueError) as exc:
        raise _model_error(plan.model_source, exc) from None
    targets = lora_targets(spec)
    model = FastLanguageModel.get_peft_model(
        model,
        r=spec.lora.r,
        lora_alpha=spec.lora.alpha,
        lora_dropout=spec.lora.dropout,
        target_modules=linear_module_names(model) if targets == "all-linear" else targets,
        bias="none",
        use_gradient_checkpointing="unsloth",  # unsloth's offloaded checkpointing: longer contexts, same speed
        random_state=spec.training.seed,
        max_seq_length=spec.training.max_seq_length,
    )
    return model, _with_pad_token(tokenizer)


def load_model_and_tokenizer(plan: TrainingPlan, spec: FineTuneJobSpec):
    if plan.engine == "unsloth":
        return load_unsloth_model(plan, spec)
    tokenizer = load_tokenizer(plan)
    return load_trl_model(plan), tokenizer


def lora_config(spec: FineTuneJobSpec):
    from peft import LoraConfig

    return LoraConfig(r=spec.lora.r, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
                      target_modules=lora_targets(spec), bias="none", task_type="CAUSAL_LM")


def build_trainer(plan: TrainingPlan, spec: FineTuneJobSpec, model, tokenizer, train_records: list[dict],
                  eval_records: list[dict], checkpoint_dir: Path, callbacks: list):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(**sft_arguments(spec, plan, checkpoint_dir, has_eval=bool(eval_records)))
    if plan.engine == "unsloth":
        # unsloth's own checkpointing is already on the model; the trainer's would wrap it a second time.
        args.gradient_checkpointing = False
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train_records),
        eval_dataset=Dataset.from_list(eval_records) if eval_records else None,
        processing_class=tokenizer,
        # unsloth has added the LoRA layers already; trl adds them from this config otherwise.
        peft_config=None if plan.engine == "unsloth" else lora_config(spec),
        callbacks=callbacks,
    )


# ---------------------------------------------------------------- checkpoints

def checkpoint_step(path: Path) -> int | None:
    suffix = path.name.removeprefix(CHECKPOINT_PREFIX)
    return int(suffix) if path.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else None


def is_complete_checkpoint(path: Path) -> bool:
    """The trainer writes its state file last, after weights, optimizer and RNG state: a checkpoint whose state
    file parses was written to the end. A pod killed mid-save leaves one without it."""
    try:
        json.loads((path / CHECKPOINT_STATE).read_text())
    except (OSError, ValueError):
        return False
    return True


def last_complete_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest complete checkpoint to resume from. Incomplete ones newer than it are removed: the trainer
    would otherwise count them when rotating old checkpoints and could delete the good one."""
    if not checkpoint_dir.is_dir():
        return None
    candidates = sorted(((checkpoint_step(p), p) for p in checkpoint_dir.iterdir()
                         if p.is_dir() and checkpoint_step(p) is not None), reverse=True)
    for step, path in candidates:
        if is_complete_checkpoint(path):
            return path
        log.warning("removing incomplete checkpoint %s (the previous try stopped while saving it)", path.name)
        shutil.rmtree(path, ignore_errors=True)
    return None
