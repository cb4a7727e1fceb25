"""Process supervision by the CLI: `vlmq up` starts everything and SIGTERM stops everything;
`vlmq worker --device a,b` runs one child per device."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import psutil
import pytest
import torch

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


@contextmanager
def vlmq_up(model, stderr, *args: str, embed_port: int | None = None, generate_port: int | None = None,
            **env: str) -> Iterator[subprocess.Popen]:
    """`vlmq up --model MODEL ARGS`, stdout piped, stderr to `stderr`, with none of our VLMQ_ settings (its own
    embedded Redis, unless `env` names a broker); killed at the end if it is still running."""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("VLMQ_")}
    child_env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **env)
    process = subprocess.Popen(
        [sys.executable, "-m", "vlmq", "up", "--model", str(model), "--embed-port", str(embed_port or free_port()),
         "--generate-port", str(generate_port or free_port()), *args],
        env=child_env, cwd=REPO, stdout=subprocess.PIPE, stderr=stderr, text=True,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def assert_all_gone(processes: list[psutil.Process], timeout_s: float = 10) -> None:
    gone, alive = psutil.wait_procs(processes, timeout=timeout_s)
    assert not alive, [" ".join(p.cmdline()) for p in alive]


@pytest.mark.parametrize("args, workers", [([], ["worker embed", "worker generate"]), (["--one-worker"], ["worker all"])])
def test_up_serves_both_apis_and_sigterm_stops_every_child(model, args, workers):
    embed_port, generate_port = free_port(), free_port()
    with vlmq_up(model, subprocess.DEVNULL, *args, embed_port=embed_port, generate_port=generate_port) as process:
        banner = "".join(wait_for_line(process, "Ctrl-C stops everything", timeout_s=180))
        assert f"http://127.0.0.1:{embed_port}" in banner and f"http://127.0.0.1:{generate_port}" in banner
        for port in (embed_port, generate_port):
            assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
        children = psutil.Process(process.pid).children(recursive=True)
        commands = [" ".join(child.cmdline()) for child in children]
        assert any("redis-server" in c for c in commands)
        for role in ("api embed", "api generate"):
            assert any(role in c for c in commands), (role, commands)
        assert [role for role in ("worker all", "worker embed", "worker generate")
                if any(f"vlmq {role} " in c for c in commands)] == workers, commands

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        assert_all_gone(children)


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


def absent_devices() -> list[str]:
    """Devices this machine does not have: one past its CUDA count always, plain `cuda` where it has none."""
    return [f"cuda:{torch.cuda.device_count()}", *([] if torch.cuda.is_available() else ["cuda"])]


@pytest.mark.parametrize("command", [["worker", "embed"], ["worker", "generate"], ["up"]])
def test_a_device_that_is_not_there_is_refused_at_start_in_one_line(model, settings, command):
    for device in [*absent_devices(), "tpu"]:
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "vlmq", *command, "--model", str(model), "--device", device],
                                env=service_env(settings), cwd=REPO, capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, result.stderr[-2000:]
        [line] = result.stderr.strip().splitlines()  # one line, no traceback
        if device == "tpu":
            expected = "no device"
        else:
            expected = "CUDA device(s), cuda:0 to" if torch.cuda.is_available() else "no CUDA device is available"
        assert line.startswith(f"vlmq {command[0]}: ") and expected in line, line
        assert time.monotonic() - started < 30  # refused before any model is loaded


def test_up_masks_the_redis_password_it_prints(model, tmp_path):
    from vlmq.redis_server import EmbeddedRedis

    with (EmbeddedRedis(password="s3cret-word") as redis_server,
          vlmq_up(model, (tmp_path / "stderr").open("w"), VLMQ_BROKER_URL=redis_server.url) as process):
        banner = "".join(wait_for_line(process, "Ctrl-C stops everything", timeout_s=180))
        assert f"redis://:**@127.0.0.1:{redis_server.port}/0 (VLMQ_BROKER_URL)" in banner, banner
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=60)
        logs = (tmp_path / "stderr").read_text()
        assert "Connected to" in logs and "s3cret-word" not in banner + out + logs  # nor in Celery's and uvicorn's logs


def test_up_names_the_child_that_died_and_how_before_stopping_the_rest(model, tmp_path):
    stderr = tmp_path / "stderr"
    with vlmq_up(model, stderr.open("w")) as process:
        wait_for_line(process, "Ctrl-C stops everything", timeout_s=180)
        children = psutil.Process(process.pid).children()
        [victim] = [c for c in children if "worker generate" in " ".join(c.cmdline())]
        victim.kill()
        assert process.wait(timeout=60) == 1
        assert f"generate-worker-0 (pid {victim.pid}) was killed by SIGKILL; stopping the rest" in stderr.read_text()
        assert_all_gone([c for c in children if c.pid != victim.pid])


def test_up_locks_down_its_embedded_redis_and_keeps_its_data_in_data_dir(model, tmp_path):
    import re
    import stat

    import redis

    data_dir = tmp_path / "redis-data"

    def started(process: subprocess.Popen) -> tuple[str, str]:
        """The embedded Redis's port, as printed (masked), and its URL, as a child was given it."""
        banner = "".join(wait_for_line(process, "Ctrl-C stops everything", timeout_s=180))
        port = re.search(r"redis://:\*\*@127\.0\.0\.1:(\d+)/0", banner).group(1)
        worker = next(c for c in psutil.Process(process.pid).children() if "worker embed" in " ".join(c.cmdline()))
        url = worker.environ()["VLMQ_BROKER_URL"]  # the password travels to children in their environment only
        assert url.startswith("redis://:") and url.endswith(f"@127.0.0.1:{port}/0")
        return port, url

    def stop(process: subprocess.Popen, stderr_name: str, url: str) -> None:
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=60)
        assert process.returncode == 0
        password = redis.Redis.from_url(url).connection_pool.connection_kwargs["password"]
        assert password not in out + (tmp_path / stderr_name).read_text()  # never printed nor logged

    with vlmq_up(model, (tmp_path / "first").open("w"), "--data-dir", str(data_dir)) as process:
        port, url = started(process)
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(port=int(port)).ping()  # no password, no access
        client = redis.Redis.from_url(url)
        with pytest.raises(redis.exceptions.ResponseError, match="unknown command"):
            client.execute_command("CONFIG", "SET", "dir", "/tmp")  # no writing files as the Redis user
        assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
        client.set("kept-across-restarts", "yes")
        stop(process, "first", url)

    with vlmq_up(model, (tmp_path / "second").open("w"), "--data-dir", str(data_dir)) as process:
        _, url = started(process)
        assert redis.Redis.from_url(url).get("kept-across-restarts") == b"yes"  # the AOF in --data-dir
        stop(process, "second", url)
