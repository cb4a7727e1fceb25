"""OpenAI-compatible `POST /v1/chat/completions` and `GET /v1/models`.

Image parts are `image_url`s: `vlmq://container/{id}` names a stored container;
a `data:` URL is embedded first — sent to the embedder queue and awaited — so
an OpenAI client needs nothing but this endpoint.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from generator_service.api.routes_generate import (
    STREAM_SILENCE_TIMEOUT_S,
    check_max_tokens,
)
from generator_service.api.schemas import ChatCompletionRequest
from generator_service.api.views import sse, stream_events, wait_finished
from shared.config.errors import InvalidInput
from shared.queue.heartbeat import live_workers
from shared.queue.tasks import enqueue_embed, enqueue_generate
from shared.web.app import Tenant
from shared.web.deps import CeleryDep, JobsDep, SettingsDep, StoreDep, StreamsDep

router = APIRouter(prefix="/v1", tags=["openai"])

CONTAINER_URL = re.compile(r"vlmq://container/([0-9a-f]{1,128})")
DATA_URL = re.compile(r"data:image/[\w.+-]+;base64,(.*)", re.DOTALL)
EMBED_TIMEOUT_S = 120
COMPLETION_TIMEOUT_S = 600


def _decode_data_url(url: str, index: int, max_bytes: int) -> bytes:
    match = DATA_URL.fullmatch(url)
    if not match:
        raise InvalidInput(f"image {index}: image_url must be `data:image/...;base64,...` or `vlmq://container/{{id}}`")
    try:
        data = base64.b64decode(match.group(1), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"image {index}: the data URL is not valid base64") from None
    if len(data) > max_bytes:
        raise InvalidInput(f"image {index} is {len(data)} bytes, over the limit of {max_bytes}", code="too_large", status=413)
    return data


def _messages_with_containers(body: ChatCompletionRequest, tenant: str, settings, jobs, celery, store) -> list[dict]:
    """The chat as the worker takes it: image parts as `{"type": "image", "container_id"}`."""
    parts = [p for m in body.messages if isinstance(m.content, list) for p in m.content]
    images = [p for p in parts if p.type == "image_url"]
    for index, part in enumerate(images):
        if part.image_url is None:
            raise InvalidInput(f"image {index}: an image_url part needs `image_url.url`")
    uploads = {i: _decode_data_url(p.image_url.url, i, settings.max_upload_bytes)
               for i, p in enumerate(images) if not CONTAINER_URL.fullmatch(p.image_url.url)}
    container_ids = {i: CONTAINER_URL.fullmatch(p.image_url.url).group(1) for i, p in enumerate(images) if i not in uploads}
    if container_ids:
        store.get_many(list(container_ids.values()), tenant=tenant)  # 404 now for unknown or expired ones
    if uploads:
        job = wait_finished(jobs, enqueue_embed(celery, jobs, tenant, list(uploads.values())), EMBED_TIMEOUT_S)
        container_ids.update(zip(uploads, (c["id"] for c in job["result"]["containers"])))
    image_index = iter(range(len(images)))
    messages = []
    for message in body.messages:
        if isinstance(message.content, str):
            messages.append({"role": message.role, "content": message.content})
            continue
        content = []
        for part in message.content:
            if part.type == "text":
                content.append({"type": "text", "text": part.text or ""})
            else:
                content.append({"type": "image", "container_id": container_ids[next(image_index)]})
        messages.append({"role": message.role, "content": content})
    return messages


@router.post("/chat/completions")
def chat_completions(body: ChatCompletionRequest, request: Request, tenant: Tenant, settings: SettingsDep,
                     jobs: JobsDep, store: StoreDep, celery: CeleryDep, streams: StreamsDep):
    """OpenAI's chat completions, streaming or not; image parts as data URLs or stored containers."""
    sampling = body.sampling()
    check_max_tokens(sampling["max_tokens"], settings.max_new_tokens)
    messages = _messages_with_containers(body, tenant, settings, jobs, celery, store)
    payload = {"messages": messages, "sampling": sampling, "stop": body.stops(), "stream": body.stream}
    job_id = enqueue_generate(celery, jobs, tenant, payload)
    completion_id, created, model = f"chatcmpl-{job_id}", int(time.time()), body.model or _model_name(request)
    if not body.stream:
        result = wait_finished(jobs, job_id, COMPLETION_TIMEOUT_S)["result"]
        return {
            "id": completion_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result["text"]},
                         "finish_reason": result["finish_reason"], "logprobs": None}],
            "usage": result["usage"],
        }
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(delta: dict, finish_reason: str | None = None) -> str:
        return sse({"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]})

    def events():
        yield chunk({"role": "assistant", "content": ""})
        for event in stream_events(streams, job_id, STREAM_SILENCE_TIMEOUT_S):
            if event["type"] == "text":
                yield chunk({"content": event["text"]})
            elif event.get("error"):
                yield sse({"error": event["error"]})
            else:
                yield chunk({}, event["finish_reason"])
        if include_usage:
            job = jobs.get(job_id)
            if job["status"] == "succeeded":
                yield sse({"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                           "choices": [], "usage": job["result"]["usage"]})
        yield sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream")


def _model_name(request: Request) -> str:
    names = _served_models(request)
    return names[0] if names else "vlmq"


def _served_models(request: Request) -> list[str]:
    state = request.app.state
    workers = live_workers(state.redis, state.settings.key_prefix, "generate")
    return sorted({Path(w.get("model", "vlmq")).name for w in workers})


@router.get("/models")
def list_models(request: Request, tenant: Tenant) -> dict:
    """The models the live generate workers serve (OpenAI's list format)."""
    return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "vlmq"} for name in _served_models(request)]}
