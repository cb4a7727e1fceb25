"""Abandoned work stops: a client that leaves a stream or a wait cancels its job, and a job can be
cancelled explicitly (tenant-checked). Real Redis, real generate worker, real sockets."""

from __future__ import annotations

import json
import socket
import struct
import time

import httpx
import pytest

from generator_service.api.app import create_app
from shared.store.jobs import stream_key
from shared.store.redis_conn import connect
from shared.store.streams import decode_events
from tests.support.services import api_server

KEY_A, KEY_B = "cancel-key-a", "cancel-key-b"
A, B = {"Authorization": f"Bearer {KEY_A}"}, {"Authorization": f"Bearer {KEY_B}"}
# A generation left alone runs 1,500 tokens (EOS ignored): over a second on the tiny model, where the same
# request ending at its first EOS took 0.18 s and a cancel sent after the first event once came too late.
LONG = {"prompt": "USER: tell me a long story ASSISTANT:", "max_tokens": 1500, "ignore_eos": True, "temperature": 1.0, "seed": 7}


@pytest.fixture
def url(service_workers):
    settings = service_workers.model_copy(update={"api_keys": [KEY_A, KEY_B]})
    with api_server(create_app(settings)) as base:
        yield base


@pytest.fixture
def store(service_workers):
    client = connect(service_workers.effective_store_url)
    yield client
    client.close()


def _wait_status(url: str, job_id: str, statuses: set[str], timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/v1/jobs/{job_id}", headers=A).json()
        if job["status"] in statuses:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not reach {statuses}: {job}")


def _end_event(store, job_id: str, timeout_s: float = 60) -> dict:
    """The end event the worker wrote on the job's stream (it ends a cancelled stream too)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        events = list(decode_events(store.xrange(stream_key("svc:", job_id))))
        if events and events[-1]["type"] == "end":
            return events[-1]
        time.sleep(0.05)
    raise AssertionError(f"job {job_id}'s stream has no end event")


def _uncancelled_tokens(url: str) -> int:
    done = httpx.post(f"{url}/v1/generate", params={"wait": 120}, json=LONG, headers=A, timeout=130).json()
    assert done["status"] == "succeeded" and done["finish_reason"] == "length", done
    return done["usage"]["completion_tokens"]


def test_leaving_a_stream_cancels_its_generation(url, store):
    full = _uncancelled_tokens(url)
    assert full >= 100  # the same request left alone runs long enough for a cancel to show
    with httpx.stream("POST", f"{url}/v1/generate", json={**LONG, "stream": True}, headers=A, timeout=60) as response:
        events = []
        for line in response.iter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
            if len(events) == 3:
                break
    job_id = events[0]["job_id"]
    job = _wait_status(url, job_id, {"cancelled", "succeeded"})
    assert job["status"] == "cancelled" and job["error"]["code"] == "cancelled"
    end = _end_event(store, job_id)
    assert end["finish_reason"] == "cancelled"
    assert end["usage"]["completion_tokens"] < full // 2


def test_leaving_a_chat_stream_cancels_its_generation(url, store):
    chat = {"messages": [{"role": "user", "content": "tell me a long story"}], "max_tokens": 400, "seed": 7, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=chat, headers=A, timeout=60) as response:
        first = next(line for line in response.iter_lines() if line.startswith("data: {"))
    job_id = json.loads(first[6:])["id"].removeprefix("chatcmpl-")
    assert _wait_status(url, job_id, {"cancelled", "succeeded"})["status"] == "cancelled"


@pytest.fixture
def workerless_url(settings):
    """An API whose queue no worker takes from: its jobs stay queued until cancelled."""
    with api_server(create_app(settings.model_copy(update={"api_keys": [KEY_A, KEY_B]}))) as base:
        yield base


def test_a_queued_job_is_cancelled_by_its_tenant_only(workerless_url):
    url = workerless_url
    job_id = httpx.post(f"{url}/v1/generate", json=LONG, headers=A).json()["job_id"]
    assert httpx.delete(f"{url}/v1/jobs/{job_id}", headers=B).status_code == 403
    assert httpx.post(f"{url}/v1/jobs/{'0' * 32}/cancel", headers=A).status_code == 404
    assert httpx.get(f"{url}/v1/jobs/{job_id}", headers=A).json()["status"] == "queued"
    cancelled = httpx.delete(f"{url}/v1/jobs/{job_id}", headers=A)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["error"] == {"code": "cancelled", "message": "cancelled by the client"}
    # Cancelling a finished job changes nothing.
    again = httpx.post(f"{url}/v1/jobs/{job_id}/cancel", headers=A).json()
    assert again["status"] == "cancelled" and again["updated_at"] == cancelled.json()["updated_at"]


def test_cancelling_a_running_job_stops_it(url, store):
    # How soon it stops (in engine steps) is bench/serving.py's figure; here: that it stops early.
    full = _uncancelled_tokens(url)
    with httpx.stream("POST", f"{url}/v1/generate", json={**LONG, "stream": True}, headers=A, timeout=60) as response:
        lines = response.iter_lines()
        job_id = json.loads(next(line for line in lines if line.startswith("data: {"))[6:])["job_id"]
        httpx.post(f"{url}/v1/jobs/{job_id}/cancel", headers=A).raise_for_status()
        events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    end = events[-1]
    assert end["type"] == "end" and end["finish_reason"] == "cancelled"
    assert end["usage"]["completion_tokens"] < full


def test_a_client_that_resets_its_connection_mid_wait_cancels_its_job_and_leaves_no_waiter(workerless_url, settings):
    # A raw socket closed with a reset (SO_LINGER 0), as a crashed client leaves it, while its `?wait` is held.
    host, port = workerless_url.removeprefix("http://").split(":")
    body = json.dumps(LONG).encode()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/generate?wait=60 HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {KEY_A}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        _wait_metric(workerless_url, "vlmq_api_jobs_waited 1.0")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    _wait_metric(workerless_url, "vlmq_api_jobs_waited 0.0")
    client = connect(settings.effective_store_url)
    [key] = client.keys(f"{settings.key_prefix}job:*")
    job = json.loads(client.get(key))
    assert job["status"] == "cancelled" and job["error"]["message"] == "the client disconnected"


def _wait_metric(url: str, line: str, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if line in httpx.get(f"{url}/metrics").text.splitlines():
            return
        time.sleep(0.05)
    raise AssertionError(f"/metrics never showed {line!r}")
