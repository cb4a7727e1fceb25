"""Waiting is asynchronous: one API process (a real `vlmq api generate` subprocess) holds 1,000
concurrent `?wait=60` requests with no worker to finish them and still answers `/healthz`; the
abandoned waits leave nothing behind; SIGTERM stops it while waits are held, answering each."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time

import httpx
import pytest

from shared.config.settings import Settings
from shared.store.redis_conn import connect
from tests.support.services import REPO, free_port, service_env

CONCURRENT = 1000
# The bench (bench/serving.py) reports the p99 against the 100 ms on a quiet machine;
# this bound only says the process is not starved while it holds the waits.
HEALTHZ_P99_BOUND_S = 0.5


@pytest.fixture
def api(redis_server):
    # Database 7 and its own prefix: no worker of any other test takes these jobs.
    url = redis_server.url.rsplit("/", 1)[0] + "/7"
    settings = Settings(broker_url=url, store_url=url, key_prefix="waits:")
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "vlmq", "api", "generate", "--port", str(port), "--log-level", "warning"],
                               env=service_env(settings), cwd=REPO)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{base}/healthz").status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline and process.poll() is None, "the API did not start"
        time.sleep(0.1)
    yield base, process, settings
    if process.poll() is None:
        process.kill()
        process.wait()
    client = connect(url)
    client.flushdb()
    client.close()


def _metric(base: str, name: str) -> float:
    for line in httpx.get(f"{base}/metrics", timeout=30).text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise AssertionError(f"/metrics has no {name}")


async def _hold_waits(base: str, count: int) -> tuple[httpx.AsyncClient, list[asyncio.Task]]:
    """`count` requests waiting in the API, held open until their tasks are cancelled."""
    client = httpx.AsyncClient(base_url=base, timeout=120, limits=httpx.Limits(max_connections=count + 10))
    body = {"prompt": "USER: hi ASSISTANT:", "max_tokens": 4}
    tasks = [asyncio.create_task(client.post("/v1/generate", params={"wait": 60}, json=body)) for _ in range(count)]
    deadline = time.monotonic() + 60
    while await asyncio.to_thread(_metric, base, "vlmq_api_jobs_waited") < count:
        assert time.monotonic() < deadline, "the API never held every wait"
        assert not any(t.done() for t in tasks), [t.result().text for t in tasks if t.done()][:1]
        await asyncio.sleep(0.2)
    return client, tasks


async def _healthz_latencies(base: str, samples: int) -> list[float]:
    latencies = []
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        for _ in range(samples):
            started = time.perf_counter()
            assert (await client.get("/healthz")).status_code == 200
            latencies.append(time.perf_counter() - started)
    return sorted(latencies)


async def _abandon(client: httpx.AsyncClient, tasks: list[asyncio.Task]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await client.aclose()


def test_one_api_holds_a_thousand_waits_and_drops_them_when_their_clients_leave(api):
    base, process, settings = api

    async def scenario() -> list[float]:
        client, tasks = await _hold_waits(base, CONCURRENT)
        latencies = await _healthz_latencies(base, 200)
        assert (await asyncio.to_thread(httpx.get, f"{base}/v1/models")).status_code == 200
        await _abandon(client, tasks)
        return latencies

    latencies = asyncio.run(scenario())
    assert latencies[int(len(latencies) * 0.99) - 1] < HEALTHZ_P99_BOUND_S, latencies[-5:]
    deadline = time.monotonic() + 30
    while _metric(base, "vlmq_api_jobs_waited") > 0:
        assert time.monotonic() < deadline, "waits outlived their clients"
        time.sleep(0.2)
    # Nobody can read these jobs (their ids never reached a client): their work is dropped.
    store = connect(settings.effective_store_url)
    while True:
        statuses = [json.loads(store.get(key))["status"] for key in store.scan_iter(match="waits:job:*", count=1000)]
        if len(statuses) == CONCURRENT and set(statuses) == {"cancelled"}:
            break
        assert time.monotonic() < deadline, f"{statuses.count('cancelled')} of {CONCURRENT} jobs cancelled"
        time.sleep(0.2)


def test_sigterm_stops_an_api_holding_a_thousand_waits_within_5_s(api):
    base, process, _ = api

    async def scenario() -> float:
        client, tasks = await _hold_waits(base, CONCURRENT)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        await asyncio.to_thread(process.wait, 10)
        stopped = time.monotonic() - started
        answers = await asyncio.gather(*tasks, return_exceptions=True)
        await client.aclose()
        # Each held wait was answered before the process went: its job as it stands, to poll later.
        assert {getattr(answer, "status_code", repr(answer)) for answer in answers} == {202}
        return stopped

    assert asyncio.run(scenario()) < 5
