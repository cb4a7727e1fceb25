"""Store overhead and fleet throughput.

Overhead: ContainerStore put+get against raw Redis SET+GET of the same bytes, and
ContainerStore on a 3-master Redis Cluster against it on one Redis, one client each.
Each pair is measured alternately in one run, so machine noise hits both alike; the
ratio of medians is the result. Each store put uses a fresh id, so content addressing
never short-circuits it.

Fleet: aggregate put+get throughput of LLaVA-1.5-7B-sized containers (576 × 4096)
from 16 client processes at once, against one Redis and against the 3-master cluster,
in float16 and in int8 (`VLMQ_CONTAINER_DTYPE=int8`), the two deployments taking turns.
Both deployments run on this machine: the clients and every server share its CPUs.

Prints JSON lines (bench/common.py).

    python bench/store.py [--reps N] [--fleet-seconds S] [--fleet-rounds R] [--quick]
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import statistics
import time
import uuid
from dataclasses import replace
from pathlib import Path

import torch
from common import LM, compare, emit, one_round, parse_args, patches

from shared.store.container import (
    EMBEDDING_INDEX_BASE,
    EmbeddingContainer,
    encode_container,
    stored_as,
)
from shared.store.containers import ContainerStore
from shared.store.redis_conn import connect
from tests.support.redis_topologies import LocalCluster
from vlmq.redis_server import EmbeddedRedis

TARGET_RATIO = 1.25
CLUSTER_OVERHEAD_TARGET = "<= 1.3"  # one client: a cluster op costs at most this much a single Redis op
FLEET_TARGET = ">= 1.5"  # 16 clients: 3 masters move at least this much more than one Redis
FLEET_CLIENTS = 16
FLEET_SHAPE = (576, 4096)  # LLaVA-1.5-7B: 576 image rows of the LM's hidden size
FLEET_DTYPES = ("float16", "int8")
WARMUP = 5  # untimed first repetitions: connections, caches, allocator
CASES = [
    ("576x4096_float16", (576, 4096), torch.float16),  # LLaVA-1.5-7B: 4.7 MB
    ("196x576_float32", (math.prod(patches("llava")), LM["hidden_size"]), torch.float32),  # bench-small: CLIP B/16 → SmolLM2-135M
]


def make_template(shape: tuple[int, int], dtype: torch.dtype) -> EmbeddingContainer:
    return EmbeddingContainer(
        id="template",
        model="bench",
        tenant="bench",
        first_token_id=EMBEDDING_INDEX_BASE,
        num_tokens=shape[0],
        embeddings=torch.randn(shape).to(dtype),
        image={"original_size": [640, 480], "processed_size": [336, 336], "sha256": "0" * 64},
    )


def timed_rounds(calls: dict, reps: int, between=lambda: None) -> dict[str, float]:
    """Each call's median seconds over `reps` rounds (after WARMUP untimed ones), the calls taking turns."""
    times = {name: [] for name in calls}
    for rep in range(WARMUP + reps):
        seconds = one_round(calls, rep)  # each goes first in turn
        if rep >= WARMUP:
            for which, value in seconds.items():
                times[which].append(value)
        between()
    return {name: statistics.median(values) for name, values in times.items()}


def put_get(store: ContainerStore, template: EmbeddingContainer):
    """A call that puts a copy of `template` under a fresh id (content addressing never short-circuits it),
    gets it back, and returns the id."""
    def call() -> str:
        container = replace(template, id=uuid.uuid4().hex)
        store.put(container)
        store.get(container.id)
        return container.id
    return call


def bench_case(client, name: str, shape: tuple[int, int], dtype: torch.dtype, reps: int) -> None:
    store = ContainerStore(client, key_prefix="bench:", ttl_s=600)
    template = make_template(shape, dtype)
    blob = encode_container(template)
    raw_key = store.key("raw")

    def raw_set_get() -> None:
        client.set(raw_key, blob)
        client.get(raw_key)

    # Untimed between rounds: keeps Redis memory flat across thousands of puts.
    median = timed_rounds({"store": put_get(store, template), "raw": raw_set_get}, reps, between=client.flushdb)
    compare("store", f"put_get_ms_{name}", median["store"] * 1e3, median["raw"] * 1e3, "ms", f"<= {TARGET_RATIO}")


def bench_cluster_overhead(single_url: str, cluster_url: str, reps: int) -> None:
    """One client's put+get of a LLaVA-7B container on the cluster against the same on one Redis."""
    template = make_template(FLEET_SHAPE, torch.float16)
    clients = {"cluster": connect(cluster_url), "single": connect(single_url)}
    stores = {name: ContainerStore(client, key_prefix="bench:", ttl_s=600) for name, client in clients.items()}
    median = timed_rounds({name: put_get(store, template) for name, store in stores.items()}, reps,
                          between=lambda: [client.flushdb() for client in clients.values()])  # FLUSHDB: every primary
    compare("store", "put_get_ms_576x4096_float16_cluster3_vs_single", median["cluster"] * 1e3, median["single"] * 1e3,
            "ms", CLUSTER_OVERHEAD_TARGET, clients=1)


_fleet_template: EmbeddingContainer | None = None  # set before the clients fork: they inherit it, none builds its own


def _fleet_client(url: str, start_at: float, seconds: float) -> int:
    """One client process: put+get+delete fresh containers from `start_at` for `seconds`; the number it did."""
    store = ContainerStore(connect(url), key_prefix="fleet:", ttl_s=60)
    run = put_get(store, _fleet_template)
    time.sleep(max(0.0, start_at - time.time()))
    done = 0
    while time.time() < start_at + seconds:
        store.delete(run())  # keeps Redis memory flat: 16 clients put hundreds of MB a second
        done += 1
    return done


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds the processes have used (Linux /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    # /proc/PID/stat after the ")" closing the command name: utime and stime are fields 12 and 13.
    return sum(sum(map(int, Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[11:13])) / ticks for pid in pids)


def fleet_rate(url: str, server_pids: list[int], seconds: float) -> tuple[float, float]:
    """Containers put and got back per second by FLEET_CLIENTS processes together, and the CPU cores the
    Redis servers used meanwhile (what tells whether the servers or the clients bound the figure)."""
    # fork: the children inherit the imports (spawning 16 fresh interpreters would cost more than a round)
    with multiprocessing.get_context("fork").Pool(FLEET_CLIENTS) as pool:
        start_at = time.time() + 2.0  # every client connected and its template made before the clock starts
        result = pool.starmap_async(_fleet_client, [(url, start_at, seconds)] * FLEET_CLIENTS)
        time.sleep(max(0.0, start_at - time.time()))
        cpu_before = _cpu_seconds(server_pids)
        time.sleep(seconds)
        server_cores = (_cpu_seconds(server_pids) - cpu_before) / seconds
        done = result.get()
    return sum(done) / seconds, server_cores


def bench_fleet(deployments: dict[str, tuple[str, list[int]]], seconds: float, rounds: int) -> None:
    """`deployments`: "single" and "cluster3", each a URL and its server processes."""
    global _fleet_template
    for dtype_name in FLEET_DTYPES:
        _fleet_template = stored_as(make_template(FLEET_SHAPE, torch.float16), dtype_name)  # as VLMQ_CONTAINER_DTYPE stores it
        blob_bytes = len(encode_container(_fleet_template))
        runs = {name: [] for name in deployments}
        for round_ in range(rounds):
            for name in (list(deployments) if round_ % 2 == 0 else list(deployments)[::-1]):  # each goes first in turn
                runs[name].append(fleet_rate(*deployments[name], seconds))
        rate = {name: statistics.median(r for r, _ in values) for name, values in runs.items()}
        cores = {name: statistics.median(c for _, c in values) for name, values in runs.items()}
        context = {"clients": FLEET_CLIENTS, "container_bytes": blob_bytes, "shape": list(FLEET_SHAPE),
                   "logical_cpus": os.cpu_count()}
        for name in deployments:
            gbps = rate[name] * 2 * blob_bytes / 1e9  # each container written once and read once
            emit("store", f"fleet_gb_per_s_{dtype_name}_{name}", gbps, "GB/s", server_cpu_cores=cores[name], **context)
        emit("store", f"fleet_containers_per_s_{dtype_name}_single", rate["single"], "containers/s", **context)
        compare("store", f"fleet_containers_per_s_{dtype_name}_cluster3_vs_single", rate["cluster3"], rate["single"],
                "containers/s", FLEET_TARGET, **context)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=200, help="timed repetitions per one-client case")
    parser.add_argument("--fleet-seconds", type=float, default=4.0, help="seconds of each fleet measurement")
    parser.add_argument("--fleet-rounds", type=int, default=3, help="fleet measurements per deployment and dtype")
    args = parse_args(parser, quick={"reps": 10, "fleet_seconds": 1.0, "fleet_rounds": 1})
    torch.set_num_threads(1)  # the clients are processes; torch's own threads would only fight them for the CPUs
    with EmbeddedRedis() as server, LocalCluster(masters=3) as cluster:
        client = connect(server.url)
        for name, shape, dtype in CASES:
            bench_case(client, name, shape, dtype, args.reps)
        bench_cluster_overhead(server.url, cluster.url, args.reps)
        bench_fleet({"single": (server.url, [server.pid]), "cluster3": (cluster.url, [m.pid for m in cluster.masters])},
                    args.fleet_seconds, args.fleet_rounds)


if __name__ == "__main__":
    main()
