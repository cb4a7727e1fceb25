"""The container store: embedding containers in Redis under ``{prefix}c:{id}``, each with a TTL."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import redis

from shared.config.errors import Forbidden, NotFound, TooLarge
from shared.store.container import (
    EmbeddingContainer,
    decode_container,
    encode_container_buffers,
)
from shared.store.redis_conn import (
    by_node,
    pipelined,
    set_buffers,
    translate_connection_errors,
)

DEFAULT_TTL_S = 7 * 24 * 3600
DEFAULT_MAX_CONTAINER_BYTES = 256 * 1024 * 1024


def container_id(tenant: str, model_fingerprint: str, preprocess_settings: dict[str, Any], image_bytes: bytes) -> str:
    """The content address of a container: 64 hex chars of SHA-256.

    Each part is length-prefixed, so no two different inputs hash the same bytes
    (``"ab" + "c"`` vs ``"a" + "bc"``); the settings dict is canonical JSON, so key
    order does not matter.
    """
    settings = json.dumps(preprocess_settings, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256()
    for part in (tenant.encode(), model_fingerprint.encode(), settings.encode(), image_bytes):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


class ContainerStore:
    """Put, get and expire embedding containers.

    Containers are content-addressed: ``put`` of an id that already exists keeps
    the stored one (its token IDs included) and returns it, so the same image
    always maps to the same IDs. ``tenant`` arguments scope access: another
    tenant's container is ``Forbidden`` (403) for reads and deletes alike. That
    tells a caller the id exists, which is harmless: ids are SHA-256 content
    addresses that include the owning tenant, so they cannot be guessed or
    computed from an image by anyone else. Containers read back carry their live expiry:
    ``expires_at`` follows ``touch`` and is None while pinned.
    """

    def __init__(
        self,
        client: redis.Redis,
        key_prefix: str = "vlmq:",
        ttl_s: int = DEFAULT_TTL_S,
        max_container_bytes: int = DEFAULT_MAX_CONTAINER_BYTES,
    ):
        self._redis = client
        self._prefix = key_prefix
        self.ttl_s = ttl_s
        self.max_container_bytes = max_container_bytes

    def key(self, container_id: str) -> str:
        return f"{self._prefix}c:{container_id}"

    def put(self, container: EmbeddingContainer) -> EmbeddingContainer:
        """Store ``container`` unless its id exists; return whichever is stored.

        ``SET NX EX`` decides atomically: of concurrent puts of one id exactly one
        wins, and every caller gets the winner back.
        """
        stored = replace(container, expires_at=time.time() + self.ttl_s)
        buffers = encode_container_buffers(stored)
        size = sum(memoryview(buffer).nbytes for buffer in buffers)
        if size > self.max_container_bytes:
            raise TooLarge(
                f"container {container.id} is {size} bytes, over the store limit of {self.max_container_bytes}"
            )
        key = self.key(container.id)
        with translate_connection_errors(self._redis):
            while True:
                if set_buffers(self._redis, key, buffers, ex=self.ttl_s, nx=True):
                    return stored
                [existing] = self._fetch([container.id])
                if existing is not None:
                    return existing
                # The existing one expired between SET and GET: try to be the winner again.

    def exists(self, container_id: str) -> bool:
        with translate_connection_errors(self._redis):
            return bool(self._redis.exists(self.key(container_id)))

    def get(self, container_id: str, tenant: str | None = None) -> EmbeddingContainer:
        """The container ``container_id``; ``NotFound`` if it is absent or expired, ``Forbidden`` if another tenant's."""
        return self.get_many([container_id], tenant)[0]

    def get_many(self, container_ids: Sequence[str], tenant: str | None = None) -> list[EmbeddingContainer]:
        """The containers, in order, fetched in one round trip; ``NotFound`` naming every missing id,
        else ``Forbidden`` naming every id of another tenant."""
        if not container_ids:
            return []
        with translate_connection_errors(self._redis):
            found = self._fetch(container_ids)
        missing = [cid for cid, c in zip(container_ids, found) if c is None]
        if missing:
            noun = "container" if len(missing) == 1 else "containers"
            raise NotFound(f"{noun} not found (unknown or expired): {', '.join(missing)}")
        foreign = [cid for cid, c in zip(container_ids, found) if tenant is not None and c.tenant != tenant]
        if foreign:
            noun = "container" if len(foreign) == 1 else "containers"
            raise Forbidden(f"{noun} of another tenant: {', '.join(foreign)}")
        return found

    def delete(self, container_id: str, tenant: str | None = None) -> bool:
        """Delete a container; False if it did not exist, ``Forbidden`` if it is another tenant's."""
        if tenant is not None:
            try:
                self.get(container_id, tenant)
            except NotFound:
                return False
        with translate_connection_errors(self._redis):
            return self._redis.delete(self.key(container_id)) == 1

    def touch(self, container_id: str, ttl_s: int | None = None) -> None:
        """Restart a container's lifetime: ``ttl_s`` (default: the store's TTL) from now."""
        ttl_s = self.ttl_s if ttl_s is None else ttl_s
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        with translate_connection_errors(self._redis):
            found = self._redis.expire(self.key(container_id), ttl_s)
        if not found:
            raise NotFound(f"container not found (unknown or expired): {container_id}")

    def pin(self, container_id: str) -> None:
        """Keep a container until ``unpin`` (drops its TTL)."""
        with translate_connection_errors(self._redis):
            # PERSIST answers 0 both for a missing key and an already pinned one: ask EXISTS too.
            pipe = self._redis.pipeline(transaction=True)
            pipe.exists(self.key(container_id))
            pipe.persist(self.key(container_id))
            found, _ = pipe.execute()
        if not found:
            raise NotFound(f"container not found (unknown or expired): {container_id}")

    def unpin(self, container_id: str) -> None:
        """Give a pinned container the store's TTL again."""
        self.touch(container_id)

    def _fetch(self, container_ids: Sequence[str]) -> list[EmbeddingContainer | None]:
        # One round trip per node (one in all on a single Redis): an MGET per slot for the blobs and
        # PTTL for each key. The stored expires_at dates from the put; the live TTL reflects touch/pin since.
        keys = [self.key(cid) for cid in container_ids]
        replies: dict[str, tuple[Any, int]] = {}  # key → (blob, TTL in ms)
        for slots in by_node(self._redis, keys):
            node_keys = [key for slot in slots for key in slot]
            answers = pipelined(self._redis, *[("MGET", *slot) for slot in slots], *[("PTTL", key) for key in node_keys])
            blobs = [blob for values in answers[: len(slots)] for blob in values]
            replies.update(zip(node_keys, zip(blobs, answers[len(slots):])))
        now = time.time()
        found: list[EmbeddingContainer | None] = []
        for key in keys:
            blob, ttl_ms = replies[key]
            if blob is None:
                found.append(None)
                continue
            container = decode_container(blob, max_bytes=self.max_container_bytes)
            if ttl_ms >= 0:
                container.expires_at = now + ttl_ms / 1000
            elif ttl_ms == -1:  # pinned
                container.expires_at = None
            found.append(container)
        return found
