"""Two index runs of one store, the second started while the first holds it (either store kind)."""

from __future__ import annotations

import threading
import time


def second_run_waits(first, second, hold: float, wait: float = 30.0) -> tuple[list[str], list[str]]:
    """The order the two runs finished in, and whom the second said it waited for."""
    order: list[str] = []
    waits: list[str] = []

    def run_second():
        with second.exclusive(wait=wait, on_wait=waits.append):
            order.append("second")
    with first.exclusive():
        thread = threading.Thread(target=run_second)
        thread.start()
        time.sleep(hold)
        order.append("first")
    thread.join(wait)
    return order, waits
