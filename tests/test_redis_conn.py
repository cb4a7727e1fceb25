"""Redis clients: authenticated URLs, surviving restarts, and "Redis is down" as StoreUnavailable."""

from __future__ import annotations

import pytest
import redis

from shared.errors import StoreUnavailable
from shared.redis_conn import connect, endpoint, translate_connection_errors
from shared.redis_server import EmbeddedRedis


def test_connect_with_password_and_acl_user_urls():
    with EmbeddedRedis(password="pw") as server:
        for url in (server.url, f"redis://default:pw@127.0.0.1:{server.port}/2"):
            client = connect(url)
            assert client.ping()
            assert client.set("k", b"\x00\xff") and client.get("k") == b"\x00\xff"  # bytes, not str
            client.close()


def test_client_reconnects_after_a_redis_restart():
    with EmbeddedRedis(appendonly=True) as server:
        client = connect(server.url)
        client.set("k", b"v")
        server.restart()
        assert client.get("k") == b"v"


def test_unreachable_redis_becomes_store_unavailable_without_the_password():
    with EmbeddedRedis() as server:
        port = server.port
    client = connect(f"redis://user:topsecret@127.0.0.1:{port}/0", retries=1)
    with pytest.raises(StoreUnavailable) as caught:
        with translate_connection_errors(client):
            client.get("k")
    assert caught.value.status == 503
    assert caught.value.message.startswith(f"Redis at 127.0.0.1:{port} unreachable: ")
    assert "topsecret" not in caught.value.message
    assert endpoint(client) == f"127.0.0.1:{port}"


def test_other_redis_errors_pass_through(redis_client):
    redis_client.set("not-a-list", b"x")
    with pytest.raises(redis.ResponseError):
        with translate_connection_errors(redis_client):
            redis_client.lpush("not-a-list", b"y")
