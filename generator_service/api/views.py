"""Stored generate jobs → API responses, and failed jobs → the caller's error."""

from __future__ import annotations

import json
from typing import Iterator

from generator_service.api.schemas import GenerateJob
from shared.config.errors import VlmqError, status_for_code
from shared.store.jobs import TERMINAL_STATUSES, JobStore
from shared.store.streams import TokenStreams


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


def wait_finished(jobs: JobStore, job_id: str, timeout_s: float) -> dict:
    job = jobs.wait(job_id, timeout_s)
    if job["status"] not in TERMINAL_STATUSES:
        raise VlmqError(f"job {job_id} did not finish within {timeout_s:.0f} s; poll /v1/jobs/{job_id}", code="timeout", status=504)
    raise_if_failed(job)
    return job


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def stream_events(streams: TokenStreams, job_id: str, timeout_s: float) -> Iterator[dict]:
    """The job's stream events; an error event if the stream goes silent for `timeout_s`."""
    for event in streams.follow(job_id, timeout_s):
        yield event
        if event["type"] == "end":
            return
    yield {"type": "end", "finish_reason": None, "error": {"code": "timeout", "message": f"no output for {timeout_s:.0f} s"}}
