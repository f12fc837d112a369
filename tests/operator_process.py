"""The ragtune operator as a real subprocess against the test cluster, as `make run` starts it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class OperatorProcess:
    def __init__(self, kubeconfig: Path, log_dir: Path, standalone: bool = True,
                 env: dict[str, str] | None = None, name: str = "operator"):
        self.kubeconfig = kubeconfig
        self.log_dir = log_dir
        self.standalone = standalone
        self.extra_env = env or {}
        self.name = name
        self.proc: subprocess.Popen | None = None
        self.metrics_port = free_port()
        self.liveness_port = free_port()
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}-{self.starts}.log"

    def start(self, timeout: float = 60) -> None:
        assert self.proc is None or self.proc.poll() is not None, "operator already running"
        self.starts += 1
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "RAGTUNE_METRICS_PORT": str(self.metrics_port),
               "RAGTUNE_METRICS_ADDR": "127.0.0.1",
               "PYTHONPATH": f"{ROOT / 'operator'}{os.pathsep}{ROOT / 'workloads'}", **self.extra_env}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ragtune", "run", *(["--standalone"] if self.standalone else []),
             "--liveness", f"http://127.0.0.1:{self.liveness_port}/healthz"],
            env=env, stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"operator exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.healthy():
                return
            time.sleep(0.2)
        raise RuntimeError(f"operator not healthy within {timeout}s:\n{self.log_tail()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.liveness_port}/healthz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def log_since(self, offset: int, lines: int = 300) -> str:
        """The log written after `offset` (its last `lines` lines): what the operator did during one test."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(offset if offset <= self.log_size() else 0)
                return "\n".join(log.read().decode(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
