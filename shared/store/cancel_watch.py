"""A worker's ear for cancellations: calls a running job's cancel callback when its job is cancelled.

`JobStore.cancel` publishes the job's id on ``{prefix}cancelled``; one thread per worker
process listens and calls the callback of each watched job named, so a generation stops
at the engine's next step rather than at its next check of the job. After any gap in the
subscription (a Redis restart) every watched job is read again, so none is missed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import redis

from shared.store.jobs import CANCELLED, JobStore
from shared.store.redis_conn import subscriber

log = logging.getLogger(__name__)

_LISTEN_S = 1.0
_RESUBSCRIBE_S = 0.5


class CancelWatch:
    def __init__(self, client: redis.Redis, jobs: JobStore):
        self._redis = client
        self._jobs = jobs
        self._callbacks: dict[str, Callable[[], None]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @contextmanager
    def watch(self, job_id: str, on_cancel: Callable[[], None]) -> Iterator[None]:
        """Within the block, `on_cancel` runs (on the listening thread) once `job_id` is cancelled —
        at once if it already is."""
        self._start()
        with self._lock:
            self._callbacks[job_id] = on_cancel
        try:
            if self._jobs.get(job_id)["status"] == CANCELLED:
                on_cancel()
            yield
        finally:
            with self._lock:
                self._callbacks.pop(job_id, None)

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._listen, name="vlmq-cancel-watch", daemon=True)
                self._thread.start()

    def _cancel(self, job_id: str) -> None:
        with self._lock:
            callback = self._callbacks.get(job_id)
        if callback is not None:
            callback()

    def _recheck(self) -> None:
        with self._lock:
            watched = list(self._callbacks)
        for job_id in watched:
            if self._jobs.get(job_id)["status"] == CANCELLED:
                self._cancel(job_id)

    def _listen(self) -> None:
        while True:
            pubsub = subscriber(self._redis)  # on a cluster, a node at random: any node hears every PUBLISH
            try:
                pubsub.subscribe(self._jobs.cancelled_channel)
                self._recheck()  # a job cancelled while there was no subscription
                while True:
                    message = pubsub.get_message(timeout=_LISTEN_S)
                    if message is not None:
                        self._cancel(message["data"].decode())
            except Exception as exc:  # noqa: BLE001 - Redis down, a job expired mid-recheck: listen again
                log.warning("cancel subscription lost (%s: %s); subscribing again", type(exc).__name__, exc)
                time.sleep(_RESUBSCRIBE_S)
            finally:
                pubsub.close()
