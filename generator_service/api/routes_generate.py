"""`POST /v1/generate`, `/v1/jobs/{id}` (state, cancel) and the job's stream: vlmq's own generation API.

Routes are async: waiting for a job or following its stream holds no thread, and a
client that disconnects while its job is waited for or streamed cancels the job.
"""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from generator_service.api.schemas import GenerateJob, GenerateRequest, JobAccepted
from generator_service.api.views import job_view, raise_if_failed, sse, stream_events
from generator_service.tokenizer import count_images, default_alias_ids
from shared.config.errors import InvalidInput
from shared.config.settings import Settings
from shared.queue.tasks import enqueue_generate
from shared.store.jobs import TERMINAL_STATUSES, JobStore
from shared.store.streams import TokenStreams
from shared.store.waiting import JobWaiters
from shared.web.app import Tenant
from shared.web.deps import CeleryDep, JobsDep, SettingsDep, StoreDep, StreamsDep, WaitersDep
from shared.web.job_routes import job_routes
from shared.web.waits import sse_response, wait_for_job

router = APIRouter(prefix="/v1", tags=["generate"])
jobs_router = job_routes(job_view, GenerateJob)

STREAM_SILENCE_TIMEOUT_S = 300


def check_max_tokens(max_tokens: int, limit: int) -> None:
    if max_tokens > limit:
        raise InvalidInput(f"max_tokens must be ≤ {limit} (VLMQ_MAX_NEW_TOKENS), got {max_tokens}")


def check_prompt_size(chars: int, images: int, settings: Settings) -> None:
    """The caps a request meets before anything is fetched or queued (`images` may stop counting past the cap)."""
    if chars > settings.max_prompt_chars:
        raise InvalidInput(f"the prompt is {chars} characters, over the limit of {settings.max_prompt_chars} (VLMQ_MAX_PROMPT_CHARS)")
    if images > settings.max_images_per_request:
        raise InvalidInput(f"the request holds more than {settings.max_images_per_request} images (VLMQ_MAX_IMAGES_PER_REQUEST)")


@router.post("/generate", status_code=202, response_model=JobAccepted,
             responses={200: {"model": GenerateJob, "description": "The finished job, with `wait` (202 if it is not finished by then)"},
                        404: {"description": "An image alias names no stored container"}})
async def generate(body: GenerateRequest, request: Request, tenant: Tenant, settings: SettingsDep, jobs: JobsDep,
                   store: StoreDep, celery: CeleryDep, streams: StreamsDep, waiters: WaitersDep,
                   wait: float | None = Query(None, ge=0, le=600, description="Seconds to wait for the result")):
    """Enqueue a generation; wait for it (`?wait=`), or stream it (`"stream": true`, Server-Sent Events)."""
    check_max_tokens(body.max_tokens, settings.max_new_tokens)
    limit = settings.max_images_per_request
    check_prompt_size(len(body.prompt), count_images(body.prompt, body.images, limit + 1), settings)

    def enqueue() -> str:
        # Fail fast on unknown or expired containers; the worker checks model and size.
        wanted = list(dict.fromkeys([*default_alias_ids(body.prompt), *body.images.values()]))
        if wanted:
            store.get_many(wanted, tenant=tenant)
        payload = {"prompt": body.prompt, "images": body.images, "sampling": body.sampling(), "stop": body.stops(), "stream": body.stream}
        return enqueue_generate(celery, jobs, tenant, payload)

    job_id = await run_in_threadpool(enqueue)
    if body.stream:
        return job_stream_response(waiters, streams, jobs, job_id, cancel_on_disconnect=True)
    if wait:
        job = await wait_for_job(request, waiters, jobs, job_id, wait)
        if job["status"] in TERMINAL_STATUSES:
            raise_if_failed(job)  # the caller's mistake found by the worker keeps its 4xx
            return JSONResponse(job_view(job).model_dump(), status_code=200)
        # Not finished in time: as without `wait` (and as the embedder answers), not a server error.
    return JobAccepted(job_id=job_id, status="queued", status_url=f"/v1/jobs/{job_id}", stream_url=f"/v1/jobs/{job_id}/stream")


@router.get("/jobs/{job_id}/stream", response_class=StreamingResponse)
def stream_job(job_id: str, tenant: Tenant, jobs: JobsDep, streams: StreamsDep, waiters: WaitersDep):
    """The text of a job submitted with `"stream": true`, as Server-Sent Events, from its start.

    Leaving this stream does not cancel the job (the stream of `POST /v1/generate` does)."""
    jobs.get(job_id, tenant=tenant)
    return job_stream_response(waiters, streams, jobs, job_id, cancel_on_disconnect=False)


def job_stream_response(waiters: JobWaiters, streams: TokenStreams, jobs: JobStore, job_id: str, *,
                        cancel_on_disconnect: bool) -> StreamingResponse:
    async def events():
        async for event in stream_events(waiters, streams, job_id, STREAM_SILENCE_TIMEOUT_S):
            yield sse({"job_id": job_id, **event})
        yield sse("[DONE]")

    return sse_response(events(), jobs, job_id, cancel_on_disconnect=cancel_on_disconnect)
