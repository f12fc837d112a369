"""`python -m ragtune_workloads.serve --config FILE --port 8000`: the whole application in one pod.

Starts a local Ray instance inside the container, runs the application on it and serves HTTP on --port until
SIGTERM (a rolling update or scale-down), then shuts Serve and Ray down so the pod exits cleanly. A config that
cannot be served exits with status 2 and a one-line reason (the pod's termination message).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

log = logging.getLogger("ragtune_workloads.serve")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ragtune_workloads.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="ServeConfig JSON (the mounted ConfigMap)")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    return parser.parse_args(argv)


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
        serve.start(http_options={"host": args.host, "port": args.port})
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
