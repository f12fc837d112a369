"""Operator benchmark: N FineTuneJobs against the local control plane, against writing the same Jobs directly.

    python bench/operator.py [--count 500] [--quick]

Prints one JSON object. Latency is apply → Job-created as seen by a watch; the baseline writes the ConfigMap and
Job that ragtune would create straight through the API, with the same client concurrency, in the same run.
"""

from __future__ import annotations

import sys

# This file is named like the standard library's `operator`; keep its folder off the import path.
sys.path[:] = [p for p in sys.path if p not in ("", __file__.rsplit("/", 1)[0])]

import argparse  # noqa: E402
import json  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "hack"), str(ROOT / "tests"), str(ROOT / "operator")]

import localcluster  # noqa: E402
import psutil  # noqa: E402
from kube import Kube  # noqa: E402
from kubernetes import client, watch  # noqa: E402
from operator_process import OperatorProcess  # noqa: E402

from ragtune.api.finetunejob import FineTuneJobSpec  # noqa: E402
from ragtune.builders import finetune  # noqa: E402

CLIENT_THREADS = 1  # as a GitOps sync or `kubectl apply` writes them; --clients raises it for a burst


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def manifest(name: str) -> dict:
    return {"apiVersion": "ragtune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name},
            "spec": {"model": {"name": "base/tiny"},
                     "dataset": {"source": "inline", "rows": [{"instruction": "2+2?", "output": "4"}]},
                     "output": {"pvc": {"claimName": "adapters", "path": name}}}}


class JobWatcher(threading.Thread):
    """Records when each Job first appears, from a watch on the namespace."""

    def __init__(self, api_client, namespace: str):
        super().__init__(daemon=True)
        self.batch = client.BatchV1Api(api_client)
        self.namespace = namespace
        self.seen: dict[str, float] = {}
        self.ready = threading.Event()
        self._stop = False

    def run(self):
        w = watch.Watch()
        rv = self.batch.list_namespaced_job(self.namespace).metadata.resource_version
        self.ready.set()
        while not self._stop:
            for event in w.stream(self.batch.list_namespaced_job, self.namespace, resource_version=rv,
                                  timeout_seconds=5):
                name = event["object"].metadata.name
                rv = event["object"].metadata.resource_version
                self.seen.setdefault(name, time.perf_counter())
                if self._stop:
                    break

    def stop(self):
        self._stop = True


def run_ragtune(kube: Kube, operator: OperatorProcess, count: int) -> dict:
    namespace = kube.create_namespace("bench-ragtune")
    watcher = JobWatcher(kube.api_client, namespace)
    watcher.start()
    watcher.ready.wait()
    custom = client.CustomObjectsApi(kube.api_client)
    applied: dict[str, float] = {}
    peak_rss = 0
    proc = psutil.Process(operator.proc.pid)
    names = [f"ft-{i:04d}" for i in range(count)]

    def create(name: str):
        custom.create_namespaced_custom_object("ragtune.io", "v1alpha1", namespace, "finetunejobs", manifest(name))
        applied[name] = time.perf_counter()

    started = time.perf_counter()
    with ThreadPoolExecutor(CLIENT_THREADS) as pool:
        futures = [pool.submit(create, n) for n in names]
        while not all(f.done() for f in futures):
            peak_rss = max(peak_rss, proc.memory_info().rss)
            time.sleep(0.05)
        for f in futures:
            f.result()

    def all_reconciled() -> bool:
        nonlocal peak_rss
        peak_rss = max(peak_rss, proc.memory_info().rss)
        if len(watcher.seen) < count:
            return False
        items = custom.list_namespaced_custom_object("ragtune.io", "v1alpha1", namespace, "finetunejobs")["items"]
        return sum(1 for o in items if (o.get("status") or {}).get("jobName")) == count
    kube.wait_for(all_reconciled, f"{count} FineTuneJobs reconciled", timeout=600, interval=0.1)
    total = time.perf_counter() - started
    watcher.stop()
    latencies = [max(0.0, watcher.seen[n] - applied[n]) for n in names]
    kube.delete_namespace(namespace)
    return {"latencies": latencies, "total": total, "peak_rss": peak_rss,
            "handler_mean_ms": handler_mean_ms(operator.metrics(), "FineTuneJob")}


def handler_mean_ms(metrics: str, kind: str) -> float | None:
    """Mean time inside ragtune's create handler, from the operator's own histogram: the rest of the latency
    is the framework's event handling and queueing."""
    values = {}
    for line in metrics.splitlines():
        for suffix in ("sum", "count"):
            if line.startswith(f"ragtune_reconcile_duration_seconds_{suffix}{{kind=\"{kind}\"}}"):
                values[suffix] = float(line.rsplit(" ", 1)[1])
    if not values.get("count"):
        return None
    return round(1000 * values["sum"] / values["count"], 2)


def run_direct(kube: Kube, count: int) -> dict:
    namespace = kube.create_namespace("bench-direct")
    watcher = JobWatcher(kube.api_client, namespace)
    watcher.start()
    watcher.ready.wait()
    core, batch = client.CoreV1Api(kube.api_client), client.BatchV1Api(kube.api_client)
    spec = FineTuneJobSpec.model_validate(manifest("x")["spec"])
    applied: dict[str, float] = {}
    names = [f"ft-{i:04d}" for i in range(count)]

    def create(name: str):
        body = {"kind": "FineTuneJob", "metadata": {"name": name, "namespace": namespace, "uid": str(uuid.uuid4())}}
        config_map, job = finetune.build(body, spec)
        job["spec"]["template"]["spec"]["serviceAccountName"] = "default"
        t0 = time.perf_counter()
        core.create_namespaced_config_map(namespace, config_map)
        batch.create_namespaced_job(namespace, job)
        applied[name] = t0

    started = time.perf_counter()
    with ThreadPoolExecutor(CLIENT_THREADS) as pool:
        list(pool.map(create, names))
    kube.wait_for(lambda: len(watcher.seen) >= count, f"{count} direct Jobs", timeout=600, interval=0.1)
    total = time.perf_counter() - started
    watcher.stop()
    latencies = [max(0.0, watcher.seen[n] - applied[n]) for n in names]
    kube.delete_namespace(namespace)
    return {"latencies": latencies, "total": total}


def target(name: str, value: float, goal: float, lower_is_better: bool = True) -> dict:
    met = value <= goal if lower_is_better else value >= goal
    return {"name": name, "value": round(value, 4), "target": goal, "met": bool(met)}


def main() -> int:
    global CLIENT_THREADS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--quick", action="store_true", help="100 objects; well under a minute")
    parser.add_argument("--clients", type=int, default=CLIENT_THREADS,
                        help="concurrent writers (1: one object after another, like a GitOps sync)")
    args = parser.parse_args()
    CLIENT_THREADS = args.clients
    count = 100 if args.quick else args.count

    started_cluster = not localcluster.is_up()
    kubeconfig = localcluster.up(quiet=True)
    kube = Kube(kubeconfig, localcluster.binaries_dir() / "kubectl")
    kube.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    log_dir = Path("/tmp/ragtune-bench")
    log_dir.mkdir(exist_ok=True)
    operator = OperatorProcess(kubeconfig, log_dir)
    operator.start()
    try:
        direct = run_direct(kube, count)
        ragtune = run_ragtune(kube, operator, count)
    finally:
        operator.stop()
        if started_cluster:
            localcluster.down(quiet=True)

    p50, p99 = percentile(ragtune["latencies"], 50) * 1000, percentile(ragtune["latencies"], 99) * 1000
    base_p50 = percentile(direct["latencies"], 50) * 1000
    scaled_total_limit = 30.0 * count / 500
    result = {
        "benchmark": "operator",
        "count": count,
        "clients": CLIENT_THREADS,
        "ragtune": {"apply_to_job_p50_ms": round(p50, 2), "apply_to_job_p99_ms": round(p99, 2),
                    "all_reconciled_s": round(ragtune["total"], 2),
                    "create_handler_mean_ms": ragtune["handler_mean_ms"],
                    "operator_peak_rss_mb": round(ragtune["peak_rss"] / 2**20, 1)},
        "direct_api_baseline": {"create_to_job_p50_ms": round(base_p50, 2),
                                "create_to_job_p99_ms": round(percentile(direct["latencies"], 99) * 1000, 2),
                                "all_created_s": round(direct["total"], 2)},
        "ratios": {"total_time_vs_direct": round(ragtune["total"] / direct["total"], 2),
                   "p50_vs_direct": round(p50 / max(base_p50, 1e-6), 2)},
        "targets": [
            target("apply_to_job_p50_ms", p50, 50.0),
            target(f"all_{count}_reconciled_s", ragtune["total"], scaled_total_limit),
            target("operator_peak_rss_mb", ragtune["peak_rss"] / 2**20, 150.0),
        ],
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
