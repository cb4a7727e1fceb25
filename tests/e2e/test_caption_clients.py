"""Several `vlmq caption` clients sharing one run (`--run-id`) against one stack, and stopping one cleanly.

Two clients split 200 images through Redis claims; one is SIGKILLed part way, its claims pass to the other
after `--claim-timeout`, and `vlmq caption merge` gives exactly one record per image. Ctrl-C cancels the jobs
in flight (JobStore.cancel) and a rerun finishes the rest.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from tests.support.captioning import caption_command, caption_stack, ctrl_c_raises, read_lines, run_caption, write_images
from tests.support.services import REPO, service_env

IMAGES = 200
PROMPT = "Describe this image."


@pytest.fixture(scope="module")
def stack(demo_model, redis_server):
    with caption_stack(demo_model, redis_server.url, embed_workers=2) as settings:
        yield settings


def client(stack, images: Path, out: Path, client_id: str, *extra: str) -> subprocess.Popen:
    command = caption_command(images, "--prompt", PROMPT, "--out", str(out), "--max-tokens", "3", "--run-id", "shared",
                              "--client-id", client_id, "--claim-timeout", "3", "--max-in-flight", "8", *extra)
    return subprocess.Popen(command, env=service_env(stack), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_lines(path: Path, count: int, process: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not (path.exists() and path.read_text().count("\n") >= count):
        assert process.poll() is None and time.monotonic() < deadline, "the client ended before it could be stopped"
        time.sleep(0.01)


def test_two_clients_one_killed_halfway_give_each_image_exactly_once(stack, tmp_path):
    paths = write_images(tmp_path / "images", range(IMAGES))
    out = tmp_path / "captions.jsonl"
    doomed = client(stack, tmp_path / "images", out, "doomed")
    survivor = client(stack, tmp_path / "images", out, "survivor")
    doomed_part = Path(f"{out}.parts/doomed.jsonl")
    wait_for_lines(doomed_part, 40, doomed)
    doomed.send_signal(signal.SIGKILL)  # no clean-up: its claims stay until they time out
    doomed.communicate()
    stdout, stderr = survivor.communicate(timeout=300)
    assert survivor.returncode == 0, stderr

    killed_lines, survivor_lines = read_lines(doomed_part), read_lines(Path(f"{out}.parts/survivor.jsonl"))
    assert len(killed_lines) >= 40 and len(survivor_lines) >= IMAGES // 4
    assert len(killed_lines) + len(survivor_lines) >= IMAGES

    merged = subprocess.run([sys.executable, "-m", "vlmq", "caption", "merge", str(out)], env=service_env(stack), cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert merged.returncode == 0, merged.stderr
    lines = read_lines(out)
    assert len(lines) == IMAGES
    assert sorted(line["path"] for line in lines) == sorted(str(path) for path in paths)
    assert all("caption" in line and "error" not in line for line in lines)
    duplicates = len(killed_lines) + len(survivor_lines) - IMAGES
    assert merged.stdout.strip() == f"merged into {out}: {IMAGES} records written, {duplicates} duplicates passed over"


def test_ctrl_c_cancels_the_jobs_in_flight_and_a_rerun_finishes(stack, tmp_path):
    paths = write_images(tmp_path / "images", range(500, 530))
    out = tmp_path / "out.jsonl"
    command = caption_command(tmp_path / "images", "--prompt", PROMPT, "--out", str(out), "--max-tokens", "48",
                              "--max-in-flight", "4")
    started = time.time()
    process = subprocess.Popen(command, env=service_env(stack), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=ctrl_c_raises)
    wait_for_lines(out, 2, process)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert stdout.startswith("interrupted") and "Traceback" not in stderr

    # Every job this run sent has ended: the ones in flight at Ctrl-C as cancelled.
    client = redis.Redis.from_url(stack.effective_store_url)
    jobs = [json.loads(client.get(key)) for key in client.scan_iter(match=f"{stack.key_prefix}job:*", count=1000)]
    jobs = [job for job in jobs if job["created_at"] >= started]  # this run's, not the killed client's above
    client.close()
    statuses = [job["status"] for job in jobs]
    assert set(statuses) <= {"succeeded", "failed", "cancelled"}, statuses
    assert statuses.count("cancelled") >= 1

    partial = read_lines(out)
    resumed = run_caption(stack, tmp_path / "images", "--prompt", PROMPT, "--out", str(out), "--max-tokens", "48")
    assert resumed.returncode == 0, resumed.stderr
    lines = read_lines(out)
    assert lines[: len(partial)] == partial
    assert sorted(line["path"] for line in lines) == sorted(str(path) for path in paths)
