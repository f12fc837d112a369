"""The hybrid stack on kind, checked the way a user would: the chart's operator turns the samples into real pods that
train, index and serve; the endpoint answers through its Service with sources; a changed document is re-indexed
incrementally; a new adapter rolls out with no failed request; deleting the resources removes what they made.

The tests run in file order and build on each other (one namespace per module), as a user's session would.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

import stack

# Long waits are bounded inside the tests (each names what it waited for); this only stops a hung session.
pytestmark = pytest.mark.timeout(3600)

DOCS = sorted(p.name for p in (stack.ROOT / "examples" / "docs").glob("*.md"))
# A document is named by its source (the claim "docs") and its path there.
DOC_IDS = {f"docs/{name}" for name in DOCS}
QUESTION = "How does a GitOps pipeline promote a new adapter without failed requests?"


@pytest.mark.parametrize("sample, field, message", [
    ("finetunejob-pvc-without-claim.yaml", "spec.model", "model.pvc is required when model.source is pvc"),
    ("vectorindex-overlap.yaml", "spec.chunking", "chunking.overlap must be smaller than chunking.size"),
    ("hybridendpoint-finetuned-without-adapter.yaml", "spec.model", "mode finetuned and hybrid serve an adapter"),
])
def test_invalid_samples_are_refused_at_apply(kind, namespace, sample, field, message):
    result = kind.kubectl_result("apply", "-n", namespace, "-f", str(stack.SAMPLES / "invalid" / sample))
    assert result.returncode != 0, f"{sample} was accepted"
    assert field in result.stderr and message in result.stderr, result.stderr
    assert kind.list("ragtune", namespace) == []


def test_finetunejob_trains_and_reports_the_adapter_digest(kind, namespace):
    from ragtune_workloads.finetune.artifacts import tree_digest

    kind.apply(stack.sample("finetunejob.yaml", namespace))
    job = stack.wait_ready(kind, "finetunejob", "faq-v1", namespace, timeout=900)
    status = stack.status(job)
    assert status["phase"] == "Succeeded"
    progress = status["progress"]
    assert progress["step"] == progress["totalSteps"] == 12 and progress["loss"] > 0, progress
    artifact = status["artifact"]
    assert artifact["metrics"]["trainSteps"] == 12 and artifact["metrics"]["trainLoss"] > 0, artifact["metrics"]
    assert artifact["digest"].startswith("sha256:") and artifact["baseModel"] == "ragtune/tiny-llama"
    adapter = stack.DATA / "adapters" / "faq-v1" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file(), sorted(p.name for p in adapter.parent.iterdir())
    assert tree_digest(adapter) == artifact["digest"], "status digest differs from the files on the volume"
    pod = kind.list("pods", namespace, f"job-name={status['jobName']}")[0]
    assert pod["status"]["phase"] == "Succeeded"
    assert "adapter" in kind.kubectl("logs", "-n", namespace, pod["metadata"]["name"]).lower()


def test_vectorindex_indexes_the_documents(kind, namespace):
    kind.apply(stack.sample("vectorindex.yaml", namespace))
    index = stack.wait_ready(kind, "vectorindex", "docs", namespace, timeout=900)
    status = stack.status(index)
    assert status["documents"] == len(DOCS), status
    assert status["chunks"] >= len(DOCS) and status["dimension"] == 384
    assert status["activeVersion"] and status["activeCollection"]
    assert kind.get("cronjob", "docs-refresh", namespace), "the schedule has no CronJob"


def test_a_vectorindex_without_a_volume_gets_one_from_the_default_storage_class(kind, namespace):
    index = stack.sample("vectorindex.yaml", namespace)[0]
    index["metadata"]["name"] = "docs-own-store"
    del index["spec"]["store"], index["spec"]["schedule"]
    kind.apply([index])
    status = stack.status(stack.wait_ready(kind, "vectorindex", "docs-own-store", namespace, timeout=900))
    assert status["documents"] == len(DOCS) and status["chunks"] >= len(DOCS), status
    claims = [c for c in kind.list("persistentvolumeclaims", namespace)
              if c["metadata"]["name"].startswith("docs-own-store")]
    assert len(claims) == 1 and claims[0]["status"]["phase"] == "Bound", claims
    assert claims[0]["spec"]["storageClassName"] == "standard"  # the cluster's default class, not named in the spec
    volume = kind.get("persistentvolume", claims[0]["spec"]["volumeName"])
    assert volume["metadata"]["annotations"]["pv.kubernetes.io/provisioned-by"] == "rancher.io/local-path"
    kind.kubectl("delete", "vectorindex.ragtune.io", "docs-own-store", "-n", namespace, "--wait=true", timeout=300)


def ask(url: str, question: str = QUESTION, timeout: float = 120):
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=timeout, max_retries=0)
    return client.chat.completions.create(model="faq", messages=[{"role": "user", "content": question}],
                                          max_tokens=16)


@pytest.fixture(scope="module")
def endpoint_url(kind, namespace):
    kind.apply(stack.sample("hybridendpoint.yaml", namespace))
    endpoint = stack.wait_ready(kind, "hybridendpoint", "faq", namespace, timeout=900)
    assert stack.status(endpoint)["served"]["adapter"] == "faq-v1"
    return stack.node_port_url(kind, "faq", namespace)


@pytest.mark.serving
def test_endpoint_answers_with_sources_through_its_service(kind, namespace, endpoint_url):
    response = ask(endpoint_url)
    assert isinstance(response.choices[0].message.content, str) and response.choices[0].message.content
    assert response.usage.completion_tokens > 0
    sources = (response.model_extra or {}).get("sources") or []
    assert sources, response
    assert {s["document"] for s in sources} <= DOC_IDS, sources


@pytest.mark.serving
def test_a_changed_document_is_reindexed_incrementally(kind, namespace, endpoint_url):
    before = stack.status(kind.get("vectorindex.ragtune.io", "docs", namespace))
    changed = stack.DATA / "docs" / DOCS[0]
    changed.write_text(changed.read_text() + "\n\n## Rollback\n\nPoint the endpoint back at the previous "
                       "FineTuneJob; the old adapter is still on its volume, so the rollback is one apply.\n")
    kind.kubectl("create", "job", "docs-refresh-e2e", "--from=cronjob/docs-refresh", "-n", namespace)

    def refreshed():
        status = stack.status(kind.get("vectorindex.ragtune.io", "docs", namespace))
        done = status.get("lastRunTime") != before.get("lastRunTime") and status.get("phase") == "Succeeded"
        ready = (stack.condition({"status": status}, "Ready") or {}).get("status") == "True"
        return status if done and ready else None

    status = kind.wait_for(refreshed, "the refresh to finish", 600, on_timeout=lambda: kind.describe(namespace))
    progress = status["progress"]
    # only the new section was embedded; the other chunks were kept from the previous version
    assert progress["embedded"] == progress["added"] == 1, progress
    assert progress["kept"] == before["chunks"] and progress["removed"] == 0, progress
    assert set(progress) == {"added", "kept", "removed", "embedded", "skipped"}, progress
    assert status["documents"] == len(DOCS)
    assert status["chunks"] > before["chunks"], (before, status)
    answer = ask(endpoint_url, "How do I roll back an adapter?")
    sources = answer.model_extra["sources"]
    assert any(s["document"] == f"docs/{DOCS[0]}" for s in sources), sources


@pytest.mark.serving
def test_a_new_adapter_rolls_out_with_no_failed_request(kind, namespace, endpoint_url):
    v2 = stack.sample("finetunejob.yaml", namespace)[0]
    v2["metadata"]["name"] = "faq-v2"
    v2["spec"]["output"]["pvc"]["path"] = "faq-v2"
    v2["spec"]["training"]["learningRate"] = 0.003
    kind.apply(v2)
    digest = stack.status(stack.wait_ready(kind, "finetunejob", "faq-v2", namespace, timeout=900))["artifact"]["digest"]

    results: list[str] = []
    stop = threading.Event()

    def client():
        while not stop.is_set():
            try:
                ask(endpoint_url, timeout=60)
                results.append("ok")
            except Exception as exc:  # noqa: BLE001 — every failure is the finding
                results.append(f"{type(exc).__name__}: {exc}")

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    try:
        kind.kubectl("patch", "hybridendpoint.ragtune.io", "faq", "-n", namespace, "--type=merge", "-p",
                     '{"spec": {"model": {"adapter": {"fineTuneJobRef": {"name": "faq-v2"}}}}}')

        def rolled():
            endpoint = kind.get("hybridendpoint.ragtune.io", "faq", namespace)
            served = stack.status(endpoint).get("served") or {}
            pods = [p for p in kind.list("pods", namespace, "ragtune.io/hybridendpoint=faq")
                    if not p["metadata"].get("deletionTimestamp")]
            ready = stack.condition(endpoint, "Ready") or {}
            return served.get("adapterDigest") == digest and len(pods) == 1 and ready.get("status") == "True"

        kind.wait_for(rolled, "the endpoint to serve faq-v2", 900, on_timeout=lambda: kind.describe(namespace))
        time.sleep(10)  # the old pod drains and goes while requests keep coming
    finally:
        stop.set()
        thread.join(90)
    failures = [r for r in results if r != "ok"]
    assert len(results) >= 5 and not failures, f"{len(failures)} of {len(results)} requests failed: {failures[:3]}"


def test_deleting_the_resources_removes_what_they_made(kind, namespace):
    kind.kubectl("delete", "hybridendpoint.ragtune.io,vectorindex.ragtune.io,finetunejob.ragtune.io", "--all",
                 "-n", namespace, "--wait=true", timeout=300)

    def gone():
        left = []
        for kind_name in ("deployments", "jobs", "cronjobs", "services", "configmaps", "pods"):
            left += [f"{kind_name}/{o['metadata']['name']}" for o in
                     kind.list(kind_name, namespace, "app.kubernetes.io/managed-by=ragtune")]
        return not left or None

    kind.wait_for(gone, "ragtune's children to be garbage-collected", 300,
                  on_timeout=lambda: kind.kubectl("get", "all", "-n", namespace, check=False))
    assert Path(stack.DATA / "adapters" / "faq-v1" / "adapter").is_dir(), "the adapter volume keeps its data"
