"""Running a Celery worker for one vlmq queue in this process."""

from __future__ import annotations

import os
from collections.abc import Sequence

import redis
from celery import Celery

from shared.config.errors import StoreUnavailable
from shared.queue.heartbeat import WorkerHeartbeat
from shared.store.redis_conn import connect, describe_auth_error


def check_credentials(url: str) -> None:
    """Exit with one clear line if Redis at `url` refuses the URL's credentials.

    Celery would retry a refused login forever, logging the same error; a wrong
    password never fixes itself. A Redis that is merely down is left to Celery,
    which waits for it.
    """
    try:
        client = connect(url, retries=0)  # a cluster client reads the slot map here: StoreUnavailable if none answers
    except StoreUnavailable:
        return
    try:
        client.ping()
    except redis.AuthenticationError as exc:
        raise SystemExit(f"vlmq worker: {describe_auth_error(client, exc)}") from None
    except (redis.ConnectionError, redis.TimeoutError):
        pass
    finally:
        client.close()


def run_celery_worker(app: Celery, queues: str | Sequence[str], *, concurrency: int, device: str, model_path: str,
                      loglevel: str = "INFO") -> None:
    """Serve `queues` (one name or several) with `concurrency` threads until SIGTERM/SIGINT (warm shutdown:
    running jobs finish).

    Threads, not processes: the model is loaded once in this process and the
    threads share it; batching across concurrent jobs happens inside the process.
    """
    queues = [queues] if isinstance(queues, str) else list(queues)
    settings = app.vlmq_settings
    for url in dict.fromkeys([settings.broker_url, settings.effective_store_url]):
        check_credentials(url)
    info = {"device": device, "model": model_path}
    client = connect(settings.effective_store_url)
    heartbeats = [WorkerHeartbeat(client, settings.key_prefix, queue, info).start() for queue in queues]
    name = f"{'+'.join(queues)}-{device.replace(':', '')}-{os.getpid()}@%h"  # unique per process; %h is the host
    try:
        app.worker_main([
            "worker", "--queues", ",".join(queues), "--pool", "threads", "--concurrency", str(concurrency),
            "--hostname", name, "--without-gossip", "--without-mingle", "--without-heartbeat",
            "--loglevel", loglevel,
        ])
    finally:
        for heartbeat in heartbeats:
            heartbeat.stop()
