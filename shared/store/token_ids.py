"""Allocation of embedding token IDs: globally unique ranges from one Redis counter."""

from __future__ import annotations

import redis

from shared.store.redis_conn import translate_connection_errors

# IDs at or above this stand for rows of an embedding container, never for text
# tokens (ExLlamaV2's EMBEDDING_INDEX). A model whose vocabulary reaches it is refused.
EMBEDDING_INDEX_BASE = 1_000_000_000


def allocate_token_ids(client: redis.Redis, key_prefix: str, count: int) -> int:
    """Reserve ``count`` fresh token IDs and return the first: the range is ``[first, first + count)``.

    ``INCRBY`` on ``{key_prefix}ids:next`` is atomic, so ranges never overlap across
    processes and machines sharing the store, and IDs are never handed out twice.
    The counter has no TTL: with a ``volatile-*`` eviction policy it is never evicted,
    which is what keeps IDs from being reused while containers still hold them.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    key = f"{key_prefix}ids:next"
    with translate_connection_errors(client):
        pipe = client.pipeline(transaction=False)
        # Starts the counter at the base the first time; a no-op ever after. Each
        # client's SET NX runs before its own INCRBY, so no INCRBY sees a missing key.
        pipe.set(key, EMBEDDING_INDEX_BASE, nx=True)
        pipe.incrby(key, count)
        _, end = pipe.execute()
    return end - count
