"""The status refresher: repeats of one kind of work fold together, each object's work runs after its own delay,
failed work is tried again with a growing delay."""

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


def test_failed_work_is_tried_again_with_a_growing_delay_until_it_succeeds():
    """A reconcile that failed once (the API server briefly unavailable) must not leave its object waiting for an
    event that may never come."""
    refresher = Refresher(workers=1, delay=0.0, retry_first=0.1, retry_max=0.3)
    attempts: list[float] = []
    done = threading.Event()
    start = time.monotonic()

    def flaky():
        attempts.append(time.monotonic() - start)
        if len(attempts) < 4:
            raise ConnectionError("the API server is unavailable")
        done.set()

    refresher.schedule(("E", "ns", "a"), flaky, work="reconcile")
    assert done.wait(5), attempts
    gaps = [later - earlier for earlier, later in zip(attempts, attempts[1:])]
    assert [round(gap, 1) for gap in gaps] == [0.1, 0.2, 0.3], gaps  # doubling, capped
    assert not refresher._failures  # forgotten once it succeeded


def test_work_due_later_never_holds_back_work_for_the_same_object():
    refresher = Refresher(workers=1, delay=0.05)
    ran: list[tuple[str, float]] = []
    done = threading.Event()
    start = time.monotonic()
    key = ("FineTuneJob", "ns", "a")

    def record(what: str):
        def run():
            ran.append((what, time.monotonic() - start))
            if what == "later":
                done.set()
        return run

    refresher.schedule(key, record("later"), work="overdue-check", delay=0.5)  # a check due much later
    refresher.schedule(key, record("refresh"), work="refresh")  # then a child's event
    assert done.wait(5), ran
    assert [name for name, _ in ran] == ["refresh", "later"]
    assert ran[0][1] < 0.3, "the refresh waited for the later check"
    assert ran[1][1] >= 0.5, "the later check ran early"
