"""Every job reaches a final state: a task that raises what is no vlmq error fails its job
(`internal_error`, without the exception's text) and ends its stream, and the worker goes on;
text the tokenizer cannot take (a lone surrogate) is refused at the API with a 400.

The worker is the production generate worker with one fault injected
(`tests/support/faulty_worker.py`), on real Redis, behind the real API on a real socket.
"""

from __future__ import annotations

import json
import sys

import httpx
import pytest

from generator_service.api.app import create_app
from shared.store.redis_conn import connect
from tests.support.faulty_worker import FAULT, FAULT_MESSAGE
from tests.support.reliability import Supervisor
from tests.support.services import REPO, api_server, service_env

WAIT_S = 60  # the worker loads its model while the first request waits in the queue


@pytest.fixture
def faulty_stack(demo_model, settings):
    argv = [sys.executable, "-m", "tests.support.faulty_worker", "--model", str(demo_model)]
    with Supervisor(argv, service_env(settings), str(REPO)) as supervisor, api_server(create_app(settings)) as url:
        yield url, supervisor


def stream_events(url: str, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{url}/v1/generate", json={**body, "stream": True}, timeout=WAIT_S) as response:
        assert response.status_code == 200, response.read()
        return [json.loads(line[len("data: "):]) for line in response.iter_lines() if line.startswith("data: {")]


def test_a_task_that_raises_fails_its_job_and_ends_its_stream(faulty_stack, settings):
    url, supervisor = faulty_stack
    waited = httpx.post(f"{url}/v1/generate", params={"wait": WAIT_S}, json={"prompt": f"USER: {FAULT} hi", "max_tokens": 4},
                        timeout=WAIT_S + 10)
    assert waited.status_code == 500, waited.text
    error = waited.json()["error"]
    assert error["code"] == "internal_error" and "TypeError" in error["message"]
    assert "secret" not in error["message"] and FAULT_MESSAGE not in waited.text  # the traceback stays in the worker's log

    [*text, end] = stream_events(url, {"prompt": f"USER: {FAULT} again", "max_tokens": 4})
    assert not text and end["type"] == "end" and end["error"]["code"] == "internal_error"
    job = httpx.get(f"{url}/v1/jobs/{end['job_id']}").json()
    assert job["status"] == "failed" and job["error"] == end["error"]
    attempts = connect(settings.effective_store_url).get(f"{settings.key_prefix}attempts:{end['job_id']}")
    assert int(attempts) == 1  # acked once failed: not redelivered

    ok = httpx.post(f"{url}/v1/generate", params={"wait": WAIT_S}, json={"prompt": "USER: hi", "max_tokens": 4}, timeout=WAIT_S + 10)
    assert ok.status_code == 200 and ok.json()["finish_reason"] in ("stop", "length"), ok.text
    assert supervisor.deaths == [] and supervisor.starts == 1  # the same worker served all three


LONE_SURROGATE = "USER: \\ud800 hi"  # JSON text: the escape a client sends, not a character


@pytest.mark.parametrize("request_kind", ["wait", "stream", "chat"])
def test_a_prompt_with_a_lone_surrogate_is_a_400_naming_it(faulty_stack, request_kind):
    url, _ = faulty_stack
    if request_kind == "chat":
        path, body = "/v1/chat/completions", f'{{"messages": [{{"role": "user", "content": "{LONE_SURROGATE}"}}]}}'
    else:
        path, body = "/v1/generate", f'{{"prompt": "{LONE_SURROGATE}", "stream": {"true" if request_kind == "stream" else "false"}}}'
    response = httpx.post(f"{url}{path}", params={"wait": 5} if request_kind == "wait" else None, content=body,
                          headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and "lone surrogate (U+D800 at character 6)" in error["message"]
