"""The serving engines on an NVIDIA GPU: the same tiny model and adapter, loaded on the GPU. Skipped without one."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import serve_fixtures as fx  # noqa: E402


def nvidia_gpu() -> str | None:
    """Why GPU tests cannot run here, or None when they can."""
    if shutil.which("nvidia-smi") is None:
        return "no NVIDIA GPU on this machine (nvidia-smi not found)"
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} cannot use the GPU (a CPU build?)"
    return None


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(nvidia_gpu() is not None, reason=nvidia_gpu() or "")]


def engine_settings(**extra):
    from ragtune_workloads.serve.engines import EngineSettings

    return EngineSettings(model=str(fx.tiny_model_path()), adapter_name=fx.ADAPTER_NAME,
                          adapter_path=str(fx.adapter_path()), max_model_len=1024, max_lora_rank=8, gpus=1,
                          gpu_memory_utilization=0.3, **extra)


def ask(engine, question: str, use_adapter: bool) -> str:
    from transformers import AutoTokenizer

    from ragtune_workloads.serve import prompts
    from ragtune_workloads.serve.engines import GenerationParams

    tokenizer = AutoTokenizer.from_pretrained(fx.tiny_model_path())
    ids = prompts.encode_messages(tokenizer, [{"role": "user", "content": question}])
    return asyncio.run(engine.generate(ids, GenerationParams(max_tokens=24, temperature=0), use_adapter)).text


def test_transformers_engine_serves_the_adapter_on_the_gpu():
    from ragtune_workloads.serve.engines import TransformersEngine

    engine = TransformersEngine(engine_settings())
    assert engine.device == "cuda"
    assert fx.speaks_like_adapter(ask(engine, "what is the capital city of france", use_adapter=True))
    assert not fx.speaks_like_adapter(ask(engine, "what is the capital city of france", use_adapter=False))


def test_vllm_engine_serves_the_adapter_on_the_gpu():
    from ragtune_workloads.serve.engines import VllmEngine, vllm_available

    if not vllm_available():
        pytest.skip("vLLM is not installed")
    engine = VllmEngine(engine_settings())
    try:
        assert fx.speaks_like_adapter(ask(engine, "what is the capital city of france", use_adapter=True))
    finally:
        engine.close()
