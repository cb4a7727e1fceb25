"""Job state and claim-check blobs in the store Redis.

A job is JSON at ``{prefix}job:{<id>}``::

    {id, kind, tenant, status: queued|running|succeeded|failed|cancelled,
     error: {code, message} | None, result: dict | None, attempts, created_at, updated_at}

A job that finishes is announced on the pub/sub channel ``{prefix}finished`` (its id),
and a cancelled one also on ``{prefix}cancelled``, where workers stop its work.

Image bytes travel as blobs under ``{prefix}in:{uuid}``; a Celery message carries
only the key. Everything has a TTL.

A job's keys — its state, its done list, its token stream — carry the job id as a hash tag
(``job:{<id>}``): in a Redis Cluster they share a slot, so one transaction may touch them
together (docs/DESIGN.md §7).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis

from shared.config.errors import Forbidden, NotFound
from shared.store.redis_conn import translate_connection_errors

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
TERMINAL_STATUSES = frozenset({SUCCEEDED, FAILED, CANCELLED})

# A waiter blocks this long per call, well under the client's socket timeout.
_WAIT_SLICE_S = 1.0
_MIN_BLOCK_S = 0.01


def job_key(key_prefix: str, job_id: str) -> str:
    return f"{key_prefix}job:{{{job_id}}}"


def done_key(key_prefix: str, job_id: str) -> str:
    return f"{key_prefix}done:{{{job_id}}}"


def stream_key(key_prefix: str, job_id: str) -> str:
    return f"{key_prefix}stream:{{{job_id}}}"


def finished_channel(key_prefix: str) -> str:
    return f"{key_prefix}finished"


def decode_job(raw: bytes | None, job_id: str, tenant: str | None) -> dict[str, Any]:
    """A job as stored; ``NotFound`` if there is none, ``Forbidden`` if it is not ``tenant``'s (None: anyone's)."""
    if raw is None:
        raise NotFound(f"job not found (unknown or expired): {job_id}")
    job = json.loads(raw)
    if tenant is not None and job["tenant"] != tenant:
        raise Forbidden(f"job of another tenant: {job_id}")
    return job


class JobStore:
    """Create jobs, move them through their states, wait for them to finish.

    A finished job (succeeded or failed) is final: later ``mark_*`` calls — from
    a redelivered task, say — leave it as it is and return it, so a task can
    check the returned status and skip work already done.
    """

    def __init__(self, client: redis.Redis, key_prefix: str = "vlmq:", ttl_s: int = 24 * 3600):
        self._redis = client
        self._prefix = key_prefix
        self.ttl_s = ttl_s

    def _job_key(self, job_id: str) -> str:
        return job_key(self._prefix, job_id)

    def _done_key(self, job_id: str) -> str:
        return done_key(self._prefix, job_id)

    def create(self, kind: str, tenant: str, *, job_id: str | None = None) -> str:
        """A new ``queued`` job; returns its id (a uuid4 hex unless given). An existing id is refused."""
        job_id = job_id or uuid.uuid4().hex
        now = time.time()
        job = {
            "id": job_id,
            "kind": kind,
            "tenant": tenant,
            "status": QUEUED,
            "error": None,
            "result": None,
            "attempts": 0,
            "created_at": now,
            "updated_at": now,
        }
        with translate_connection_errors(self._redis):
            created = self._redis.set(self._job_key(job_id), json.dumps(job), nx=True, ex=self.ttl_s)
        if not created:
            raise ValueError(f"job {job_id} already exists")
        return job_id

    def get(self, job_id: str, tenant: str | None = None) -> dict[str, Any]:
        """The job; ``NotFound`` if it is unknown or expired, ``Forbidden`` if another tenant's."""
        with translate_connection_errors(self._redis):
            raw = self._redis.get(self._job_key(job_id))
        return decode_job(raw, job_id, tenant)

    def mark_running(self, job_id: str) -> dict[str, Any]:
        """Record the start of an attempt (``attempts`` += 1)."""

        def start(job: dict[str, Any]) -> None:
            job["status"] = RUNNING
            job["attempts"] += 1

        return self._update(job_id, start)

    def mark_succeeded(self, job_id: str, result: dict[str, Any]) -> dict[str, Any]:
        """Finish the job with a small JSON-able ``result`` (keys and status, never tensors)."""

        def succeed(job: dict[str, Any]) -> None:
            job["status"] = SUCCEEDED
            job["result"] = result
            job["error"] = None

        return self._update(job_id, succeed)

    def mark_failed(self, job_id: str, code: str, message: str) -> dict[str, Any]:
        """Finish the job with an error the client will see as ``{code, message}``."""

        def fail(job: dict[str, Any]) -> None:
            job["status"] = FAILED
            job["error"] = {"code": code, "message": message}

        return self._update(job_id, fail)

    def cancel(self, job_id: str, tenant: str | None = None, reason: str = "cancelled by the client") -> dict[str, Any]:
        """End a job that has not finished as ``cancelled`` and tell the workers; a finished job stays as it is.

        ``NotFound`` / ``Forbidden`` as `get` for an unknown job or another tenant's.
        """
        self.get(job_id, tenant)

        def cancel(job: dict[str, Any]) -> None:
            job["status"] = CANCELLED
            job["error"] = {"code": "cancelled", "message": reason}

        job = self._update(job_id, cancel)
        if job["status"] == CANCELLED:
            with translate_connection_errors(self._redis):
                self._redis.publish(self.cancelled_channel, job_id)
        return job

    @property
    def finished_channel(self) -> str:
        return finished_channel(self._prefix)

    @property
    def cancelled_channel(self) -> str:
        return f"{self._prefix}cancelled"

    def wait(self, job_id: str, timeout_s: float, tenant: str | None = None) -> dict[str, Any]:
        """The job once it has finished, or as it stands after ``timeout_s``.

        Finishing pushes a marker to ``{prefix}done:{<id>}``. Waiters block on it with
        ``BLMOVE`` from the list to itself, which returns the marker without
        consuming it, so any number of waiters wake — and late ones return at once.
        """
        deadline = time.monotonic() + timeout_s
        done_key = self._done_key(job_id)
        while True:
            job = self.get(job_id, tenant)
            remaining = deadline - time.monotonic()
            if job["status"] in TERMINAL_STATUSES or remaining <= 0:
                return job
            # Redis reads a timeout that rounds to 0 ms as "block forever": never ask for less than the floor.
            with translate_connection_errors(self._redis):
                self._redis.blmove(done_key, done_key, min(max(remaining, _MIN_BLOCK_S), _WAIT_SLICE_S), "RIGHT", "LEFT")

    def put_blob(self, data: bytes) -> str:
        """Store bytes (an uploaded image) for a worker to fetch; returns the key."""
        key = f"{self._prefix}in:{uuid.uuid4().hex}"
        with translate_connection_errors(self._redis):
            self._redis.set(key, data, ex=self.ttl_s)
        return key

    def get_blob(self, key: str) -> bytes:
        """The bytes under a key from ``put_blob``; ``NotFound`` once expired or deleted."""
        self._check_blob_key(key)
        with translate_connection_errors(self._redis):
            data = self._redis.get(key)
        if data is None:
            raise NotFound(f"upload not found (expired or already processed): {key}")
        return data

    def delete_blob(self, key: str) -> bool:
        self._check_blob_key(key)
        with translate_connection_errors(self._redis):
            return self._redis.delete(key) == 1

    def _check_blob_key(self, key: str) -> None:
        # Keys arrive in task messages: never let one name a key outside the upload space.
        if not key.startswith(f"{self._prefix}in:"):
            raise ValueError(f"{key!r} is not an upload key under {self._prefix}in:")

    def _update(self, job_id: str, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        # Optimistic transaction: WATCH the job, apply the change, write it back; a
        # concurrent writer makes EXEC fail and redis-py runs this again.
        key = self._job_key(job_id)
        finishing = False

        def transaction(pipe: redis.client.Pipeline) -> dict[str, Any]:
            nonlocal finishing
            raw = pipe.get(key)
            if raw is None:
                raise NotFound(f"job not found (unknown or expired): {job_id}")
            job = json.loads(raw)
            if job["status"] in TERMINAL_STATUSES:
                return job
            change(job)
            job["updated_at"] = time.time()
            finishing = job["status"] in TERMINAL_STATUSES
            pipe.multi()
            pipe.set(key, json.dumps(job), ex=self.ttl_s)
            if finishing:
                pipe.lpush(self._done_key(job_id), b"1")
                pipe.expire(self._done_key(job_id), self.ttl_s)
            return job

        with translate_connection_errors(self._redis):
            job = self._redis.transaction(transaction, key, value_from_callable=True)
            if finishing:
                # After EXEC, not inside it: a cluster transaction runs on the job's slot and takes
                # no PUBLISH. A waiter woken reads the job committed; one never woken (this process
                # died in between) reads it at its timeout, and a blocking waiter has the done list.
                self._redis.publish(self.finished_channel, job_id)
        return job
