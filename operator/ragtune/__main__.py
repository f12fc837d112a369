"""`python -m ragtune run`: run the operator against the current kubeconfig (or in-cluster config)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ragtune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the operator")
    run.add_argument("--namespace", "-n", action="append", default=None,
                     help="watch only these namespaces (repeatable); all namespaces when omitted")
    run.add_argument("--standalone", action="store_true", help="no peering (one operator replica)")
    run.add_argument("--liveness", default=os.environ.get("RAGTUNE_LIVENESS", "http://0.0.0.0:8081/healthz"),
                     help="health probe endpoint")
    run.add_argument("--verbose", "-v", action="store_true")
    args = parser.parse_args(argv)

    import kopf

    from . import controllers  # noqa: F401  registers the handlers

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        # kopf logs every handler run at INFO; ragtune's own events and warnings are what operators read.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    # Handlers wait on the API in threads while the event loop decodes watch events; with the default 5 ms switch
    # interval a thread whose response has arrived waits that long for the interpreter lock, at every request.
    sys.setswitchinterval(float(os.environ.get("RAGTUNE_SWITCH_INTERVAL", "0.0005")))
    namespaces = args.namespace or ([os.environ["RAGTUNE_NAMESPACE"]] if os.environ.get("RAGTUNE_NAMESPACE") else [])
    asyncio.run(kopf.operator(
        clusterwide=not namespaces,
        namespaces=namespaces,
        standalone=args.standalone,
        liveness_endpoint=args.liveness or None,
        identity=peering_identity(),
    ))
    return 0


def peering_identity() -> str:
    """Who this replica is among its peers. kopf's default asks the password database for the user name, which
    has no entry for the arbitrary non-root UIDs pods run as; the pod name is what an operator wants to read."""
    import secrets
    import socket

    pod = os.environ.get("POD_NAME") or socket.gethostname()
    return f"{pod}/{secrets.token_hex(4)}"


if __name__ == "__main__":
    sys.exit(main())
