"""The indexing workload end to end on Cranfield, with the real model and real milvus-lite."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from conftest import MODEL_NAME, REPO, RecordingReporter, index_config
from ragtune_workloads.index import cranfield
from ragtune_workloads.index.chunking import Chunk, chunk_document
from ragtune_workloads.index.embedding import Embedder, ModelRef
from ragtune_workloads.index.loaders import Document
from ragtune_workloads.index.pipeline import embedding_text, run_index
from ragtune_workloads.index.retrieval import ModelMismatchError, Retriever
from ragtune_workloads.index.store import LITE_INDEX_TYPES

# Measured on the 300-document subset (114 queries, grades 1-4 relevant): recall@10 0.633, nDCG@10 0.500 with
# all-MiniLM-L6-v2, 256-token chunks (254 fit its window), AUTOINDEX. Pinned a little lower so index build noise
# cannot flip it.
RECALL_AT_10_FLOOR = 0.60
NDCG_AT_10_FLOOR = 0.47


def subprocess_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{REPO / 'operator'}:{REPO / 'workloads'}", "HF_HUB_OFFLINE": "1", **extra}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, cranfield_subset) -> Path:
    docs, _ = cranfield_subset
    directory = tmp_path_factory.mktemp("corpus")
    cranfield.write_corpus(docs, directory)
    return directory


@pytest.fixture(scope="module")
def first_run(corpus, tmp_path_factory, embedder, model_path):
    store = tmp_path_factory.mktemp("store")
    config = index_config(corpus, store, model_path)
    reporter = RecordingReporter()
    result = run_index(config, reporter, embedder=embedder)
    return config, result, reporter


def ranked_docs(retriever: Retriever, query: str, k: int = 10) -> list[int]:
    # Several chunks of one document can match; rank documents by their best chunk.
    return cranfield.unique_docs(hit.metadata["path"] for hit in retriever.search(query, k=3 * k))[:k]


def test_full_index_reports_documents_chunks_and_the_active_version(first_run, cranfield_subset, embedder):
    config, result, reporter = first_run
    docs, _ = cranfield_subset

    assert result["documents"] == len(docs)
    assert result["chunks"] >= len(docs)
    assert (result["dimension"], result["embeddingModel"]) == (384, MODEL_NAME)
    assert (result["activeCollection"], result["activeVersion"]) == ("cranfield_v1", "v1")
    assert (result["added"], result["kept"], result["removed"]) == (result["chunks"], 0, 0)
    assert result["skipped"] == [] and result["durationSeconds"] > 0

    last = reporter.reports[-1]
    assert (last["documents"], last["documentsTotal"]) == (len(docs), len(docs))
    assert last["chunks"] == last["chunksTotal"] == result["chunks"]
    phases = [report["phase"] for report in reporter.reports]
    assert phases.index("Embedding") < phases.index("Writing") < phases.index("Switching") < phases.index("Done")
    embedding = [r["chunks"] for r in reporter.reports if r["phase"] == "Embedding"]
    assert embedding == sorted(embedding) and len(set(embedding)) > 2  # chunk progress moved batch by batch

    with Retriever(config.store_uri, config.collection, embedder) as retriever:
        assert retriever.active.chunks == result["chunks"]
        hit = retriever.search("supersonic flow over a flat plate", k=1)[0]
        source = (Path(config.source_paths[0]) / Path(hit.metadata["path"]).name).read_text()
        assert source[hit.metadata["start"]:hit.metadata["end"]] == hit.text
        assert hit.metadata["title"] and hit.metadata["chunk"] >= 0 and hit.version == "v1"


def test_recall_at_10_on_cranfield_is_above_the_pinned_floor(first_run, cranfield_subset, embedder):
    config, _, _ = first_run
    _, queries = cranfield_subset
    recalls, ndcgs = [], []
    with Retriever(config.store_uri, config.collection, embedder) as retriever:
        for text, relevant in queries.values():
            ranked = ranked_docs(retriever, text)
            recalls.append(cranfield.recall_at(ranked, relevant, 10))
            ndcgs.append(cranfield.ndcg_at(ranked, relevant, 10))
    assert statistics.mean(recalls) >= RECALL_AT_10_FLOOR
    assert statistics.mean(ndcgs) >= NDCG_AT_10_FLOOR


def test_chunks_are_embedded_with_their_title_and_stored_without_it(first_run, tmp_path, embedder, model_path):
    config, first, _ = first_run
    chunk = Chunk("0001.txt", "Experimental   investigation of\nthe aerodynamics", "", 3, 0, 4, "wing")
    assert embedding_text(chunk, "title") == "title: Experimental investigation of the aerodynamics\n\nwing"
    assert embedding_text(chunk, "none") == "wing"
    assert embedding_text(Chunk("x.txt", " ", "", 0, 0, 4, "wing"), "title") == "wing"
    # Switching the context re-embeds every chunk (a different text reaches the model); the rows keep the chunk.
    store = tmp_path / "store"
    shutil.copytree(config.store_uri, store)
    plain = index_config(Path(config.source_paths[0]), store, model_path, spec={"embedding": {"context": "none"}})
    result = run_index(plain, RecordingReporter(), embedder=embedder)
    assert result["embedded"] == result["chunks"] == first["chunks"] and result["activeVersion"] == "v2"
    with Retriever(str(store), "cranfield", embedder) as retriever:
        hit = retriever.search("boundary layer", k=1)[0]
        assert not hit.text.startswith("title:")


def test_incremental_rerun_embeds_only_what_changed(first_run, tmp_path, embedder, model_path):
    config, first, _ = first_run
    corpus, store = tmp_path / "corpus", tmp_path / "store"
    shutil.copytree(config.source_paths[0], corpus)
    shutil.copytree(config.store_uri, store)
    rerun_config = index_config(corpus, store, model_path)

    unchanged = run_index(rerun_config, RecordingReporter(), embedder=embedder)
    assert (unchanged["embedded"], unchanged["added"], unchanged["removed"]) == (0, 0, 0)
    assert unchanged["kept"] == first["chunks"]
    assert unchanged["activeVersion"] == "v1"  # nothing changed: readers keep the same version
    assert not (store / "cranfield" / "v2").exists()

    def chunks_of(name: str) -> int:
        doc = Document(path=name, title="", text=(corpus / name).read_text(), format="txt")
        return len(chunk_document(doc, embedder.tokenizer, "tokens", 254, 32))

    changed = next(p.name for p in sorted(corpus.iterdir()) if chunks_of(p.name) == 1)
    removed = sorted(corpus.iterdir())[-1].name
    removed_chunks = chunks_of(removed)
    (corpus / changed).write_text((corpus / changed).read_text() + "Gyroscopic precession of rotor blades.\n")
    (corpus / removed).unlink()
    (corpus / "9999.txt").write_text("Icing on the wings of helicopters in arctic winter conditions.\n")

    result = run_index(rerun_config, RecordingReporter(), embedder=embedder)

    assert result["embedded"] == 2
    assert (result["added"], result["removed"]) == (2, 1 + removed_chunks)
    assert result["kept"] == first["chunks"] - 1 - removed_chunks
    assert result["chunks"] == result["kept"] + result["added"]
    assert result["activeVersion"] == "v2"
    with Retriever(str(store), "cranfield", embedder) as retriever:
        assert retriever.active.name == "v2"
        assert retriever.search("helicopter wing icing in arctic winter", k=1)[0].metadata["path"] == "docs/9999.txt"
        changed_hits = retriever.search("rotor blades", k=10, filter=f'metadata["path"] == "docs/{changed}"')
        assert len(changed_hits) == 1 and changed_hits[0].text.endswith("Gyroscopic precession of rotor blades.")
        removed_title = (Path(config.source_paths[0]) / removed).read_text().splitlines()[0]
        paths = [hit.metadata["path"] for hit in retriever.search(removed_title, k=20)]
        assert f"docs/{removed}" not in paths


READER = """
import json, sys, time
from pathlib import Path
from ragtune_workloads.index.embedding import Embedder, ModelRef
from ragtune_workloads.index.retrieval import Retriever
store, model_path, stop, out = sys.argv[1:5]
retriever = Retriever(store, "small", Embedder(ModelRef(sys.argv[5], model_path), backend=sys.argv[6]))
with open(out, "w") as log:
    print(json.dumps({"ready": retriever.active.name}), file=log, flush=True)
    while not Path(stop).exists():
        hits = retriever.search("pressure distribution on a cone at supersonic speed", k=5)
        print(json.dumps({"versions": sorted({h.version for h in hits}), "ids": [h.id for h in hits]}),
              file=log, flush=True)
retriever.close()
"""


def version_ids(store: Path, alias: str, version: str, scratch: Path) -> set[str]:
    from pymilvus import MilvusClient

    copy = scratch / f"{version}.db"
    shutil.copytree(store / alias / version / "milvus.db", copy)
    client = MilvusClient(str(copy))
    client.load_collection(f"{alias}_{version}")
    ids = {row["id"] for row in client.query(f"{alias}_{version}", filter="", output_fields=["id"], limit=16384)}
    client.close()
    return ids


def test_rebuild_switches_a_reader_in_another_process_atomically(cranfield_subset, tmp_path, embedder, model_path):
    docs, _ = cranfield_subset
    corpus, store = tmp_path / "corpus", tmp_path / "store"
    cranfield.write_corpus(docs[:40], corpus)
    run_index(index_config(corpus, store, model_path, collection="small"), RecordingReporter(), embedder=embedder)

    stop, log = tmp_path / "stop", tmp_path / "reader.jsonl"
    reader = subprocess.Popen([sys.executable, "-c", READER, str(store), model_path, str(stop), str(log), MODEL_NAME,
                               embedder.backend],
                              env=subprocess_env(), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (log.exists() and log.read_text().count("\n") >= 3):
            assert reader.poll() is None, reader.stderr.read()
            assert time.monotonic() < deadline, "reader did not start"
            time.sleep(0.2)
        # Smaller chunks invalidate every vector: a complete new version is built while the reader queries.
        rebuilt = run_index(index_config(corpus, store, model_path, collection="small",
                                         spec={"chunking": {"size": 64, "overlap": 8}}),
                            RecordingReporter(), embedder=embedder)
        assert rebuilt["activeVersion"] == "v2" and rebuilt["kept"] == 0
        deadline = time.monotonic() + 60
        while '"v2"' not in log.read_text():
            assert reader.poll() is None, reader.stderr.read()
            assert time.monotonic() < deadline, "reader never switched to v2"
            time.sleep(0.2)
    finally:
        stop.touch()
        reader.wait(timeout=60)
    assert reader.returncode == 0, reader.stderr.read()

    results = [json.loads(line) for line in log.read_text().splitlines()[1:]]
    ids = {v: version_ids(store, "small", v, tmp_path) for v in ("v1", "v2")}
    assert all(len(r["ids"]) == 5 for r in results)  # never empty
    assert all(len(r["versions"]) == 1 for r in results)  # never a mix
    assert all(set(r["ids"]) <= ids[r["versions"][0]] for r in results)
    seen = [r["versions"][0] for r in results]
    assert seen == sorted(seen) and seen[0] == "v1" and seen[-1] == "v2"  # old, then new, never back


def test_index_type_changes_reuse_vectors_and_old_versions_are_pruned(cranfield_subset, tmp_path, embedder,
                                                                       model_path):
    docs, _ = cranfield_subset
    corpus, store = tmp_path / "corpus", tmp_path / "store"
    cranfield.write_corpus(docs[:40], corpus)
    top = {}
    for number, index_type in enumerate(sorted(LITE_INDEX_TYPES), 1):
        config = index_config(corpus, store, model_path, collection="types",
                              spec={"store": {"indexType": index_type, "retainVersions": 2}})
        result = run_index(config, RecordingReporter(), embedder=embedder)
        assert result["activeVersion"] == f"v{number}"
        assert result["embedded"] == (result["chunks"] if number == 1 else 0)
        with Retriever(str(store), "types", embedder) as retriever:
            assert retriever.active.index_type == index_type
            top[index_type] = retriever.search("heat transfer in hypersonic boundary layers", k=1)[0].id
    assert len(set(top.values())) == 1, top  # every index type finds the same best chunk
    versions = sorted(p.name for p in (store / "types").iterdir() if p.name.startswith("v"))
    assert versions == [f"v{len(LITE_INDEX_TYPES) - 1}", f"v{len(LITE_INDEX_TYPES)}"]


def test_querying_with_another_model_is_refused(first_run, embedder, model_path, tmp_path):
    config, _, _ = first_run
    other = Embedder(ModelRef("BAAI/bge-small-en-v1.5", model_path), model=embedder.model)
    with pytest.raises(ModelMismatchError, match="embedded with sentence-transformers/all-MiniLM-L6-v2"):
        Retriever(config.store_uri, config.collection, other, scratch_dir=str(tmp_path))
    assert list(tmp_path.iterdir()) == []  # nothing left behind by the refused reader


def test_long_queries_are_cut_to_the_model_window(embedder):
    vectors = embedder.embed_queries(["supersonic wing " * 1500, "wing"])
    assert vectors.shape == (2, 384)


def load_onnx(path: Path):
    import onnx

    return onnx.load(str(path))


def test_onnx_backend_gives_the_same_vectors_and_answers(first_run, embedder, model_path, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime", reason="spec.embedding.backend=onnx needs onnxruntime")
    pytest.importorskip("onnx", reason="spec.embedding.backend=onnx needs onnx to export the model")
    monkeypatch.setenv("RAGTUNE_ONNX_CACHE", str(tmp_path / "onnx"))  # exported afresh, not from the session
    config, _, _ = first_run
    onnx = Embedder(ModelRef(MODEL_NAME, model_path), backend="onnx")
    # onnxruntime runs the fused graph: attention in one operator per layer
    graph = onnx._direct.runner.path
    assert "-fused-" in graph.name and "Attention" in {node.op_type for node in load_onnx(graph).graph.node}
    assert [p.name for p in (tmp_path / "onnx").glob("*.onnx")] == [graph.name]  # no plain export made for nothing
    torch = Embedder(ModelRef(MODEL_NAME, model_path), backend="torch") if embedder.backend == "onnx" \
        else embedder
    texts = ["shock waves on a blunt body", "heat transfer " * 80, "lift"]
    cosines = (onnx.embed_documents(texts) * torch.embed_documents(texts)).sum(axis=1)
    assert cosines.min() > 0.9999
    queries = ["boundary layer transition on a flat plate", "buckling of thin cylindrical shells"]
    with Retriever(config.store_uri, config.collection, onnx) as by_onnx, \
            Retriever(config.store_uri, config.collection, torch) as by_torch:
        for query in queries:
            assert [h.id for h in by_onnx.search(query, k=5)] == [h.id for h in by_torch.search(query, k=5)]


def test_a_model_the_fused_graph_gets_wrong_runs_the_plain_export(model_path, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime", reason="spec.embedding.backend=onnx needs onnxruntime")
    from ragtune_workloads.index.embedding import load_sentence_transformer, use_exported_runtime

    cache = tmp_path / "onnx"
    monkeypatch.setenv("RAGTUNE_ONNX_CACHE", str(cache))
    ref = ModelRef(MODEL_NAME, model_path)
    model = load_sentence_transformer(ref)
    # Padded on the left, a batch breaks the fused attention's assumption that padding comes last.
    model.tokenizer.padding_side = "left"
    use_exported_runtime(model, ref, "onnx")
    graph = model._ragtune_runner[0].path
    assert "-fused-" not in graph.name and "Attention" not in {n.op_type for n in load_onnx(graph).graph.node}
    [refused] = cache.glob("*.refused")
    assert "left-padded" in refused.read_text()
    texts = ["lift", "shock waves on a blunt body at mach 3"]
    reference = Embedder(ref, backend="torch")
    model.tokenizer.padding_side = reference.tokenizer.padding_side = "left"
    vectors = Embedder(ref, backend="onnx", model=model).embed_documents(texts)
    assert np.allclose(vectors, reference.embed_documents(texts), atol=1e-5)
    # the verdict belongs to the left padding: padded on the right, the same model runs the fused graph
    right = load_sentence_transformer(ref)
    use_exported_runtime(right, ref, "onnx")
    assert "-fused-" in right._ragtune_runner[0].path.name


def test_onnx_runs_a_few_texts_directly_with_the_same_vectors(model_path, monkeypatch):
    pytest.importorskip("onnxruntime", reason="spec.embedding.backend=onnx needs onnxruntime")
    from ragtune_workloads.index import embedding

    onnx = Embedder(ModelRef(MODEL_NAME, model_path), backend="onnx")
    texts = ["  Shock waves on a Blunt body ", "heat transfer " * 300, "lift"]  # spaces, truncation, padding
    calls = []
    encode = onnx.model.encode
    monkeypatch.setattr(onnx.model, "encode", lambda *a, **k: calls.append(1) or encode(*a, **k))
    direct = onnx.embed_queries(texts)
    assert calls == []  # sentence-transformers was not involved
    monkeypatch.setattr(embedding, "DIRECT_MAX_TEXTS", 0)
    through_st = onnx.embed_queries(texts)
    assert calls == [1]
    assert ((direct * through_st).sum(axis=1) > 0.99999).all()


def test_onnx_worker_threads_take_no_cpu_once_a_call_returns(model_path):
    pytest.importorskip("onnxruntime", reason="spec.embedding.backend=onnx needs onnxruntime")
    import time

    onnx = Embedder(ModelRef(MODEL_NAME, model_path), backend="onnx", threads=1, wide_threads=2)
    assert onnx.wide_threads == 2  # a session with a worker thread besides the caller's
    busy = []
    for query in ["shock waves on a blunt body", "heat transfer at mach 3", "lift of a slender wing"] * 2:
        onnx.embed_queries([query], wide=True)
        before = time.process_time()
        time.sleep(0.05)
        busy.append(time.process_time() - before)
    # a worker left spinning after the call would take ~35 ms of a core in those 50 ms
    assert min(busy) < 0.01, busy


def test_one_query_is_tokenised_once_as_the_tokenizers_own_call_would(model_path):
    pytest.importorskip("onnxruntime", reason="spec.embedding.backend=onnx needs onnxruntime")
    from ragtune_workloads.serve.cache import MISSING, VersionedCache
    from ragtune_workloads.serve.retriever import CachingEmbedder

    onnx = Embedder(ModelRef(MODEL_NAME, model_path), backend="onnx")
    caching = CachingEmbedder(onnx, VersionedCache(8))
    assert onnx._single is not None
    texts = ["  Shock waves on a Blunt body ", "Überschall-Strömung: Δp = ½ρv²", "heat transfer " * 300, "lift"]
    alone = [caching.embed_queries([text]) for text in texts]
    assert all(caching.cache.get(text, None) is not MISSING for text in texts)  # cached as asked
    onnx._single = None  # the tokenizer's own call
    for text, vector in zip(texts, alone):
        assert (vector * onnx.embed_queries([text])).sum() > 0.99999, text
    # A query longer than the model's window gets the vector of what the model reads, in every backend (torch
    # would overflow its position embeddings if it read it all): the query cut at the window.
    long = texts[2]
    offsets = onnx.tokenizer(long, add_special_tokens=False, return_offsets_mapping=True,
                             verbose=False)["offset_mapping"]
    cut = long[:offsets[onnx.max_chunk_tokens - 1][1]]
    assert len(cut) < len(long)
    assert (alone[2] * onnx.embed_queries([cut])).sum() > 0.99999
    torch_embedder = Embedder(ModelRef(MODEL_NAME, model_path), backend="torch")
    assert (alone[2] * torch_embedder.embed_queries([long])).sum() > 0.9999


def test_an_endpoint_embeds_queries_with_onnx_and_falls_back_to_torch(model_path, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime", reason="retrieval.queryBackend=onnx needs onnxruntime")
    from ragtune.api.workload import RetrievalTarget
    from ragtune_workloads.serve.retriever import query_embedder

    target = RetrievalTarget(store_uri=str(tmp_path), collection="c", embedding_model=MODEL_NAME,
                             model_path=model_path, query_backend="onnx", query_prefix="q: ")
    chosen = query_embedder(target)
    assert (chosen.backend, chosen.query_prefix) == ("onnx", "q: ")
    assert chosen._direct.runner.session.get_session_options().intra_op_num_threads == 1  # requests run side by side
    (tmp_path / "not-a-dir").write_text("")
    monkeypatch.setenv("RAGTUNE_ONNX_CACHE", str(tmp_path / "not-a-dir" / "onnx"))  # the export cannot be written
    fallback = query_embedder(target)
    assert fallback.backend == "torch"
    assert ((fallback.embed_queries(["lift"]) * chosen.embed_queries(["lift"])).sum() > 0.9999)
    assert query_embedder(target.model_copy(update={"query_backend": "torch"})).backend == "torch"


def test_an_endpoint_embeds_queries_with_openvino_at_the_precision_it_names(model_path, tmp_path, monkeypatch):
    pytest.importorskip("openvino", reason="retrieval.queryBackend=openvino needs openvino")
    from ragtune.api.workload import RetrievalTarget
    from ragtune_workloads.serve.retriever import query_embedder

    monkeypatch.setenv("RAGTUNE_ONNX_CACHE", str(tmp_path / "onnx"))
    target = RetrievalTarget(store_uri=str(tmp_path), collection="c", embedding_model=MODEL_NAME,
                             model_path=model_path, query_backend="openvino", query_precision="bf16")
    chosen = query_embedder(target)
    assert (chosen.backend, chosen.precision) == ("openvino", "bf16")
    assert chosen._direct.runner.compiled.get_property("INFERENCE_NUM_THREADS") == 1  # requests side by side
    (tmp_path / "not-a-dir").write_text("")
    monkeypatch.setenv("RAGTUNE_ONNX_CACHE", str(tmp_path / "not-a-dir" / "onnx"))  # the export cannot be written
    fallback = query_embedder(target)
    assert (fallback.backend, fallback.precision) == ("torch", "bf16")  # the arithmetic asked for, in torch


def test_an_endpoint_runs_every_short_query_length_before_serving(model_path, tmp_path, monkeypatch):
    pytest.importorskip("openvino", reason="retrieval.queryBackend=openvino needs openvino")
    from ragtune.api.workload import RetrievalTarget
    from ragtune_workloads.index.embedding import QUERY_WARM_TOKENS, OpenVinoRunner
    from ragtune_workloads.serve.retriever import query_embedder

    monkeypatch.setenv("RAGTUNE_ONNX_CACHE", str(tmp_path / "onnx"))
    queries = ["lift", "supersonic flow past a cone at incidence"]
    direct = openvino_embedder(model_path, "fp32", threads=1)
    before = direct.embed_queries(queries)
    seen: list[tuple[int, ...]] = []
    run = OpenVinoRunner.__call__
    monkeypatch.setattr(OpenVinoRunner, "__call__", lambda self, feeds, wide=False: seen.append(
        (*feeds["input_ids"].shape, "wide" if wide else "narrow")) or run(self, feeds, wide))
    assert direct.warm_up_queries() == QUERY_WARM_TOKENS
    assert np.allclose(direct.embed_queries(queries), before, atol=1e-6)  # the runtime's state is not disturbed
    seen.clear()
    target = RetrievalTarget(store_uri=str(tmp_path), collection="c", embedding_model=MODEL_NAME,
                             model_path=model_path, query_backend="openvino", query_precision="bf16")
    # OpenVINO builds kernels per input shape: none is left for a request to wait on, with one thread (queries
    # side by side) or two (a query alone)
    embedder = query_embedder(target)
    assert "_single" in vars(embedder)  # nor for the copy of the tokenizer a lone query is tokenised with
    wide = ["narrow", "wide"] if embedder.wide_threads else ["narrow"]
    assert seen == [(1, n, how) for n in range(1, QUERY_WARM_TOKENS + 1) for how in wide]
    assert np.allclose(embedder.embed_queries(queries, wide=True), embedder.embed_queries(queries), atol=2e-2)
    assert query_embedder(target.model_copy(update={"query_backend": "torch"})).warm_up_queries() == 0


def test_int8_precision_stays_close_to_fp32_and_is_quantised_once(embedder, model_path, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime", reason="spec.embedding.precision=int8 needs onnxruntime")
    pytest.importorskip("onnx", reason="spec.embedding.precision=int8 needs onnx to export the model")
    cache = tmp_path / "onnx"
    monkeypatch.setenv("RAGTUNE_ONNX_CACHE", str(cache))
    int8 = Embedder(ModelRef(MODEL_NAME, model_path), backend="onnx", precision="int8")
    exports = sorted(p.name for p in cache.iterdir())
    assert len(exports) == 2 and exports[0].endswith("-int8.onnx")  # the fp32 export and its quantised copy
    quantised = cache / exports[0]
    assert quantised.stat().st_size < 0.5 * (cache / exports[1]).stat().st_size  # weights really in int8
    modified = quantised.stat().st_mtime_ns
    Embedder(ModelRef(MODEL_NAME, model_path), backend="onnx", precision="int8")
    assert quantised.stat().st_mtime_ns == modified  # reused, not quantised again
    assert_close_but_not_identical(int8, embedder, 0.97)


def test_bf16_precision_stays_within_rounding_of_fp32(embedder, model_path):
    bf16 = Embedder(ModelRef(MODEL_NAME, model_path), backend="torch", precision="bf16")
    assert_close_but_not_identical(bf16, embedder, 0.999)


def test_a_precision_the_backend_cannot_run_is_refused(model_path):
    with pytest.raises(ValueError, match="bf16 runs on torch or openvino; onnx runs fp32 or int8"):
        Embedder(ModelRef(MODEL_NAME, model_path), backend="onnx", precision="bf16")
    with pytest.raises(ValueError, match="int8 runs on onnx; openvino runs fp32 or bf16"):
        Embedder(ModelRef(MODEL_NAME, model_path), backend="openvino", precision="int8")


def openvino_embedder(model_path: str, precision: str, **kwargs) -> Embedder:
    pytest.importorskip("openvino", reason="spec.embedding.backend=openvino needs openvino")
    return Embedder(ModelRef(MODEL_NAME, model_path), backend="openvino", precision=precision, **kwargs)


def test_openvino_fp32_gives_the_same_vectors_and_answers(first_run, embedder, model_path, tmp_path, monkeypatch):
    monkeypatch.setenv("RAGTUNE_ONNX_CACHE", str(tmp_path / "onnx"))
    config, _, _ = first_run
    openvino = openvino_embedder(model_path, "fp32")
    # OpenVINO would choose bf16 by itself on a CPU with AMX: fp32 is pinned, not left to the runtime.
    assert openvino.model._ragtune_runner[0].precision == "fp32"
    texts = ["shock waves on a blunt body", "heat transfer " * 80, "lift"]
    assert (openvino.embed_documents(texts) * embedder.embed_documents(texts)).sum(axis=1).min() > 0.9999
    assert (openvino.embed_queries(texts) * embedder.embed_queries(texts)).sum(axis=1).min() > 0.9999  # direct
    with Retriever(config.store_uri, config.collection, openvino) as by_openvino, \
            Retriever(config.store_uri, config.collection, embedder) as by_reference:
        for query in ["boundary layer transition on a flat plate", "buckling of thin cylindrical shells"]:
            assert [h.id for h in by_openvino.search(query, k=5)] == [h.id for h in by_reference.search(query, k=5)]


def test_openvino_bf16_stays_within_rounding_of_fp32(embedder, model_path, tmp_path, monkeypatch):
    monkeypatch.setenv("RAGTUNE_ONNX_CACHE", str(tmp_path / "onnx"))
    bf16 = openvino_embedder(model_path, "bf16")
    if bf16.model._ragtune_runner[0].precision != "bf16":
        pytest.skip("this CPU has no bf16 arithmetic (AMX or AVX-512 BF16): OpenVINO runs f32")
    assert_close_but_not_identical(bf16, embedder, 0.999)
    queries = ["lift", "supersonic flow past a cone", "  Heat transfer  "]
    assert ((bf16.embed_queries(queries) * embedder.embed_queries(queries)).sum(axis=1) > 0.999).all()


def test_openvino_answers_concurrent_callers_each_with_its_own_vector(model_path, tmp_path, monkeypatch):
    monkeypatch.setenv("RAGTUNE_ONNX_CACHE", str(tmp_path / "onnx"))
    openvino = openvino_embedder(model_path, "fp32", threads=1)
    queries = [f"pressure distribution number {i} on a swept wing" + " at incidence" * (i % 5) for i in range(24)]
    alone = openvino.embed_queries(queries)
    with ThreadPoolExecutor(max_workers=6) as pool:  # one inference request per thread, none shared
        together = np.concatenate(list(pool.map(lambda q: openvino.embed_queries([q]), queries)))
    assert np.allclose(together, alone, atol=1e-5)


def assert_close_but_not_identical(variant: Embedder, fp32: Embedder, floor: float) -> None:
    texts = ["shock waves on a blunt body", "heat transfer " * 80, "lift", "buckling of thin cylindrical shells"]
    reference, vectors = fp32.embed_documents(texts), variant.embed_documents(texts)
    assert vectors.dtype == np.float32 and vectors.shape == reference.shape
    cosines = (vectors * reference).sum(axis=1)
    assert floor < cosines.min() and cosines.max() < 0.999999  # close to fp32, and really a different computation
    assert list((vectors @ reference.T).argmax(axis=1)) == list(range(len(texts)))  # each nearest its own


# ---- the program as the Job runs it ---------------------------------------------------------------------------

def run_cli(tmp_path: Path, config) -> subprocess.CompletedProcess:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.model_dump(by_alias=True, mode="json")))
    env = subprocess_env(RAGTUNE_PROGRESS_FILE=str(tmp_path / "progress.json"),
                         RAGTUNE_TERMINATION_LOG=str(tmp_path / "termination-log"))
    return subprocess.run([sys.executable, "-m", "ragtune_workloads.index", "--config", str(path)], env=env,
                          capture_output=True, text=True, timeout=300)


def inline_config(store_dir: Path | str, model_path: str | None, **spec):
    from ragtune.api.workload import IndexConfig

    return IndexConfig.model_validate({
        "owner": {"kind": "VectorIndex", "name": "faq", "namespace": "test"},
        "spec": {"sources": [{"inline": [
            {"name": "faq.md", "text": "# FAQ\n\n## Reset\n\nHold the button for five seconds.\n"},
            {"name": "empty.txt", "text": ""}]}], "embedding": {"model": MODEL_NAME}, **spec},
        "sourcePaths": [None], "modelPath": model_path, "storeUri": str(store_dir), "collection": "faq"})


def test_cli_success_reports_progress_and_result(tmp_path, model_path):
    done = run_cli(tmp_path, inline_config(tmp_path / "store", model_path))
    assert done.returncode == 0, done.stderr
    annotations = json.loads((tmp_path / "progress.json").read_text())
    progress = json.loads(annotations["ragtune.io/progress"])
    result = json.loads(annotations["ragtune.io/result"])
    assert progress["phase"] == "Done" and progress["documentsTotal"] == 1
    assert result == json.loads((tmp_path / "termination-log").read_text())
    assert (result["documents"], result["chunks"], result["dimension"]) == (1, 1, 384)
    assert (result["activeCollection"], result["activeVersion"], result["embeddingModel"]) == \
        ("faq_v1", "v1", MODEL_NAME)
    assert result["skipped"] == [{"path": "inline/empty.txt", "reason": "empty file"}]


@pytest.mark.parametrize("case, expected", [
    ("index type", "index type IVF_PQ is not supported by milvus-lite"),
    ("model", "embedding model 'sentence-transformers/all-MiniLM-L6-v2' not found"),
    ("documents", "no documents could be loaded (1 skipped: inline/empty.txt: empty file)"),
    ("store", "is not writable"),
    ("server", "Milvus at http://127.0.0.1:1 is unreachable or refused the connection (without a token)"),
])
def test_cli_failures_exit_non_zero_with_one_line_reason(tmp_path, model_path, case, expected):
    store = tmp_path / "store"
    config = {
        "index type": lambda: inline_config(store, model_path, store={"indexType": "IVF_PQ"}),
        "model": lambda: inline_config(store, str(tmp_path / "no-model")),
        "documents": lambda: inline_config(store, model_path, sources=[{"inline": [{"name": "empty.txt",
                                                                                     "text": ""}]}]),
        "store": lambda: inline_config(Path("/proc/ragtune-store"), model_path),
        "server": lambda: inline_config("http://127.0.0.1:1", model_path),
    }[case]()
    done = run_cli(tmp_path, config)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and expected in done.stderr, done.stderr
    assert not (tmp_path / "termination-log").exists()
    if case != "store":
        assert not (store / "faq" / "current.json").exists()


def test_server_layout_moves_the_alias_between_collection_versions(tmp_path):
    """The Milvus-server strategy (collections <alias>_v<N> behind an alias), driven through pymilvus against a
    milvus-lite file: the same API calls a server gets, minus the network."""
    import numpy as np
    from pymilvus import MilvusClient

    from ragtune_workloads.index.store import Rows, ServerStore, VersionInfo

    client = MilvusClient(str(tmp_path / "server.db"))
    store = ServerStore(client, "docs")
    rng = np.random.default_rng(0)

    def publish(version: int, texts: list[str]) -> VersionInfo:
        vectors = rng.normal(size=(len(texts), 8)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        info = VersionInfo(alias="docs", version=version, embedding_model="m", dimension=8, metric="COSINE",
                           index_type="HNSW", chunks=len(texts), documents=len(texts), vectors_fingerprint="f",
                           layout_fingerprint="l")
        store.write(info, Rows([f"{version}-{i}" for i in range(len(texts))], vectors, texts,
                               [{"path": t} for t in texts]))
        store.publish(info)
        return info

    try:
        assert store.active() is None
        publish(store.next_version(), ["a", "b", "c"])
        publish(store.next_version(), ["d", "e"])
        assert store.active().version == 2
        rows = client.query("docs", filter="", output_fields=["text"], limit=10)
        assert sorted(row["text"] for row in rows) == ["d", "e"]  # the alias reads the new version only
        publish(store.next_version(), ["f"])
        assert store.prune(retain=2) == ["v1"]
        assert store.versions() == [2, 3] and store.active().version == 3
    finally:
        client.close()


def test_a_server_store_stays_incremental_when_the_state_directory_is_gone(tmp_path, model_path):
    """A Milvus server's index Job keeps its state in the pod, so each run starts without it: the rows and
    vectors of the active version are read back from the server (driven through pymilvus against a milvus-lite
    file, as above)."""
    from pymilvus import MilvusClient

    from conftest import fast_backend
    from ragtune_workloads.index.pipeline import Progress, index_documents, load_documents
    from ragtune_workloads.index.store import ServerStore

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for number in range(6):
        (corpus / f"{number}.txt").write_text(f"Report {number}: pressure distribution on a swept wing at Mach "
                                              f"{number}.{number}, measured in the transonic tunnel.\n")
    state = tmp_path / "state"
    config = index_config(corpus, tmp_path / "unused", model_path, collection="docs", state=state,
                          spec={"embedding": {"context": "none"}})  # the model reads the stored text
    embedder = Embedder(ModelRef(MODEL_NAME, model_path), backend=fast_backend())
    client = MilvusClient(str(tmp_path / "server.db"))

    def run() -> dict:
        shutil.rmtree(state, ignore_errors=True)  # a new pod: nothing of the last run's state
        progress = Progress(RecordingReporter())
        try:
            return index_documents(config, load_documents(config), embedder, ServerStore(client, "docs"), progress)
        finally:
            progress.stop()

    try:
        first = run()
        assert first["embedded"] == first["chunks"] == 6 and first["activeVersion"] == "v1"
        unchanged = run()
        assert (unchanged["embedded"], unchanged["added"], unchanged["kept"]) == (0, 0, 6)
        assert unchanged["activeVersion"] == "v1", "nothing changed: no new version on the server"

        (corpus / "2.txt").write_text("Icing on helicopter rotor blades in arctic winter conditions.\n")
        changed = run()
        assert (changed["embedded"], changed["added"], changed["removed"], changed["kept"]) == (1, 1, 1, 5)
        assert changed["activeVersion"] == "v2"
        stored = ServerStore(client, "docs")
        rows = client.query("docs", filter='id != ""', output_fields=["id", "vector", "text"], limit=100)
        fresh = embedder.embed_documents([row["text"] for row in rows])
        assert np.allclose(np.asarray([row["vector"] for row in rows]), fresh, atol=1e-4), \
            "vectors read back are the ones the model gives"
        assert stored.row_ids(stored.active()) == frozenset(row["id"] for row in rows)
    finally:
        client.close()


@pytest.fixture
def refusing_milvus():
    """A gRPC server on loopback that refuses every call as a Milvus server refuses a bad token, and records the
    metadata each call came with: what a Milvus server would have been sent."""
    from concurrent import futures

    import grpc

    calls: list[dict[str, str]] = []

    class Refuse(grpc.GenericRpcHandler):
        def service(self, details):
            calls.append({"method": details.method, **dict(details.invocation_metadata)})

            def refuse(request, context):
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "auth check failure")
            return grpc.unary_unary_rpc_method_handler(refuse)

    server = grpc.server(futures.ThreadPoolExecutor(2), handlers=[Refuse()])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"http://127.0.0.1:{port}", calls
    server.stop(None)


def test_the_index_run_and_the_endpoint_send_the_token_from_the_environment(refusing_milvus, monkeypatch, embedder):
    """The operator sets MILVUS_TOKEN from store.tokenSecret in both the index Job and the endpoint's pods."""
    import base64

    from ragtune_workloads.index.store import StoreError, open_store

    uri, calls = refusing_milvus
    monkeypatch.setenv("MILVUS_TOKEN", "root:s3cret")
    with pytest.raises(StoreError, match=rf"^Milvus at {uri} is unreachable or refused the connection \(with a "
                                         r"token\): .*; check store\.uri, and that store\.tokenSecret holds"):
        open_store(uri, "docs")
    with pytest.raises(Exception):
        Retriever(uri, "docs", embedder)
    sent = [base64.b64decode(call["authorization"]).decode() for call in calls if "authorization" in call]
    assert len(calls) >= 2 and sent == ["root:s3cret"] * len(calls)


def test_a_second_index_run_on_the_same_store_waits_for_the_first(tmp_path):
    from exclusive_runs import second_run_waits
    from ragtune_workloads.index.store import LiteStore, StoreError

    first, second = LiteStore(tmp_path, "docs"), LiteStore(tmp_path, "docs")
    with first.exclusive():
        with pytest.raises(StoreError, match="another index run is writing .* did not finish within 1s"):
            with second.exclusive(wait=1.0):
                pass
    order, waits = second_run_waits(first, second, hold=1.5)
    assert order == ["first", "second"] and waits and set(waits) == {"another index run"}


@pytest.mark.parametrize("metric,index_type", [("COSINE", "HNSW"), ("IP", "FLAT"), ("L2", "IVF_FLAT"),
                                               ("COSINE", "FLAT")])
def test_the_embedded_reader_answers_exactly_as_pymilvus_does(tmp_path, metric, index_type):
    """The serving path searches milvus-lite copies in process (`LiteReader`), not over pymilvus' loopback gRPC:
    same hits, order, distances, text and decoded metadata, with and without a filter. Without a filter the
    version's rows are searched in memory, exactly: the same as pymilvus on a FLAT index, the exact neighbours
    (which an approximate index may miss) on the others; a version too big for memory goes to the engine."""
    from pymilvus import MilvusClient

    from ragtune_workloads.index.retrieval import LiteReader
    from ragtune_workloads.index.store import Rows, VersionInfo, index_params, write_version

    rng = np.random.default_rng(7)
    vectors = rng.normal(size=(60, 8)).astype(np.float32)
    if metric == "COSINE" and index_type == "HNSW":
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    texts = [f"chunk {i}" for i in range(60)]
    info = VersionInfo(alias="docs", version=1, embedding_model="m", dimension=8, metric=metric,
                       index_type=index_type, chunks=60, documents=60, vectors_fingerprint="f",
                       layout_fingerprint="l", search_params=index_params(index_type, 60)[1])
    path = tmp_path / "milvus.db"
    queries = [v.tolist() for v in rng.normal(size=(5, 8)).astype(np.float32)]
    params = {"metric_type": metric, "params": dict(info.search_params)}

    def search(client, name: str, flt: str) -> list:
        hits = client.search(name, data=queries, limit=6, filter=flt, output_fields=["text", "metadata"],
                             search_params=params)
        return [[(str(h["id"]), round(float(h["distance"]), 5), h["entity"]["text"], h["entity"]["metadata"])
                 for h in per_query] for per_query in hits]

    client = MilvusClient(str(path))
    try:
        write_version(client, info, Rows([f"id-{i}" for i in range(60)], vectors, texts,
                                         [{"path": f"doc{i % 7}.md", "chunk": i} for i in range(60)]))
        client.load_collection(info.collection)
        expected = {flt: search(client, info.collection, flt) for flt in ("", 'text != "chunk 3"')}
    finally:
        client.close()
    # the exact neighbours, best first, with milvus' public distances
    q = np.asarray(queries, dtype=np.float32)
    if metric == "COSINE":
        unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        scores = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ unit.T
    elif metric == "IP":
        scores = q @ vectors.T
    else:
        scores = -((q[:, None, :] - vectors[None, :, :]) ** 2).sum(axis=2)
    exact = [[(f"id-{i}", float(abs(row[i]) if metric == "L2" else row[i])) for i in np.argsort(-row)[:6]]
             for row in scores]
    # As the endpoint does: a private copy of the version (the original stays locked by the process that wrote it).
    shutil.copytree(path, tmp_path / "copy.db")
    for memory_max_values in (None, 0):
        reader = LiteReader(tmp_path / "copy.db", info.collection, memory_max_values=memory_max_values)
        try:
            assert reader.memory_loaded.wait(30)
            assert (reader.memory is not None) == (memory_max_values is None)
            for flt, want in expected.items():
                got = search(reader, info.collection, flt)
                in_memory = reader.memory is not None and not flt
                if not in_memory or index_type == "FLAT":
                    assert got == want
                if in_memory:  # float32 sums in another order: the same to a relative 1e-5
                    assert [[hit[0] for hit in per_query] for per_query in got] == [[i for i, _ in e] for e in exact]
                    assert [[hit[1] for hit in per_query] for per_query in got] == [
                        pytest.approx([d for _, d in e], rel=1e-5, abs=1e-5) for e in exact]
                assert all(len(per_query) == 6 for per_query in got)
                assert isinstance(got[0][0][3], dict) and got[0][0][3]["path"].startswith("doc")
        finally:
            reader.close()
    reader = LiteReader(tmp_path / "copy.db", info.collection)
    reader.close()  # while its rows may still be read: the read ends, nothing is left waiting
    assert reader.memory_loaded.wait(30)


def test_a_damaged_vector_cache_costs_a_re_embedding_not_the_run(tmp_path):
    """A node that died while the cache was written leaves a truncated file; the next run starts afresh."""
    from ragtune_workloads.index.state import CACHE_FILE, VectorCache

    cache = VectorCache("fp")
    keys = [bytes([1]) * 32, bytes([2]) * 32]
    cache.save(tmp_path, keys, np.ones((2, 4), dtype=np.float32))
    assert set(VectorCache.load(tmp_path, "fp").vectors) == set(keys)
    whole = (tmp_path / CACHE_FILE).read_bytes()
    for damaged in (whole[: len(whole) // 2], whole[:10], b""):
        (tmp_path / CACHE_FILE).write_bytes(damaged)
        assert VectorCache.load(tmp_path, "fp").vectors == {}


def test_a_vector_cache_from_before_model_files_were_recorded_is_kept(tmp_path):
    from ragtune_workloads.index.state import CACHE_FILE, VectorCache, keys_array

    keys = [bytes([1]) * 32]
    np.savez(tmp_path / CACHE_FILE, fingerprint=np.array("fp"), keys=keys_array(keys),
             vectors=np.ones((1, 4), dtype=np.float32))  # as earlier releases wrote it
    kept = VectorCache.load(tmp_path, "fp", model_files="abc")
    assert set(kept.vectors) == set(keys) and not kept.model_replaced
    kept.save(tmp_path, keys, np.ones((1, 4), dtype=np.float32))
    assert VectorCache.load(tmp_path, "fp", model_files="def").model_replaced


def test_pruning_keeps_complete_versions_and_drops_what_a_crash_left(tmp_path):
    from ragtune_workloads.index.store import VERSION_FILE, LiteStore, VersionInfo, atomic_write_json

    store = LiteStore(tmp_path, "docs")

    def version(number: int, complete: bool) -> VersionInfo:
        info = VersionInfo(alias="docs", version=number, embedding_model="m", dimension=8, metric="COSINE",
                           index_type="FLAT", chunks=1, documents=1, vectors_fingerprint="f", layout_fingerprint="l")
        (tmp_path / "docs" / info.name).mkdir(parents=True)
        if complete:
            atomic_write_json(tmp_path / "docs" / info.name / VERSION_FILE, info.to_dict())
        return info

    version(1, True)
    version(2, False)  # the run that wrote it died before finishing
    store.publish(version(3, True))
    assert store.prune(retain=2) == ["v2"]  # v1 is the version to go back to, and stays
    assert store.versions() == [1, 3]


def test_a_model_replaced_under_the_same_name_embeds_every_chunk_again(tmp_path, model_path):
    """A fine-tuned embedding model copied over the old one at the same path: the cached vectors are the old
    model's, and mixing them with the new model's would rank silently worse."""
    from safetensors.torch import load_file, save_file

    from conftest import fast_backend

    model, corpus = tmp_path / "model", tmp_path / "corpus"
    shutil.copytree(model_path, model)
    corpus.mkdir()
    for number, text in enumerate(["Laminar flow over a flat plate.", "Shock waves at transonic speed.",
                                   "Heat transfer in hypersonic boundary layers."]):
        (corpus / f"{number}.txt").write_text(text + "\n")
    config = index_config(corpus, tmp_path / "store", str(model), collection="small", state=tmp_path / "state")

    def run() -> dict:
        return run_index(config, RecordingReporter(), embedder=Embedder(ModelRef(MODEL_NAME, str(model)),
                                                                        backend=fast_backend()))

    first = run()
    (model / "README.md").write_text("retrained for our documents\n")  # words about the model change nothing
    unchanged = run()
    assert (unchanged["embedded"], unchanged["activeVersion"]) == (0, first["activeVersion"])

    weights = load_file(model / "model.safetensors")
    name = next(key for key in weights if key.endswith("layer.0.attention.self.query.weight"))
    weights[name] = weights[name] + 0.05 * torch_randn_like(weights[name])
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    replaced = run()
    assert replaced["embedded"] == replaced["chunks"] == first["chunks"]
    assert replaced["activeVersion"] == "v2", "the new model's vectors are published"
    assert run()["embedded"] == 0


def torch_randn_like(tensor):
    import torch

    return torch.randn_like(tensor, generator=torch.Generator().manual_seed(0))
