"""Stored generate jobs → API responses, failed jobs → the caller's error, token streams → Server-Sent Events."""

from __future__ import annotations

import json
from typing import AsyncIterator

from fastapi import Request

from generator_service.api.schemas import GenerateJob
from shared.config.errors import VlmqError, status_for_code
from shared.store.jobs import TERMINAL_STATUSES, JobStore
from shared.store.streams import TokenStreams
from shared.store.waiting import JobWaiters
from shared.web.waits import wait_for_job


def job_view(job: dict) -> GenerateJob:
    result = job.get("result") or {}
    return GenerateJob(
        id=job["id"], status=job["status"], error=job.get("error"), text=result.get("text"),
        token_ids=result.get("token_ids"), finish_reason=result.get("finish_reason"), usage=result.get("usage"),
        created_at=job["created_at"], updated_at=job["updated_at"],
    )


def raise_if_failed(job: dict) -> None:
    """A failed job becomes the error its worker recorded, with that error's HTTP status."""
    if job["status"] == "failed":
        error = job["error"] or {"code": "internal_error", "message": "the job failed"}
        raise VlmqError(error["message"], code=error["code"], status=status_for_code(error["code"]))


async def wait_finished(request: Request, waiters: JobWaiters, jobs: JobStore, job_id: str, timeout_s: float) -> dict:
    """The job once it has succeeded; its error if it failed; 504 if it is not finished within `timeout_s`."""
    job = await wait_for_job(request, waiters, jobs, job_id, timeout_s)
    if job["status"] not in TERMINAL_STATUSES:
        raise VlmqError(f"job {job_id} did not finish within {timeout_s:.0f} s; poll /v1/jobs/{job_id}", code="timeout", status=504)
    if job["status"] == "cancelled":
        raise VlmqError(f"job {job_id} was cancelled", code="cancelled", status=409)
    raise_if_failed(job)
    return job


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def stream_events(waiters: JobWaiters, streams: TokenStreams, job_id: str, timeout_s: float) -> AsyncIterator[dict]:
    """The job's stream events; an error event if the stream goes silent for `timeout_s`."""
    async for event in waiters.follow(streams.key(job_id), timeout_s):
        yield event
        if event["type"] == "end":
            return
    if waiters.closing:
        error = {"code": "unavailable", "message": f"this API process is stopping; read the rest at /v1/jobs/{job_id}/stream"}
    else:
        error = {"code": "timeout", "message": f"no output for {timeout_s:.0f} s"}
    yield {"type": "end", "finish_reason": None, "error": error}
