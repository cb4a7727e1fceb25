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
from starlette.concurrency import run_in_threadpool

from generator_service.api.routes_generate import STREAM_SILENCE_TIMEOUT_S, check_max_tokens, check_prompt_size
from generator_service.api.schemas import ChatCompletionRequest
from generator_service.api.views import sse, stream_events, wait_finished
from shared.config.errors import InvalidInput
from shared.config.settings import Settings
from shared.queue.heartbeat import live_workers
from shared.queue.tasks import enqueue_embed, enqueue_generate
from shared.store.jobs import JobStore
from shared.web.app import Tenant
from shared.web.deps import CeleryDep, JobsDep, SettingsDep, StoreDep, StreamsDep, WaitersDep
from shared.web.waits import sse_response

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


def _image_urls(body: ChatCompletionRequest, settings: Settings) -> list[str]:
    """The chat's image URLs, after the caps on text and images (checked before anything is decoded or fetched)."""
    parts = [p for m in body.messages if isinstance(m.content, list) for p in m.content]
    chars = sum(len(m.content) for m in body.messages if isinstance(m.content, str)) + sum(len(p.text or "") for p in parts)
    images = [p for p in parts if p.type == "image_url"]
    check_prompt_size(chars, len(images), settings)
    for index, part in enumerate(images):
        if part.image_url is None:
            raise InvalidInput(f"image {index}: an image_url part needs `image_url.url`")
    return [part.image_url.url for part in images]


async def _container_ids(urls: list[str], request: Request, tenant: str, settings: Settings, jobs: JobStore,
                         celery, store, waiters) -> list[str]:
    """One container id per image URL: named ones checked to exist, data URLs embedded first (and awaited)."""

    def check_and_enqueue() -> tuple[dict[int, str], str | None]:
        named = {i: match.group(1) for i, url in enumerate(urls) if (match := CONTAINER_URL.fullmatch(url))}
        uploads = [_decode_data_url(url, i, settings.max_upload_bytes) for i, url in enumerate(urls) if i not in named]
        if named:
            store.get_many(list(named.values()), tenant=tenant)  # 404 now for unknown or expired ones
        return named, enqueue_embed(celery, jobs, tenant, uploads) if uploads else None

    named, embed_job_id = await run_in_threadpool(check_and_enqueue)
    embedded = []
    if embed_job_id is not None:
        job = await wait_finished(request, waiters, jobs, embed_job_id, EMBED_TIMEOUT_S)
        embedded = [c["id"] for c in job["result"]["containers"]]
    uploaded = iter(embedded)
    return [named[i] if i in named else next(uploaded) for i in range(len(urls))]


def _worker_messages(body: ChatCompletionRequest, container_ids: list[str]) -> list[dict]:
    """The chat as the worker takes it: image parts as `{"type": "image", "container_id"}`."""
    ids = iter(container_ids)
    messages = []
    for message in body.messages:
        if isinstance(message.content, str):
            messages.append({"role": message.role, "content": message.content})
            continue
        content = [{"type": "text", "text": part.text or ""} if part.type == "text" else {"type": "image", "container_id": next(ids)}
                   for part in message.content]
        messages.append({"role": message.role, "content": content})
    return messages


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, tenant: Tenant, settings: SettingsDep,
                           jobs: JobsDep, store: StoreDep, celery: CeleryDep, streams: StreamsDep, waiters: WaitersDep):
    """OpenAI's chat completions, streaming or not; image parts as data URLs or stored containers.

    A client that disconnects before the answer is complete cancels the generation."""
    sampling = body.sampling()
    check_max_tokens(sampling["max_tokens"], settings.max_new_tokens)
    urls = _image_urls(body, settings)
    container_ids = await _container_ids(urls, request, tenant, settings, jobs, celery, store, waiters)
    payload = {"messages": _worker_messages(body, container_ids), "sampling": sampling, "stop": body.stops(), "stream": body.stream}
    job_id = await run_in_threadpool(enqueue_generate, celery, jobs, tenant, payload)
    completion_id, created = f"chatcmpl-{job_id}", int(time.time())
    model = body.model or await run_in_threadpool(_model_name, request)
    if not body.stream:
        result = (await wait_finished(request, waiters, jobs, job_id, COMPLETION_TIMEOUT_S))["result"]
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

    async def events():
        yield chunk({"role": "assistant", "content": ""})
        async for event in stream_events(waiters, streams, job_id, STREAM_SILENCE_TIMEOUT_S):
            if event["type"] == "text":
                yield chunk({"content": event["text"]})
            elif event.get("error"):
                yield sse({"error": event["error"]})
            else:
                yield chunk({}, event["finish_reason"])
        if include_usage:
            job = await waiters.get(job_id)
            if job["status"] == "succeeded":
                yield sse({"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                           "choices": [], "usage": job["result"]["usage"]})
        yield sse("[DONE]")

    return sse_response(events(), jobs, job_id, cancel_on_disconnect=True)


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
