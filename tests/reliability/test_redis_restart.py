"""Redis restarts and outages: clients reconnect, APIs answer 503 while Redis is down, runs complete.

A private redis-server with AOF on (so queues, unacked messages and job state
survive a restart, as they do in production) serves one worker of each kind and
both APIs. Redis is restarted in the middle of a run; later it is stopped, every
route of both APIs is called while it is down, and it is started again.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from embedder_service.api.app import create_app as create_embed_app
from generator_service.api.app import create_app as create_generate_app
from shared.config.settings import Settings
from shared.queue.celery_app import create_celery_app
from shared.queue.tasks import embed_signature
from shared.store.jobs import JobStore
from shared.store.redis_conn import connect
from tests.support.images import png_bytes
from tests.support.reliability import (
    chains_outcome,
    embed_then_generate,
    submit_until_some_finish,
)
from tests.support.services import (
    REPO,
    api_server,
    free_port,
    service_env,
    worker_processes,
    workers_and_apis,
)
from vlmq.redis_server import EmbeddedRedis

# Jobs whose ack was lost with the connection come back after this long.
VISIBILITY_TIMEOUT_S = 5
# An API call while Redis is down must answer within this (the client retries with backoff for ~3 s).
OUTAGE_ANSWER_S = 6.0


@pytest.fixture(scope="module")
def aof_stack(demo_model):
    with EmbeddedRedis(appendonly=True) as server:
        settings = Settings(broker_url=server.url, key_prefix="restart:", visibility_timeout_s=VISIBILITY_TIMEOUT_S,
                            max_new_tokens=8)
        with workers_and_apis(demo_model, settings) as (embed_url, generate_url):
            yield {"server": server, "settings": settings, "embed": embed_url, "generate": generate_url}


def test_a_run_survives_a_redis_restart(aof_stack):
    server, settings = aof_stack["server"], aof_stack["settings"]
    client = connect(settings.effective_store_url)
    jobs = JobStore(client, settings.key_prefix, settings.job_ttl_s)
    celery = create_celery_app(settings)
    started = time.monotonic()
    chains, done_before = submit_until_some_finish(celery, jobs, client, settings.key_prefix, 2000, 40, 5, timeout_s=30)
    server.restart()  # SIGTERM (AOF flushed), then a new process on the same port and folder
    restarted_at = time.monotonic()

    # Through the APIs too, after the restart: the APIs' clients reconnect by themselves.
    embed_then_generate(aof_stack["embed"], aof_stack["generate"], 2100, wait_s=30)

    figures, finished = chains_outcome("redis restart", client, settings.key_prefix, jobs, chains, started, timeout_s=45)
    figures.extra = {"done_before_restart": done_before, "seconds_after_restart": round(time.monotonic() - restarted_at, 1)}
    figures.print()
    assert figures.lost == 0 and figures.duplicated == 0
    assert [j["error"] for j in finished.values() if j["status"] != "succeeded"] == []


def _routes(embed: str, generate: str, container_id: str) -> list[tuple[str, str, dict]]:
    png = png_bytes(7)
    data_url = "data:image/png;base64," + base64.b64encode(png).decode()
    return [
        ("POST", f"{embed}/v1/embeddings", {"files": {"file": ("a.png", png, "image/png")}}),
        ("POST", f"{embed}/v1/embeddings", {"json": {"images": [{"base64": base64.b64encode(png).decode()}]}}),
        ("GET", f"{embed}/v1/jobs/abc", {}),
        ("GET", f"{embed}/v1/containers/{container_id}", {}),
        ("GET", f"{embed}/v1/containers/{container_id}/tensor", {}),
        ("DELETE", f"{embed}/v1/containers/{container_id}", {}),
        ("GET", f"{embed}/readyz", {}),
        ("POST", f"{generate}/v1/generate", {"json": {"prompt": "hi", "max_tokens": 2}}),
        ("POST", f"{generate}/v1/generate", {"json": {"prompt": f"<image:{container_id}> hi", "max_tokens": 2}}),
        ("POST", f"{generate}/v1/generate", {"json": {"prompt": "hi", "max_tokens": 2, "stream": True}}),
        ("GET", f"{generate}/v1/jobs/abc", {}),
        ("GET", f"{generate}/v1/jobs/abc/stream", {}),
        ("POST", f"{generate}/v1/chat/completions", {"json": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}}),
        ("POST", f"{generate}/v1/chat/completions", {"json": {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url}}, {"type": "text", "text": "hi"}]}], "max_tokens": 2}}),
        ("GET", f"{generate}/v1/models", {}),
        ("GET", f"{generate}/readyz", {}),
    ]


def _timed(method: str, url: str, kwargs: dict) -> tuple[str, str, int, float, dict]:
    began = time.monotonic()
    response = httpx.request(method, url, timeout=30, **kwargs)
    return method, url, response.status_code, time.monotonic() - began, response.json()["error"]


def test_while_redis_is_down_every_route_answers_503_and_work_resumes_after(aof_stack):
    embed, generate, server = aof_stack["embed"], aof_stack["generate"], aof_stack["server"]
    job = httpx.post(f"{embed}/v1/embeddings?wait=30", files={"file": ("a.png", png_bytes(2200), "image/png")}, timeout=40).json()
    container_id = job["images"][0]["id"]
    server.stop()
    try:
        # All at once, so Redis stays down for seconds only: a Celery worker retries its broker
        # connection 2, 4, 6 … (up to 30) s apart, and a long outage would slow its return.
        with ThreadPoolExecutor(len(routes := _routes(embed, generate, container_id))) as pool:
            answers = list(pool.map(lambda route: _timed(*route), routes))
        # The processes themselves are fine: liveness says so, and metrics still render.
        assert httpx.get(f"{embed}/healthz").status_code == 200
        assert httpx.get(f"{generate}/metrics").status_code == 200
    finally:
        server.start()
    print("\n[redis down] " + ", ".join(f"{m} {u.split('/', 3)[-1][:40]}: {s} in {t:.1f} s" for m, u, s, t, _ in answers))
    for method, url, status, seconds, error in answers:
        assert status == 503, (method, url, status, error)
        assert seconds < OUTAGE_ANSWER_S, (method, url, seconds)
        assert error["code"] in ("store_unavailable", "broker_unavailable")
        assert "unreachable" in error["message"], error

    # Redis is back: the workers and APIs reconnected and serve again.
    again = httpx.post(f"{embed}/v1/embeddings?wait=40", files={"file": ("a.png", png_bytes(2201), "image/png")}, timeout=50)
    assert again.status_code == 200 and again.json()["status"] == "succeeded", again.text
    alias = again.json()["images"][0]["alias"]
    generated = httpx.post(f"{generate}/v1/generate?wait=40", json={"prompt": f"{alias} hi", "max_tokens": 2}, timeout=50)
    assert generated.status_code == 200 and generated.json()["status"] == "succeeded", generated.text


def test_publishing_to_a_dead_broker_is_a_quick_503(redis_url, key_prefix):
    """Store up, broker down: the job is created but its message cannot be sent. Publishing retries a
    bounded number of times (create_celery_app's policy), then kombu's OperationalError becomes a 503."""
    settings = Settings(broker_url=f"redis://127.0.0.1:{free_port()}/0", store_url=redis_url, key_prefix=key_prefix)
    with api_server(create_embed_app(settings)) as embed, api_server(create_generate_app(settings)) as generate:
        for url, kwargs in [
            (f"{embed}/v1/embeddings", {"files": {"file": ("a.png", png_bytes(8), "image/png")}}),
            (f"{generate}/v1/generate", {"json": {"prompt": "hi", "max_tokens": 2}}),
            (f"{generate}/v1/chat/completions", {"json": {"messages": [{"role": "user", "content": "hi"}]}}),
        ]:
            began = time.monotonic()
            response = httpx.post(url, timeout=60, **kwargs)
            seconds = time.monotonic() - began
            assert response.status_code == 503, (url, response.text)
            assert response.json()["error"] == {
                "code": "broker_unavailable",
                "message": "the job queue (Redis broker) is unreachable, try again shortly",
            }
            assert seconds < OUTAGE_ANSWER_S, (url, seconds)


def test_caption_with_redis_gone_for_good_exits_with_one_clear_line(tmp_path, demo_model):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(png_bytes(9))
    port = free_port()  # nothing listens there
    env = service_env(Settings(broker_url=f"redis://127.0.0.1:{port}/0", key_prefix="gone:"))
    began = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "vlmq", "caption", str(tmp_path / "images"), "--model", str(demo_model),
                             "--prompt", "hi", "--out", str(tmp_path / "out.jsonl"), "--no-progress"],
                            env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (f"vlmq caption: error: Redis at 127.0.0.1:{port} unreachable: "
                                     f"Error 111 connecting to 127.0.0.1:{port}. Connection refused."), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert time.monotonic() - began < OUTAGE_ANSWER_S + 5


def test_a_job_that_finds_the_store_down_is_requeued_not_failed(demo_model, redis_server):
    """Store and broker apart: with the store down, a delivered job cannot even be counted. The task puts
    its message back (after a pause) instead of being acked as done, and runs once the store returns."""
    broker_url = redis_server.url.rsplit("/", 1)[0] + "/6"  # a database of this test's own
    with EmbeddedRedis(appendonly=True) as store:
        settings = Settings(broker_url=broker_url, store_url=store.url, key_prefix="store-down:")
        client = connect(store.url)
        jobs = JobStore(client, settings.key_prefix, settings.job_ttl_s)
        celery = create_celery_app(settings)
        with worker_processes(["embed"], demo_model, settings):
            job_id, signature = embed_signature(celery, jobs, "public", [png_bytes(2300)])
            store.stop()
            signature.apply_async()  # the broker is up: the message goes out, the worker takes it
            broker = connect(broker_url)
            # Watch the message while the store is down: it is always exactly once in the queue or
            # taken (unacked), and soon marked redelivered — the task put it back, it was not acked.
            seen: list[list[dict]] = []
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and not (seen and seen[-1][0]["headers"].get("redelivered")):
                snapshot = broker.pipeline(transaction=True)  # both reads at one instant
                queued, taken = snapshot.lrange("embed", 0, -1).hvals("unacked").execute()
                seen.append([json.loads(m) for m in queued] + [json.loads(entry)[0] for entry in taken])
                assert len(seen[-1]) == 1 and seen[-1][0]["headers"]["id"] == job_id, seen[-1]
                time.sleep(0.05)
            store.start()
            job = JobStore(connect(store.url), settings.key_prefix, settings.job_ttl_s).wait(job_id, timeout_s=30)
        broker.flushdb()
    assert seen[-1][0]["headers"]["redelivered"] is True
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 1  # the rounds without a store were not counted as attempts
