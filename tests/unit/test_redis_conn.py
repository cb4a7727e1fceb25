"""Redis clients: authenticated URLs, surviving restarts, and "Redis is down" as StoreUnavailable."""

from __future__ import annotations

import random

import pytest
import redis

from shared.config.errors import StoreUnavailable
from shared.store.redis_conn import (
    connect,
    endpoint,
    pipelined,
    set_buffers,
    translate_connection_errors,
)
from shared.store.resp import idle_socket
from vlmq.redis_server import EmbeddedRedis


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


def test_set_buffers_stores_the_parts_back_to_back_with_nx_and_ex(redis_client, key_prefix):
    key = f"{key_prefix}parts"
    big = memoryview(bytes(range(256)) * 100)  # above the size that is sent uncopied
    parts = [b"head", big, b"", b"\r\n$3\r\nSET\r\n", b"tail"]  # RESP-looking bytes are data like any other
    assert set_buffers(redis_client, key, parts, ex=60, nx=True)
    assert redis_client.get(key) == b"".join(bytes(part) for part in parts)
    assert 0 < redis_client.ttl(key) <= 60
    assert not set_buffers(redis_client, key, [b"other"], ex=60, nx=True)  # NX: the first value stays
    assert redis_client.get(key) == b"".join(bytes(part) for part in parts)
    assert set_buffers(redis_client, key, [b"other"], ex=30, nx=False)
    assert redis_client.get(key) == b"other" and redis_client.ttl(key) <= 30


def test_set_buffers_reconnects_after_a_redis_restart():
    with EmbeddedRedis(appendonly=True) as server:
        client = connect(server.url)
        assert set_buffers(client, "k", [b"a", b"b"], ex=60, nx=False)
        server.restart()
        assert set_buffers(client, "k", [b"c"], ex=60, nx=False)
        assert client.get("k") == b"c"


def test_pipelined_returns_each_raw_reply_in_order(redis_client, key_prefix):
    a, b = f"{key_prefix}a", f"{key_prefix}b"
    redis_client.set(a, b"1", ex=100)
    assert pipelined(redis_client, ("MGET", a, b), ("PTTL", a), ("PTTL", b)) == [[b"1", None], pytest.approx(100_000, abs=2_000), -2]


def test_an_error_reply_in_a_pipelined_call_raises_and_leaves_the_client_usable(redis_client, key_prefix):
    text, number = f"{key_prefix}text", f"{key_prefix}n"
    redis_client.set(text, b"not a number")
    with pytest.raises(redis.ResponseError):
        pipelined(redis_client, ("INCR", text), ("SET", number, b"7"), ("GET", number))
    # The replies after the error were never read: the connection they were on must not be reused as is.
    assert pipelined(redis_client, ("GET", number)) == [b"7"]
    assert redis_client.get(text) == b"not a number"


def _reads_directly(client: redis.Redis) -> bool:
    connection = client.connection_pool.get_connection()
    try:
        return idle_socket(connection) is not None
    finally:
        client.connection_pool.release(connection)


@pytest.mark.parametrize("protocol", [2, 3])
def test_pipelined_reads_big_replies_off_the_socket_in_both_protocols(redis_server, key_prefix, protocol):
    client = redis.Redis.from_url(f"{redis_server.url}?protocol={protocol}")
    assert _reads_directly(client), "the direct reader should apply to redis-py's own reader with nothing buffered"
    big, key = random.randbytes(5_000_000), f"{key_prefix}big{protocol}"  # many socket reads' worth
    client.set(key, big)
    [[value, missing], ttl, ok] = pipelined(client, ("MGET", key, f"{key}-none"), ("PTTL", key), ("PING",))
    assert type(value) is bytearray and value == big  # received into its own writable buffer
    assert missing is None and ttl == -1 and ok == b"PONG"


def test_a_resp3_push_next_to_replies_is_read_past(redis_server, key_prefix):
    client = redis.Redis.from_url(f"{redis_server.url}?protocol=3")
    tracked = f"{key_prefix}tracked"
    client.set(tracked, b"1")
    # Tracking makes Redis push an invalidation to this connection when it writes the key it read.
    assert pipelined(client, ("CLIENT", "TRACKING", "ON"), ("GET", tracked)) == [b"OK", b"1"]
    assert pipelined(client, ("SET", tracked, b"2"), ("GET", tracked)) == [b"OK", b"2"]
    assert pipelined(client, ("GET", tracked)) == [b"2"]


def test_a_connection_with_buffered_bytes_is_read_by_redis_py():
    class Buffered:
        def unread_bytes(self) -> int:
            return 3

    connection = redis.Connection()
    connection._sock, connection._parser._buffer = object(), Buffered()
    assert idle_socket(connection) is None
