"""The operator as a process: crash-safe reconciliation, metrics, health."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from ragtune_objects import API, adapter_result, bound_pvc, finetunejob, report_result

COUNT = 50


def test_killed_and_restarted_mid_reconcile_leaves_no_duplicates_and_every_object_correct(
        kube, namespace, ragtune_operator):
    bound_pvc(kube, namespace, "adapters")
    manifests = [finetunejob(f"ft-{i:02d}") for i in range(COUNT)]
    # Kill the operator as soon as it is part-way through, while objects are still arriving, then bring it back.
    with ThreadPoolExecutor(4) as pool:
        applied = [pool.submit(kube.apply, m, namespace) for m in manifests]
        kube.wait_for(lambda: len(kube.list("batch/v1", "Job", namespace)) >= 5, "reconciling to be under way",
                      interval=0.05)
        ragtune_operator.kill()
        under_way = len(kube.list("batch/v1", "Job", namespace))
        for done in applied:
            done.result()
    ragtune_operator.start()
    assert under_way < COUNT, "the operator had finished before it was killed: nothing was tested"

    def finish(name: str) -> None:  # each run's workload reports its adapter, as a real one does
        kube.wait_condition("batch/v1", "Job", name, namespace, "Complete", timeout=300)
        report_result(kube, namespace, name, adapter_result(name, "sha256:" + "e" * 64))
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(finish, [m["metadata"]["name"] for m in manifests]))

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
