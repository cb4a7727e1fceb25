"""The generator end to end: real Redis, embed and generate worker subprocesses, HTTP on real sockets,
and the official `openai` package as a client of the chat endpoint."""

from __future__ import annotations

import base64
import json

import httpx
import openai
import pytest

from embedder_service.api.app import create_app as create_embed_app
from embedder_service.worker import build_pipeline as build_embed_pipeline
from generator_service.api.app import create_app as create_generate_app
from tests.support.images import png_bytes
from tests.support.services import api_server, worker_process
from tests.support.tiny_models import build_tiny_llava


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="module")
def stack(checkpoint, redis_server, tmp_path_factory):
    from shared.config.settings import Settings

    settings = Settings(broker_url=redis_server.url, key_prefix="gen-e2e:", max_new_tokens=64)
    with worker_process("embed", checkpoint, settings), worker_process("generate", checkpoint, settings), \
            api_server(create_embed_app(settings)) as embed_url, api_server(create_generate_app(settings)) as generate_url:
        yield {"embed": embed_url, "generate": generate_url, "settings": settings}


def embed(stack, seed: int) -> dict:
    job = httpx.post(f"{stack['embed']}/v1/embeddings?wait=60", files={"file": ("a.png", png_bytes(seed), "image/png")}).json()
    assert job["status"] == "succeeded", job
    return job["images"][0]


def generate(stack, **body) -> httpx.Response:
    return httpx.post(f"{stack['generate']}/v1/generate?wait=60", json=body, timeout=90)


def test_generate_with_default_alias_and_own_alias(stack):
    container = embed(stack, 1)
    by_default = generate(stack, prompt=f"USER: {container['alias']}\nDescribe this image. ASSISTANT:", max_tokens=12, temperature=0)
    assert by_default.status_code == 200, by_default.text
    result = by_default.json()
    assert result["status"] == "succeeded" and result["finish_reason"] in ("length", "stop")
    assert result["usage"]["image_tokens"] == container["num_tokens"]
    assert len(result["token_ids"]) == result["usage"]["completion_tokens"] <= 12
    own = generate(stack, prompt="USER: <photo>\nDescribe this image. ASSISTANT:", images={"<photo>": container["id"]}, max_tokens=12, temperature=0)
    assert own.json()["token_ids"] == result["token_ids"]  # same IDs in, same greedy tokens out


def test_stream_matches_the_waited_result(stack):
    container = embed(stack, 2)
    body = {"prompt": f"{container['alias']} A photo of", "max_tokens": 16, "temperature": 0}
    waited = generate(stack, **body).json()
    pieces, end = [], None
    with httpx.stream("POST", f"{stack['generate']}/v1/generate", json={**body, "stream": True}, timeout=90) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event["type"] == "text":
                pieces.append(event["text"])
            else:
                end = event
    assert "".join(pieces) == waited["text"]
    assert end["finish_reason"] == waited["finish_reason"]


def test_same_seed_same_text(stack):
    container = embed(stack, 3)
    body = {"prompt": f"{container['alias']} The", "max_tokens": 16, "temperature": 1.0, "top_p": 0.9, "seed": 1234}
    assert generate(stack, **body).json()["text"] == generate(stack, **body).json()["text"]


def test_openai_client_chat_with_data_url_and_container(stack):
    client = openai.OpenAI(base_url=f"{stack['generate']}/v1", api_key="unused", timeout=90)
    data_url = "data:image/png;base64," + base64.b64encode(png_bytes(4)).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}},
                                             {"type": "text", "text": "What is this?"}]}]
    completion = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert completion.choices[0].finish_reason in ("length", "stop")
    assert completion.usage.completion_tokens >= 1
    text = completion.choices[0].message.content

    container = embed(stack, 4)  # the same bytes: the container the data URL made
    by_id = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"vlmq://container/{container['id']}"}},
                                          {"type": "text", "text": "What is this?"}]}]
    stream = client.chat.completions.create(model="tiny", messages=by_id, max_tokens=10, temperature=0, stream=True)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == text
    assert [m.id for m in client.models.list()] == [stack_model_name(stack)]


def stack_model_name(stack) -> str:
    from shared.queue.heartbeat import live_workers
    from shared.store.redis_conn import connect

    settings = stack["settings"]
    workers = live_workers(connect(settings.effective_store_url), settings.key_prefix, "generate")
    return workers[0]["model"].rsplit("/", 1)[-1]


def test_errors_are_4xx_and_the_worker_keeps_serving(stack, tmp_path):
    container = embed(stack, 5)
    unknown = generate(stack, prompt="<image:0123abcd> hi", max_tokens=4)
    assert unknown.status_code == 404 and "0123abcd" in unknown.json()["error"]["message"]
    unbound = generate(stack, prompt="<pic> hi", images={"<pic>": "feedbeef"}, max_tokens=4)
    assert unbound.status_code == 404
    too_long = generate(stack, prompt=f"{container['alias']} " + "word " * 400, max_tokens=4)
    assert too_long.status_code == 400 and "exceeds" in too_long.json()["error"]["message"]
    for field, value in [("temperature", -1), ("top_p", 0), ("top_p", 1.5), ("max_tokens", 0), ("max_tokens", 10_000), ("top_k", -2)]:
        bad = generate(stack, prompt="hi", **{field: value})
        assert bad.status_code == 400 and field in bad.json()["error"]["message"], (field, value, bad.text)
    malformed = httpx.post(f"{stack['generate']}/v1/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert malformed.status_code == 400

    other = build_tiny_llava(tmp_path / "other", seed=7)
    foreign = build_embed_pipeline(stack["settings"], str(other), "cpu").embed(png_bytes(6), "public")
    wrong_model = generate(stack, prompt=f"{foreign.alias} hi", max_tokens=4)
    assert wrong_model.status_code == 409 and "model" in wrong_model.json()["error"]["message"]

    still_serving = generate(stack, prompt=f"{container['alias']} hi", max_tokens=4, temperature=0)
    assert still_serving.status_code == 200 and still_serving.json()["status"] == "succeeded"
