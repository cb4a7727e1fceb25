"""Bulk captioning on *bench-small* (docs/DESIGN.md §9): `vlmq caption` against the pipelines in one process,
against the `transformers` loop a user would write instead, and with two prompts per image.

bench-small (bench/common.py): CLIP ViT-B/16 at 224 px (196 image tokens) +
projector + a SmolLM2-135M-shaped Llama (hidden 576, 30 layers, 9 heads, 3 KV
heads, MLP 1536, tied embeddings, vocab 49152), random weights, float32. It is
the LLaVA demo model at those sizes (no download): the demo tokenizer (400
tokens) with the LM's vocabulary padded to 49152 — the rows of the padded IDs
and of the special tokens are zero, so greedy decoding picks the tokenizer's
text tokens (captions have text), but the LM computes full-size logits, which
is what the timing needs.

Four ways to caption the same N images (default 32), greedy, 16 new tokens each:

  queued        `python -m vlmq caption DIR --model CKPT ...` with no broker
                configured: it starts its private stack (embedded Redis, one worker
                process serving the embed and generate queues, its vision tower and
                LM taking turns on the cores: `vlmq worker all`), sends one
                `embed | generate` chain per image (at most 32 in flight), and
                writes out.jsonl. The figure is the command's own images/s, from
                the first enqueue to the last line written: it covers queue, store,
                claim-check uploads, job polling — not the one-off model loading at
                stack start (reported apart as `startup_s`).
  two prompts   the same command with two named prompts: each image embedded once,
                both prompts generated against its container. Compared in
                captions/s with the one-prompt run.
  direct        this process builds the same two pipelines (`build_pipeline` of each
                worker module, the private stack's generate batch) and calls them:
                `EmbedPipeline.embed_many` on all images, then
                `GeneratePipeline.generate` from `generate_max_batch` threads — what
                a worker does, minus Celery and the queue.
  transformers  the loop a user would write: `LlavaForConditionalGeneration.generate`
                on the same checkpoint over batches of 8 images, prepared by
                `LlavaProcessor` with the checkpoint's chat template, the same
                prompt and number of new tokens (`min_new_tokens` = `max_new_tokens`:
                EOS never ends a caption early).
  direct and transformers are timed from reading the first file to the last caption.

EOS: ignored on every side (`--ignore-eos` / `"ignore_eos": true` for vlmq), so every
caption is exactly the number of new tokens; each row reports the completion tokens
it produced, which shows it.

Threads: every contender runs `--threads` torch threads (default 2, this machine's
cores; OMP_NUM_THREADS for the private stack's worker), so each has the whole machine.

Prints JSON lines (bench/common.py): the direct and transformers figures, then the
queued one against each, then the two-prompt captions/s against the one-prompt run.

Each contender runs once per round (`--rounds`, default 3), in turn; the best round of each is kept (on the
noisy 2-core host of 2026-12-06 one contender moved ±30% between rounds: two were too few).

Usage: python bench/caption.py [--images 32] [--new-tokens 16] [--threads 2] [--rounds 3] [--quick]
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
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from common import REPO, compare, emit, parse_args, write_bench_small
from vlmq.caption.command import PRIVATE_GENERATE_BATCH
from PIL import Image

BENCH = "caption"
PROMPT = "Describe this image in one sentence."
SECOND_PROMPT = "List the objects in this image."
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
    return {"messages": [{"role": "user", "content": content}], "sampling": {"max_tokens": new_tokens, "temperature": 0, "ignore_eos": True}, "stop": []}


@dataclass
class QueuedRun:
    images_per_s: float
    captions_per_s: float
    startup_s: float
    completion_tokens: int
    lines: list[dict]


def run_queued(checkpoint: Path, images: Path, out: Path, new_tokens: int, threads: int, prompts: list[str]) -> QueuedRun:
    """`vlmq caption` with its private stack, one `--prompt` per entry of `prompts`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLMQ_")}  # no broker: the private stack
    env.update(OMP_NUM_THREADS=str(threads), PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "vlmq", "caption", str(images), "--model", str(checkpoint), "--out", str(out),
               "--max-tokens", str(new_tokens), "--ignore-eos", "--temperature", "0", "--max-in-flight", "32", "--no-progress"]
    for prompt in prompts:
        command += ["--prompt", prompt]
    started = time.perf_counter()
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"vlmq caption failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    match = re.search(r"in ([\d.]+) s: ([\d.]+) images/s", result.stdout)
    seconds, rate = float(match.group(1)), float(match.group(2))
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    captions = sum(1 for line in lines for name in ("caption", "short", "long") if name in line)
    return QueuedRun(rate, captions / seconds, wall - seconds, sum(line.get("completion_tokens", 0) for line in lines), lines)


@contextmanager
def direct_runner(checkpoint: Path, new_tokens: int, threads: int) -> Iterator[Callable[[list[Path], str], tuple[float, dict]]]:
    """Both pipelines in this process against a fresh Redis: yields run(paths, tenant) → (images/s, caption by path).
    Each round takes a tenant of its own, so no container of an earlier round is reused."""
    from embedder_service.worker import build_pipeline as build_embed_pipeline
    from generator_service.worker import build_pipeline as build_generate_pipeline
    from shared.config.settings import Settings
    from vlmq.redis_server import EmbeddedRedis

    torch.set_num_threads(threads)
    with EmbeddedRedis() as redis_server:
        # The generate batch of the private stack `vlmq caption` starts, so that both decode alike.
        settings = Settings(broker_url=redis_server.url, store_url=redis_server.url, generate_max_batch=PRIVATE_GENERATE_BATCH)
        embedder = build_embed_pipeline(settings, str(checkpoint), "cpu")
        generator = build_generate_pipeline(settings, str(checkpoint), "cpu")

        def run(paths: list[Path], tenant: str) -> tuple[float, dict[str, str]]:
            torch.set_num_threads(threads)
            started = time.perf_counter()
            containers = embedder.embed_many([path.read_bytes() for path in paths], tenant)
            with ThreadPoolExecutor(max_workers=settings.generate_max_batch) as pool:
                results = list(pool.map(lambda c: generator.generate(tenant, caption_payload(c.id, new_tokens)), containers))
            seconds = time.perf_counter() - started
            return len(paths) / seconds, {str(path): result["text"] for path, result in zip(paths, results)}

        yield run


def transformers_runner(checkpoint: Path, new_tokens: int, threads: int, batch: int = 8
                        ) -> Callable[[list[Path]], tuple[float, int, dict[str, str]]]:
    """The transformers loop over batches of `batch`: run(paths) → (images/s, completion tokens, caption by path)."""
    from transformers import AutoTokenizer, CLIPImageProcessorPil, LlavaForConditionalGeneration, LlavaProcessor

    config = json.loads((checkpoint / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    processor = LlavaProcessor(image_processor=CLIPImageProcessorPil.from_pretrained(checkpoint), tokenizer=tokenizer,
                               patch_size=config["vision_config"]["patch_size"],
                               vision_feature_select_strategy=config["vision_feature_select_strategy"],
                               chat_template=(checkpoint / "chat_template.jinja").read_text(), num_additional_image_tokens=1)
    model = LlavaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)

    def run(paths: list[Path]) -> tuple[float, int, dict[str, str]]:
        torch.set_num_threads(threads)
        captions, tokens = {}, 0
        started = time.perf_counter()
        with torch.inference_mode():
            for first in range(0, len(paths), batch):
                chunk = paths[first:first + batch]
                inputs = processor(images=[Image.open(path).convert("RGB") for path in chunk], text=[text] * len(chunk),
                                   return_tensors="pt", padding=True)
                output = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
                new = output[:, inputs["input_ids"].shape[1]:]
                tokens += new.numel()
                captions |= dict(zip(map(str, chunk), tokenizer.batch_decode(new, skip_special_tokens=True)))
        return len(paths) / (time.perf_counter() - started), tokens, captions

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every contender")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every contender; the best of each is kept")
    args = parse_args(parser, quick={"images": 4, "new_tokens": 4, "rounds": 1})

    # Every contender once per round, the rounds in turn, the best round of each kept: load on a shared host
    # only ever slows a run down, and each contender meets the same load.
    best: dict[str, tuple] = {}

    def keep(name: str, rate: float, *rest) -> None:
        if name not in best or rate > best[name][0]:
            best[name] = (rate, *rest)

    with tempfile.TemporaryDirectory(prefix="vlmq-bench-caption-") as tmp:
        tmp = Path(tmp)
        checkpoint = tmp / "bench-small"
        write_bench_small(checkpoint, "llava")
        paths = write_images(tmp / "images", args.images)
        queued_run = partial(run_queued, checkpoint, tmp / "images", new_tokens=args.new_tokens, threads=args.threads)
        transformers_run = transformers_runner(checkpoint, args.new_tokens, args.threads)
        with direct_runner(checkpoint, args.new_tokens, args.threads) as direct_run:
            for index in range(args.rounds):
                one = queued_run(tmp / f"one{index}.jsonl", prompts=[PROMPT])
                keep("queued", one.images_per_s, one)
                two = queued_run(tmp / f"two{index}.jsonl", prompts=[f"short={PROMPT}", f"long={SECOND_PROMPT}"])
                keep("two", two.captions_per_s, two)
                keep("direct", *direct_run(paths, f"round{index}"))
                keep("transformers", *transformers_run(paths))
    queued, two = best["queued"][1], best["two"][1]
    direct, direct_captions = best["direct"]
    reference, reference_tokens, reference_captions = best["transformers"]

    sizes = {"images": args.images, "new_tokens": args.new_tokens}
    same = sum(direct_captions.get(line["path"]) == line.get("caption") for line in queued.lines)
    same_hf = sum(reference_captions.get(line["path"]) == line.get("caption") for line in queued.lines)
    emit(BENCH, "images_per_s_direct", direct, "images/s", **sizes, threads=args.threads)
    emit(BENCH, "images_per_s_transformers", reference, "images/s", **sizes, batch=8, threads=args.threads,
         completion_tokens=reference_tokens)
    compare(BENCH, "images_per_s_queued", queued.images_per_s, direct, "images/s", ">= 0.9", **sizes,
            threads=args.threads, startup_s=queued.startup_s, captions_equal_to_direct=f"{same}/{len(queued.lines)}")
    compare(BENCH, "images_per_s_queued_vs_transformers", queued.images_per_s, reference, "images/s", ">= 1.5", **sizes,
            threads=args.threads, completion_tokens=queued.completion_tokens,
            captions_equal_to_transformers=f"{same_hf}/{len(queued.lines)}")
    compare(BENCH, "captions_per_s_two_prompts", two.captions_per_s, queued.captions_per_s, "captions/s", ">= 1.3", **sizes,
            threads=args.threads, completion_tokens=two.completion_tokens)


if __name__ == "__main__":
    main()
