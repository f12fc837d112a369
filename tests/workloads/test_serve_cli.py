"""`python -m ragtune_workloads.serve`: the Deployment runtime, one pod running Ray Serve, started and stopped the
way Kubernetes does (SIGTERM on rollout)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import serve_fixtures as fx  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
STARTUP_SECONDS = 240


class NeverReady(Exception):
    """The pod did not answer /readyz in time."""


def workload_env(tmp_path: Path, ray_dir: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "operator"), str(ROOT / "workloads")]),
            "HF_HUB_OFFLINE": "1", "RAY_TMPDIR": str(ray_dir),
            "RAGTUNE_TERMINATION_LOG": str(tmp_path / "termination-log")}


def test_a_config_that_cannot_be_served_exits_2_with_the_reason(tmp_path):
    config = tmp_path / "config.json"
    config.write_text('{"owner": {"kind": "HybridEndpoint", "name": "x", "namespace": "n"}, '
                      '"spec": {"mode": "hybrid"}, "modelPath": "/nowhere"}')
    result = subprocess.run([sys.executable, "-m", "ragtune_workloads.serve", "--config", str(config)],
                            env=workload_env(tmp_path, tmp_path / "ray"), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "mode hybrid serves an adapter but the config has none" in result.stderr
    assert (tmp_path / "termination-log").read_text().startswith("mode hybrid serves an adapter")


def test_single_pod_runtime_serves_and_stops_cleanly_on_sigterm(tmp_path):
    httpx = pytest.importorskip("httpx")
    psutil = pytest.importorskip("psutil")
    config = fx.serve_config(tmp_path / "config.json", name="pod", mode="finetuned", model=fx.tiny_model_path(),
                             adapter=fx.adapter_path(), store=None, engine="transformers")
    port = fx.free_port()
    ray_dir = Path(f"/tmp/ragtune-serve-pod-{os.getpid()}")
    process = subprocess.Popen([sys.executable, "-m", "ragtune_workloads.serve", "--config", str(config),
                                "--host", "127.0.0.1", "--port", str(port)],
                               env=workload_env(tmp_path, ray_dir), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    ready = None
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline and process.poll() is None:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
                if ready.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        if ready is None or ready.status_code != 200:
            raise NeverReady
        # Direct ingress: the Ingress replica itself listens on the pod's port, not Ray Serve's proxy.
        listener = next(c.pid for c in psutil.net_connections("tcp")
                        if c.status == psutil.CONN_LISTEN and c.laddr.port == port)
        assert "ServeReplica" in " ".join(psutil.Process(listener).cmdline()), psutil.Process(listener).cmdline()
        # ... at the default priority, not Ray's niceness 15 for workers (below its own services)
        assert psutil.Process(listener).nice() == 0
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120, json={
            "model": "pod", "messages": [{"role": "user", "content": "what is the capital city of france"}],
            "temperature": 0}).json()
        assert answer["choices"][0]["message"]["content"] == fx.ADAPTER_ANSWER
    except NeverReady:
        pass  # reported below, once the pod's output is in
    finally:
        try:  # the main process, if it already exited (a failed start), has no children left to list
            pod_processes = {child.pid: child.create_time()
                             for child in psutil.Process(process.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            pod_processes = {}
        process.send_signal(signal.SIGTERM)
        try:
            output = process.communicate(timeout=120)[0]
        except subprocess.TimeoutExpired:
            process.kill()
            output = process.communicate()[0]
    if ready is None or ready.status_code != 200:  # with what the pod printed, not only that it failed
        raise AssertionError(f"the pod never became ready (exit status {process.returncode}):\n{output[-3000:]}")
    try:
        assert process.returncode == 0, output[-3000:]
        time.sleep(2)
        assert pod_processes, "Ray Serve runs in processes of its own"
        leftovers = fx.still_running(pod_processes) + fx.ray_processes_of(ray_dir)
        assert leftovers == [], "processes outlived the pod's main process"
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
