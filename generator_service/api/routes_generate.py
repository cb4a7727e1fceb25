"""`POST /v1/generate`, `GET /v1/jobs/{id}` and its stream: vlmq's own generation API."""

from __future__ import annotations

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse, StreamingResponse

from generator_service.api.schemas import GenerateJob, GenerateRequest, JobAccepted
from generator_service.api.views import job_view, raise_if_failed, sse, stream_events
from generator_service.tokenizer import default_alias_ids
from shared.config.errors import InvalidInput
from shared.queue.tasks import enqueue_generate
from shared.store.jobs import TERMINAL_STATUSES
from shared.web.app import Tenant
from shared.web.deps import CeleryDep, JobsDep, SettingsDep, StoreDep, StreamsDep

router = APIRouter(prefix="/v1", tags=["generate"])

STREAM_SILENCE_TIMEOUT_S = 300


def check_max_tokens(max_tokens: int, limit: int) -> None:
    if max_tokens > limit:
        raise InvalidInput(f"max_tokens must be ≤ {limit} (VLMQ_MAX_NEW_TOKENS), got {max_tokens}")


@router.post("/generate", status_code=202, response_model=JobAccepted,
             responses={200: {"model": GenerateJob, "description": "The finished job, with `wait` (202 if it is not finished by then)"},
                        404: {"description": "An image alias names no stored container"}})
def generate(body: GenerateRequest, tenant: Tenant, settings: SettingsDep, jobs: JobsDep, store: StoreDep,
             celery: CeleryDep, streams: StreamsDep,
             wait: float | None = Query(None, ge=0, le=600, description="Seconds to wait for the result")):
    """Enqueue a generation; wait for it (`?wait=`), or stream it (`"stream": true`, Server-Sent Events)."""
    check_max_tokens(body.max_tokens, settings.max_new_tokens)
    # Fail fast on unknown or expired containers; the worker checks model and size.
    wanted = list(dict.fromkeys([*default_alias_ids(body.prompt), *body.images.values()]))
    if wanted:
        store.get_many(wanted, tenant=tenant)
    payload = {"prompt": body.prompt, "images": body.images, "sampling": body.sampling(), "stop": body.stops(), "stream": body.stream}
    job_id = enqueue_generate(celery, jobs, tenant, payload)
    if body.stream:
        return job_stream_response(streams, job_id)
    if wait:
        job = jobs.wait(job_id, wait)
        if job["status"] in TERMINAL_STATUSES:
            raise_if_failed(job)  # the caller's mistake found by the worker keeps its 4xx
            return JSONResponse(job_view(job).model_dump(), status_code=200)
        # Not finished in time: as without `wait` (and as the embedder answers), not a server error.
    return JobAccepted(job_id=job_id, status="queued", status_url=f"/v1/jobs/{job_id}", stream_url=f"/v1/jobs/{job_id}/stream")


@router.get("/jobs/{job_id}", response_model=GenerateJob)
def get_job(job_id: str, tenant: Tenant, jobs: JobsDep) -> GenerateJob:
    return job_view(jobs.get(job_id, tenant=tenant))


@router.get("/jobs/{job_id}/stream", response_class=StreamingResponse)
def stream_job(job_id: str, tenant: Tenant, jobs: JobsDep, streams: StreamsDep):
    """The text of a job submitted with `"stream": true`, as Server-Sent Events, from its start."""
    jobs.get(job_id, tenant=tenant)
    return job_stream_response(streams, job_id)


def job_stream_response(streams, job_id: str) -> StreamingResponse:
    def events():
        for event in stream_events(streams, job_id, STREAM_SILENCE_TIMEOUT_S):
            yield sse({"job_id": job_id, **event})
        yield sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream")
