"""The operator as a process: crash-safe reconciliation, metrics, health."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from ragtune_objects import API, bound_pvc, finetunejob

COUNT = 50


def test_killed_and_restarted_mid_reconcile_leaves_no_duplicates_and_every_object_correct(
        kube, namespace, ragtune_operator):
    bound_pvc(kube, namespace, "adapters")
    manifests = [finetunejob(f"ft-{i:02d}") for i in range(COUNT)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda m: kube.apply(m, namespace), manifests))

    # Kill the operator as soon as it is part-way through, then bring it back.
    kube.wait_for(lambda: len(kube.list("batch/v1", "Job", namespace)) >= 5, "reconciling to be under way")
    ragtune_operator.kill()
    ragtune_operator.start()

    phases: dict[str, int] = {}

    def settled():
        objs = kube.list(API, "FineTuneJob", namespace)
        phases.clear()
        for o in objs:
            phase = (o.get("status") or {}).get("phase") or "none"
            phases[phase] = phases.get(phase, 0) + 1
        return phases.get("Succeeded") == COUNT and objs
    try:
        objs = kube.wait_for(settled, f"all {COUNT} FineTuneJobs to reach Succeeded", timeout=300)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; phases {phases}; operator log:\n{ragtune_operator.log_tail()}") from None
    jobs = kube.list("batch/v1", "Job", namespace)
    config_maps = [c for c in kube.list("v1", "ConfigMap", namespace) if c["metadata"]["name"].endswith("-config")]
    assert sorted(j["metadata"]["name"] for j in jobs) == sorted(m["metadata"]["name"] for m in manifests)
    assert len(config_maps) == COUNT
    for obj in objs:
        owners = {j["metadata"]["ownerReferences"][0]["uid"] for j in jobs
                  if j["metadata"]["name"] == obj["metadata"]["name"]}
        assert owners == {obj["metadata"]["uid"]}
        assert kube.condition(obj, "Succeeded")["status"] == "True"
        assert obj["status"]["jobName"] == obj["metadata"]["name"]


def test_metrics_count_reconciles_by_kind(ragtune_operator, kube, namespace):
    bound_pvc(kube, namespace, "adapters")
    kube.apply(finetunejob("counted"), namespace)
    kube.wait_for(lambda: kube.get("batch/v1", "Job", "counted", namespace), "the Job")

    def counted():
        text = ragtune_operator.metrics()
        return text if 'ragtune_reconciles_total{kind="FineTuneJob",result="success"}' in text else None
    text = kube.wait_for(counted, "the reconcile counter")
    assert "ragtune_reconcile_duration_seconds_bucket" in text


def test_health_probe_answers(ragtune_operator):
    started = time.monotonic()
    assert ragtune_operator.healthy()
    assert time.monotonic() - started < 2
