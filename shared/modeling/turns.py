"""Two models in one process taking turns on the cores (`vlmq worker all`).

A vision tower and a language model that run at once in one process each start
a team of torch threads as wide as the machine: twice as many busy threads as
cores, and every step of either waits on a thread the OS has descheduled
(issue 24 measured a decode step 2–3× slower so). Taking turns, each forward
has every core to itself and none waits; the work done per second is that of
one model at a time on the whole machine, which for bulk captioning is the
point. The price is latency: a decode step waits for a vision batch to end.
"""

from __future__ import annotations

import threading
from types import TracebackType


class Turns:
    """A first-come, first-served lock: `with turns:` around each forward.

    A plain `threading.Lock` is not fair: the engine thread, which releases it
    and asks again at once for its next step, would win it nearly every time and
    starve the vision batches waiting beside it. Here a thread that asks waits
    behind every thread that asked before it.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._next_ticket = 0
        self._serving = 0

    def __enter__(self) -> None:
        with self._changed:
            ticket = self._next_ticket
            self._next_ticket += 1
            self._changed.wait_for(lambda: self._serving == ticket)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        with self._changed:
            self._serving += 1
            self._changed.notify_all()
