"""Workers announce themselves in the store so APIs and the CLI know someone is serving a queue."""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import redis

from shared.store.redis_conn import mget

HEARTBEAT_INTERVAL_S = 5.0
HEARTBEAT_TTL_S = 15


def _key(prefix: str, kind: str, worker_id: str) -> str:
    return f"{prefix}workers:{kind}:{worker_id}"


class WorkerHeartbeat:
    """A daemon thread refreshing `{prefix}workers:{kind}:{id}` with a short TTL while the worker lives."""

    def __init__(self, client: redis.Redis, prefix: str, kind: str, info: dict | None = None):
        self.client, self.prefix, self.kind = client, prefix, kind
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}"
        self.info = {"id": self.worker_id, **(info or {})}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"vlmq-heartbeat-{kind}", daemon=True)

    def start(self) -> "WorkerHeartbeat":
        self._thread.start()
        return self

    def _run(self) -> None:
        key = _key(self.prefix, self.kind, self.worker_id)
        while not self._stop.is_set():
            try:
                self.client.set(key, json.dumps({**self.info, "seen_at": time.time()}), ex=HEARTBEAT_TTL_S)
            except redis.exceptions.RedisError:
                pass  # Redis is down; the next beat after it returns re-registers us.
            self._stop.wait(HEARTBEAT_INTERVAL_S)

    def stop(self) -> None:
        self._stop.set()
        try:
            self.client.delete(_key(self.prefix, self.kind, self.worker_id))
        except redis.exceptions.RedisError:
            pass


def live_workers(client: redis.Redis, prefix: str, kind: str) -> list[dict]:
    keys = list(client.scan_iter(match=_key(prefix, kind, "*"), count=100))
    values = mget(client, keys) if keys else []
    return [json.loads(v) for v in values if v is not None]
