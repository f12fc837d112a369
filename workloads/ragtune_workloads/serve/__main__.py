"""`python -m ragtune_workloads.serve --config FILE --port 8000`: the whole application in one pod.

Starts a local Ray instance inside the container, runs the application on it and serves HTTP on --port until
SIGTERM (a rolling update or scale-down), then shuts Serve and Ray down so the pod exits cleanly. A config that
cannot be served exits with status 2 and a one-line reason (the pod's termination message).

`--ingress direct` (default): the Ingress replica serves --port itself (Ray Serve's direct ingress). A pod holds
exactly one Ingress replica, so Ray Serve's HTTP proxy would be a second hop inside the pod that routes nowhere
else: ~6 ms of a request on two cores against ~0.5 ms direct. `--ingress proxy` serves through the proxy instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import socket
import sys
import threading

log = logging.getLogger("ragtune_workloads.serve")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ragtune_workloads.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="ServeConfig JSON (the mounted ConfigMap)")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--ingress", choices=["direct", "proxy"], default="direct",
                        help="direct: the Ingress replica serves --port; proxy: Ray Serve's HTTP proxy does")
    return parser.parse_args(argv)


# Ports this program picks for itself lie below Linux's ephemeral range (32768 up), where Ray's own processes bind
# theirs while they start (a port found free there can be taken before it is bound: seen once as "No available
# ports" for an Ingress replica), and above Ray's worker ports (10002-19999).
FREE_PORTS = range(20000, 30000)


def free_port(host: str) -> int:
    for port in random.sample(FREE_PORTS, min(200, len(FREE_PORTS))):
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {FREE_PORTS.start}-{FREE_PORTS.stop - 1} on {host}")


def direct_ingress_env(port: int) -> dict[str, str]:
    """Ray Serve settings (read when Ray starts) that put the one Ingress replica's HTTP server on `port`."""
    return {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1),  # exclusive
        # A replica that restarts inside the pod must get the pod's one port back at once, not after a quarantine
        # meant for ports shared between replicas behind a load balancer.
        "RAY_SERVE_PORT_QUARANTINE_S": "0",
        # The pod's preStop hook already waits for the Service to stop sending requests before SIGTERM; in-flight
        # requests are still drained.
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
        # The handlers run on the loop that serves HTTP instead of a second loop in another thread, as in Ray
        # Serve's throughput-optimised profile: every request crossed threads twice (~0.4 ms). They never block
        # it: retrieval and the transformers engine run in threads, vLLM is asynchronous.
        "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    }


# Ray starts its worker processes, here the replicas that serve every request and vLLM's engine, at niceness 15,
# below its own services (GCS, raylet, agents) and anything else at the default: in a pod whose work is serving,
# requests then wait whenever those run. At 0 (two paired runs on two cores, `bench/serve.py`'s server and
# questions): one client 15.1 and 14.8 -> 14.0 and 13.5 ms outside generation, latency p50 122-133 -> 110-113 ms;
# four clients 48 and 42 -> 39 ms, 14.6-14.8 -> 16.6-17.3 requests a second. The operator sets the same in the pod.
SERVING_PRIORITY_ENV = {"RAY_worker_niceness": "0"}


def write_termination_message(reason: str) -> None:
    path = os.environ.get("RAGTUNE_TERMINATION_LOG", "/dev/termination-log")
    try:
        with open(path, "w") as handle:
            handle.write(reason[:4000])
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Ray's token auth writes under $HOME, which is read-only in the pod; the Service is the boundary here.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from .config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"ragtune serve: {exc}", file=sys.stderr)
        write_termination_message(str(exc))
        return 2

    if args.ingress == "direct":
        os.environ.update(direct_ingress_env(args.port))
    for name, value in SERVING_PRIORITY_ENV.items():
        os.environ.setdefault(name, value)
    import ray
    from ray import serve

    from .app import build_from_config

    ray.init(include_dashboard=False, logging_level=logging.WARNING)
    # After ray.init: Ray installs a crash handler for SIGTERM that aborts the process; a rollout's SIGTERM must
    # instead drain Serve and stop Ray so the pod exits 0.
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        # With direct ingress Ray Serve still starts its proxy: it gets a port of its own, unused by clients.
        proxy_port = free_port(args.host) if args.ingress == "direct" else args.port
        serve.start(http_options={"host": args.host, "port": proxy_port})
        serve.run(build_from_config(config, runtime="deployment"), name=config.owner.name, route_prefix="/")
        log.info("serving %s on %s:%d", config.owner.name, args.host, args.port)
        stop.wait()
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
        print(f"ragtune serve: {reason}", file=sys.stderr)
        write_termination_message(reason)
        return 1
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
