"""`POST /v1/embeddings`: images in (multipart, base64 or path), a job out."""

from __future__ import annotations

import base64
import binascii

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from embedder_service.api.schemas import EmbeddingsRequest, JobAccepted
from embedder_service.api.views import job_view
from shared.config.errors import InvalidInput, TooLarge
from shared.config.settings import Settings
from shared.media.paths import read_allowed_file
from shared.queue.tasks import enqueue_embed
from shared.store.jobs import TERMINAL_STATUSES
from shared.web.app import Tenant
from shared.web.deps import CeleryDep, JobsDep, SettingsDep, WaitersDep
from shared.web.waits import wait_for_job

router = APIRouter(prefix="/v1", tags=["embeddings"])

MULTIPART_FIELD = "file"


async def _images_from_multipart(request: Request, settings: Settings) -> list[bytes]:
    form = await request.form()
    uploads = form.getlist(MULTIPART_FIELD)
    if not uploads:
        raise InvalidInput(f"multipart body has no `{MULTIPART_FIELD}` field")
    images = []
    for upload in uploads:
        if isinstance(upload, str):
            raise InvalidInput(f"`{MULTIPART_FIELD}` must be a file upload, not a text field")
        images.append(await upload.read())
    return images


def _images_from_json(body: bytes, settings: Settings) -> list[bytes]:
    try:
        parsed = EmbeddingsRequest.model_validate_json(body)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise InvalidInput(f"invalid request body: {problems}") from None
    images = []
    for index, item in enumerate(parsed.images):
        if item.path is not None:
            images.append(read_allowed_file(item.path, settings.allowed_path_roots, settings.max_upload_bytes))
            continue
        try:
            images.append(base64.b64decode(item.base64, validate=True))
        except (binascii.Error, ValueError):
            raise InvalidInput(f"images.{index}.base64 is not valid base64") from None
    return images


@router.post(
    "/embeddings",
    status_code=202,
    response_model=JobAccepted,
    responses={200: {"description": "The finished job, when `wait` was given and it finished in time"}},
    openapi_extra={
        "requestBody": {
            "content": {
                "application/json": {"schema": EmbeddingsRequest.model_json_schema()},
                "multipart/form-data": {
                    "schema": {"type": "object", "properties": {MULTIPART_FIELD: {"type": "array", "items": {"type": "string", "format": "binary"}}}}
                },
            }
        }
    },
)
async def create_embeddings(
    request: Request,
    tenant: Tenant,
    settings: SettingsDep,
    jobs: JobsDep,
    celery: CeleryDep,
    waiters: WaitersDep,
    wait: float | None = Query(None, ge=0, le=300, description="Seconds to wait for the job to finish"),
):
    """Enqueue one job embedding one or more images; each becomes a container."""
    # This route is async (to stream the upload in, and to wait holding no thread); everything that
    # blocks — Redis, files — runs in the thread pool, or one client would stall the server.
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        images = await _images_from_multipart(request, settings)
    elif content_type.startswith("application/json"):
        images = await run_in_threadpool(_images_from_json, await request.body(), settings)
    else:
        raise InvalidInput("send multipart/form-data with `file` fields or application/json with `images`", status=415, code="unsupported_media_type")
    for index, data in enumerate(images):
        if len(data) > settings.max_upload_bytes:
            raise TooLarge(f"image {index} is {len(data)} bytes, over the limit of {settings.max_upload_bytes}")
        if not data:
            raise InvalidInput(f"image {index} is empty")
    job_id = await run_in_threadpool(enqueue_embed, celery, jobs, tenant, images)
    if wait:
        job = await wait_for_job(request, waiters, jobs, job_id, wait)
        if job["status"] in TERMINAL_STATUSES:
            return JSONResponse(job_view(job).model_dump(), status_code=200)
    return JobAccepted(job_id=job_id, status="queued", status_url=f"/v1/jobs/{job_id}")
