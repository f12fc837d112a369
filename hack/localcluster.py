#!/usr/bin/env python3
"""A real Kubernetes control plane as local processes on loopback, for ragtune's integration tests.

etcd, kube-apiserver (TLS, RBAC, admission), kube-controller-manager, kube-scheduler and kwok with two fake
nodes (one CPU node, one GPU node advertising nvidia.com/gpu: 2). Binaries come from hack/build-k8s.sh.

    python3 hack/localcluster.py up|down|status|kubeconfig

State (PKI, etcd data, logs, PIDs, kubeconfig) lives in $RAGTUNE_CLUSTER_DIR (default /tmp/ragtune-cluster),
never inside the repository. Standard library only: it runs before any virtualenv exists.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

HACK = Path(__file__).resolve().parent
STATE = Path(os.environ.get("RAGTUNE_CLUSTER_DIR", "/tmp/ragtune-cluster"))
PORT_BASE = int(os.environ.get("RAGTUNE_CLUSTER_PORT_BASE", "36400"))
HOST = "127.0.0.1"
SERVICE_CIDR = "10.0.0.0/24"
START_TIMEOUT = float(os.environ.get("RAGTUNE_CLUSTER_START_TIMEOUT", "120"))


class ClusterError(RuntimeError):
    """Start-up failed; the message says what to do."""


@dataclass(frozen=True)
class Ports:
    etcd: int = PORT_BASE + 79
    etcd_peer: int = PORT_BASE + 81   # +80 is the wheelhouse `make images` serves while tests run
    apiserver: int = PORT_BASE + 43
    controller_manager: int = PORT_BASE + 57
    scheduler: int = PORT_BASE + 59
    kwok: int = PORT_BASE + 47

    def all(self) -> dict[str, int]:
        return dict(self.__dict__)


PORTS = Ports()


def paths() -> dict[str, Path]:
    return {
        "pki": STATE / "pki",
        "logs": STATE / "logs",
        "pids": STATE / "pids",
        "etcd": STATE / "etcd",
        "kubeconfig": STATE / "kubeconfig",
    }


def kubeconfig_path() -> Path:
    return paths()["kubeconfig"]


def server_url() -> str:
    return f"https://{HOST}:{PORTS.apiserver}"


# ---------------------------------------------------------------- binaries


def binaries_dir() -> Path:
    """The cached binaries, building them first when missing (minutes on a cold machine)."""
    override = os.environ.get("RAGTUNE_K8S_BIN")
    if override:
        return Path(override)
    result = subprocess.run(["bash", str(HACK / "build-k8s.sh")], stdout=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise ClusterError("building the control-plane binaries failed (see the output above); "
                           "check that Go >= 1.24 is installed and the Go module proxy is reachable")
    return Path(result.stdout.strip().splitlines()[-1])


def require_binaries(bin_dir: Path) -> dict[str, Path]:
    names = ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok", "kubectl"]
    found = {n: bin_dir / n for n in names}
    missing = [n for n, p in found.items() if not os.access(p, os.X_OK)]
    if missing:
        raise ClusterError(f"missing binaries in {bin_dir}: {', '.join(missing)}; run `bash hack/build-k8s.sh` "
                           "(or unset RAGTUNE_K8S_BIN) and retry")
    return found


# ---------------------------------------------------------------- PKI


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise ClusterError(f"openssl {' '.join(args[:2])} failed: {result.stderr.strip()}")


def make_pki(pki: Path) -> None:
    if shutil.which("openssl") is None:
        raise ClusterError("openssl not found; install it (apt-get install openssl) and retry")
    pki.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "3650", "-subj", "/CN=ragtune-test-ca", cwd=pki)
    sans = ("subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,"
            "DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local")
    _sign(pki, "apiserver", "/CN=kube-apiserver", f"{sans}\nextendedKeyUsage=serverAuth\n")
    _sign(pki, "admin", "/O=system:masters/CN=ragtune-admin", "extendedKeyUsage=clientAuth\n")
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)


def _sign(pki: Path, name: str, subject: str, extensions: str) -> None:
    (pki / f"{name}.ext").write_text(extensions)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", subject, cwd=pki)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", f"{name}.crt", "-days", "3650", "-extfile", f"{name}.ext", cwd=pki)


def write_kubeconfig(pki: Path, target: Path) -> None:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "ragtune-test", "cluster": {
            "server": server_url(), "certificate-authority": str(pki / "ca.crt")}}],
        "users": [{"name": "ragtune-admin", "user": {
            "client-certificate": str(pki / "admin.crt"), "client-key": str(pki / "admin.key")}}],
        "contexts": [{"name": "ragtune-test", "context": {"cluster": "ragtune-test", "user": "ragtune-admin"}}],
        "current-context": "ragtune-test",
    }
    target.write_text(json.dumps(config, indent=2))  # JSON is valid kubeconfig YAML


# ---------------------------------------------------------------- processes


def _pid_file(name: str) -> Path:
    return paths()["pids"] / f"{name}.pid"


def _process_start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def start_process(name: str, argv: list[str]) -> subprocess.Popen:
    log = open(paths()["logs"] / f"{name}.log", "ab")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, cwd=STATE)
    # The start time guards against signalling a recycled PID later.
    _pid_file(name).write_text(f"{proc.pid} {_process_start_time(proc.pid)}\n")
    return proc


def running_pid(name: str) -> int | None:
    try:
        pid_text, started = _pid_file(name).read_text().split()
    except (OSError, ValueError):
        return None
    pid = int(pid_text)
    return pid if _process_start_time(pid) == started else None


def stop_process(name: str, grace: float = 10.0) -> None:
    pid = running_pid(name)
    if pid is not None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and running_pid(name) is not None and _alive(pid):
                time.sleep(0.1)
            if not _alive(pid):
                break
    _pid_file(name).unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def log_tail(name: str, lines: int = 25) -> str:
    try:
        return "\n".join((paths()["logs"] / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ---------------------------------------------------------------- health


def _tls_context(pki: Path, client_cert: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    if client_cert:
        ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    return ctx


def _insecure_context() -> ssl.SSLContext:
    # kube-controller-manager and kube-scheduler serve health on self-signed certificates of their own.
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def probe(url: str, context: ssl.SSLContext | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ssl.SSLError):
        return False


def wait_healthy(name: str, proc: subprocess.Popen, url: str, context: ssl.SSLContext | None = None) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ClusterError(f"{name} exited with code {proc.returncode} during start-up; its log "
                               f"({paths()['logs'] / (name + '.log')}) ends with:\n{log_tail(name)}")
        if probe(url, context):
            return
        time.sleep(0.1)
    raise ClusterError(f"{name} did not become healthy at {url} within {START_TIMEOUT:.0f}s; its log ends with:\n"
                       f"{log_tail(name)}")


def check_ports_free() -> None:
    taken = []
    for component, port in PORTS.all().items():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((HOST, port))
            except OSError:
                taken.append(f"{component}:{port}")
    if taken:
        raise ClusterError(f"ports already in use on {HOST}: {', '.join(taken)}; stop what holds them "
                           "(`make cluster-down` if it is an old test cluster) or choose other ports with "
                           "RAGTUNE_CLUSTER_PORT_BASE")


def is_up() -> bool:
    pki = paths()["pki"]
    if running_pid("kube-apiserver") is None or not (pki / "ca.crt").exists():
        return False
    return probe(f"{server_url()}/readyz", _tls_context(pki, client_cert=True))


# ---------------------------------------------------------------- up / down

NODES = """
apiVersion: v1
kind: List
items:
{items}
"""

NODE = """
- apiVersion: v1
  kind: Node
  metadata:
    name: {name}
    annotations:
      node.alpha.kubernetes.io/ttl: "0"
      kwok.x-k8s.io/node: fake
    labels:
      kubernetes.io/hostname: {name}
      kubernetes.io/os: linux
      kubernetes.io/arch: amd64
      kubernetes.io/role: agent
      node-role.kubernetes.io/agent: ""
      type: kwok
      {extra_labels}
  spec: {{{taints}}}
  status:
    allocatable: {{cpu: "32", memory: 256Gi, pods: "500"{gpu}}}
    capacity: {{cpu: "32", memory: 256Gi, pods: "500"{gpu}}}
    phase: Running
"""


def node_manifest() -> str:
    cpu = NODE.format(name="kwok-cpu-0", gpu="", taints="", extra_labels="ragtune.io/test-node: cpu")
    # GPU nodes are tainted as in real clusters, so CPU work stays off them; pods that request the GPU
    # resource get the matching toleration from the ExtendedResourceToleration admission plugin.
    gpu = NODE.format(name="kwok-gpu-0", gpu=', nvidia.com/gpu: "2"',
                      taints='taints: [{key: nvidia.com/gpu, value: present, effect: NoSchedule}]',
                      extra_labels="ragtune.io/test-node: gpu\n      nvidia.com/gpu.present: \"true\"")
    return NODES.format(items=cpu + gpu)


def kubectl(bins: dict[str, Path], *args: str, stdin: str | None = None, timeout: float = 60) -> str:
    result = subprocess.run([str(bins["kubectl"]), "--kubeconfig", str(kubeconfig_path()), *args],
                            input=stdin, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise ClusterError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


def up(quiet: bool = False) -> Path:
    say = (lambda *_: None) if quiet else (lambda msg: print(f"cluster: {msg}", file=sys.stderr, flush=True))
    if is_up():
        say(f"already running; kubeconfig {kubeconfig_path()}")
        return kubeconfig_path()
    if any(running_pid(n) for n in COMPONENTS):
        say("cleaning up a half-started cluster")
        down(quiet=True)
    bins = require_binaries(binaries_dir())
    check_ports_free()
    started = time.monotonic()
    shutil.rmtree(STATE, ignore_errors=True)
    for key in ("pki", "logs", "pids", "etcd"):
        paths()[key].mkdir(parents=True, exist_ok=True)
    try:
        _start_all(bins, say)
    except BaseException:
        down(quiet=True, keep_logs=True)
        raise
    say(f"ready in {time.monotonic() - started:.1f}s; kubeconfig {kubeconfig_path()}")
    return kubeconfig_path()


COMPONENTS = ["kwok", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"]


def _start_all(bins: dict[str, Path], say) -> None:
    p = paths()
    pki = p["pki"]
    make_pki(pki)
    write_kubeconfig(pki, p["kubeconfig"])
    kubeconfig = str(p["kubeconfig"])

    say("starting etcd")
    etcd = start_process("etcd", [
        str(bins["etcd"]), "--data-dir", str(p["etcd"]), "--name", "ragtune-test",
        "--listen-client-urls", f"http://{HOST}:{PORTS.etcd}", "--advertise-client-urls", f"http://{HOST}:{PORTS.etcd}",
        "--listen-peer-urls", f"http://{HOST}:{PORTS.etcd_peer}",
        "--initial-advertise-peer-urls", f"http://{HOST}:{PORTS.etcd_peer}",
        "--initial-cluster", f"ragtune-test=http://{HOST}:{PORTS.etcd_peer}",
        "--unsafe-no-fsync", "--log-level", "warn", "--quota-backend-bytes", str(4 << 30),
    ])
    wait_healthy("etcd", etcd, f"http://{HOST}:{PORTS.etcd}/health")

    say("starting kube-apiserver")
    apiserver = start_process("kube-apiserver", [
        str(bins["kube-apiserver"]), f"--etcd-servers=http://{HOST}:{PORTS.etcd}",
        f"--bind-address={HOST}", f"--advertise-address={HOST}", f"--secure-port={PORTS.apiserver}",
        f"--cert-dir={pki}", f"--tls-cert-file={pki / 'apiserver.crt'}",
        f"--tls-private-key-file={pki / 'apiserver.key'}", f"--client-ca-file={pki / 'ca.crt'}",
        f"--service-cluster-ip-range={SERVICE_CIDR}", "--allow-privileged=true",
        "--authorization-mode=Node,RBAC", "--enable-admission-plugins=NodeRestriction,PodSecurity,ExtendedResourceToleration",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        f"--service-account-key-file={pki / 'sa.pub'}", f"--service-account-signing-key-file={pki / 'sa.key'}",
        "--endpoint-reconciler-type=none", "--v=1",
    ])
    wait_healthy("kube-apiserver", apiserver, f"{server_url()}/readyz", _tls_context(pki, client_cert=True))

    say("starting kube-controller-manager, kube-scheduler and kwok")
    common = [f"--kubeconfig={kubeconfig}", f"--authentication-kubeconfig={kubeconfig}",
              f"--authorization-kubeconfig={kubeconfig}", f"--bind-address={HOST}", "--leader-elect=false", "--v=1"]
    kcm = start_process("kube-controller-manager", [
        str(bins["kube-controller-manager"]), *common, f"--secure-port={PORTS.controller_manager}",
        f"--service-account-private-key-file={pki / 'sa.key'}", f"--root-ca-file={pki / 'ca.crt'}",
        "--use-service-account-credentials=false", "--controllers=*,-nodeipam,-cloud-node-lifecycle",
        f"--cert-dir={pki / 'kcm'}", "--concurrent-job-syncs=10",
        # kwok renews the fake nodes' leases; on a loaded 2-core machine a renewal can come late, and a node marked
        # NotReady turns its pods unready under the tests' feet.
        "--node-monitor-grace-period=5m",
    ])
    scheduler = start_process("kube-scheduler", [
        str(bins["kube-scheduler"]), *common, f"--secure-port={PORTS.scheduler}", f"--cert-dir={pki / 'sched'}",
    ])
    kwok = start_process("kwok", [
        str(bins["kwok"]), f"--kubeconfig={kubeconfig}", f"--config={HACK / 'kwok' / 'stages.yaml'}",
        "--manage-all-nodes=false", "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
        f"--server-address={HOST}:{PORTS.kwok}", "--cidr=10.0.64.0/18", "--node-ip=10.0.0.2",
    ])
    wait_healthy("kube-controller-manager", kcm, f"https://{HOST}:{PORTS.controller_manager}/healthz",
                 _insecure_context())
    wait_healthy("kube-scheduler", scheduler, f"https://{HOST}:{PORTS.scheduler}/healthz", _insecure_context())
    wait_healthy("kwok", kwok, f"http://{HOST}:{PORTS.kwok}/healthz")

    say("registering fake nodes kwok-cpu-0 and kwok-gpu-0 (nvidia.com/gpu: 2)")
    kubectl(bins, "apply", "-f", "-", stdin=node_manifest())
    kubectl(bins, "wait", "--for=condition=Ready", "node/kwok-cpu-0", "node/kwok-gpu-0",
            f"--timeout={int(START_TIMEOUT)}s", timeout=START_TIMEOUT + 10)
    # Pods are refused until the controller-manager has created the namespace's default ServiceAccount.
    _wait_for(lambda: kubectl(bins, "get", "serviceaccount", "default", "-n", "default", "-o", "name"),
              "the default ServiceAccount")


def _wait_for(check, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    last = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except ClusterError as exc:
            last = exc
        time.sleep(0.2)
    raise ClusterError(f"timed out waiting for {what}: {last}")


def down(quiet: bool = False, keep_logs: bool = False) -> None:
    for name in COMPONENTS:
        stop_process(name)
    if keep_logs:
        for p in (paths()["etcd"],):
            shutil.rmtree(p, ignore_errors=True)
    else:
        shutil.rmtree(STATE, ignore_errors=True)
    if not quiet:
        print("cluster: stopped", file=sys.stderr)


def status() -> dict[str, object]:
    return {
        "up": is_up(),
        "kubeconfig": str(kubeconfig_path()),
        "server": server_url(),
        "processes": {name: running_pid(name) for name in reversed(COMPONENTS)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["up", "down", "status", "kubeconfig"])
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            print(up())
        elif args.command == "down":
            down()
        elif args.command == "status":
            print(json.dumps(status(), indent=2))
        else:
            print(kubeconfig_path())
    except ClusterError as exc:
        print(f"cluster: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
