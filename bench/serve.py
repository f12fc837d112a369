"""Serving benchmark: ragtune's endpoint vs the seed's server shape, on Cranfield, with the same model and embedder.

- ragtune: `python -m ragtune_workloads.serve` (Ray Serve in one process tree, as in a pod; topology auto =
  colocated: retrieval (milvus-lite) and generation inside the ingress replica; `--topology split` for separate
  Retriever and Generator deployments; the ingress replica serves HTTP itself, `--ingress proxy` through Ray
  Serve's proxy), mode rag, engine auto (vLLM where installed, `--engine` to choose), POST /v1/chat/completions;
- baseline (the seed's shape): one FastAPI app (uvicorn) with a LlamaIndex retriever over Chroma
  (`VectorStoreIndex` + `HuggingFaceEmbedding`, a `SentenceSplitter` of the same size in the same model's tokens) and
  the same tiny Llama generating with transformers in the request thread, POST /query.
Both: all-MiniLM-L6-v2, top-4 chunks, the base model's chat template, greedy decoding, max_tokens 32, a 2,048-token
window (the test model's, raised from 1,024: rotary positions, same weights) that holds the prompt with all 4 chunks;
every request retrieves (no threshold), so both do the same work and generate the same number of tokens at most.

Each server reports the time spent generating for each request; latency minus that is the time spent outside
generation (HTTP, routing, embedding, search, prompt building). Both report their retrieval time (query embedding and
search); ragtune's own timings further split the rest into transport (client to the replica's handler and back) and
the rest inside the replica. Concurrency 1, 4
and 16 clients, each level with queries no earlier level asked (ragtune's caches cannot help: "cold"); then the
concurrency-1 queries once more ("warm", where ragtune answers retrieval from its per-version cache and the baseline
has nothing to reuse).
The two servers' answers to the same (cold) questions are compared in `answers`: the share answered with equal work
(the same number of completion tokens from prompts holding every retrieved chunk, none cut), the share with the same
number of completion tokens, the share of identical texts, how far the cited documents agree
(each side chunks the corpus its own way, so chunks cannot be compared one for one) and how often they include one
judged relevant, the chunks each side cites (ragtune: those its prompt holds; the baseline: all it retrieved), and
the share of the baseline's prompts cut to the window from the left.
Servers are measured one after the other, never together. Prints one JSON object; `--quick` (about a minute): 20
documents, 4 requests per level, the transformers engine (vLLM takes ~40 s to start on 2 cores), and both servers
started at once (each idle while the other is measured).

Target: ragtune's non-generation time per request <= 0.5x the baseline's (cold, concurrency 1, p50), at equal answers
(every cold question answered with equal work: a target of its own).
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
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "operator"), str(REPO / "workloads"), str(REPO / "tests" / "workloads")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")  # chromadb
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
CHUNK_SIZE, CHUNK_OVERLAP, TOP_K = 128, 16, 4
# A window that holds the system prompt, the question and all TOP_K chunks in the generation model's tokens (~1.8k
# on Cranfield): both servers then give the model the same passages, uncut, and their answers are alike in content
# and work ("at equal answers"). In 1,024 tokens ragtune fits about two and the baseline cuts its prompt from the left.
MAX_TOKENS, MAX_MODEL_LEN = 32, 2048
LEVELS = (1, 4, 16)
STARTUP_SECONDS = 300
TARGET_RATIO = 0.5


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


# ------------------------------------------------------------------------------------------ the baseline server


def baseline_server(corpus: Path, model: Path, embedding_path: str, work: Path, port: int) -> None:
    """The seed's shape: FastAPI + LlamaIndex retriever over Chroma + transformers generate, one process."""
    import chromadb
    import torch
    import uvicorn
    from fastapi import FastAPI
    from llama_index.core import Document, StorageContext, VectorStoreIndex
    from llama_index.core.node_parser import SentenceSplitter
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding
    from llama_index.vector_stores.chroma import ChromaVectorStore
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ragtune.api.hybridendpoint import DEFAULT_RAG_SYSTEM_PROMPT, DEFAULT_TEMPLATE

    embed_model = HuggingFaceEmbedding(model_name=embedding_path, device="cpu")
    splitter_tokenizer = embed_model._model.tokenizer
    splitter = SentenceSplitter(chunk_size=CHUNK_SIZE, chunk_overlap=CHUNK_OVERLAP,
                                tokenizer=lambda text: splitter_tokenizer.tokenize(text))
    documents = [Document(text=path.read_text(), metadata={"path": path.name}) for path in sorted(corpus.iterdir())]
    client = chromadb.PersistentClient(path=str(work / "chroma"))
    store = ChromaVectorStore(chroma_collection=client.get_or_create_collection("bench"))
    index = VectorStoreIndex.from_documents(documents, storage_context=StorageContext.from_defaults(vector_store=store),
                                           embed_model=embed_model, transformations=[splitter])
    retriever = index.as_retriever(similarity_top_k=TOP_K)
    tokenizer = AutoTokenizer.from_pretrained(model)
    llm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    app = FastAPI()

    @app.get("/health")
    def health():
        return {"ok": True}

    @app.post("/query")
    def query(body: dict):
        started = time.perf_counter()
        nodes = retriever.retrieve(body["question"])
        retrieval = time.perf_counter() - started
        context = "\n\n".join(node.get_content() for node in nodes)
        messages = [{"role": "system", "content": DEFAULT_RAG_SYSTEM_PROMPT},
                    {"role": "user", "content": DEFAULT_TEMPLATE.format(context=context, question=body["question"])}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        full = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = full[-(MAX_MODEL_LEN - MAX_TOKENS):]
        started = time.perf_counter()
        with torch.inference_mode():
            output = llm.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id)
        generation = time.perf_counter() - started
        answer = tokenizer.decode(output[0, len(ids):], skip_special_tokens=True)
        return {"answer": answer, "completion_tokens": int(output.shape[1] - len(ids)),
                "sources": [{"document": node.node.metadata["path"], "score": node.score} for node in nodes],
                "generation_ms": generation * 1000, "retrieval_ms": retrieval * 1000,
                "prompt_cut": len(full) > len(ids)}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# ---------------------------------------------------------------------------------------------------- clients


class Server:
    """A server process started for the benchmark and stopped (with everything it started) afterwards."""

    def __init__(self, name: str, command: list[str], port: int, ready_path: str, env: dict[str, str], log: Path):
        self.name, self.port, self.ready_path = name, port, ready_path
        self.log = log
        self.process = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                        start_new_session=True)

    def wait_ready(self) -> float:
        import httpx

        started = time.monotonic()
        while time.monotonic() - started < STARTUP_SECONDS:
            if self.process.poll() is not None:
                raise SystemExit(f"bench: {self.name} exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}{self.ready_path}", timeout=5).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"bench: {self.name} not ready after {STARTUP_SECONDS}s (log {self.log})")

    def stop(self) -> None:
        # SIGTERM to the main process only, as Kubernetes sends it: signalling the whole group would stop Ray's
        # controller before the server asks it to shut Serve down, which then waits 30 s for a dead actor.
        try:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(120)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # whatever it left behind
        except ProcessLookupError:
            pass


def windowed_model(model: Path, target: Path, window: int) -> Path:
    """The tiny model with a `window`-token context: the same weights (linked) and tokenizer, max_position_embeddings
    raised in its config (rotary positions: nothing learned depends on it)."""
    target.mkdir(parents=True)
    for item in model.iterdir():
        if item.name != "config.json":
            (target / item.name).symlink_to(item)
    config = json.loads((model / "config.json").read_text())
    config["max_position_embeddings"] = max(window, config.get("max_position_embeddings", 0))
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target


def ragtune_request(question: str) -> tuple[str, dict]:
    return "/v1/chat/completions", {"model": "bench", "messages": [{"role": "user", "content": question}],
                                    "temperature": 0, "max_tokens": MAX_TOKENS, "retrieval": "always"}


def baseline_request(question: str) -> tuple[str, dict]:
    return "/query", {"question": question}


def generation_ms(body: dict) -> float:
    return body["timings"]["generation_ms"] if "timings" in body else body["generation_ms"]


def completion_tokens(body: dict) -> int:
    return body["usage"]["completion_tokens"] if "usage" in body else body["completion_tokens"]


def answer_of(body: dict) -> dict:
    """What a request was answered with: the text, its token count and the documents of the chunks it cited."""
    text = body["choices"][0]["message"]["content"] if "choices" in body else body["answer"]
    return {"text": text, "tokens": completion_tokens(body), "chunks": len(body["sources"]),
            "cut": body.get("prompt_cut", False),
            "documents": sorted({Path(source["document"]).name for source in body["sources"]})}


def compare_answers(ours: dict[str, dict], theirs: dict[str, dict], relevant: dict[str, set[int]]) -> dict:
    """How alike the two servers' answers to the same questions are. The chunks differ (each side chunks the
    corpus its own way), so sources are compared by document: the mean Jaccard overlap of the cited documents, and
    for the questions with a document judged relevant in the corpus (`relevant`: question -> Cranfield doc ids),
    the share whose cited documents include one, on each side."""
    from ragtune_workloads.index.cranfield import unique_docs

    questions = [question for question in ours if question in theirs]
    judged = [question for question in questions if relevant.get(question)]

    def share(same) -> float:
        return round(sum(map(same, questions)) / max(len(questions), 1), 3)

    def cites_relevant(answers: dict[str, dict]) -> float:
        cited = {q: set(unique_docs(answers[q]["documents"])) for q in judged}
        return round(sum(bool(relevant[q] & cited[q]) for q in judged) / max(len(judged), 1), 3)

    def mean_of(answers: dict[str, dict], count) -> float:
        return round(statistics.mean(count(answers[q]) for q in questions), 2) if questions else 0.0

    def jaccard(question: str) -> float:
        a, b = set(ours[question]["documents"]), set(theirs[question]["documents"])
        return len(a & b) / max(len(a | b), 1)

    def equal_work(question: str) -> bool:
        # the same number of tokens generated from prompts that hold every retrieved chunk on both sides
        a, b = ours[question], theirs[question]
        return a["tokens"] == b["tokens"] and a["chunks"] == b["chunks"] == TOP_K and not b["cut"]

    return {"questions": len(questions),
            "equalWork": share(equal_work),
            "sameCompletionTokens": share(lambda q: ours[q]["tokens"] == theirs[q]["tokens"]),
            "identicalText": share(lambda q: ours[q]["text"] == theirs[q]["text"]),
            "sourceDocumentOverlap": round(statistics.mean(map(jaccard, questions)), 3) if questions else None,
            "sameDocuments": share(lambda q: ours[q]["documents"] == theirs[q]["documents"]),
            "judgedQuestions": len(judged),
            "ragtuneCitesRelevant": cites_relevant(ours), "baselineCitesRelevant": cites_relevant(theirs),
            # ragtune cites the chunks its prompt holds (packed to the window, best first); the baseline cites
            # every chunk it retrieved, though its prompt is cut to the window from the left
            "ragtuneChunksCited": mean_of(ours, lambda a: a["chunks"]),
            "baselineChunksCited": mean_of(theirs, lambda a: a["chunks"]),
            "ragtuneDocumentsCited": mean_of(ours, lambda a: len(a["documents"])),
            "baselineDocumentsCited": mean_of(theirs, lambda a: len(a["documents"])),
            # the share of the baseline's prompts that lost their beginning (system prompt, best chunks) to the cut
            "baselinePromptsCut": mean_of(theirs, lambda a: a["cut"])}


async def run_level(port: int, build, questions: list[str], clients: int) -> dict:
    import httpx

    queue = list(questions)
    samples: list[tuple[float, float, int]] = []
    answers: dict[str, dict] = {}
    parts: list[tuple[float, float, float]] = []  # ragtune's own timings: (latency - total, retrieval, rest)

    async def worker(http):
        while queue:
            question = queue.pop(0)
            path, body = build(question)
            started = time.perf_counter()
            response = await http.post(path, json=body)
            elapsed = (time.perf_counter() - started) * 1000
            response.raise_for_status()
            answer = response.json()
            samples.append((elapsed, generation_ms(answer), completion_tokens(answer)))
            answers[question] = answer_of(answer)
            if "timings" in answer:
                timings = answer["timings"]
                parts.append((elapsed - timings["total_ms"], timings["retrieval_ms"],
                              timings["total_ms"] - timings["generation_ms"] - timings["retrieval_ms"]))
            else:  # the baseline times its retriever call (query embedding, search, LlamaIndex's nodes)
                parts.append((None, answer["retrieval_ms"], elapsed - answer["generation_ms"] - answer["retrieval_ms"]))

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=300,
                                 limits=httpx.Limits(max_connections=clients)) as http:
        started = time.perf_counter()
        await asyncio.gather(*[worker(http) for _ in range(clients)])
        wall = time.perf_counter() - started
    latencies = [s[0] for s in samples]
    ragtune = parts[0][0] is not None  # the baseline has no timings of its own beyond retrieval
    outside = [s[0] - s[1] for s in samples]
    return {"clients": clients, "requests": len(samples),
            "latencyP50Ms": round(percentile(latencies, 0.5), 2), "latencyP99Ms": round(percentile(latencies, 0.99), 2),
            "throughputRps": round(len(samples) / wall, 2),
            "outsideGenerationP50Ms": round(percentile(outside, 0.5), 2),
            "outsideGenerationMeanMs": round(statistics.mean(outside), 2),
            "outsideGenerationShare": round(sum(outside) / sum(latencies), 4),
            "meanCompletionTokens": round(statistics.mean(s[2] for s in samples), 2),
            "outsideGenerationPartsP50Ms": {
                # ragtune: HTTP from the client to the replica's handler and back
                **({"transport": round(percentile([x[0] for x in parts], 0.5), 2)} if ragtune else {}),
                # query embedding and search (ragtune: or its cache)
                "retrieval": round(percentile([x[1] for x in parts], 0.5), 2),
                # ragtune: the rest inside the replica (parsing, routing, context packing and the prompt, the
                # response); the baseline: everything but retrieval and generation (HTTP included)
                "replica" if ragtune else "rest": round(percentile([x[2] for x in parts], 0.5), 2)},
            "answers": answers}


def measure(port: int, build, question_sets: dict[int, list[str]], warmup: list[str]) -> dict:
    asyncio.run(run_level(port, build, warmup, 1))
    levels = {f"c{clients}": asyncio.run(run_level(port, build, question_sets[clients], clients))
              for clients in LEVELS}
    levels["warm_c1"] = asyncio.run(run_level(port, build, question_sets[1], 1))
    return levels


def answers_by_question(levels: dict) -> dict[str, dict]:
    """Every level's answers (taken out of the levels: the report keeps the comparison, not the texts)."""
    found: dict[str, dict] = {}
    for name, level in levels.items():
        answers = level.pop("answers")
        if name != "warm_c1":
            found.update(answers)
    return found


# ------------------------------------------------------------------------------------------------------- main


def target(name: str, value: float, goal: float, met: bool) -> dict:
    return {"name": name, "value": value, "target": goal, "met": met}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--engine", choices=["auto", "vllm", "transformers"], default=None)
    parser.add_argument("--topology", choices=["auto", "colocated", "split"], default="auto")
    parser.add_argument("--ingress", choices=["direct", "proxy"], default="direct",
                        help="how HTTP reaches ragtune's ingress replica (python -m ragtune_workloads.serve --ingress)")
    parser.add_argument("--query-backend", choices=["onnx", "openvino", "torch"], default="onnx",
                        help="the endpoint's retrieval.queryBackend (default onnx, the API's default)")
    parser.add_argument("--query-precision", choices=["fp32", "bf16", "int8"], default="fp32",
                        help="its retrieval.queryPrecision (openvino + bf16: the recommended deployment on AMX CPUs)")
    parser.add_argument("--baseline-server", nargs=5, metavar=("CORPUS", "MODEL", "EMBEDDER", "WORK", "PORT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_server:
        corpus, model, embedder, work, port = args.baseline_server
        baseline_server(Path(corpus), Path(model), embedder, Path(work), int(port))
        return 0

    import serve_fixtures as fx
    from ragtune_workloads.index import cranfield

    if not fx.cranfield_available():
        print(json.dumps({"benchmark": "serve", "error": f"Cranfield not found at {fx.CRANFIELD}"}))
        return 1
    documents, per_level = (20, 4) if args.quick else (150, 48)
    engine = args.engine or ("transformers" if args.quick else "auto")
    work = Path(tempfile.mkdtemp(prefix="ragtune-bench-serve-"))
    started = time.monotonic()
    try:
        corpus = work / "corpus"
        corpus_docs = fx.write_cranfield_corpus(corpus, documents)
        model = windowed_model(fx.tiny_model_path(), work / "model", MAX_MODEL_LEN)
        embedding_path = fx.embedding_model_path()
        index = fx.build_index(work / "store", corpus)
        queries = cranfield.load_queries(fx.CRANFIELD)
        warmup, rest = queries[:3], queries[3:]
        question_sets = {clients: rest[i * per_level:(i + 1) * per_level] for i, clients in enumerate(LEVELS)}
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "operator"), str(REPO / "workloads")]),
               "HF_HUB_OFFLINE": "1", "RAY_TMPDIR": str(work / "ray"),
               "RAGTUNE_TERMINATION_LOG": str(work / "termination-log")}
        results, startup = {}, {}
        baseline_port = ragtune_port = fx.free_port()
        while ragtune_port == baseline_port:  # --quick runs both at once
            ragtune_port = fx.free_port()
        config = fx.serve_config(work / "serve.json", name="bench", mode="rag", model=model, adapter=None,
                                 store=work / "store", engine=engine, top_k=TOP_K, score_threshold=None,
                                 max_model_len=MAX_MODEL_LEN, max_tokens=MAX_TOKENS, topology=args.topology,
                                 query_backend=args.query_backend, query_precision=args.query_precision)

        def start_baseline() -> Server:
            return Server("baseline", [sys.executable, __file__, "--baseline-server", str(corpus), str(model),
                                       embedding_path, str(work), str(baseline_port)], baseline_port, "/health", env,
                          work / "baseline.log")

        def start_ragtune() -> Server:
            return Server("ragtune", [sys.executable, "-m", "ragtune_workloads.serve", "--config", str(config),
                                      "--host", "127.0.0.1", "--port", str(ragtune_port), "--ingress", args.ingress],
                          ragtune_port, "/readyz",
                          env, work / "ragtune.log")

        # --quick starts both servers together to fit in a minute (each is idle while the other is measured);
        # a full run starts each only when the other is gone.
        baseline = start_baseline()
        ragtune = start_ragtune() if args.quick else None
        try:
            startup["baseline"] = round(baseline.wait_ready(), 1)
            results["baseline"] = measure(baseline_port, baseline_request, question_sets, warmup)
        finally:
            baseline.stop()
        ragtune = ragtune or start_ragtune()
        try:
            startup["ragtune"] = round(ragtune.wait_ready(), 1)
            import httpx

            served_engine = httpx.get(f"http://127.0.0.1:{ragtune_port}/readyz", timeout=10).json()["engine"]
            results["ragtune"] = measure(ragtune_port, ragtune_request, question_sets, warmup)
        finally:
            ragtune.stop()

        ours, theirs = results["ragtune"], results["baseline"]
        judgments, in_corpus = cranfield.load_judgments(fx.CRANFIELD), {doc.id for doc in corpus_docs}
        relevant = {question: set(judgments.get(position, {})) & in_corpus
                    for position, question in enumerate(queries, start=1)}
        answers = compare_answers(answers_by_question(ours), answers_by_question(theirs), relevant)
        ratio = ours["c1"]["outsideGenerationP50Ms"] / max(theirs["c1"]["outsideGenerationP50Ms"], 1e-9)
        warm_ratio = ours["warm_c1"]["outsideGenerationP50Ms"] / max(theirs["warm_c1"]["outsideGenerationP50Ms"], 1e-9)
        targets = [
            target("outside-generation time vs baseline, cold, 1 client, p50 (ratio)", round(ratio, 3),
                   TARGET_RATIO, ratio <= TARGET_RATIO),
            target("outside-generation time vs baseline, warm (cached retrieval), 1 client, p50 (ratio)",
                   round(warm_ratio, 3), TARGET_RATIO, warm_ratio <= TARGET_RATIO),
        ]
        targets.append(target("answers of equal work: same completion tokens, every retrieved chunk in both "
                              "prompts, none cut (share of cold questions)", answers["equalWork"], 1.0,
                              answers["equalWork"] >= 1.0))
        for clients in LEVELS[1:]:
            level = f"c{clients}"
            r = ours[level]["outsideGenerationP50Ms"] / max(theirs[level]["outsideGenerationP50Ms"], 1e-9)
            targets.append(target(f"outside-generation time vs baseline, cold, {clients} clients, p50 (ratio)",
                                  round(r, 3), TARGET_RATIO, r <= TARGET_RATIO))
        report = {
            "benchmark": "serve", "quick": args.quick, "engine": served_engine, "topology": args.topology,
            "ingress": args.ingress,
            "query": f"{args.query_backend}:{args.query_precision}", "documents": documents,
            "chunks": index["chunks"], "requestsPerLevel": per_level, "maxTokens": MAX_TOKENS, "topK": TOP_K,
            "maxModelLen": MAX_MODEL_LEN,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "loadAverage1m": round(os.getloadavg()[0], 2)},
            "startupSeconds": startup, "startupsOverlapped": args.quick, "results": results, "answers": answers,
            "targets": targets,
            "seconds": round(time.monotonic() - started, 1),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
