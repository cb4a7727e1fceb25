"""Process supervision by the CLI: `vlmq up` starts everything and SIGTERM stops everything;
`vlmq worker --device a,b` runs one child per device."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from shared.queue.heartbeat import live_workers
from tests.support.services import REPO, free_port, service_env
from vlmq.demo_model import write_demo_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_demo_model(tmp_path_factory.mktemp("demo"))


def wait_for_line(process: subprocess.Popen, text: str, timeout_s: float) -> list[str]:
    """stdout lines up to and including the first containing `text`."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            raise AssertionError(f"exited with {process.wait()} before printing {text!r}: {lines}")
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"{text!r} not printed within {timeout_s} s")


def assert_all_gone(processes: list[psutil.Process], timeout_s: float = 10) -> None:
    gone, alive = psutil.wait_procs(processes, timeout=timeout_s)
    assert not alive, [" ".join(p.cmdline()) for p in alive]


def test_up_serves_both_apis_and_sigterm_stops_every_child(model):
    embed_port, generate_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLMQ_")}  # its own embedded Redis
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    process = subprocess.Popen(
        [sys.executable, "-m", "vlmq", "up", "--model", str(model),
         "--embed-port", str(embed_port), "--generate-port", str(generate_port)],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        banner = "".join(wait_for_line(process, "Ctrl-C stops everything", timeout_s=180))
        assert f"http://127.0.0.1:{embed_port}" in banner and f"http://127.0.0.1:{generate_port}" in banner
        for port in (embed_port, generate_port):
            assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
        children = psutil.Process(process.pid).children(recursive=True)
        commands = [" ".join(child.cmdline()) for child in children]
        assert any("redis-server" in c for c in commands)
        for role in ("worker embed", "worker generate", "api embed", "api generate"):
            assert any(role in c for c in commands), (role, commands)

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        assert_all_gone(children)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_worker_with_two_devices_runs_one_child_per_device(model, settings, redis_client):
    process = subprocess.Popen(
        [sys.executable, "-m", "vlmq", "worker", "embed", "--model", str(model), "--device", "cpu,cpu", "--concurrency", "1"],
        env=service_env(settings), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        children = []
        while len(children) < 2 or len(live_workers(redis_client, settings.key_prefix, "embed")) < 2:
            assert process.poll() is None and time.monotonic() < deadline, "two workers did not report in"
            children = psutil.Process(process.pid).children()
            time.sleep(0.2)
        reported = {int(w["id"].rsplit("-", 1)[1]) for w in live_workers(redis_client, settings.key_prefix, "embed")}
        assert reported == {child.pid for child in children}

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        assert_all_gone(children)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
