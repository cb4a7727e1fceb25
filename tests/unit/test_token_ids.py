"""Token-ID ranges are unique across processes sharing one Redis."""

from __future__ import annotations

import multiprocessing
import random

import pytest

from shared.store.redis_conn import connect
from shared.store.token_ids import EMBEDDING_INDEX_BASE, allocate_token_ids

PROCESSES = 8
ALLOCATIONS = 1000


def _allocate_many(url: str, prefix: str, seed: int, barrier, results) -> None:
    client = connect(url)
    client.ping()
    rng = random.Random(seed)
    ranges = []
    barrier.wait()  # all processes allocate at the same time
    for _ in range(ALLOCATIONS):
        count = rng.randint(1, 1200)
        ranges.append((allocate_token_ids(client, prefix, count), count))
    results.put(ranges)


def test_ranges_from_many_processes_never_overlap(redis_url, key_prefix):
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(PROCESSES), ctx.Queue()
    workers = [
        ctx.Process(target=_allocate_many, args=(redis_url, key_prefix, seed, barrier, results))
        for seed in range(PROCESSES)
    ]
    for worker in workers:
        worker.start()
    per_process = [results.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=10)
    ranges = sorted(r for ranges in per_process for r in ranges)
    assert len(ranges) == PROCESSES * ALLOCATIONS
    assert ranges[0][0] == EMBEDDING_INDEX_BASE
    for (first, count), (next_first, _) in zip(ranges, ranges[1:]):
        assert first + count <= next_first
    # Nothing was skipped either: the ranges tile [base, base + total).
    last_first, last_count = ranges[-1]
    assert last_first + last_count == EMBEDDING_INDEX_BASE + sum(count for _, count in ranges)


def test_first_allocation_starts_at_the_base_and_ids_are_never_reused(redis_client, key_prefix):
    assert allocate_token_ids(redis_client, key_prefix, 576) == EMBEDDING_INDEX_BASE
    assert allocate_token_ids(redis_client, key_prefix, 1) == EMBEDDING_INDEX_BASE + 576
    assert allocate_token_ids(redis_client, key_prefix, 10) == EMBEDDING_INDEX_BASE + 577


@pytest.mark.parametrize("count", [0, -3])
def test_count_must_be_positive(redis_client, key_prefix, count):
    with pytest.raises(ValueError, match="at least 1"):
        allocate_token_ids(redis_client, key_prefix, count)
