"""Publishes an engine's statistics to the store, where every API's /metrics reads them (`shared.queue.metrics`).

A thread of its own, once a second: the engine thread only counts in memory (`Engine.stats`), so
a slow store never delays a decode step. Counters and histograms go as what was added since the
last publication; gauges (KV blocks used and in all, requests waiting and running) as they are now.
"""

from __future__ import annotations

import logging
import os
import socket
import threading

from generator_service.engine import Engine
from shared.queue.metrics import WorkerStats

log = logging.getLogger(__name__)


def publish_engine_stats(engine: Engine, stats: WorkerStats, stop: threading.Event, interval_s: float = 1.0) -> threading.Thread:
    """Start publishing `engine`'s statistics every `interval_s` until `stop` is set; returns the (daemon) thread."""
    worker = f"{socket.gethostname()}:{os.getpid()}"

    def loop() -> None:
        sent_hits = sent_lookups = 0
        sent = {"ttft_seconds": ([0] * len(engine.stats.ttft.counts), 0.0), "itl_seconds": ([0] * len(engine.stats.itl.counts), 0.0)}
        while not stop.wait(interval_s):
            s = engine.stats  # read while the engine thread writes: each number is whole, the set may be a step apart
            hits, lookups = s.prefix_hit_tokens, s.prefix_lookup_tokens
            if lookups > sent_lookups:
                stats.add(prefix_hit_tokens=hits - sent_hits, prefix_lookup_tokens=lookups - sent_lookups)
                sent_hits, sent_lookups = hits, lookups
            for name, histogram in (("ttft_seconds", s.ttft), ("itl_seconds", s.itl)):
                counts, total = list(histogram.counts), histogram.sum
                before, before_total = sent[name]
                if counts[-1] > before[-1]:
                    stats.add_histogram(name, [now - then for now, then in zip(counts, before)], total - before_total)
                    sent[name] = (counts, total)
            stats.set_gauges(worker, kv_blocks_used=engine.pool.used, kv_blocks_total=engine.pool.num_blocks,
                             waiting_requests=engine.num_waiting, running_requests=engine.num_running)

    thread = threading.Thread(target=loop, name="vlmq-engine-stats", daemon=True)
    thread.start()
    return thread
