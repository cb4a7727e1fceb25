"""Choosing between code paths that compute the same thing by timing them on this machine, once."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import TypeVar

K = TypeVar("K", bound=Hashable)


def fastest(calls: dict[K, Callable[[], object]], rounds: int) -> tuple[K, dict[K, float]]:
    """The key of the call that ran fastest (the first listed on a tie), and each one's best seconds.

    Each call runs `rounds` times, in turn with the others, and keeps its best time: on a shared
    host other work only ever slows a call down, and a cold first call only loses to the later ones.
    """
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(rounds):
        for key, call in calls.items():
            start = time.perf_counter()
            call()
            best[key] = min(best[key], time.perf_counter() - start)
    return min(best, key=best.__getitem__), best
