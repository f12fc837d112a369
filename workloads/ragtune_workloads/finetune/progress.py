"""Progress to the operator: a TrainerCallback keeps a snapshot, a heartbeat thread publishes it.

The heartbeat matters because one optimizer step of a 7B model with gradient accumulation, an evaluation pass or
the merge can each take longer than the operator's patience; without it status would look stuck.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from transformers import TrainerCallback

from ragtune_workloads.reporting import Reporter

HEARTBEAT_SECONDS = 2.0


def eta_seconds(step: int, total: int, first_step: int, elapsed: float) -> float | None:
    """Time left at the pace of this run (steps restored from a checkpoint took no time here)."""
    done = step - first_step
    if done <= 0 or total <= 0 or elapsed <= 0:
        return None
    return max(0.0, elapsed / done * (total - step))


class ProgressCallback(TrainerCallback):
    """Keeps the latest step, loss, eval loss, ETA and token rate as a `Progress` dict (camelCase keys)."""

    def __init__(self, reporter: Reporter, clock: Callable[[], float] = time.monotonic):
        self.reporter = reporter
        self.clock = clock
        self._lock = threading.Lock()
        self._fields: dict[str, Any] = {"step": 0, "totalSteps": 0}
        self._start_time = clock()
        self._first_step = 0
        self._first_tokens: int | None = None
        self.resumed_from_step = 0
        self.tokens_per_second: float | None = None

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._fields)

    def record(self, **fields: Any) -> None:
        """Merges non-empty fields into the snapshot and offers it to the reporter."""
        with self._lock:
            self._fields.update({k: v for k, v in fields.items() if v is not None})
        self.reporter.progress(**self.snapshot())

    def on_train_begin(self, args, state, control, **kwargs):
        self._start_time = self.clock()
        self._first_step = state.global_step
        self.resumed_from_step = state.global_step
        self._first_tokens = state.num_input_tokens_seen
        self.record(step=state.global_step, totalSteps=state.max_steps, epoch=state.epoch)

    def on_step_end(self, args, state, control, **kwargs):
        elapsed = self.clock() - self._start_time
        if elapsed > 0 and state.num_input_tokens_seen:
            self.tokens_per_second = (state.num_input_tokens_seen - (self._first_tokens or 0)) / elapsed
        self.record(step=state.global_step, totalSteps=state.max_steps, epoch=state.epoch,
                     etaSeconds=eta_seconds(state.global_step, state.max_steps, self._first_step, elapsed),
                     tokensPerSecond=self.tokens_per_second)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        self.record(loss=logs.get("loss"), evalLoss=logs.get("eval_loss"))

    def on_train_end(self, args, state, control, **kwargs):
        with self._lock:
            self._fields.update(step=state.global_step, etaSeconds=0.0)
        self.reporter.progress(force=True, **self.snapshot())


class Heartbeat:
    """Republishes the latest snapshot every few seconds until stopped (the Reporter throttles the actual writes)."""

    def __init__(self, reporter: Reporter, snapshot: Callable[[], dict[str, Any]],
                 every: float = HEARTBEAT_SECONDS):
        self.reporter = reporter
        self.snapshot = snapshot
        self.every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.reporter.progress(**self.snapshot())

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.every * 2)
