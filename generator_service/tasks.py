"""The `vlmq.generate` Celery task: thin — run the pipeline, stream text, record the job.

In a chain after `vlmq.embed` (bulk captioning), the embed task's result arrives
as the first argument: chat image parts without a `container_id` take its
containers in order, and a failed embed fails this job with the same reason.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import TYPE_CHECKING, Callable

from celery import Celery

from generator_service.chat_template import image_parts
from shared.config.errors import InvalidInput, StoreUnavailable, VlmqError
from shared.queue.celery_app import AttemptLimitedTask
from shared.queue.metrics import WorkerStats
from shared.queue.tasks import GENERATE_TASK
from shared.store.cancel_watch import CancelWatch
from shared.store.jobs import SUCCEEDED, TERMINAL_STATUSES, JobStore
from shared.store.streams import TokenStreams

if TYPE_CHECKING:  # the pipeline needs torch; tests import this module without it
    from generator_service.pipeline import GeneratePipeline

log = logging.getLogger(__name__)


def _fill_chained_images(payload: dict, embed_result: dict) -> dict:
    if embed_result["status"] != "succeeded":
        error = embed_result.get("error") or {}
        raise VlmqError(error.get("message", "the image could not be embedded"), code=error.get("code", "embed_failed"), status=400)
    ids = iter(embed_result["container_ids"])
    payload = copy.deepcopy(payload)
    for part in image_parts(payload.get("messages") or []):
        if not part.get("container_id"):
            part["container_id"] = next(ids, None)
            if part["container_id"] is None:
                raise InvalidInput("the chat has more image parts than the embed job produced containers")
    return payload


def run_generate_job(pipeline: GeneratePipeline, jobs: JobStore, streams: TokenStreams, stats: WorkerStats, cancels: CancelWatch,
                     job_id: str, tenant: str, payload: dict, embed_result: dict | None = None) -> dict:
    job = jobs.get(job_id)
    if job["status"] in TERMINAL_STATUSES:  # a redelivery of a job that already finished
        return {"job_id": job_id, "status": job["status"]}
    jobs.mark_running(job_id)
    streams.reset(job_id)
    on_text = (lambda text, tokens: streams.add_text(job_id, text, tokens)) if payload.get("stream") else None
    started = time.perf_counter()
    try:
        if embed_result is not None:
            payload = _fill_chained_images(payload, embed_result)
        result = pipeline.generate(tenant, payload, on_text, watch_cancel=lambda cancel: cancels.watch(job_id, cancel))
    except StoreUnavailable:
        raise  # not the request's fault: the task requeues the job (AttemptLimitedTask)
    except VlmqError as exc:
        jobs.mark_failed(job_id, exc.code, exc.message)
        streams.end(job_id, None, exc.to_dict())
        stats.add(jobs_failed=1)
        return {"job_id": job_id, "status": "failed"}
    job = jobs.mark_succeeded(job_id, result)  # a job cancelled meanwhile stays cancelled
    streams.end(job_id, result["finish_reason"], usage=result["usage"])
    stats.add(completion_tokens=result["usage"]["completion_tokens"], prompt_tokens=result["usage"]["prompt_tokens"])
    if job["status"] == SUCCEEDED:
        stats.add(jobs_succeeded=1)
        stats.observe("latency_seconds", time.perf_counter() - started)
    return {"job_id": job_id, "status": job["status"]}


class GenerateTask(AttemptLimitedTask):
    _cancels: CancelWatch | None = None

    @property
    def cancels(self) -> CancelWatch:
        """This process's listener for cancelled jobs (one per process, as the store client)."""
        if self._cancels is None:
            self._cancels = CancelWatch(self.store_redis, self.jobs)
        return self._cancels

    @property
    def streams(self) -> TokenStreams:
        settings = self.vlmq_settings
        return TokenStreams(self.store_redis, settings.key_prefix, settings.job_ttl_s)

    def on_job_failed(self, job: dict) -> None:
        # A stream's reader waits for an end event: a job failed outside `run_generate_job` must send one too.
        self.streams.end(job["id"], None, job["error"])


def register_generate_task(app: Celery, get_pipeline: Callable[[], GeneratePipeline]) -> None:
    @app.task(name=GENERATE_TASK, base=GenerateTask, bind=True)
    def generate(self: GenerateTask, embed_result: dict | None = None, *, job_id: str, tenant: str, payload: dict) -> dict:
        stats = WorkerStats(self.store_redis, self.vlmq_settings.key_prefix, "generate")
        return run_generate_job(get_pipeline(), self.jobs, self.streams, stats, self.cancels, job_id, tenant, payload, embed_result)
