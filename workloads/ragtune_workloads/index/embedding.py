"""Embedding with sentence-transformers, in batches, normalised, with the backend the spec asks for.

Texts are sorted by length before batching so each batch pads to similar lengths (the main cost on CPU is
padding tokens); results come back in the caller's order.

Backends (spec.embedding.backend): `torch` runs the model as loaded. `onnx` and `openvino` export the model's
transformer once with torch.onnx (cached by weights) and run the export in onnxruntime or the OpenVINO runtime;
tokenisation, pooling and normalisation stay in sentence-transformers, or, for a few texts (a query), in a direct
path here. At fp32, onnxruntime runs the export fused by its transformer optimizer where that gives the model's own
outputs (`fused_onnx_export`). (sentence-transformers' own ONNX and OpenVINO backends need optimum-onnx /
optimum-intel, which cap transformers below the version this image ships.)

Precision (spec.embedding.precision), never changed behind the user's back: `fp32` as the model ships (OpenVINO,
which would pick bf16 by itself on AMX CPUs, is pinned to f32); `bf16` runs torch under bfloat16 autocast (matrix
products in bf16, accumulations and normalisation in fp32) or OpenVINO with a bf16 inference precision — about
2.5x faster on CPUs with AMX or AVX-512 BF16, vectors within cosine 0.9999 of fp32; `int8` quantises the ONNX
export's weights with onnxruntime's dynamic quantisation (activations per batch) — about 1.5x faster than fp32
onnx on AVX-512 VNNI, vectors within cosine 0.99.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ragtune.api.base import EMBEDDING_PRECISIONS

from ragtune_workloads.cpu import cpu_has_bf16

log = logging.getLogger(__name__)

# Special tokens ([CLS] … [SEP]) take room in the model's window that chunk text cannot use.
SPECIAL_TOKENS = 2
# Up to this many texts (a query, a few concurrent queries) an exported model is run directly: sentence-transformers'
# batching machinery costs about as much as the model itself on one short text.
DIRECT_MAX_TEXTS = 8
# Query lengths (in tokens, special tokens included) an exported runtime is run at once before serving: OpenVINO
# builds its kernels for each new input shape on first sight (~10 ms on one thread), which a query of a length
# not seen before would otherwise wait for.
QUERY_WARM_TOKENS = 64


class EmbeddingModelError(RuntimeError):
    """The embedding model cannot be loaded; the message names it and where it was looked for."""


@dataclass(frozen=True)
class ModelRef:
    name: str  # what the collection records, e.g. BAAI/bge-small-en-v1.5
    path: str | None = None  # local directory; loaded by name from the hub cache when None


def onnx_cache_dir() -> Path:
    return Path(os.environ.get("RAGTUNE_ONNX_CACHE", Path(tempfile.gettempdir()) / "ragtune-onnx"))


def export_onnx(transformer, input_names: list[str], path: Path) -> None:
    import torch

    class Positional(torch.nn.Module):
        # The exporter passes inputs positionally; transformers' forward signatures differ between versions.
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, *inputs):
            return self.model(**dict(zip(input_names, inputs)), return_dict=True).last_hidden_state

    example = {name: torch.ones((1, 8), dtype=torch.long) for name in input_names}
    axes = {name: {0: "batch", 1: "tokens"} for name in [*input_names, "last_hidden_state"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.partial")
    with torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(Positional(transformer).eval(), tuple(example[n] for n in input_names), str(partial),
                          input_names=input_names, output_names=["last_hidden_state"], dynamic_axes=axes,
                          opset_version=17, dynamo=False)
    os.replace(partial, path)


# A fused graph is used only where it gives the model's own hidden states within this (fp32 rounding: ~2e-6 seen).
FUSED_TOLERANCE = 1e-4


def fused_onnx_export(model, ref: ModelRef, input_names: list[str]) -> Path:
    """The export for onnxruntime at fp32: the transformer exported with eager attention (the pattern onnxruntime's
    transformer optimizer recognises) and fused by it — attention, embeddings + LayerNorm, bias + GELU, residual +
    LayerNorm: ~560 nodes become ~50, and a short query waits for far fewer operator hand-offs (a query on two
    threads ~15-20 % faster). Used only when attention fused and `fused_mismatch` finds the fused graph gives the
    model's own hidden states; otherwise (another architecture, another padding side) the plain export, made
    only then, and the reason is remembered beside it so the attempt is not repeated at every start. Cached beside
    the plain export by onnxruntime version (the fusions are onnxruntime's)."""
    import onnxruntime

    plain = onnx_export_path(ref, input_names)
    # The check's verdict holds for the padding side it was made with.
    side = getattr(model.tokenizer, "padding_side", "right")
    fused = plain.with_name(f"{plain.stem}-fused-ort{onnxruntime.__version__}-{side}-padded.onnx")
    refused = fused.with_suffix(".refused")
    if fused.exists():
        return fused
    if refused.exists():
        return onnx_export(model, ref, input_names)
    partial = fused.with_suffix(f".{os.getpid()}.partial")
    try:
        reason = build_fused_export(model[0].model, input_names, model.tokenizer, partial)
    except Exception as exc:  # the optimizer fails in many ways on graphs it does not know
        reason = f"{type(exc).__name__}: {exc}"
    if reason:
        partial.unlink(missing_ok=True)
        log.info("embedding model runs its plain ONNX export: %s", reason)
        try:
            refused.write_text(reason + "\n")
        except OSError:  # a read-only cache: tried again at the next start
            pass
        return onnx_export(model, ref, input_names)
    os.replace(partial, fused)
    return fused


def build_fused_export(transformer, input_names: list[str], tokenizer, target: Path) -> str | None:
    """Writes the fused graph to `target`; the reason when it is not to be used, else None."""
    config = transformer.config
    heads, hidden = getattr(config, "num_attention_heads", 0), getattr(config, "hidden_size", 0)
    if not heads or not hidden:
        return f"{config.model_type}: no num_attention_heads / hidden_size in its config"
    attention = config._attn_implementation
    eager = target.with_suffix(".eager.onnx")
    try:
        transformer.set_attn_implementation("eager")
        export_onnx(transformer, input_names, eager)
    finally:
        transformer.set_attn_implementation(attention)
    try:
        fused = optimize_bert_graph(eager, target, heads, hidden)
    finally:
        eager.unlink(missing_ok=True)
    if not fused.get("Attention"):
        target.unlink(missing_ok=True)
        return f"{config.model_type}: onnxruntime did not fuse its attention"
    return fused_mismatch(target, transformer, input_names, tokenizer)


# onnxruntime's transformer optimizer, run in a child process: importing it adds its own directory to sys.path
# (top-level modules named `constants`, `onnx_model`, ...) and sympy, ~35 MB a process keeps for its lifetime.
OPTIMIZE_BERT_GRAPH = """
import json, sys
from onnxruntime.transformers import optimizer
model = optimizer.optimize_model(sys.argv[1], model_type="bert", num_heads=int(sys.argv[3]),
                                 hidden_size=int(sys.argv[4]), opt_level=1)
model.save_model_to_file(sys.argv[2])
print(json.dumps(model.get_fused_operator_statistics()))
"""


def optimize_bert_graph(source: Path, target: Path, heads: int, hidden: int) -> dict[str, int]:
    """Fuses the graph at `source` into `target`; how many of each fused operator it made."""
    done = subprocess.run([sys.executable, "-c", OPTIMIZE_BERT_GRAPH, str(source), str(target), str(heads),
                           str(hidden)], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        raise RuntimeError(f"onnxruntime's optimizer failed: {lines[-1] if lines else done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def fused_mismatch(path: Path, transformer, input_names: list[str], tokenizer) -> str | None:
    """None when the graph at `path` gives `transformer`'s last hidden states at every real token of a padded
    batch (padded as `tokenizer` pads) and of one unpadded text; else how far apart they are."""
    import onnxruntime
    import torch

    side = getattr(tokenizer, "padding_side", "right")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rng = np.random.default_rng(0)
    vocab = min(int(transformer.config.vocab_size), len(tokenizer))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    worst = 0.0
    for lengths in ((5, 12, 9), (9,)):
        width = max(lengths)
        ids = np.full((len(lengths), width), pad, dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, length in enumerate(lengths):
            span = slice(0, length) if side == "right" else slice(width - length, width)
            ids[row, span] = rng.integers(min(1000, vocab - 1), vocab, length)
            mask[row, span] = 1
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        feeds = {name: feeds[name] for name in input_names}
        with torch.no_grad():
            expected = transformer(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()
        got = session.run(["last_hidden_state"], feeds)[0]
        real = mask.astype(bool)
        worst = max(worst, float(np.abs(got[real] - expected[real]).max()))
    if worst > FUSED_TOLERANCE:
        return (f"{transformer.config.model_type}: the fused graph's hidden states differ from the model's by up to "
                f"{worst:.2g} ({side}-padded batch)")
    return None


def quantize_int8(path: Path) -> Path:
    """The fp32 export with its weights in int8 (cached beside it)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantized = path.with_name(f"{path.stem}-int8.onnx")
    if not quantized.exists():
        partial = quantized.with_suffix(f".{os.getpid()}.partial")
        quantize_dynamic(str(path), str(partial), weight_type=QuantType.QInt8, per_channel=True)
        os.replace(partial, quantized)
    return quantized


# What each backend can run: the API's table, from which the CRDs' CEL rules are generated too.
PRECISIONS = EMBEDDING_PRECISIONS
EXPORTED_BACKENDS = ("onnx", "openvino")


def check_precision(backend: str, precision: str) -> None:
    if backend not in PRECISIONS:
        raise ValueError(f"embedding backend {backend!r}: use one of {', '.join(PRECISIONS)}")
    if precision not in PRECISIONS[backend]:
        able = [name for name, precisions in PRECISIONS.items() if precision in precisions]
        raise ValueError(f"embedding precision {precision!r} does not run on backend {backend}: "
                         f"{precision} runs on {' or '.join(able) or 'no backend'}; {backend} runs "
                         f"{' or '.join(PRECISIONS[backend])}")


def onnx_export_path(ref: ModelRef, input_names: list[str]) -> Path:
    """Where the fp32 ONNX export of the model's transformer is cached (whether or not it was made yet)."""
    import torch

    # Keyed by the weight files too: a model replaced at the same path must not reuse an old export.
    weights = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in Path(ref.path).glob("*")
                     if f.suffix in (".safetensors", ".bin")) if ref.path else []
    identity = f"{ref.name}|{ref.path}|{weights}|{torch.__version__}|{input_names}"
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return onnx_cache_dir() / f"{key}.onnx"


def onnx_export(model, ref: ModelRef, input_names: list[str]) -> Path:
    """The cached fp32 ONNX export of the model's transformer, made on first use."""
    path = onnx_export_path(ref, input_names)
    if not path.exists():
        export_onnx(model[0].model, input_names, path)
    return path


class OrtRunner:
    """An onnxruntime session of the export: feeds in, last hidden state out (safe across threads). With
    `wide_threads` (other than `threads`), a second session of the same export for calls made with `wide=True`
    (see Embedder)."""

    def __init__(self, path: Path, threads: int | None, wide_threads: int | None = None):
        self.path = path
        self.session = self._session(path, threads)
        self.wide = self._session(path, wide_threads) if wide_threads else self.session

    @staticmethod
    def _session(path: Path, threads: int | None):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Worker threads spin between the operators of a call (a query's ~100 small ones would otherwise each wait
        # for a sleeping thread to wake: 6.6 -> 5.5 ms on two threads) and stop the moment the call returns, so
        # they take no CPU from the rest of the process between calls (left spinning: ~35 ms of a core after each).
        options.add_session_config_entry("session.intra_op.allow_spinning", "1")
        options.add_session_config_entry("session.force_spinning_stop", "1")
        if threads:
            options.intra_op_num_threads = threads
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, feeds: dict[str, np.ndarray], wide: bool = False) -> np.ndarray:
        return (self.wide if wide else self.session).run(["last_hidden_state"], feeds)[0]


class OpenVinoRunner:
    """The export compiled by OpenVINO for the CPU with the precision asked for; one infer request per calling
    thread (a request runs one inference at a time). With `wide_threads`, a second compilation for calls made
    with `wide=True` (see Embedder)."""

    HINTS = {"fp32": "f32", "bf16": "bf16"}

    def __init__(self, path: Path, precision: str, threads: int | None, wide_threads: int | None = None):
        import openvino

        core = openvino.Core()
        self.compiled = self._compile(core, path, precision, threads)
        self.wide = self._compile(core, path, precision, wide_threads) if wide_threads else self.compiled
        # What the runtime really runs, in the spec's words (fp32, bf16).
        ran = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        self.precision = {"f32": "fp32"}.get(ran, ran)
        self._local = threading.local()

    def _compile(self, core, path: Path, precision: str, threads: int | None):
        config = {"INFERENCE_PRECISION_HINT": self.HINTS[precision], "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        return core.compile_model(str(path), "CPU", config)

    def __call__(self, feeds: dict[str, np.ndarray], wide: bool = False) -> np.ndarray:
        requests = getattr(self._local, "requests", None)
        if requests is None:
            requests = self._local.requests = {}
        request = requests.get(wide)
        if request is None:
            request = requests[wide] = (self.wide if wide else self.compiled).create_infer_request()
        return request.infer(feeds)[0]  # a copy: the request's own buffer is reused by its next call


def use_exported_runtime(model, ref: ModelRef, backend: str = "onnx", precision: str = "fp32",
                         threads: int | None = None, wide_threads: int | None = None) -> None:
    """Swaps the transformer inside a loaded SentenceTransformer for an onnxruntime session or an OpenVINO
    compiled model of the same weights; everything around it (tokeniser, pooling, normalisation) is untouched."""
    import torch

    module = model[0]
    transformer = module.model
    input_names = [n for n in ("input_ids", "attention_mask", "token_type_ids")
                   if n in model.tokenizer.model_input_names]
    if backend == "openvino":
        runner = OpenVinoRunner(onnx_export(model, ref, input_names), precision, threads, wide_threads)
    elif precision == "int8":
        runner = OrtRunner(quantize_int8(onnx_export(model, ref, input_names)), threads, wide_threads)
    else:  # the plain export is made only where the fused graph is not used
        runner = OrtRunner(fused_onnx_export(model, ref, input_names), threads, wide_threads)

    class ExportedTransformer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = transformer.config

        def forward(self, **features):
            feeds = {n: features[n].numpy().astype("int64") for n in input_names if n in features}
            if "token_type_ids" in input_names and "token_type_ids" not in feeds:
                feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
            return {"last_hidden_state": torch.from_numpy(runner(feeds))}

    module.model = ExportedTransformer()
    model._ragtune_runner = (runner, input_names)  # for Embedder's direct path


def model_directory(ref: ModelRef) -> Path | None:
    """Where the model's files are: its path, else its snapshot in the local hub cache; None if unknown."""
    if ref.path:
        return Path(ref.path)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref.name, local_files_only=True))
    except Exception:  # not a hub model, or not cached under the hub's layout
        return None


def model_files_digest(directory: Path) -> str:
    """sha256 of what decides the model's vectors: the files at its top (weights, tokenizer, configs; not its
    README) and those of the modules modules.json names (pooling, normalisation). A model replaced under the same
    name gives another digest."""
    try:
        modules = json.loads((directory / "modules.json").read_text())
        module_dirs = [directory / m["path"] for m in modules if m.get("path")]
    except (OSError, ValueError, TypeError, KeyError):
        module_dirs = []
    files = [f for folder in (directory, *module_dirs) if folder.is_dir() for f in sorted(folder.iterdir())
             if f.is_file() and not f.name.startswith(".") and f.suffix.lower() != ".md"]
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.relative_to(directory)}\0".encode())
        with open(path, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()[:16]


def load_sentence_transformer(ref: ModelRef, backend: str = "torch", device: str | None = None,
                              precision: str = "fp32", threads: int | None = None, wide_threads: int | None = None):
    location = ref.path or ref.name
    if ref.path and not Path(ref.path).is_dir():
        raise EmbeddingModelError(f"embedding model {ref.name!r} not found: {ref.path} is not a directory")
    from sentence_transformers import SentenceTransformer  # after the cheap check: importing it takes seconds
    try:
        model = SentenceTransformer(location, device=device or "cpu", backend="torch",
                                    local_files_only=bool(ref.path) or os.environ.get("HF_HUB_OFFLINE") == "1")
        if backend in EXPORTED_BACKENDS:
            use_exported_runtime(model, ref, backend, precision, threads, wide_threads)
        return model
    except Exception as exc:  # the library raises many types (OSError, ValueError, HF errors) for the same cause
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise EmbeddingModelError(f"embedding model {ref.name!r} could not be loaded from {location} "
                                  f"(backend {backend}): {type(exc).__name__}: {first_line}") from exc


@dataclass(frozen=True)
class DirectRun:
    """What running an exported model without sentence-transformers needs, worked out once per model."""

    runner: Callable[[dict[str, np.ndarray]], np.ndarray]
    input_names: list[str]
    pooling: str  # mean | cls
    lower_case: bool
    max_length: int
    normalize: bool  # the model ends in a Normalize module


def direct_run(model) -> DirectRun | None:
    """None where the model does not run from an export or has modules the direct path does not reproduce (then
    sentence-transformers runs it)."""
    exported = getattr(model, "_ragtune_runner", None)
    if exported is None:
        return None
    modules = list(model)
    names = [type(m).__name__ for m in modules]
    if names[:2] != ["Transformer", "Pooling"] or any(n != "Normalize" for n in names[2:]):
        return None
    pooling = getattr(modules[1], "pooling_mode", None)
    if pooling not in ("mean", "cls"):
        return None
    runner, input_names = exported
    return DirectRun(runner, input_names, pooling, bool(getattr(modules[0], "do_lower_case", False)),
                     int(modules[0].max_seq_length), "Normalize" in names)


def single_text_tokenizer(tokenizer: Any, max_length: int) -> Any | None:
    """A private copy of a fast tokenizer's Rust tokenizer for one text per call: no padding, and truncated on the
    right to `max_length` tokens (special tokens included), so it gives the ids the tokenizer's own call gives with
    those settings. The wrapper's call costs ~0.3 ms more than the tokenisation of a query when the
    CPU's caches are cold, and it sets truncation and padding on the shared Rust tokenizer every time. None for a
    slow tokenizer or one truncating on the left."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "truncation_side", "right") != "right":
        return None
    single = copy.deepcopy(backend)
    single.no_padding()
    single.enable_truncation(max_length)
    return single


class Embedder:
    def __init__(self, ref: ModelRef, backend: str = "torch", batch_size: int = 64, normalize: bool = True,
                 query_prefix: str = "", model=None, precision: str = "fp32", threads: int | None = None,
                 wide_threads: int | None = None):
        """`threads`: the exported runtime's threads per call (onnxruntime, OpenVINO; default: one per core). A
        server embedding one query per request wants 1: concurrent requests run side by side, and no call waits
        for a sleeping worker thread. `wide_threads`: the threads of calls made with `wide=True` (a server with
        nothing else to do uses the cores it would otherwise leave idle)."""
        check_precision(backend, precision)
        self.ref = ref
        self.backend = backend
        self.precision = precision
        self.batch_size = batch_size
        self.normalize = normalize
        self.query_prefix = query_prefix
        # Only a thread count other than `threads` needs a second session or compilation.
        self.wide_threads = wide_threads if wide_threads and wide_threads != threads else None
        self.model = model if model is not None else load_sentence_transformer(
            ref, backend, precision=precision, threads=threads, wide_threads=self.wide_threads)
        if precision == "bf16" and backend == "openvino" and self.model._ragtune_runner[0].precision != "bf16":
            log.warning("embedding precision bf16: OpenVINO runs %s on this CPU",
                        self.model._ragtune_runner[0].precision)
        elif precision == "bf16" and str(self.model.device) == "cpu" and not cpu_has_bf16():
            log.warning("embedding precision bf16 on a CPU without AMX or AVX-512 BF16: slower than fp32")
        dimension = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dimension = int(dimension())
        # Chunking tokenises whole documents with this (no truncation); encoding still truncates to the model's
        # window, which relies on the tokenizer's own limit staying as loaded.
        self.tokenizer = self.model.tokenizer
        self._direct = direct_run(self.model)

    @functools.cached_property
    def _single(self) -> Any | None:
        """The tokenizer of one text as the exported model reads it. Made on first use (a copy takes ~40 ms; an
        indexing job rarely embeds one text alone), or by `warm_up_queries` before a server takes queries."""
        return single_text_tokenizer(self.tokenizer, self._direct.max_length) if self._direct else None

    @property
    def name(self) -> str:
        return self.ref.name

    @functools.cached_property
    def files_digest(self) -> str:
        """The digest of the model's files (see model_files_digest); "" where they cannot be found."""
        directory = model_directory(self.ref)
        return model_files_digest(directory) if directory and directory.is_dir() else ""

    @property
    def max_chunk_tokens(self) -> int:
        return int(self.model.max_seq_length) - SPECIAL_TOKENS

    def encode(self, texts: Sequence[str], wide: bool = False) -> np.ndarray:
        """`wide`: run with the exported runtime's `wide_threads` (where it has them)."""
        if self.precision == "bf16" and self.backend == "torch":
            import torch

            with torch.autocast(device_type=str(self.model.device).split(":")[0], dtype=torch.bfloat16):
                return self._encode(texts)
        return self._encode(texts, wide)

    def _encode(self, texts: Sequence[str], wide: bool = False) -> np.ndarray:
        if self._direct is not None and len(texts) <= DIRECT_MAX_TEXTS:
            return self._run_direct(texts, wide)
        vectors = self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=self.normalize,
                                    convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32).reshape(len(texts), self.dimension)

    def _run_direct(self, texts: Sequence[str], wide: bool = False) -> np.ndarray:
        """The exported model on the tokenised texts, pooled and normalised here as sentence-transformers would."""
        direct = self._direct
        texts = [str(t).strip() for t in texts]
        if direct.lower_case:
            texts = [t.lower() for t in texts]
        if len(texts) == 1 and self._single is not None:
            encoding = self._single.encode(texts[0])
            features = {"input_ids": np.array([encoding.ids]), "attention_mask": np.array([encoding.attention_mask]),
                        "token_type_ids": np.array([encoding.type_ids])}
        else:
            features = self.tokenizer(texts, padding=True, truncation="longest_first", return_tensors="np",
                                      max_length=direct.max_length)
        feeds = {n: features[n].astype(np.int64) for n in direct.input_names if n in features}
        if "token_type_ids" in direct.input_names and "token_type_ids" not in feeds:
            feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
        hidden = direct.runner(feeds, wide=wide)
        if direct.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = features["attention_mask"][..., None].astype(np.float32)
            pooled = (hidden * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None)
        if self.normalize or direct.normalize:
            pooled = pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
        return np.ascontiguousarray(pooled, dtype=np.float32)

    def embed_documents(self, texts: Sequence[str], on_batch: Callable[[int], None] | None = None) -> np.ndarray:
        """Vectors of `texts` (row i for texts[i]); `on_batch(done)` after every batch, for progress."""
        out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
        for first in range(0, len(order), self.batch_size):
            rows = order[first:first + self.batch_size]
            out[rows] = self.encode([texts[i] for i in rows])
            if on_batch:
                on_batch(min(first + self.batch_size, len(order)))
        return out

    def embed_queries(self, queries: Sequence[str], wide: bool = False) -> np.ndarray:
        return self.encode([self.query_prefix + query for query in queries], wide)

    def warm_up_queries(self, max_tokens: int = QUERY_WARM_TOKENS) -> int:
        """Runs the exported model once at every single-query length up to `max_tokens` (capped by the model's
        window), so no query waits for its shape's first run; returns how many lengths ran (0 on torch)."""
        direct = self._direct
        if direct is None:
            return 0
        _ = self._single  # made now rather than on the first query
        lengths = range(1, min(max_tokens, direct.max_length) + 1)
        for length in lengths:
            ones = np.ones((1, length), dtype=np.int64)
            feeds = {"input_ids": ones, "attention_mask": ones, "token_type_ids": np.zeros_like(ones)}
            direct.runner({n: feeds[n] for n in direct.input_names})
            if self.wide_threads:
                direct.runner({n: feeds[n] for n in direct.input_names}, wide=True)
        return len(lengths)
