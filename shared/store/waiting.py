"""Waiting on jobs and token streams from an event loop (the APIs), holding no thread per waiter.

One pub/sub subscription per process (`JobWaiters`) wakes every request waiting on a
job when the job's finish is announced on ``{prefix}finished`` (`JobStore` publishes it
with the final state). A stream is followed with blocking ``XREAD`` on the asyncio
client. A waiter that is cancelled — its client went away — leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from typing import Any, AsyncIterator

import redis
import redis.asyncio

from shared.store.jobs import TERMINAL_STATUSES, decode_job, finished_channel, job_key
from shared.store.redis_conn import async_subscriber, translate_connection_errors
from shared.store.streams import READ_BLOCK_MS, decode_events

log = logging.getLogger(__name__)

# How long the subscription waits for a message before checking that it should go on.
_LISTEN_S = 1.0
# After losing the subscription, how long before subscribing again.
_RESUBSCRIBE_S = 0.5


class JobWaiters:
    """Requests waiting for jobs to finish, woken by one subscription to the finish announcements.

    `start()` and `stop()` run in the event loop that serves the requests (the API's lifespan).
    """

    def __init__(self, client: redis.asyncio.Redis, key_prefix: str):
        self._redis = client
        self._prefix = key_prefix
        self._events: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._listener: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = asyncio.Event()  # the server is stopping: waits return, streams end
        self.streams_followed = 0  # `follow` calls in progress, for /metrics

    @property
    def jobs_waited(self) -> int:
        """Requests waiting on a job right now."""
        return sum(len(events) for events in self._events.values())

    @property
    def closing(self) -> bool:
        return self._closing.is_set()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._listener = asyncio.create_task(self._listen(), name="vlmq-job-waiters")

    def close_soon(self) -> None:
        """From any thread (a signal handler): end every wait now, so that a stopping server answers its
        waiting clients (the job as it stands) instead of cutting them off after its grace period."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._close)

    def _close(self) -> None:
        self._closing.set()
        self._wake()

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
        await self._redis.aclose()

    async def get(self, job_id: str, tenant: str | None = None) -> dict[str, Any]:
        """The job as stored now (`JobStore.get` on the asyncio client)."""
        with translate_connection_errors(self._redis):
            raw = await self._redis.get(job_key(self._prefix, job_id))
        return decode_job(raw, job_id, tenant)

    async def wait(self, job_id: str, timeout_s: float, tenant: str | None = None) -> dict[str, Any]:
        """The job once it has finished, or as it stands after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        finished = asyncio.Event()
        self._events[job_id].add(finished)  # before reading the job: a finish from then on is not missed
        try:
            while True:
                job = await self.get(job_id, tenant)
                remaining = deadline - time.monotonic()
                if job["status"] in TERMINAL_STATUSES or remaining <= 0 or self._closing.is_set():
                    return job
                try:
                    await asyncio.wait_for(finished.wait(), remaining)
                except TimeoutError:
                    pass
                finished.clear()
        finally:
            self._events[job_id].discard(finished)
            if not self._events[job_id]:
                del self._events[job_id]

    async def follow(self, stream_key: str, timeout_s: float) -> AsyncIterator[dict]:
        """Every event of a token stream from its start, until its end event, `timeout_s` of silence,
        or the server stopping."""
        last_id, silent_ms = "0-0", 0
        self.streams_followed += 1
        try:
            while silent_ms < timeout_s * 1000 and not self._closing.is_set():
                with translate_connection_errors(self._redis):
                    reply = await self._redis.xread({stream_key: last_id}, block=READ_BLOCK_MS, count=256)
                if not reply:
                    silent_ms += READ_BLOCK_MS
                    continue
                silent_ms = 0
                entries = reply[0][1]
                last_id = entries[-1][0]
                for event in decode_events(entries):
                    yield event
                    if event["type"] == "end":
                        return
        finally:
            self.streams_followed -= 1

    def _wake(self, job_id: str | None = None) -> None:
        """Wake the waiters of `job_id`, or all of them (after a gap in the subscription)."""
        for events in ([self._events.get(job_id, ())] if job_id is not None else list(self._events.values())):
            for event in events:
                event.set()

    async def _listen(self) -> None:
        channel = finished_channel(self._prefix)
        while True:
            pubsub = None
            try:
                pubsub = await async_subscriber(self._redis)
                await pubsub.subscribe(channel)
                self._wake()  # a job may have finished while there was no subscription: everyone reads again
                while True:
                    message = await pubsub.get_message(timeout=_LISTEN_S)
                    if message is not None:
                        self._wake(message["data"].decode())
            except (redis.RedisError, OSError) as exc:  # the server gone, or a cluster mid-failover
                log.warning("job finish subscription lost (%s); subscribing again", type(exc).__name__)
                await asyncio.sleep(_RESUBSCRIBE_S)
            finally:
                if pubsub is not None:
                    await pubsub.aclose()
