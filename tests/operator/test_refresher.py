"""The status refresher: repeats of one kind of work fold together, each object's work runs after its own delay."""

from __future__ import annotations

import threading
import time

from ragtune.controllers.shared import Refresher


def test_repeated_work_folds_and_a_slow_resync_does_not_hold_back_other_objects():
    refresher = Refresher(workers=1, delay=0.05)
    ran: list[tuple[str, float]] = []
    done = threading.Event()
    start = time.monotonic()

    def record(what: str):
        def run():
            ran.append((what, time.monotonic() - start))
            if what == "resync":
                done.set()
        return run

    refresher.schedule(("E/resync", "ns", "a"), record("resync"), work="resync", delay=0.6)
    for _ in range(5):
        refresher.schedule(("E", "ns", "a"), record("refresh"), work="refresh")
    refresher.schedule(("E", "ns", "a"), record("reconcile"), work="reconcile")

    assert done.wait(5), ran
    names = [name for name, _ in ran]
    assert names == ["refresh", "reconcile", "resync"], names
    refresh_at = ran[0][1]
    resync_at = ran[2][1]
    assert refresh_at < 0.4, "the refresh waited behind the delayed resync"
    assert resync_at >= 0.6, "the resync ran before its delay"
