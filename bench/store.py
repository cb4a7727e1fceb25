"""Store overhead: ContainerStore put+get against raw Redis SET+GET of the same bytes.

Both are measured alternately in one run against a private redis-server, so
machine noise hits them alike; the ratio of medians is the result. Each store
put uses a fresh id, so content addressing never short-circuits it. Prints one
JSON line per container shape.

    python bench/store.py [--reps N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid
from dataclasses import replace

import torch

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
    ("196x576_float32", (196, 576), torch.float32),  # bench-small: CLIP B/16 → SmolLM2-135M
]


def _timed(operation) -> float:
    start = time.perf_counter()
    operation()
    return time.perf_counter() - start


def bench_case(client, name: str, shape: tuple[int, int], dtype: torch.dtype, reps: int) -> dict:
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

    store_times, raw_times = [], []
    for rep in range(WARMUP + reps):
        # Alternate which goes first, so neither always runs on a warmer cache.
        pair = (store_put_get, raw_set_get) if rep % 2 else (raw_set_get, store_put_get)
        timings = {op: _timed(op) for op in pair}
        if rep >= WARMUP:
            store_times.append(timings[store_put_get])
            raw_times.append(timings[raw_set_get])
        client.flushdb()  # untimed: keeps Redis memory flat across thousands of puts
    value = statistics.median(store_times) * 1e3
    baseline = statistics.median(raw_times) * 1e3
    ratio = value / baseline
    return {
        "bench": "store",
        "metric": f"put_get_ms_{name}",
        "value": round(value, 3),
        "unit": "ms",
        "baseline": round(baseline, 3),
        "ratio": round(ratio, 3),
        "target": f"<= {TARGET_RATIO}",
        "met": ratio <= TARGET_RATIO,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=200, help="timed repetitions per case")
    args = parser.parse_args()
    with EmbeddedRedis() as server:
        client = connect(server.url)
        for name, shape, dtype in CASES:
            print(json.dumps(bench_case(client, name, shape, dtype, args.reps)), flush=True)


if __name__ == "__main__":
    main()
