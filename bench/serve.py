"""Load with image reuse (issue 24): streaming chats over HTTP against a local stack, prefix cache and chunked
prefill on vs off.

A bench-small checkpoint (LLaVA: 196 image tokens; `--family pixtral`: 768) behind a real local
stack (`vlmq.stack.LocalStack`: Redis, one embed and one generate worker, both APIs as processes),
started twice: with the engine's defaults (VLMQ_PREFIX_CACHE=on, VLMQ_PREFILL_CHUNK_TOKENS=512) and
with both off (VLMQ_PREFIX_CACHE=off, VLMQ_PREFILL_CHUNK_TOKENS=0). The images are embedded first
(not timed). Then `--requests` chats arrive as a Poisson process at `--rate` per second, the same
arrival times in both runs; each asks a question about an image: `--repeat-share` of them (default
0.5, rounded; never the first) about an image an earlier request asked about, the rest about a new one. Each chat streams
(`/v1/chat/completions`, stream) `--max-tokens` tokens; the client times the first text (TTFT)
and the gaps between texts (inter-token latency).

Prints JSON lines (bench/common.py) for the on run against the off run: throughput (completion
tokens ÷ the time from the first arrival to the last answer; target ≥ 1.5×; the default rate, 8/s, is
above what either run serves on 2 cores, so the figure compares what each serves, not the arrivals: at
2/s the on run kept up with the arrivals and its throughput was the arrival rate's, and at 4/s too on an
AMD EPYC of 2026-12-07, whose on run answered last 0.5 s after the last arrival (the throughput line's
after_last_arrival_s says how far behind the arrivals each run ended)), TTFT p50 (target
≤ 0.5×) and p99, ITL p50 and p99, and the share of looked-up prompt tokens found in the prefix
cache (from /metrics). The machine's other load changes every figure: compare the ratios. `--rounds` (default 2)
runs the two configurations in turn that many times, and each figure is the best of its configuration's rounds
(other load only ever slows a run: the most throughput, the least latency).

`--one-worker`: the stack as `vlmq up --one-worker` starts it (one process serving both queues).

Usage: python bench/serve.py [--family llava|pixtral] [--rate 8] [--requests 32] [--max-tokens 16] [--rounds 2] [--one-worker] [--quick]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import socket
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import httpx
from common import compare, emit, parse_args, write_bench_small
from PIL import Image

from vlmq.stack import ONE_WORKER, ApiPorts, LocalStack, private_log_dir

QUESTIONS = ["Describe the picture.", "What colours dominate it?", "What is in the top left corner?", "Is there a person?",
             "Write a caption.", "What is the mood of this image?", "Count the objects.", "What is in the background?"]
CONFIGS = {"on": {}, "off": {"VLMQ_PREFIX_CACHE": "off", "VLMQ_PREFILL_CHUNK_TOKENS": "0"}}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _png(seed: int, size: tuple[int, int]) -> bytes:
    rng = random.Random(seed)
    image = Image.frombytes("RGB", size, bytes(rng.getrandbits(8) for _ in range(size[0] * size[1] * 3)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _plan(requests: int, rate: float, share: float, seed: int = 0) -> list[tuple[float, int, str]]:
    """(arrival second, image index, question) per request: Poisson arrivals; `share` of the requests (rounded) ask
    about an image asked before, at random places after the first. Drawn per request instead, 32 requests at 50%
    had held 10 repeats (31%)."""
    rng = random.Random(seed)
    repeats = set(rng.sample(range(1, requests), min(round(share * requests), requests - 1)))
    at, asked, plan = 0.0, 0, []
    for index in range(requests):
        at += rng.expovariate(rate)
        if index in repeats:
            image = rng.randrange(asked)
        else:
            image, asked = asked, asked + 1
        plan.append((at, image, rng.choice(QUESTIONS)))
    return plan


def _chat(base: str, container: str, question: str, max_tokens: int, out: dict) -> None:
    """One streamed chat; out gets its start, the time of each text piece, and the completion tokens."""
    body = {"model": "bench", "stream": True, "max_tokens": max_tokens, "temperature": 0, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"vlmq://container/{container}"}},
                                                       {"type": "text", "text": question}]}]}
    out["start"], out["texts"], out["tokens"] = time.perf_counter(), [], 0
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("choices") and event["choices"][0]["delta"].get("content"):
                out["texts"].append(time.perf_counter())
            if event.get("usage"):
                out["tokens"] = event["usage"]["completion_tokens"]


def _metric(base: str, name: str) -> float:
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    return 0.0


def run(model: Path, config: dict[str, str], plan, image_bytes: list[bytes], max_tokens: int, workers: Mapping[str, int]) -> dict:
    saved = {key: os.environ.get(key) for key in config}
    os.environ.update(config)  # the stack's children inherit the environment
    try:
        ports = ApiPorts(embed_port=_free_port(), generate_port=_free_port())
        with LocalStack(model, **workers, apis=ports, log_dir=private_log_dir()):
            embed, generate = ports.url("embed"), ports.url("generate")
            containers = []
            for data in image_bytes:
                job = httpx.post(f"{embed}/v1/embeddings?wait=300", json={"images": [{"base64": base64.b64encode(data).decode()}]},
                                 timeout=330).json()
                assert job["status"] == "succeeded", job
                containers.append(job["images"][0]["id"])
            _chat(generate, containers[-1], "Warm up.", 2, {})  # the first forward's one-off costs, then a fresh image
            before = (_metric(generate, "vlmq_generate_prefix_hit_tokens_total"), _metric(generate, "vlmq_generate_prefix_lookup_tokens_total"))
            outs = [{} for _ in plan]
            threads, started = [], time.perf_counter()
            for (at, image, question), out in zip(plan, outs):
                time.sleep(max(0.0, started + at - time.perf_counter()))
                thread = threading.Thread(target=_chat, args=(generate, containers[image], question, max_tokens, out))
                thread.start()
                threads.append(thread)
            for thread in threads:
                thread.join()
            ended = max(out["texts"][-1] for out in outs)
            time.sleep(2.5)  # the engine's statistics reach the store once a second
            hits = _metric(generate, "vlmq_generate_prefix_hit_tokens_total") - before[0]
            lookups = _metric(generate, "vlmq_generate_prefix_lookup_tokens_total") - before[1]
    finally:
        for key, value in saved.items():
            if value is None:
                del os.environ[key]
            else:
                os.environ[key] = value
    ttft = sorted(out["texts"][0] - out["start"] for out in outs)
    itl = sorted(b - a for out in outs for a, b in zip(out["texts"], out["texts"][1:]))
    return {"throughput": sum(out["tokens"] for out in outs) / (ended - started - plan[0][0]),
            "ttft_p50": _percentile(ttft, 0.5), "ttft_p99": _percentile(ttft, 0.99),
            "itl_p50": _percentile(itl, 0.5), "itl_p99": _percentile(itl, 0.99), "hit_share": hits / lookups if lookups else 0.0,
            "after_last_arrival_s": ended - started - plan[-1][0]}


def _best(rounds: list[dict]) -> dict:
    """Each figure's best over `rounds`: the most throughput, the least latency (the hit share is the same in each)."""
    return {key: (max if key in ("throughput", "hit_share") else min)(r[key] for r in rounds) for key in rounds[0]}


def _percentile(values: list[float], share: float) -> float:
    return values[min(len(values) - 1, int(len(values) * share))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=["llava", "pixtral"], default="llava")
    parser.add_argument("--rate", type=float, default=8.0, help="arrivals per second (Poisson): above what either run serves")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--repeat-share", type=float, default=0.5)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--one-worker", action="store_true", help="the stack as `vlmq up --one-worker` starts it")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each configuration, in turn; the best of each figure is kept")
    args = parse_args(parser, quick={"requests": 8, "max_tokens": 8, "rounds": 1})
    plan = _plan(args.requests, args.rate, args.repeat_share)
    size = (512, 384) if args.family == "pixtral" else (224, 224)
    image_bytes = [_png(seed, size) for seed in range(max(image for _, image, _ in plan) + 2)]  # + the warm-up's
    bench = f"serve/bench-small/{args.family}"
    with tempfile.TemporaryDirectory() as tmp:
        write_bench_small(Path(tmp), args.family)
        workers = ONE_WORKER if args.one_worker else {}
        rounds: dict[str, list[dict]] = {name: [] for name in CONFIGS}
        for index in range(args.rounds):
            for name in list(CONFIGS)[:: -1 if index % 2 else 1]:  # on, off, then off, on: neither always runs first
                rounds[name].append(run(Path(tmp), CONFIGS[name], plan, image_bytes, args.max_tokens, workers))
    on, off = _best(rounds["on"]), _best(rounds["off"])
    context = dict(requests=args.requests, rate_per_s=args.rate, rounds=args.rounds, repeat_share=args.repeat_share, max_tokens=args.max_tokens,
                   workers="one worker serving both queues" if args.one_worker else "an embed and a generate worker",
                   note="on: prefix cache + 512-token chunks; off: neither")
    compare(bench, "throughput", on["throughput"], off["throughput"], "tokens/s", ">= 1.5", **context,
            last_arrival_s=round(plan[-1][0], 2),
            after_last_arrival_s={name: round(r["after_last_arrival_s"], 2) for name, r in (("on", on), ("off", off))})
    compare(bench, "ttft_p50", on["ttft_p50"] * 1e3, off["ttft_p50"] * 1e3, "ms", "<= 0.5")
    compare(bench, "ttft_p99", on["ttft_p99"] * 1e3, off["ttft_p99"] * 1e3, "ms")
    compare(bench, "itl_p50", on["itl_p50"] * 1e3, off["itl_p50"] * 1e3, "ms")
    compare(bench, "itl_p99", on["itl_p99"] * 1e3, off["itl_p99"] * 1e3, "ms")
    emit(bench, "prefix_hit_share", on["hit_share"], "share", off=off["hit_share"], note="hit ÷ looked-up prompt tokens")


if __name__ == "__main__":
    main()
