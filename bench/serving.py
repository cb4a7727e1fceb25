"""Serving under hostile load (issue 23): a real local stack (`vlmq.stack.LocalStack`, APIs as `vlmq api`
processes) driven over HTTP.

- waits: one generate API with no worker holds `--waits` concurrent `?wait=60` requests; /healthz latency
  meanwhile (p50, p99; target p99 < 100 ms), the waits left once their clients are gone (target 0), and
  how long the API takes to stop on SIGTERM while holding as many (target < 5 s).
- disconnect: `--streams` streams of bench-small LLaVA (SmolLM2-135M-shaped LM) decoding together, each
  closed by its client after 3 text events: tokens each generated after its client left, which with
  one token per stream per engine step is engine steps (target ≤ 2).
- cheap checks: a 2,000,000-alias prompt and a 4 MB prompt: time to the 400 (target < 100 ms), the
  generate worker's resident memory before and after, and another user's generate latency while one of
  each arrives against before (target: unchanged).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import signal
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
from common import emit, parse_args, write_bench_small
from PIL import Image

from shared.store.redis_conn import connect
from shared.store.jobs import stream_key
from shared.store.streams import decode_events
from vlmq.demo_model import write_demo_model
from vlmq.stack import ApiPorts, LocalStack, private_log_dir

BENCH = "serving"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stack(model: Path, workers: int) -> LocalStack:
    ports = ApiPorts(embed_port=_free_port(), generate_port=_free_port())
    return LocalStack(model, embed_workers=workers, generate_workers=workers, apis=ports, log_dir=private_log_dir())


def _metric(base: str, name: str) -> float:
    line = next(line for line in httpx.get(f"{base}/metrics", timeout=30).text.splitlines() if line.startswith(f"{name} "))
    return float(line.split()[1])


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))]


# -- waits ------------------------------------------------------------------------------------


async def _hold(base: str, count: int) -> tuple[httpx.AsyncClient, list[asyncio.Task]]:
    client = httpx.AsyncClient(base_url=base, timeout=120, limits=httpx.Limits(max_connections=count + 10))
    body = {"prompt": "USER: hi ASSISTANT:", "max_tokens": 4}
    tasks = [asyncio.create_task(client.post("/v1/generate", params={"wait": 60}, json=body)) for _ in range(count)]
    while await asyncio.to_thread(_metric, base, "vlmq_api_jobs_waited") < count:
        await asyncio.sleep(0.2)
    return client, tasks


async def _drop(client: httpx.AsyncClient, tasks: list[asyncio.Task]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await client.aclose()


def bench_waits(model: Path, count: int) -> None:
    with _stack(model, workers=0) as stack:
        base = stack.apis.url("generate")

        async def held_then_dropped() -> list[float]:
            client, tasks = await _hold(base, count)
            latencies = []
            async with httpx.AsyncClient(base_url=base) as probe:
                for _ in range(300):
                    started = time.perf_counter()
                    (await probe.get("/healthz")).raise_for_status()
                    latencies.append(time.perf_counter() - started)
            await _drop(client, tasks)
            return latencies

        latencies = asyncio.run(held_then_dropped())
        emit(BENCH, "healthz p50 while waits are held", _percentile(latencies, 0.5) * 1000, "ms", waits=count)
        p99 = _percentile(latencies, 0.99) * 1000
        emit(BENCH, "healthz p99 while waits are held", p99, "ms", waits=count, target="< 100", met=p99 < 100)
        time.sleep(2)
        left = _metric(base, "vlmq_api_jobs_waited")
        emit(BENCH, "waits left 2 s after their clients left", left, "requests", waits=count, target="0", met=left == 0)

        api = next(child.process for child in stack.children if child.name == "generate-api")

        async def stop_while_held() -> float:
            client, tasks = await _hold(base, count)
            started = time.monotonic()
            api.send_signal(signal.SIGTERM)
            await asyncio.to_thread(api.wait, 30)
            stopped = time.monotonic() - started
            await _drop(client, tasks)
            return stopped

        stopped = asyncio.run(stop_while_held())
        emit(BENCH, "SIGTERM to exit while waits are held", stopped, "s", waits=count, target="< 5", met=stopped < 5)


# -- disconnect -------------------------------------------------------------------------------


def _stream_then_leave(base: str, seed: int, seen: dict[str, int]) -> None:
    body = {"prompt": "USER: tell me a story ASSISTANT:", "max_tokens": 256, "temperature": 1.0, "seed": seed, "stream": True}
    with httpx.stream("POST", f"{base}/v1/generate", json=body, timeout=120) as response:
        texts = 0
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event["type"] == "text":
                texts += 1
                seen[event["job_id"]] = event["tokens"]
            if texts == 3:
                return  # closing the response closes the connection: the client has left


def _end_event(store, key_prefix: str, job_id: str) -> dict:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        events = list(decode_events(store.xrange(stream_key(key_prefix, job_id))))
        if events and events[-1]["type"] == "end":
            return events[-1]
        time.sleep(0.05)
    raise RuntimeError(f"job {job_id}'s stream never ended")


def bench_disconnect(model: Path, streams: int) -> None:
    with _stack(model, workers=1) as stack:
        base = stack.apis.url("generate")
        seen: dict[str, int] = {}
        threads = [threading.Thread(target=_stream_then_leave, args=(base, seed, seen)) for seed in range(streams)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        store = connect(stack.settings.effective_store_url)
        ends = {job_id: _end_event(store, stack.settings.key_prefix, job_id) for job_id in seen}
        after = [ends[job_id]["usage"]["completion_tokens"] - tokens for job_id, tokens in seen.items()]
        reasons = sorted({end["finish_reason"] for end in ends.values()})
        emit(BENCH, "tokens generated after the client left (worst stream)", max(after), "tokens (= engine steps)",
             streams=streams, median=statistics.median(after), finish_reasons=reasons, target="<= 2", met=max(after) <= 2)


# -- cheap checks -----------------------------------------------------------------------------


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (224, 224), (120, 40, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def _generate_seconds(http: httpx.Client, prompt: str) -> float:
    started = time.perf_counter()
    reply = http.post("/v1/generate", params={"wait": 300}, json={"prompt": prompt, "max_tokens": 8, "temperature": 0})
    assert reply.status_code == 200, reply.text
    return time.perf_counter() - started


def bench_cheap_checks(model: Path, rounds: int) -> None:
    with _stack(model, workers=1) as stack:
        embedded = httpx.post(f"{stack.apis.url('embed')}/v1/embeddings", params={"wait": 60}, files={"file": _png()}, timeout=70)
        container = embedded.json()["images"][0]["id"]
        http = httpx.Client(base_url=stack.apis.url("generate"), timeout=120)
        other_user = f"USER: <image:{container}> what is this? ASSISTANT:"
        hostile = {"2,000,000 aliases": {"prompt": "e" * 2_000_000, "images": {"e": container}},
                   "4 MB prompt": {"prompt": "word " * 800_000}}
        worker = next(child.process.pid for child in stack.children if child.worker_kinds == ("generate",))
        _generate_seconds(http, other_user)  # warm
        before = [_generate_seconds(http, other_user) for _ in range(rounds)]
        rss_before = _rss_mb(worker)
        for name, body in hostile.items():
            times = []
            for _ in range(rounds):
                started = time.perf_counter()
                reply = http.post("/v1/generate", json=body)
                times.append(time.perf_counter() - started)
                assert reply.status_code == 400, reply.text
            ms = statistics.median(times) * 1000
            emit(BENCH, f"{name}: time to the 400", ms, "ms", refusal=reply.json()["error"]["message"][:60], target="< 100", met=ms < 100)

        def attack() -> None:  # one of each, as the other user's request runs
            with httpx.Client(base_url=stack.apis.url("generate"), timeout=120) as attacker:
                for body in hostile.values():
                    attacker.post("/v1/generate", json=body)

        during = []
        for _ in range(rounds):
            attacker = threading.Thread(target=attack)
            attacker.start()
            during.append(_generate_seconds(http, other_user))
            attacker.join()
        growth = _rss_mb(worker) - rss_before
        emit(BENCH, "generate worker memory growth from the hostile prompts", growth, "MB", rss_before_mb=rss_before)
        median_before, median_during = statistics.median(before), statistics.median(during)
        emit(BENCH, "another user's generate latency while hostile prompts arrive", median_during, "s",
             baseline=median_before, ratio=median_during / median_before)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--waits", type=int, default=1000, help="concurrent ?wait requests held")
    parser.add_argument("--streams", type=int, default=8, help="streams left after 3 events")
    parser.add_argument("--rounds", type=int, default=5)
    args = parse_args(parser, quick={"waits": 50, "streams": 2, "rounds": 1})
    with tempfile.TemporaryDirectory() as tmp:
        bench_waits(write_demo_model(Path(tmp) / "demo"), args.waits)
        bench_small = Path(tmp) / "llava"
        write_bench_small(bench_small, "llava")
        bench_disconnect(bench_small, args.streams)
        bench_cheap_checks(bench_small, args.rounds)


if __name__ == "__main__":
    main()
