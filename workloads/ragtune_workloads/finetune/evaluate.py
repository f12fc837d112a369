"""Scoring the adapter on the held-out rows: exact match, ROUGE-L, BLEU, plus the eval loss from training."""

from __future__ import annotations

import re
from typing import Any

from ragtune.api.finetunejob import EvaluationSpec

# Generation budget per sample: room for the reference answer and some slack, bounded so a 7B model does not
# spend minutes on a runaway answer.
MIN_NEW_TOKENS = 16
MAX_NEW_TOKENS = 256


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def exact_match(predictions: list[str], references: list[str]) -> float:
    if not references:
        return 0.0
    return sum(normalize(p) == normalize(r) for p, r in zip(predictions, references)) / len(references)


def rouge_l(predictions: list[str], references: list[str]) -> float:
    from rouge_score import rouge_scorer

    if not references:
        return 0.0
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)) / len(references)


def bleu(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU on sacrebleu's 0-100 scale."""
    import sacrebleu

    if not references:
        return 0.0
    return float(sacrebleu.corpus_bleu(predictions, [references]).score)


def score(predictions: list[str], references: list[str]) -> dict[str, float]:
    return {
        "exactMatch": exact_match(predictions, references),
        "rougeL": rouge_l(predictions, references),
        "bleu": bleu(predictions, references),
    }


def promotion_verdict(metrics: dict[str, float], evaluation: EvaluationSpec) -> tuple[bool, list[str]]:
    """Whether the adapter meets the spec's thresholds, with a reason for each one it misses. A threshold whose
    metric could not be computed (no validation rows) counts as missed: nothing was shown to meet it."""
    reasons = []
    if evaluation.min_rouge_l is not None:
        value = metrics.get("rougeL")
        if value is None:
            reasons.append("minRougeL is set but there is no validation split to measure ROUGE-L on")
        elif value < evaluation.min_rouge_l:
            reasons.append(f"ROUGE-L {value:.4f} is below minRougeL {evaluation.min_rouge_l}")
    if evaluation.max_eval_loss is not None:
        value = metrics.get("evalLoss")
        if value is None:
            reasons.append("maxEvalLoss is set but there is no validation split to measure eval loss on")
        elif value > evaluation.max_eval_loss:
            reasons.append(f"eval loss {value:.4f} is above maxEvalLoss {evaluation.max_eval_loss}")
    return not reasons, reasons


def new_token_budget(tokenizer: Any, reference: str) -> int:
    return max(MIN_NEW_TOKENS, min(MAX_NEW_TOKENS, 2 * len(tokenizer(reference).input_ids) + 8))


def generate(model: Any, tokenizer: Any, prompts: list[str], references: list[str], batch_size: int = 8) -> list[str]:
    """Greedy answers to `prompts`; prompts are tokenized as in training (the template is already applied)."""
    import torch

    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only models continue from the right edge
    answers: list[str] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            budget = max(new_token_budget(tokenizer, r) for r in references[start:start + batch_size])
            inputs = tokenizer(batch, return_tensors="pt", padding=True).to(model.device)
            with torch.no_grad():
                output = model.generate(**inputs, max_new_tokens=budget, do_sample=False,
                                        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
            new_tokens = output[:, inputs["input_ids"].shape[1]:]
            answers.extend(t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return answers
