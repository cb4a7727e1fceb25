"""Allocation of embedding token IDs: globally unique ranges from one Redis counter."""

from __future__ import annotations

import redis
from redis.connection import Connection

from shared.config.errors import StoreUnavailable
from shared.store.redis_conn import (
    on_node_of,
    translate_connection_errors,
    with_connection,
)

# IDs at or above this stand for rows of an embedding container, never for text
# tokens (ExLlamaV2's EMBEDDING_INDEX). A model whose vocabulary reaches it is refused.
EMBEDDING_INDEX_BASE = 1_000_000_000
# How long an allocation waits for a replica of the counter to have it, where there is one.
REPLICA_WAIT_MS = 2000


def allocate_token_ids(client: redis.Redis, key_prefix: str, count: int) -> int:
    """Reserve ``count`` fresh token IDs and return the first: the range is ``[first, first + count)``.

    ``INCRBY`` on ``{key_prefix}ids:next`` is atomic, so ranges never overlap across
    processes and machines sharing the store, and IDs are never handed out twice.
    The counter has no TTL: with a ``volatile-*`` eviction policy it is never evicted,
    which is what keeps IDs from being reused while containers still hold them.

    Where the counter's master has replicas (Sentinel, a cluster with replicas), the range
    is returned only once a replica has the increment (``WAIT``): replication is
    asynchronous, and a failover that lost the increment would hand the range out again
    to another image. ``StoreUnavailable`` if no replica has it within ``REPLICA_WAIT_MS``.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    key = f"{key_prefix}ids:next"
    with translate_connection_errors(client):
        return on_node_of(client, key, lambda node: _allocate(node, key, count))


def _allocate(node: redis.Redis, key: str, count: int) -> int:
    def allocate(connection: Connection) -> int:
        # Starts the counter at the base the first time; a no-op ever after. Each
        # client's SET NX runs before its own INCRBY, so no INCRBY sees a missing key.
        # ROLE: ["master", offset, [[host, port, offset], …]], the replicas connected.
        connection.send_packed_command(connection.pack_commands(
            [("SET", key, EMBEDDING_INDEX_BASE, "NX"), ("INCRBY", key, count), ("ROLE",)]))
        _, end, role = [connection.read_response() for _ in range(3)]
        if role[2]:
            # On the same connection: WAIT counts the replicas that have this connection's writes.
            connection.send_command("WAIT", 1, REPLICA_WAIT_MS)
            if connection.read_response() < 1:
                raise StoreUnavailable(f"token IDs not on a replica of the counter within {REPLICA_WAIT_MS} ms; try again")
        return end - count

    return with_connection(node, allocate)
