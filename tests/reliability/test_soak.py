"""Soak: 2,000 images through `vlmq caption` on the tiny demo model; nothing accumulates.

- Redis: every key vlmq writes carries a TTL (the `ids:next` counter alone does not,
  and is one small integer); once the TTLs have passed, memory is back near where it
  started, and the broker holds no messages.
- Workers: resident memory grows less than 10% from job 200 to job 2,000.

Lifetimes are cut to seconds here (production: VLMQ_JOB_TTL_S 1 day,
VLMQ_CONTAINER_TTL_S 7 days) so the test can watch them run out.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time

import psutil
import pytest
import redis
from PIL import Image

from shared.config.settings import Settings
from tests.support.reliability import FaultFigures
from tests.support.services import REPO, service_env, worker_processes
from vlmq.redis_server import EmbeddedRedis

IMAGES = int(os.environ.get("VLMQ_SOAK_IMAGES", "2000"))
EARLY = 200  # RSS is compared from this job on: imports, model and allocator warm-up are done by then
TTL_S = 10


def write_images(folder, count: int) -> None:
    """Small distinct PNGs (every image is a new container, as in a real run)."""
    folder.mkdir()
    for i in range(count):
        image = Image.new("RGB", (24, 24), ((i * 7) % 256, (i * 13) % 256, (i // 256) % 256))
        image.putpixel((i % 24, (i // 24) % 24), (255 - (i % 256), 0, 0))
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        (folder / f"{i:05d}.png").write_bytes(buffer.getvalue())


def count_lines(path) -> int:
    try:
        with open(path, "rb") as out:
            return sum(1 for _ in out)
    except FileNotFoundError:
        return 0


def stored_bytes(client: redis.Redis) -> int:
    """Redis memory without client buffers: those follow the number of connections (worker
    thread pools open more as they get busy), not what is stored."""
    memory = client.info("memory")
    return memory["used_memory"] - memory["mem_clients_normal"]


def rss(procs) -> int:
    return sum(psutil.Process(p.pid).memory_info().rss for p in procs)


@pytest.mark.soak
def test_two_thousand_captions_leave_nothing_behind(demo_model, tmp_path):
    write_images(tmp_path / "images", IMAGES)
    out = tmp_path / "captions.jsonl"
    with EmbeddedRedis() as server:
        settings = Settings(broker_url=server.url, key_prefix="soak:", job_ttl_s=TTL_S, container_ttl_s=TTL_S)
        client = redis.Redis.from_url(server.url)
        ttl_env = {"VLMQ_JOB_TTL_S": str(TTL_S), "VLMQ_CONTAINER_TTL_S": str(TTL_S)}
        with worker_processes(["embed", "generate"], demo_model, settings, **ttl_env) as workers:
            memory_before = stored_bytes(client)
            clients_before = client.info("clients")["connected_clients"]
            rss_samples: dict[str, int] = {}

            def sample_rss() -> None:
                # RSS of both workers when the 200th caption is written, and at the end.
                while count_lines(out) < EARLY and caption.poll() is None:
                    time.sleep(0.05)
                rss_samples["early"] = rss(workers)

            started = time.monotonic()
            caption = subprocess.Popen(
                [sys.executable, "-m", "vlmq", "caption", str(tmp_path / "images"), "--prompt", "Describe.",
                 "--out", str(out), "--max-tokens", "3", "--max-in-flight", "32", "--no-progress"],
                env=service_env(settings, **ttl_env), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            sampler = threading.Thread(target=sample_rss)
            sampler.start()
            stdout, stderr = caption.communicate(timeout=1800)
            seconds = time.monotonic() - started
            sampler.join()
            rss_samples["end"] = rss(workers)
            memory_after_run = stored_bytes(client)
            clients_after = client.info("clients")["connected_clients"]

            # Right after the run: everything under the prefix expires by itself.
            keys = list(client.scan_iter(match="soak:*", count=1000))
            no_ttl = [k for k in keys if client.ttl(k) == -1]
            counter_bytes = client.memory_usage("soak:ids:next")
            kinds = sorted({k.decode().split(":")[1] for k in keys})
            queued = {q: client.llen(q) for q in ("embed", "generate")}
            unacked = client.hlen("unacked")

            time.sleep(TTL_S + 2)  # every job, upload, stream and container lifetime has run out
            left = sorted(k.decode() for k in client.scan_iter(match="soak:*", count=1000))
            memory_after_ttl = stored_bytes(client)

    lines = [json.loads(line) for line in out.read_text().splitlines()]
    done = [line for line in lines if "caption" in line]
    paths = [line["path"] for line in lines]
    figures = FaultFigures(
        "soak", submitted=IMAGES, completed=len(done), failed=len(lines) - len(done),
        lost=IMAGES - len(set(paths)), duplicated=len(paths) - len(set(paths)), seconds=seconds,
        extra={
            "images_per_s": round(IMAGES / seconds, 1),
            "redis_bytes_before": memory_before, "redis_bytes_after_run": memory_after_run, "redis_bytes_after_ttl": memory_after_ttl,
            "redis_clients_before": clients_before, "redis_clients_after_run": clients_after,
            "worker_rss_mb_at_job_200": round(rss_samples["early"] / 2**20, 1),
            "worker_rss_mb_at_end": round(rss_samples["end"] / 2**20, 1),
            "rss_growth_pct": round(100 * (rss_samples["end"] / rss_samples["early"] - 1), 2),
            "keys_right_after_run": len(keys), "key_kinds": kinds, "keys_left_after_ttl": left,
        },
    )
    figures.print()

    assert caption.returncode == 0, stderr[-3000:]
    assert stdout.strip().startswith(f"finished: done {IMAGES}, failed 0"), stdout
    assert figures.completed == IMAGES and figures.lost == 0 and figures.duplicated == 0
    assert no_ttl == [b"soak:ids:next"], no_ttl
    assert counter_bytes < 100  # one integer, whatever the number of images
    assert queued == {"embed": 0, "generate": 0} and unacked == 0
    # What is left: the ID counter, the workers' stats (kept 7 days after their last job) and the
    # heartbeats of the two workers still running (15 s after they stop).
    assert [k for k in left if not k.startswith(("soak:stats:", "soak:workers:"))] == ["soak:ids:next"], left
    # Back near the start: within 256 kB (those few keys, cached scripts), against megabytes while the jobs lived.
    assert memory_after_ttl - memory_before < 256 * 1024, figures.extra
    assert rss_samples["end"] < 1.10 * rss_samples["early"], figures.extra
