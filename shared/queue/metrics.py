"""Worker statistics kept in the store, exported by the APIs' `/metrics`.

Workers run on other machines than the APIs, so what only a worker sees (batch
sizes, images embedded, tokens generated, latencies) is counted in one Redis hash
per worker kind, and each API turns that hash into Prometheus metrics when scraped.
"""

from __future__ import annotations

import logging

import redis
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

HISTOGRAMS = {
    "batch_size": (1, 2, 4, 8, 16, 32, 64),
    "latency_seconds": (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
}


# Every store key has a TTL (the store may evict by TTL, and nothing may pile up): the stats
# hash lives this long after the last job recorded in it. Prometheus treats the reset of a
# counter that expired as any restart.
STATS_TTL_S = 7 * 24 * 3600


class WorkerStats:
    """Counters and histograms of one worker kind, in `{prefix}stats:{kind}`."""

    def __init__(self, client: redis.Redis, prefix: str, kind: str):
        self.client, self.kind = client, kind
        self.key = f"{prefix}stats:{kind}"

    def add(self, **counts: float) -> None:
        try:
            pipe = self.client.pipeline(transaction=False)
            for name, value in counts.items():
                pipe.hincrbyfloat(self.key, f"c:{name}", value)
            pipe.expire(self.key, STATS_TTL_S)
            pipe.execute()
        except redis.exceptions.RedisError:
            log.warning("could not record stats %s", counts)  # stats never fail a job

    def observe(self, name: str, value: float) -> None:
        try:
            pipe = self.client.pipeline(transaction=False)
            for bound in HISTOGRAMS[name]:
                if value <= bound:
                    pipe.hincrbyfloat(self.key, f"h:{name}:{bound}", 1)
            pipe.hincrbyfloat(self.key, f"h:{name}:+Inf", 1)
            pipe.hincrbyfloat(self.key, f"h:{name}:sum", value)
            pipe.expire(self.key, STATS_TTL_S)
            pipe.execute()
        except redis.exceptions.RedisError:
            log.warning("could not record %s=%s", name, value)

    def read(self) -> dict[str, float]:
        return {k.decode(): float(v) for k, v in self.client.hgetall(self.key).items()}


class WorkerStatsCollector(Collector):
    def __init__(self, stats: WorkerStats):
        self.stats = stats

    def collect(self):
        try:
            values = self.stats.read()
        except redis.exceptions.RedisError:
            return  # the store is down; /readyz says so
        kind = self.stats.kind
        for key, value in sorted(values.items()):
            if key.startswith("c:"):
                counter = CounterMetricFamily(f"vlmq_{kind}_{key[2:]}", f"{kind} workers: {key[2:]}")
                counter.add_metric([], value)
                yield counter
        for name, bounds in HISTOGRAMS.items():
            if f"h:{name}:+Inf" not in values:
                continue
            buckets = [(str(b), values.get(f"h:{name}:{b}", 0.0)) for b in bounds] + [("+Inf", values[f"h:{name}:+Inf"])]
            hist = HistogramMetricFamily(f"vlmq_{kind}_{name}", f"{kind} workers: {name}")
            hist.add_metric([], buckets, values.get(f"h:{name}:sum", 0.0))
            yield hist

