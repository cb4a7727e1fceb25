"""Which images this client captions: the units it claims, less the images its output already has.

The feed yields items, a `UnitEnd` after a unit's last item (the run then
finishes the unit once its images are written), and `WAIT` while every unit
left is held by another client: those are asked again every `RETRY_S` until
they are done or their holder has died and the claim passes to this client.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from vlmq.caption.claims import BUSY, FINAL, Claims
from vlmq.caption.inputs import Item, Unit

RETRY_S = 1.0
WAIT = "wait"


@dataclass(frozen=True)
class UnitEnd:
    name: str


@dataclass
class FeedCounts:
    skipped: int = 0  # images already in the output, or given twice
    elsewhere: int = 0  # units another client finished


def feed(units: Iterable[Unit], output, claims: Claims, counts: FeedCounts) -> Iterator[Item | UnitEnd | str]:
    seen: set[str] = set()
    deferred: list[Unit] = []
    for unit in units:
        if unit.name in seen:  # the same file listed twice
            counts.skipped += sum(1 for _ in unit.list_items())
            continue
        seen.add(unit.name)
        taken = yield from _take(unit, output, claims, counts)
        if not taken:
            deferred.append(unit)
    while deferred:
        retry_at = time.monotonic() + RETRY_S
        still = []
        for unit in deferred:
            taken = yield from _take(unit, output, claims, counts)
            if not taken:
                still.append(unit)
        deferred = still
        while deferred and time.monotonic() < retry_at:
            yield WAIT


def _take(unit: Unit, output, claims: Claims, counts: FeedCounts) -> Iterator[Item | UnitEnd]:
    """The unit's images not yet written, if this client gets the claim; returns False while another holds it."""
    if output.unit_done(unit.name):
        return True
    state, _ = claims.claim(unit.name)
    if state == BUSY:
        return False
    if state == FINAL:
        counts.elsewhere += 1
        return True
    for item in unit.items():
        if output.is_done(item):
            counts.skipped += 1
        else:
            yield item
    yield UnitEnd(unit.name)
    return True
