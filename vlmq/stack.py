"""The whole vlmq stack on one machine as child processes: for `vlmq up` and a private `vlmq caption`.

A ``LocalStack`` starts an embedded ``redis-server`` (unless a broker URL is
given), then worker and API children (``python -m vlmq worker|api ...``)
that all see that Redis through their ``VLMQ_`` environment, and waits until
every worker has reported in (heartbeat) and every API answers ``/healthz``.
Leaving the context stops the children first, then Redis: workers finish or
requeue their jobs while the broker is still there.

Children run in their own sessions, so a Ctrl-C at the terminal reaches only
the parent, which then stops them in order. On Linux each child also asks the
kernel for SIGTERM should the parent die without cleaning up (SIGKILL, crash),
so nothing is left running even then.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType, TracebackType

import httpx

from shared.config.settings import Settings
from shared.queue.celery_app import QUEUES
from shared.queue.heartbeat import live_workers
from shared.store.redis_conn import connect
from vlmq.processes import describe_exit, die_with_parent, stop_all, wait_all_or_stop
from vlmq.redis_server import EmbeddedRedis

READY_TIMEOUT_S = 180.0  # model loading on a busy CPU takes a while
# `LocalStack`'s worker counts for one `vlmq worker all` in place of an embed and a generate worker.
ONE_WORKER: Mapping[str, int] = MappingProxyType({"embed_workers": 0, "generate_workers": 0, "combined_workers": 1})


class StackError(RuntimeError):
    """A child of the stack could not start, or died."""


@dataclass
class Child:
    """One supervised child: what it is, how to check it is ready, where its output goes."""

    name: str
    process: subprocess.Popen
    worker_kinds: tuple[str, ...] = ()  # ready once a heartbeat with its pid is seen for each
    health_url: str | None = None  # ready once this answers 200
    log_path: Path | None = None

    def log_tail(self, lines: int = 15) -> str:
        if self.log_path is None:
            return ""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass(frozen=True)
class ApiPorts:
    host: str = "127.0.0.1"
    embed_port: int = 8001
    generate_port: int = 8002

    def url(self, kind: str) -> str:
        # A server bound to every interface is reached on loopback from here.
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.embed_port if kind == 'embed' else self.generate_port}"


class LocalStack:
    """Redis + ``embed_workers`` embed workers + ``generate_workers`` generate workers + ``combined_workers``
    workers of both queues in one process (`vlmq worker all`) (+ both APIs).

    ``broker_url``: use that Redis instead of starting one; else the embedded one gets a
    random password, which reaches the children through their environment only.
    ``data_dir``: the embedded Redis keeps its append-only file there, so queued jobs and
    containers outlive the stack (none: a temporary folder, removed at the end).
    ``apis``: also run both REST APIs on those ports. ``log_dir``: children write their
    output to one file each there (none: they share this process's stdout/stderr).
    """

    def __init__(
        self,
        model: str | Path,
        *,
        embed_workers: int = 1,
        generate_workers: int = 1,
        combined_workers: int = 0,
        device: str = "cpu",
        apis: ApiPorts | None = None,
        broker_url: str | None = None,
        data_dir: str | Path | None = None,
        log_dir: str | Path | None = None,
        ready_timeout_s: float = READY_TIMEOUT_S,
    ):
        self.model = str(Path(model).resolve())
        self.worker_counts = {"embed": embed_workers, "generate": generate_workers, "all": combined_workers}
        self.device = device
        self.apis = apis
        self._broker_url = broker_url
        self.data_dir = Path(data_dir).resolve() if data_dir is not None else None
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.ready_timeout_s = ready_timeout_s
        self.redis: EmbeddedRedis | None = None
        self.children: list[Child] = []
        self.settings: Settings | None = None

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> LocalStack:
        try:
            if self._broker_url is None:
                self.redis = EmbeddedRedis(data_dir=self.data_dir, appendonly=self.data_dir is not None,
                                           password=secrets.token_urlsafe(32)).start()
            broker = self._broker_url or self.redis.url
            # Explicit values beat the environment; everything else (key prefix, limits) comes from it.
            store = os.environ.get("VLMQ_STORE_URL") if self._broker_url else broker
            self.settings = Settings(broker_url=broker, store_url=store or broker)
            workers = [(kind, index) for kind, count in self.worker_counts.items() for index in range(count)]
            # On the CPU each worker gets cores of its own (see `divide_cores`).
            shares = divide_cores(available_cores(), len(workers)) if self.device == "cpu" else [None] * len(workers)
            for (kind, index), cores in zip(workers, shares):
                self._spawn(f"{kind}-worker-{index}", ["worker", kind, "--model", self.model, "--device", self.device],
                            worker_kinds=QUEUES if kind == "all" else (kind,), cores=cores)
            if self.apis is not None:
                for kind in ("embed", "generate"):
                    port = self.apis.embed_port if kind == "embed" else self.apis.generate_port
                    self._spawn(f"{kind}-api", ["api", kind, "--host", self.apis.host, "--port", str(port), "--log-level", "warning"],
                                health_url=f"{self.apis.url(kind)}/healthz")
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every child (SIGTERM, then SIGKILL after a grace period), then Redis."""
        stop_all([child.process for child in self.children])
        if self.redis is not None:
            self.redis.stop()
            if self.data_dir is None:
                shutil.rmtree(self.redis.data_dir, ignore_errors=True)
            self.redis = None

    def wait(self) -> int:
        """Block until SIGINT/SIGTERM or until a child exits; then stop everything. Returns an exit status."""
        try:
            return wait_all_or_stop([child.process for child in self.children], [child.name for child in self.children])
        finally:
            self.stop()

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    # -- state ------------------------------------------------------------------------------

    @property
    def pids(self) -> list[int]:
        """Process ids of every child, Redis included."""
        pids = [child.process.pid for child in self.children]
        return pids + ([self.redis.pid] if self.redis is not None and self.redis.pid else [])

    def check_alive(self) -> None:
        """Raise ``StackError`` naming the first child that has exited."""
        for child in self.children:
            if child.process.poll() is not None:
                raise StackError(self._describe_exit(child))

    # -- internals --------------------------------------------------------------------------

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(VLMQ_BROKER_URL=self.settings.broker_url, VLMQ_STORE_URL=self.settings.effective_store_url)
        return env

    def _spawn(self, name: str, cli_args: list[str], *, worker_kinds: tuple[str, ...] = (), health_url: str | None = None,
               cores: list[int] | None = None) -> None:
        """cores: the CPUs the child may run on (and as many torch/OpenMP threads); None: all, torch's default threads."""
        env = self._child_env()
        if cores is not None:
            env.update(OMP_NUM_THREADS=str(len(cores)), MKL_NUM_THREADS=str(len(cores)))
        log_path = None
        output = None  # inherit
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log_path = self.log_dir / f"{name}.log"
            output = open(log_path, "ab")
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "vlmq", *cli_args],
                env=env, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT if output else None,
                start_new_session=True, preexec_fn=_child_setup(cores),
            )
        finally:
            if output is not None:
                output.close()  # the child holds its own descriptor
        self.children.append(Child(name, process, worker_kinds, health_url, log_path))

    def _wait_until_ready(self) -> None:
        client = connect(self.settings.effective_store_url)
        pending = list(self.children)
        deadline = time.monotonic() + self.ready_timeout_s
        try:
            with httpx.Client(timeout=2.0) as http:
                while pending:
                    self.check_alive()
                    pending = [child for child in pending if not self._is_ready(child, client, http)]
                    if pending and time.monotonic() > deadline:
                        names = ", ".join(child.name for child in pending)
                        raise StackError(f"not ready within {self.ready_timeout_s:.0f} s: {names}" + self._log_hint())
                    if pending:
                        time.sleep(0.2)
        finally:
            client.close()

    def _is_ready(self, child: Child, client, http: httpx.Client) -> bool:
        if child.worker_kinds:
            suffix = f"-{child.process.pid}"
            return all(any(w["id"].endswith(suffix) for w in live_workers(client, self.settings.key_prefix, kind))
                       for kind in child.worker_kinds)
        try:
            return http.get(child.health_url).status_code == 200
        except httpx.HTTPError:
            return False

    def _describe_exit(self, child: Child) -> str:
        message = f"{child.name} {describe_exit(child.process.returncode)}"
        tail = child.log_tail()
        return message + (f"; last lines of {child.log_path}:\n{tail}" if tail else "")

    def _log_hint(self) -> str:
        return f" (logs in {self.log_dir})" if self.log_dir is not None else ""


def available_cores() -> list[int]:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def divide_cores(cores: list[int], workers: int) -> list[list[int] | None]:
    """Each worker's share of `cores`: contiguous, as even as possible, so that workers decoding or embedding side by
    side never queue their threads behind each other's (two workers with a thread per core each on the same cores made
    a decode step wait for a descheduled thread; issue 24). Fewer cores than workers: None each (no division)."""
    if workers < 2 or len(cores) < workers:
        return [None] * workers
    size, extra = divmod(len(cores), workers)
    shares, at = [], 0
    for index in range(workers):
        count = size + (index < extra)
        shares.append(cores[at : at + count])
        at += count
    return shares


def _child_setup(cores: list[int] | None):
    """The child's `preexec_fn`: tied to the parent's life (`die_with_parent`), pinned to `cores` where the OS allows."""
    tie = die_with_parent()
    if cores is None or not hasattr(os, "sched_setaffinity"):
        return tie

    def setup() -> None:
        if tie is not None:
            tie()
        os.sched_setaffinity(0, cores)

    return setup


def private_log_dir() -> Path:
    """A fresh folder for a private stack's child logs."""
    return Path(tempfile.mkdtemp(prefix="vlmq-stack-"))
