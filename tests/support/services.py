"""Running vlmq's services for real in tests: APIs on real sockets, workers as subprocesses."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import uvicorn

from embedder_service.api.app import create_app as create_embed_app
from generator_service.api.app import create_app as create_generate_app
from shared.config.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def service_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment a child process needs to see the same Redis and key prefix as `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLMQ_")}
    env.update(
        VLMQ_BROKER_URL=settings.broker_url,
        VLMQ_STORE_URL=settings.effective_store_url,
        VLMQ_KEY_PREFIX=settings.key_prefix,
        VLMQ_MAX_ATTEMPTS=str(settings.max_attempts),
        VLMQ_VISIBILITY_TIMEOUT_S=str(settings.visibility_timeout_s),
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(REPO),
        **extra,
    )
    return env


@contextmanager
def api_server(app) -> Iterator[str]:
    """Serve a FastAPI app with uvicorn on a free loopback port in a thread; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("API server did not start within 15 s")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@contextmanager
def worker_process(kind: str, model: Path, settings: Settings, *extra_args: str, **env: str) -> Iterator[subprocess.Popen]:
    """`vlmq worker KIND --model MODEL` in a subprocess; waits until it has reported in."""
    with worker_processes([kind], model, settings, *extra_args, **env) as (proc,):
        yield proc


@contextmanager
def worker_processes(kinds: list[str], model: Path, settings: Settings, *extra_args: str, **env: str) -> Iterator[list[subprocess.Popen]]:
    """One `vlmq worker KIND --model MODEL` subprocess per entry of `kinds`, started together (their
    model loads overlap); waits until every one has reported in, and stops them all together."""
    from shared.queue.heartbeat import live_workers
    from shared.store.redis_conn import connect

    procs = [
        subprocess.Popen([sys.executable, "-m", "vlmq", "worker", kind, "--model", str(model), *extra_args],
                         env=service_env(settings, **env), cwd=REPO)
        for kind in kinds
    ]
    client = connect(settings.effective_store_url)  # any deployment vlmq speaks: one Redis, a cluster, Sentinel
    try:
        deadline = time.monotonic() + 60
        waiting = list(zip(kinds, procs))
        while waiting:
            for kind, proc in list(waiting):
                if any(w["id"].endswith(f"-{proc.pid}") for w in live_workers(client, settings.key_prefix, kind)):
                    waiting.remove((kind, proc))
                elif proc.poll() is not None:
                    raise RuntimeError(f"{kind} worker exited with {proc.returncode} before reporting in")
            if waiting and time.monotonic() > deadline:
                raise RuntimeError(f"{waiting[0][0]} worker did not report in within 60 s")
            time.sleep(0.1)
        yield procs
    finally:
        running = [proc for proc in procs if proc.poll() is None]
        for proc in running:
            proc.terminate()
        for proc in running:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        client.close()


@contextmanager
def workers_and_apis(model: Path, settings: Settings) -> Iterator[tuple[str, str]]:
    """An embed and a generate worker (4 threads each) and both APIs on `settings`, as the fault tests run
    them: yields (embed API URL, generate API URL)."""
    with worker_processes(["embed", "generate"], model, settings, "--concurrency", "4"), \
            api_server(create_embed_app(settings)) as embed_url, api_server(create_generate_app(settings)) as generate_url:
        yield embed_url, generate_url


def wait_job(base_url: str, job_id: str, timeout_s: float = 60, headers: dict | None = None) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = httpx.get(f"{base_url}/v1/jobs/{job_id}", headers=headers).json()
        if job["status"] in ("succeeded", "failed"):
            return job
        time.sleep(0.05)
    raise TimeoutError(f"job {job_id} did not finish within {timeout_s} s")
