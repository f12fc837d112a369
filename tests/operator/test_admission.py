"""Invalid objects are refused by the API server at admission (schema + CEL) with messages naming the field."""

from __future__ import annotations

import copy

import pytest

API = "ragtune.io/v1alpha1"

FTJ = {"apiVersion": API, "kind": "FineTuneJob", "metadata": {"name": "x"},
       "spec": {"dataset": {"source": "inline", "rows": [{"instruction": "a", "output": "b"}]},
                "output": {"pvc": {"claimName": "adapters"}}}}
VIX = {"apiVersion": API, "kind": "VectorIndex", "metadata": {"name": "x"},
       "spec": {"sources": [{"inline": [{"name": "a.md", "text": "hello"}]}]}}
HEP = {"apiVersion": API, "kind": "HybridEndpoint", "metadata": {"name": "x"},
       "spec": {"mode": "hybrid", "model": {"adapter": {"fineTuneJobRef": {"name": "ft"}}},
                "retrieval": {"vectorIndexRef": {"name": "docs"}}}}


def variant(base: dict, path: str, value, delete: bool = False) -> dict:
    obj = copy.deepcopy(base)
    *parents, leaf = path.split(".")
    node = obj
    for key in parents:
        node = node[int(key)] if key.isdigit() else node.setdefault(key, {})
    if delete:
        del node[leaf]
    elif leaf.isdigit():
        node[int(leaf)] = value
    else:
        node[leaf] = value
    return obj


INVALID = [
    # FineTuneJob
    ("ftj-no-dataset", variant(FTJ, "spec.dataset", None, delete=True), "spec.dataset"),
    ("ftj-no-output", variant(FTJ, "spec.output", None, delete=True), "spec.output"),
    ("ftj-bad-source", variant(FTJ, "spec.dataset.source", "ftp"), "spec.dataset.source"),
    ("ftj-bad-format", variant(FTJ, "spec.dataset.format", "csv"), "spec.dataset.format"),
    ("ftj-pvc-dataset-missing", variant(FTJ, "spec.dataset.source", "pvc"), "dataset.pvc is required"),
    ("ftj-configmap-missing", variant(FTJ, "spec.dataset.source", "configMap"), "dataset.configMap is required"),
    ("ftj-inline-empty", variant(FTJ, "spec.dataset.rows", []), "dataset.rows must hold at least one row"),
    ("ftj-qlora-cpu", variant(FTJ, "spec.method", "qlora"), "method qlora needs an NVIDIA GPU"),
    ("ftj-unsloth-cpu", variant(FTJ, "spec.engine", "unsloth"), "engine unsloth runs on NVIDIA GPUs only"),
    ("ftj-rank-zero", variant(FTJ, "spec.lora", {"r": 0}), "spec.lora.r"),
    ("ftj-dropout", variant(FTJ, "spec.lora", {"dropout": 1.5}), "spec.lora.dropout"),
    ("ftj-lr-negative", variant(FTJ, "spec.training", {"learningRate": -1}), "spec.training.learningRate"),
    ("ftj-batch-zero", variant(FTJ, "spec.training", {"batchSize": 0}), "spec.training.batchSize"),
    ("ftj-split", variant(FTJ, "spec.dataset.validationSplit", 0.95), "spec.dataset.validationSplit"),
    ("ftj-output-none", variant(FTJ, "spec.output", {"merge": True}), "output needs a destination"),
    ("ftj-output-both", variant(FTJ, "spec.output.s3", {"uri": "s3://b/p"}), "set only one of output.pvc and output.s3"),
    ("ftj-s3-uri", variant(FTJ, "spec.output", {"s3": {"uri": "http://b"}}), "spec.output.s3.uri"),
    ("ftj-model-pvc", variant(FTJ, "spec.model", {"source": "pvc"}), "model.pvc is required"),
    ("ftj-unknown-field", variant(FTJ, "spec.epochs", 3), "epochs"),
    ("ftj-gpu-negative", variant(FTJ, "spec.resources", {"gpu": -1}), "spec.resources.gpu"),
    ("ftj-memory", variant(FTJ, "spec.resources", {"memory": "lots"}), "spec.resources.memory"),
    ("ftj-gguf-quant", variant(FTJ, "spec.output.gguf", {"enabled": True, "quantization": "q3"}),
     "spec.output.gguf.quantization"),
    # VectorIndex
    ("vix-no-sources", variant(VIX, "spec.sources", []), "spec.sources"),
    ("vix-two-kinds", variant(VIX, "spec.sources.0.configMap", "docs"), "exactly one of pvc, configMap, s3 or inline"),
    ("vix-overlap", variant(VIX, "spec.chunking", {"size": 64, "overlap": 64}),
     "chunking.overlap must be smaller than chunking.size"),
    ("vix-chunk-tiny", variant(VIX, "spec.chunking", {"size": 2}), "spec.chunking.size"),
    ("vix-milvus-no-uri", variant(VIX, "spec.store", {"backend": "milvus"}), "store.uri is required"),
    ("vix-lite-ivfpq", variant(VIX, "spec.store", {"indexType": "IVF_PQ"}),
     "store.indexType is not supported by milvus-lite"),
    ("vix-bf16-onnx", variant(VIX, "spec.embedding", {"backend": "onnx", "precision": "bf16"}),
     "embedding.precision bf16 runs on torch or openvino: set embedding.backend"),
    ("vix-int8-torch", variant(VIX, "spec.embedding", {"precision": "int8"}),
     "embedding.precision int8 runs on onnx: set embedding.backend to onnx"),
    ("vix-precision", variant(VIX, "spec.embedding", {"precision": "fp8"}), "spec.embedding.precision"),
    ("vix-metric", variant(VIX, "spec.store", {"metric": "HAMMING"}), "spec.store.metric"),
    ("vix-cron", variant(VIX, "spec.schedule", "every day"), "schedule must be a 5-field cron expression"),
    ("vix-format", variant(VIX, "spec.formats", ["docx"]), "spec.formats"),
    ("vix-collection-name", variant(VIX, "spec.store", {"collection": "bad-name"}), "spec.store.collection"),
    ("vix-deletion-policy", variant(VIX, "spec.deletionPolicy", "Orphan"), "spec.deletionPolicy"),
    # HybridEndpoint
    ("hep-mode", variant(HEP, "spec.mode", "chat"), "spec.mode"),
    ("hep-rag-no-index", variant(variant(HEP, "spec.mode", "rag"), "spec.retrieval", None, delete=True),
     "mode rag and hybrid retrieve: set retrieval.vectorIndexRef.name"),
    ("hep-hybrid-no-adapter", variant(HEP, "spec.model", {"name": "m"}),
     "mode finetuned and hybrid serve an adapter"),
    ("hep-adapter-both", variant(HEP, "spec.model.adapter.uri", "s3://b/a"),
     "model.adapter sets exactly one of fineTuneJobRef"),
    ("hep-topk", variant(HEP, "spec.retrieval.topK", 0), "spec.retrieval.topK"),
    ("hep-threshold", variant(HEP, "spec.retrieval.scoreThreshold", 3), "spec.retrieval.scoreThreshold"),
    ("hep-gpu-util", variant(HEP, "spec.engine", {"gpuMemoryUtilization": 1.5}), "spec.engine.gpuMemoryUtilization"),
    ("hep-autoscaling", variant(HEP, "spec.autoscaling", {"minReplicas": 3, "maxReplicas": 2}),
     "autoscaling.minReplicas must be <= autoscaling.maxReplicas"),
    ("hep-runtime", variant(HEP, "spec.runtime", "knative"), "spec.runtime"),
    ("hep-query-bf16-onnx", variant(HEP, "spec.retrieval.queryPrecision", "bf16"),
     "retrieval.queryPrecision bf16 runs on torch or openvino: set retrieval.queryBackend"),
    ("hep-query-int8-openvino", variant(variant(HEP, "spec.retrieval.queryPrecision", "int8"),
                                        "spec.retrieval.queryBackend", "openvino"),
     "retrieval.queryPrecision int8 runs on onnx: set retrieval.queryBackend to onnx"),
    ("hep-port", variant(HEP, "spec.port", 80), "spec.port"),
]


def test_there_are_at_least_25_refusals():
    assert len(INVALID) >= 25


@pytest.mark.parametrize("name,obj,expected", INVALID, ids=[i[0] for i in INVALID])
def test_invalid_object_is_refused_naming_the_field(kube, crds, namespace, name, obj, expected):
    obj = copy.deepcopy(obj)
    obj["metadata"]["name"] = name
    result = kube.apply(obj, namespace, check=False)
    assert result.returncode != 0, f"{name} was accepted"
    assert expected in result.stderr, result.stderr
    assert kube.get(API, obj["kind"], name, namespace) is None


@pytest.mark.parametrize("obj", [FTJ, VIX, HEP], ids=["FineTuneJob", "VectorIndex", "HybridEndpoint"])
def test_the_valid_base_objects_are_accepted_with_defaults(kube, crds, namespace, obj):
    kube.apply(obj, namespace)
    stored = kube.get(API, obj["kind"], "x", namespace)
    assert stored is not None
    if obj["kind"] == "FineTuneJob":
        assert stored["spec"]["lora"] == {"r": 16, "alpha": 32, "dropout": 0.05, "targetModules": ["all-linear"]}
        assert stored["spec"]["training"]["learningRate"] == 0.0001
        assert stored["spec"]["training"]["gradientAccumulationSteps"] == 8
    elif obj["kind"] == "VectorIndex":
        assert stored["spec"]["embedding"]["model"] == "BAAI/bge-small-en-v1.5"
        assert stored["spec"]["store"]["backend"] == "milvus-lite"
    else:
        assert stored["spec"]["engine"]["name"] == "auto"
        assert stored["spec"]["retrieval"]["topK"] == 4


@pytest.mark.parametrize("schedule", ["0 3 * * *", "@daily", "@hourly"])
def test_a_schedule_is_a_cron_expression_or_a_macro_as_cronjobs_take_it(kube, crds, namespace, schedule):
    result = kube.apply(variant(VIX, "spec.schedule", schedule), namespace, check=False)
    assert result.returncode == 0, result.stderr


def test_a_started_finetunejob_is_immutable(kube, crds, namespace):
    kube.apply(FTJ, namespace)
    changed = variant(FTJ, "spec.training", {"epochs": 5})
    result = kube.apply(changed, namespace, check=False)
    assert result.returncode != 0
    assert "spec is immutable (a FineTuneJob is one training run)" in result.stderr
