"""The pydantic models are the source of truth: defaults, CRD rendering, drift check."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from typing import get_args

from ragtune import conditions as c
from ragtune.api.base import EMBEDDING_PRECISIONS
from ragtune.api.crdgen import CONDITION_REASON_PATTERN, CONDITION_TYPE_PATTERN, KINDS, crd, render_all
from ragtune.api.finetunejob import FineTuneJobSpec
from ragtune.api.hybridendpoint import DEFAULT_RAG_SYSTEM_PROMPT, HybridEndpointSpec, RetrievalSpec
from ragtune.api.vectorindex import EmbeddingSpec
from ragtune.manifests import ROOT


def walk(schema: dict):
    yield schema
    for prop in (schema.get("properties") or {}).values():
        yield from walk(prop)
    if isinstance(schema.get("items"), dict):
        yield from walk(schema["items"])
    if isinstance(schema.get("additionalProperties"), dict):
        yield from walk(schema["additionalProperties"])


def test_generated_schemas_are_structural():
    for kind in KINDS:
        schema = crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        for node in walk(schema):
            assert not {"$ref", "anyOf", "oneOf", "allOf", "$defs"} & set(node), node
            assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), node


def test_crds_carry_short_names_category_status_and_printer_columns():
    shorts = {k.kind: crd(k)["spec"]["names"]["shortNames"] for k in KINDS}
    assert shorts == {"FineTuneJob": ["ftj"], "VectorIndex": ["vix"], "HybridEndpoint": ["hep"]}
    for kind in KINDS:
        rendered = crd(kind)
        version = rendered["spec"]["versions"][0]
        assert rendered["spec"]["names"]["categories"] == ["ragtune"]
        # a HybridEndpoint scales (kubectl scale, an HPA, KEDA): replicas, and the serving pods' selector
        assert version["subresources"] == ({"status": {}, "scale": {
            "specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.selector"}} if kind.kind == "HybridEndpoint" else {"status": {}})
        columns = [col["name"] for col in version["additionalPrinterColumns"]]
        assert columns[:2] == ["Ready", "Reason"] and columns[-1] == "Age"
        conditions = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["conditions"]
        assert (conditions["x-kubernetes-list-type"], conditions["x-kubernetes-list-map-keys"]) == ("map", ["type"])
        # each item as metav1.Condition: every field but observedGeneration required, type and reason patterned
        assert set(conditions["items"]["required"]) == {"type", "status", "lastTransitionTime", "reason", "message"}
        assert conditions["items"]["properties"]["reason"]["pattern"] == CONDITION_REASON_PATTERN
        assert conditions["items"]["properties"]["lastTransitionTime"]["format"] == "date-time"


def test_finetune_defaults_are_the_seed_recipe():
    spec = FineTuneJobSpec.model_validate({"dataset": {"source": "inline", "rows": [{"a": 1}]},
                                           "output": {"pvc": {"claimName": "x"}}})
    assert (spec.lora.r, spec.lora.alpha, spec.lora.dropout, spec.lora.target_modules) == (16, 32, 0.05,
                                                                                            ["all-linear"])
    t = spec.training
    assert (t.learning_rate, t.epochs, t.batch_size, t.gradient_accumulation_steps) == (1e-4, 2, 2, 8)


def test_crd_defaults_match_the_model_defaults():
    ftj = yaml.safe_load(render_all()["ragtune.io_finetunejobs.yaml"])
    spec_schema = ftj["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec_schema["properties"]["lora"]["default"] == {"r": 16, "alpha": 32, "dropout": 0.05,
                                                            "targetModules": ["all-linear"]}


def test_embedding_runtimes_and_precisions_come_from_one_table():
    precisions = {p for runs in EMBEDDING_PRECISIONS.values() for p in runs}
    for model, backend, precision in [(EmbeddingSpec, "backend", "precision"),
                                      (RetrievalSpec, "query_backend", "query_precision")]:
        assert set(get_args(model.model_fields[backend].annotation)) == set(EMBEDDING_PRECISIONS)
        assert set(get_args(model.model_fields[precision].annotation)) == precisions
        rules = model.model_config["json_schema_extra"]["x-kubernetes-validations"]
        refused = [r for r in rules if " runs on " in r["message"]]
        assert len(refused) == sum(1 for p in precisions if not all(p in r for r in EMBEDDING_PRECISIONS.values()))


def test_rag_prompt_tells_the_model_to_use_only_the_context():
    assert "ONLY the context" in DEFAULT_RAG_SYSTEM_PROMPT and "don't know" in DEFAULT_RAG_SYSTEM_PROMPT
    assert HybridEndpointSpec.model_validate({"mode": "rag", "retrieval": {"vectorIndexRef": {"name": "d"}}}
                                             ).prompt.template.count("{context}") == 1


def test_generated_files_are_in_sync_with_the_models():
    result = subprocess.run([sys.executable, "-m", "ragtune.manifests", "verify"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_conditions_keep_transition_time_until_status_flips():
    first = c.merge_conditions([], [c.condition(c.READY, False, c.PENDING, "x")], 1)
    first[0]["lastTransitionTime"] = "2020-01-01T00:00:00Z"
    same = c.merge_conditions(first, [c.condition(c.READY, False, c.JOB_RUNNING, "y")], 2)
    flipped = c.merge_conditions(same, [c.condition(c.READY, True, c.JOB_SUCCEEDED, "z")], 2)
    assert same[0]["lastTransitionTime"] == "2020-01-01T00:00:00Z" and same[0]["observedGeneration"] == 2
    assert flipped[0]["lastTransitionTime"] != "2020-01-01T00:00:00Z"
    assert [t["type"] for t in c.transitions(same, flipped)] == [c.READY]


def test_every_condition_ragtune_writes_passes_the_crds_condition_rules():
    import re

    constants = {name: value for name, value in vars(c).items() if name.isupper() and isinstance(value, str)}
    types = [constants[n] for n in ("READY", "PROGRESSING", "SUCCEEDED", "FAILED", "PROMOTABLE", "INDEXED",
                                    "REFERENCES_READY", "AVAILABLE", "RECONCILING", "STALLED")]
    reasons = [v for n, v in constants.items() if v not in types] + ["Indexing"]
    assert all(re.match(CONDITION_TYPE_PATTERN, t) for t in types)
    assert [r for r in reasons if not re.match(CONDITION_REASON_PATTERN, r)] == []
    # a message past metav1.Condition's limit is cut, not refused with the whole status write
    long = c.condition(c.FAILED, True, c.JOB_FAILED, "x" * 40000)
    assert len(long["message"]) == c.MESSAGE_LIMIT and long["message"].endswith("…")
    # a condition an older release wrote without message or lastTransitionTime is completed when kept
    kept = c.merge_conditions([{"type": c.INDEXED, "status": "True", "reason": "Indexed"}],
                              [c.condition(c.READY, True, c.JOB_SUCCEEDED, "done")], 1)
    assert all({"message", "lastTransitionTime"} <= set(cond) for cond in kept)


@pytest.mark.parametrize("ready,progressing,failed,expected", [
    (("True", c.JOB_SUCCEEDED), ("False", c.JOB_SUCCEEDED), ("False", c.JOB_SUCCEEDED), None),  # done: neither
    (("False", c.JOB_RUNNING), ("True", c.JOB_RUNNING), ("False", c.JOB_RUNNING), (c.RECONCILING, c.JOB_RUNNING)),
    (("False", c.BACKOFF_LIMIT_EXCEEDED), ("False", c.BACKOFF_LIMIT_EXCEEDED), ("True", c.BACKOFF_LIMIT_EXCEEDED),
     (c.STALLED, c.BACKOFF_LIMIT_EXCEEDED)),
    # an index serving its last version after a failed run: Stalled, as Argo CD's check says Degraded
    (("True", c.JOB_FAILED), ("False", c.JOB_FAILED), ("True", c.JOB_FAILED), (c.STALLED, c.JOB_FAILED)),
    # an endpoint whose reference is missing: not Ready, not progressing
    (("False", c.REFERENCE_NOT_FOUND), ("False", c.REFERENCE_NOT_FOUND), None, (c.STALLED, c.REFERENCE_NOT_FOUND)),
    # an endpoint serving while it waits for a new adapter
    (("True", c.DEPLOYED), ("True", c.WAITING_FOR_FINE_TUNE_JOB), None, (c.RECONCILING, c.WAITING_FOR_FINE_TUNE_JOB)),
])
def test_kstatus_conditions_follow_ready_progressing_and_failed(ready, progressing, failed, expected):
    desired = [c.condition(c.READY, ready[0] == "True", ready[1], "r"),
               c.condition(c.PROGRESSING, progressing[0] == "True", progressing[1], "p")]
    if failed:
        desired.append(c.condition(c.FAILED, failed[0] == "True", failed[1], "f"))
    conditions = c.with_kstatus(c.merge_conditions([], desired, 3), 3)
    found = [(x["type"], x["reason"]) for x in conditions if x["type"] in c.KSTATUS]
    assert found == ([expected] if expected else [])
    assert all(x["status"] == "True" and x["observedGeneration"] == 3 for x in conditions if x["type"] in c.KSTATUS)


def test_kstatus_conditions_go_once_settled_and_keep_their_transition_time_meanwhile():
    running = [c.condition(c.READY, False, c.JOB_RUNNING, "x"), c.condition(c.PROGRESSING, True, c.JOB_RUNNING, "x")]
    first = c.with_kstatus(c.merge_conditions([], running, 1), 1)
    next(x for x in first if x["type"] == c.RECONCILING)["lastTransitionTime"] = "2020-01-01T00:00:00Z"
    again = c.with_kstatus(c.merge_conditions(first, running, 1), 1)
    assert next(x for x in again if x["type"] == c.RECONCILING)["lastTransitionTime"] == "2020-01-01T00:00:00Z"
    done = [c.condition(c.READY, True, c.JOB_SUCCEEDED, "y"), c.condition(c.PROGRESSING, False, c.JOB_SUCCEEDED, "y")]
    assert not {x["type"] for x in c.with_kstatus(c.merge_conditions(again, done, 1), 1)} & set(c.KSTATUS)


def test_every_spec_field_is_documented_for_kubectl_explain():
    undocumented = []

    def walk(node: dict, path: str) -> None:
        for name, prop in (node.get("properties") or {}).items():
            if not prop.get("description"):
                undocumented.append(f"{path}.{name}")
            walk(prop, f"{path}.{name}")
            walk(prop.get("items") or {}, f"{path}.{name}[]")

    for kind in KINDS:
        walk(crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"], kind.kind)
    assert undocumented == []
