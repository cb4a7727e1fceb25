"""Store overhead: ContainerStore put+get against raw Redis SET+GET of the same bytes.

Both are measured alternately in one run against a private redis-server, so
machine noise hits them alike; the ratio of medians is the result. Each store
put uses a fresh id, so content addressing never short-circuits it. Prints one
JSON line per container shape (bench/common.py).

    python bench/store.py [--reps N] [--quick]
"""

from __future__ import annotations

import argparse
import math
import statistics
import uuid
from dataclasses import replace

import torch
from common import LM, compare, one_round, parse_args, patches

from shared.store.container import (
    EMBEDDING_INDEX_BASE,
    EmbeddingContainer,
    encode_container,
)
from shared.store.containers import ContainerStore
from shared.store.redis_conn import connect
from vlmq.redis_server import EmbeddedRedis

TARGET_RATIO = 1.25
WARMUP = 5  # untimed first repetitions: connections, caches, allocator
CASES = [
    ("576x4096_float16", (576, 4096), torch.float16),  # LLaVA-1.5-7B: 4.7 MB
    ("196x576_float32", (math.prod(patches("llava")), LM["hidden_size"]), torch.float32),  # bench-small: CLIP B/16 → SmolLM2-135M
]


def bench_case(client, name: str, shape: tuple[int, int], dtype: torch.dtype, reps: int) -> None:
    store = ContainerStore(client, key_prefix="bench:", ttl_s=600)
    template = EmbeddingContainer(
        id="template",
        model="bench",
        tenant="bench",
        first_token_id=EMBEDDING_INDEX_BASE,
        num_tokens=shape[0],
        embeddings=torch.randn(shape).to(dtype),
        image={"original_size": [640, 480], "processed_size": [336, 336], "sha256": "0" * 64},
    )
    blob = encode_container(template)
    raw_key = store.key("raw")

    # Containers with fresh ids, made before timing: building them is the embedder's work, not the store's.
    containers = iter([replace(template, id=uuid.uuid4().hex) for _ in range(WARMUP + reps)])

    def store_put_get() -> None:
        container = next(containers)
        store.put(container)
        store.get(container.id)

    def raw_set_get() -> None:
        client.set(raw_key, blob)
        client.get(raw_key)

    times = {"store": [], "raw": []}
    for rep in range(WARMUP + reps):
        seconds = one_round({"store": store_put_get, "raw": raw_set_get}, rep)  # each goes first in turn
        if rep >= WARMUP:
            for which, value in seconds.items():
                times[which].append(value)
        client.flushdb()  # untimed: keeps Redis memory flat across thousands of puts
    compare("store", f"put_get_ms_{name}", statistics.median(times["store"]) * 1e3, statistics.median(times["raw"]) * 1e3, "ms",
            f"<= {TARGET_RATIO}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=200, help="timed repetitions per case")
    args = parse_args(parser, quick={"reps": 10})
    with EmbeddedRedis() as server:
        client = connect(server.url)
        for name, shape, dtype in CASES:
            bench_case(client, name, shape, dtype, args.reps)


if __name__ == "__main__":
    main()
