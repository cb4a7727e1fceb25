"""Generated text as it is produced: a Redis Stream per job at `{prefix}stream:{<job>}` (the job id its hash tag).

Entries are `{"type": "text", "text": ..., "tokens": n}` pieces (n: tokens generated so far),
then one `{"type": "end", "finish_reason": ..., "error": ..., "usage": {...}}`. Readers (the SSE endpoints, through
`shared.store.waiting`) block on XREAD, so any API process can stream any worker's job.
"""

from __future__ import annotations

import json
from typing import Iterator

import redis

from shared.store.jobs import stream_key
from shared.store.redis_conn import translate_connection_errors

READ_BLOCK_MS = 1000


def decode_events(entries: list) -> Iterator[dict]:
    """The events of XREAD entries ``[(entry_id, {b"e": json}), …]``."""
    for _entry_id, fields in entries:
        yield json.loads(fields[b"e"])


class TokenStreams:
    def __init__(self, client: redis.Redis, key_prefix: str, ttl_s: int):
        self._redis, self._prefix, self.ttl_s = client, key_prefix, ttl_s

    def key(self, job_id: str) -> str:
        return stream_key(self._prefix, job_id)

    def _add(self, job_id: str, event: dict) -> None:
        key = self.key(job_id)
        with translate_connection_errors(self._redis):
            pipe = self._redis.pipeline(transaction=False)
            pipe.xadd(key, {"e": json.dumps(event)})
            pipe.expire(key, self.ttl_s)
            pipe.execute()

    def add_text(self, job_id: str, text: str, tokens: int) -> None:
        """A piece of text, with the number of tokens generated up to it."""
        self._add(job_id, {"type": "text", "text": text, "tokens": tokens})

    def end(self, job_id: str, finish_reason: str | None, error: dict | None = None, usage: dict | None = None) -> None:
        """The last event: why the text ended, the error if it failed, the token counts if it ran."""
        self._add(job_id, {"type": "end", "finish_reason": finish_reason, "error": error,
                           **({"usage": usage} if usage is not None else {})})

    def reset(self, job_id: str) -> None:
        """A redelivered job starts its stream again rather than appending to a dead attempt's."""
        with translate_connection_errors(self._redis):
            self._redis.delete(self.key(job_id))
