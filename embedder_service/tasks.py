"""The `vlmq.embed` Celery task: thin — fetch the uploaded bytes, call the pipeline, record the job.

Senders build the message with `shared.queue.tasks.embed_signature`; the image bytes wait
in the store under `in:{uuid}` until the job has finished.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable

from celery import Celery

from shared.config.errors import NotFound, VlmqError
from shared.queue.celery_app import AttemptLimitedTask
from shared.queue.metrics import WorkerStats
from shared.queue.tasks import EMBED_TASK
from shared.store.jobs import TERMINAL_STATUSES, JobStore

if TYPE_CHECKING:  # the pipeline needs torch; tests import this module without it
    from embedder_service.pipeline import EmbedPipeline

log = logging.getLogger(__name__)


def run_embed_job(pipeline: EmbedPipeline, jobs: JobStore, stats: WorkerStats, job_id: str, tenant: str, blob_keys: list[str]) -> dict:
    """Embed every image of a job; the job fails (naming the image) if any image is bad."""
    job = jobs.get(job_id)
    if job["status"] in TERMINAL_STATUSES:  # a redelivery of a job that already finished
        return _task_result(job)
    jobs.mark_running(job_id)
    started = time.perf_counter()
    try:
        images = [jobs.get_blob(key) for key in blob_keys]
    except NotFound as exc:  # expired before a worker got to it (a store outage propagates: the job is requeued)
        return _task_result(jobs.mark_failed(job_id, exc.code, f"the uploaded image is gone: {exc.message}"))
    outcomes = pipeline.embed_many(images, tenant)
    failures = [(i, o) for i, o in enumerate(outcomes) if isinstance(o, VlmqError)]
    if failures:
        index, error = failures[0]
        prefix = f"image {index}: " if len(images) > 1 else ""
        job = jobs.mark_failed(job_id, error.code, prefix + error.message)
        stats.add(jobs_failed=1)
    else:
        job = jobs.mark_succeeded(job_id, {"containers": [c.metadata() for c in outcomes]})
        stats.add(jobs_succeeded=1, images=len(images))
        stats.observe("latency_seconds", time.perf_counter() - started)
    for key in blob_keys:
        jobs.delete_blob(key)
    return _task_result(job)


def _task_result(job: dict) -> dict:
    # Celery results stay small: keys and status, never tensors.
    containers = (job.get("result") or {}).get("containers", [])
    return {"job_id": job["id"], "status": job["status"], "error": job["error"], "container_ids": [c["id"] for c in containers]}


class EmbedTask(AttemptLimitedTask):
    def result_of_job(self, job: dict) -> dict:
        # Given up after too many attempts, the chained generate still gets the usual shape (and fails alike).
        return _task_result(job)


def register_embed_task(app: Celery, get_pipeline: Callable[[], EmbedPipeline]) -> None:
    @app.task(name=EMBED_TASK, base=EmbedTask, bind=True)
    def embed(self: EmbedTask, job_id: str, tenant: str, blob_keys: list[str]) -> dict:
        stats = WorkerStats(self.store_redis, self.vlmq_settings.key_prefix, "embed")
        return run_embed_job(get_pipeline(), self.jobs, stats, job_id, tenant, blob_keys)
