"""Running a Celery worker for one vlmq queue in this process."""

from __future__ import annotations

import os

from celery import Celery

from shared.heartbeat import WorkerHeartbeat
from shared.redis_conn import connect


def run_celery_worker(app: Celery, queue: str, *, concurrency: int, device: str, model_path: str, loglevel: str = "INFO") -> None:
    """Serve `queue` with `concurrency` threads until SIGTERM/SIGINT (warm shutdown: running jobs finish).

    Threads, not processes: the model is loaded once in this process and the
    threads share it; batching across concurrent jobs happens inside the process.
    """
    settings = app.vlmq_settings
    info = {"device": device, "model": model_path}
    heartbeat = WorkerHeartbeat(connect(settings.effective_store_url), settings.key_prefix, queue, info).start()
    name = f"{queue}-{device.replace(':', '')}-{os.getpid()}@%h"  # unique per process; %h is the host
    try:
        app.worker_main([
            "worker", "--queues", queue, "--pool", "threads", "--concurrency", str(concurrency),
            "--hostname", name, "--without-gossip", "--without-mingle", "--without-heartbeat",
            "--loglevel", loglevel,
        ])
    finally:
        heartbeat.stop()
