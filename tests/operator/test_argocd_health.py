"""examples/argocd/health.lua, the Argo CD health check for ragtune's kinds, run as Argo CD runs it (gopher-lua,
built from tests/argocd/luahealth) on the objects the operator reports on: a promotion in Git is Progressing until
the endpoint serves the new adapter, then Healthy; a failed FineTuneJob is Degraded. And kstatus' Reconciling and
Stalled conditions (Flux, kpt, Config Sync) say the same."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from ragtune_objects import (API, bound_pvc, endpoint, finetunejob, finish_finetune, ready_references, status,
                             wait_ready)

pytestmark = pytest.mark.usefixtures("ragtune_operator")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "argocd" / "health.lua"


@pytest.fixture(scope="module")
def luahealth(tmp_path_factory) -> Path:
    binary = tmp_path_factory.mktemp("luahealth") / "luahealth"
    result = subprocess.run(["go", "build", "-o", str(binary), "."], cwd=ROOT / "tests" / "argocd" / "luahealth",
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return binary


def health(luahealth: Path, obj: dict) -> dict:
    result = subprocess.run([str(luahealth), str(SCRIPT)], input=json.dumps(obj) + "\n", capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_a_promotion_is_progressing_until_the_new_adapter_serves(kube, namespace, luahealth):
    assert health(luahealth, {"kind": "HybridEndpoint", "metadata": {"generation": 1}})["status"] == "Progressing"
    ready_references(kube, namespace, "ft-v1", "sha256:" + "1" * 64)
    assert health(luahealth, kube.get(API, "FineTuneJob", "ft-v1", namespace))["status"] == "Healthy"
    assert health(luahealth, kube.get(API, "VectorIndex", "docs", namespace))["status"] == "Healthy"
    kube.apply(endpoint("chat", adapter="ft-v1", index="docs"), namespace)
    served = wait_ready(kube, "HybridEndpoint", "chat", namespace, timeout=90)
    assert health(luahealth, served) == {"status": "Healthy", "message": "1/1 replicas ready"}
    assert not {x["type"] for x in served["status"]["conditions"]} & {"Reconciling", "Stalled"}

    # the Git change: a new FineTuneJob and the endpoint's reference to it
    kube.apply(finetunejob("ft-v2"), namespace)
    kube.apply(endpoint("chat", adapter="ft-v2", index="docs"), namespace)
    training = health(luahealth, kube.get(API, "FineTuneJob", "ft-v2", namespace))
    assert training["status"] == "Progressing", training
    waiting = kube.wait_for(lambda: (lambda o: o if "ft-v2" in health(luahealth, o)["message"] else None)(
        kube.get(API, "HybridEndpoint", "chat", namespace)), "the endpoint to wait for ft-v2")
    assert health(luahealth, waiting)["status"] == "Progressing"
    assert kube.condition(waiting, "Reconciling")["reason"] == "WaitingForFineTuneJob"
    assert kube.condition(waiting, "Ready")["status"] == "True"  # it serves ft-v1 meanwhile

    finish_finetune(kube, namespace, "ft-v2", "sha256:" + "2" * 64)
    promoted = kube.wait_for(lambda: (lambda o: o if health(luahealth, o)["status"] == "Healthy" else None)(
        kube.get(API, "HybridEndpoint", "chat", namespace)), "the endpoint to be Healthy again", timeout=90)
    assert promoted["status"]["served"]["adapter"] == "ft-v2"
    # kubectl get -o wide shows what is served
    header, row = kube.kubectl("get", "hybridendpoint", "chat", "-n", namespace, "-o", "wide").stdout.splitlines()
    columns = dict(zip(header.split(), row.split()))
    assert (columns["ADAPTER"], columns["INDEX"]) == ("ft-v2", "v1"), columns
    # and scaled to zero it is Suspended, not missing or broken
    kube.apply(endpoint("chat", adapter="ft-v2", index="docs", replicas=0), namespace)
    kube.wait_for(lambda: health(luahealth, kube.get(API, "HybridEndpoint", "chat", namespace))["status"]
                  == "Suspended", "a scaled-to-zero endpoint to be Suspended")


def test_a_failed_finetunejob_is_degraded_with_the_reason(kube, namespace, luahealth):
    bound_pvc(kube, namespace, "adapters")
    kube.apply(finetunejob("broken", image="kwok.ragtune.io/fail", backoffLimit=0), namespace)
    failed = kube.wait_condition(API, "FineTuneJob", "broken", namespace, "Failed", timeout=60)
    verdict = health(luahealth, failed)
    assert verdict["status"] == "Degraded" and "exit code 1" in verdict["message"]
    stalled = kube.condition(failed, "Stalled") or kube.condition(
        kube.wait_condition(API, "FineTuneJob", "broken", namespace, "Stalled"), "Stalled")
    assert (stalled["status"], stalled["reason"]) == ("True", "BackoffLimitExceeded")
    assert kube.condition(failed, "Reconciling") is None
    assert status(kube, "FineTuneJob", "broken", namespace)["phase"] == "Failed"
