"""Worker statistics kept in the store, exported by the APIs' `/metrics`.

Workers run on other machines than the APIs, so what only a worker sees (batch
sizes, images embedded, tokens generated, latencies) is counted in one Redis hash
per worker kind, and each API turns that hash into Prometheus metrics when scraped.
"""

from __future__ import annotations

import logging
import time

import redis
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

HISTOGRAMS = {
    "batch_size": (1, 2, 4, 8, 16, 32, 64),
    "latency_seconds": (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    # The generator engine's: submit to first token, and between two tokens of one request.
    "ttft_seconds": (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    "itl_seconds": (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
}


class Histogram:
    """Counts per upper bound (cumulative, as Prometheus buckets) and the sum, kept in process memory."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: +Inf, every observation
        self.sum = 0.0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
        self.counts[-1] += 1
        self.sum += value


# A worker's gauges count while it refreshed them this recently (a stopped worker's last values drop out).
GAUGE_FRESH_S = 30.0

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

    def add_histogram(self, name: str, counts: list[float], total: float) -> None:
        """Add observations counted elsewhere: `counts` per bound of HISTOGRAMS[name] then +Inf (as `Histogram.counts`)."""
        try:
            pipe = self.client.pipeline(transaction=False)
            for bound, count in zip((*HISTOGRAMS[name], "+Inf"), counts):
                if count:
                    pipe.hincrbyfloat(self.key, f"h:{name}:{bound}", count)
            pipe.hincrbyfloat(self.key, f"h:{name}:sum", total)
            pipe.expire(self.key, STATS_TTL_S)
            pipe.execute()
        except redis.exceptions.RedisError:
            log.warning("could not record histogram %s", name)

    def set_gauges(self, worker: str, **values: float) -> None:
        """The current values of one worker's gauges (each worker of the kind has its own; /metrics labels them)."""
        try:
            fields = {f"g:{name}:{worker}": value for name, value in values.items()}
            pipe = self.client.pipeline(transaction=False)
            pipe.hset(self.key, mapping={**fields, f"seen:{worker}": time.time()})
            pipe.expire(self.key, STATS_TTL_S)
            pipe.execute()
        except redis.exceptions.RedisError:
            log.warning("could not record gauges %s", values)

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
        fresh = {key[5:] for key, seen in values.items() if key.startswith("seen:") and time.time() - seen <= GAUGE_FRESH_S}
        gauges: dict[str, GaugeMetricFamily] = {}
        for key, value in sorted(values.items()):
            if key.startswith("g:"):
                name, worker = key[2:].split(":", 1)
                if worker in fresh:
                    if name not in gauges:
                        gauges[name] = GaugeMetricFamily(f"vlmq_{kind}_{name}", f"{kind} workers: {name}", labels=["worker"])
                    gauges[name].add_metric([worker], value)
        yield from gauges.values()

