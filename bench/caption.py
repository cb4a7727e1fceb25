"""Bulk captioning on *bench-small* (docs/DESIGN.md §9): `vlmq caption` through queue and store vs the pipelines in one process.

bench-small (bench/common.py): CLIP ViT-B/16 at 224 px (196 image tokens) +
projector + a SmolLM2-135M-shaped Llama (hidden 576, 30 layers, 9 heads, 3 KV
heads, MLP 1536, tied embeddings, vocab 49152), random weights, float32. It is
the LLaVA demo model at those sizes (no transformers, no download): the demo
tokenizer (400 tokens) with the LM's vocabulary padded to 49152 — the tokenizer
never produces the padded IDs and decoding skips them, but the LM computes
full-size logits, which is what the timing needs.

Two ways to caption the same N images (default 32) with the same prompt, greedy,
16 new tokens each, same Settings (batch sizes, dtype):

  queued   `python -m vlmq caption DIR --model CKPT ...` with no broker
           configured: it starts its private stack (embedded Redis, one embed
           worker process, one generate worker process), sends one
           `embed | generate` chain per image (at most 32 in flight), and writes
           out.jsonl. The figure is the command's own images/s, measured from the
           first enqueue to the last line written: it covers queue, store,
           claim-check uploads, job polling — not the one-off model loading at
           stack start (reported apart as `startup_s`).
  direct   this process builds the same two pipelines (`build_pipeline` of each
           worker module) and calls them: `EmbedPipeline.embed_many` on all images
           (the batcher makes batches of `embed_max_batch`), then
           `GeneratePipeline.generate` from `generate_max_batch` threads (the
           engine decodes them together) — what a worker does, minus Celery and
           the queue. Timed from reading the first file to the last caption.

Threads, on this 2-core machine: each worker process runs with
OMP_NUM_THREADS=1 (two processes, one core each: torch threads beyond the
cores only contend), and the direct run uses 2 threads (one process gets both
cores). Both sides thus have the whole machine; the queued side overlaps
embedding with generation across its two processes, the direct side runs
each phase on both cores. With more cores, raise `--worker-threads` to
cores ÷ 2 and `--direct-threads` to the core count.

Prints JSON lines (bench/common.py): the direct figure, then the queued one with ratio and target.

Usage: python bench/caption.py [--images 32] [--new-tokens 16] [--worker-threads 1] [--direct-threads 2] [--quick]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from common import REPO, compare, emit, parse_args, write_bench_small
from PIL import Image

BENCH = "caption"
PROMPT = "Describe this image in one sentence."
TENANT = "public"


def write_images(folder: Path, count: int) -> list[Path]:
    """Distinct random photos-sized-ish PNGs (larger than 224 px, so resize and crop run)."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    paths = []
    for index in range(count):
        pixels = torch.randint(0, 256, (240, 320, 3), generator=generator, dtype=torch.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels.numpy()).save(buffer, format="PNG")
        path = folder / f"image{index:03d}.png"
        path.write_bytes(buffer.getvalue())
        paths.append(path)
    return paths


def caption_payload(container_id: str, new_tokens: int) -> dict:
    content = [{"type": "image", "container_id": container_id}, {"type": "text", "text": PROMPT}]
    return {"messages": [{"role": "user", "content": content}], "sampling": {"max_tokens": new_tokens, "temperature": 0}, "stop": []}


def run_queued(checkpoint: Path, images: Path, out: Path, new_tokens: int, worker_threads: int) -> tuple[float, float, list[dict]]:
    """`vlmq caption` with its private stack; returns (images/s, seconds to start the stack, lines)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLMQ_")}  # no broker: the private stack
    env.update(OMP_NUM_THREADS=str(worker_threads), PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "vlmq", "caption", str(images), "--model", str(checkpoint), "--prompt", PROMPT,
               "--out", str(out), "--max-tokens", str(new_tokens), "--temperature", "0", "--max-in-flight", "32", "--no-progress"]
    started = time.perf_counter()
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"vlmq caption failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    match = re.search(r"in ([\d.]+) s: ([\d.]+) images/s", result.stdout)
    seconds, rate = float(match.group(1)), float(match.group(2))
    return rate, wall - seconds, [json.loads(line) for line in out.read_text().splitlines()]


def run_direct(checkpoint: Path, paths: list[Path], new_tokens: int, threads: int) -> tuple[float, dict[str, str]]:
    """Both pipelines in this process against a fresh Redis; returns (images/s, caption by path)."""
    from embedder_service.worker import build_pipeline as build_embed_pipeline
    from generator_service.worker import build_pipeline as build_generate_pipeline
    from shared.config.settings import Settings
    from vlmq.redis_server import EmbeddedRedis

    torch.set_num_threads(threads)
    with EmbeddedRedis() as redis_server:
        settings = Settings(broker_url=redis_server.url, store_url=redis_server.url)
        embedder = build_embed_pipeline(settings, str(checkpoint), "cpu")
        generator = build_generate_pipeline(settings, str(checkpoint), "cpu")
        started = time.perf_counter()
        containers = embedder.embed_many([path.read_bytes() for path in paths], TENANT)
        with ThreadPoolExecutor(max_workers=settings.generate_max_batch) as pool:
            results = list(pool.map(lambda c: generator.generate(TENANT, caption_payload(c.id, new_tokens)), containers))
        seconds = time.perf_counter() - started
    return len(paths) / seconds, {str(path): result["text"] for path, result in zip(paths, results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--worker-threads", type=int, default=1, help="torch threads of each worker process")
    parser.add_argument("--direct-threads", type=int, default=2, help="torch threads of the one-process run")
    args = parse_args(parser, quick={"images": 4, "new_tokens": 4})

    with tempfile.TemporaryDirectory(prefix="vlmq-bench-caption-") as tmp:
        tmp = Path(tmp)
        checkpoint = tmp / "bench-small"
        write_bench_small(checkpoint, "llava")
        paths = write_images(tmp / "images", args.images)
        queued, startup_s, lines = run_queued(checkpoint, tmp / "images", tmp / "out.jsonl", args.new_tokens, args.worker_threads)
        direct, direct_captions = run_direct(checkpoint, paths, args.new_tokens, args.direct_threads)

    same = sum(direct_captions.get(line["path"]) == line.get("caption") for line in lines)
    emit(BENCH, "images_per_s_direct", direct, "images/s", images=args.images, new_tokens=args.new_tokens, threads=args.direct_threads)
    compare(BENCH, "images_per_s_queued", queued, direct, "images/s", ">= 0.85", images=args.images, new_tokens=args.new_tokens,
            worker_threads=args.worker_threads, startup_s=startup_s, captions_equal_to_direct=f"{same}/{len(lines)}")


if __name__ == "__main__":
    main()
