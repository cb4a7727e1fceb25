"""Redis clients for vlmq, and the translation of "Redis is down" into ``StoreUnavailable``."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialWithJitterBackoff
from redis.connection import Connection
from redis.retry import Retry

from shared.config.errors import StoreUnavailable
from shared.store.resp import ReplyReader, idle_socket

# Blocking reads in vlmq (job waits) block for at most ~1 s per call, so a read that
# takes longer than this means the server is gone or wedged.
SOCKET_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 5.0
# A Redis restart takes about a second: retrying 6 times with jittered exponential
# backoff (50 ms doubling, capped at 1 s) rides through it without hanging a caller long.
RETRIES = 6
# Connections of an API's asyncio client: each followed token stream holds one while it blocks.
ASYNC_MAX_CONNECTIONS = 256


_OPTIONS = dict(
    socket_timeout=SOCKET_TIMEOUT_S,
    socket_connect_timeout=CONNECT_TIMEOUT_S,
    socket_keepalive=True,
    health_check_interval=30,
    decode_responses=False,
)


def connect(url: str, *, retries: int = RETRIES) -> redis.Redis:
    """A client for ``url`` (``redis://``, ``rediss://`` for TLS, ``redis://user:password@host:port/db``).

    Replies are bytes (``decode_responses=False``): containers are binary. Commands
    that fail on a connection error or timeout are retried with backoff, and idle
    connections are health-checked before reuse, so clients survive Redis restarts.
    """
    return redis.Redis.from_url(url, retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries), **_OPTIONS)


def connect_async(url: str, *, retries: int = RETRIES, max_connections: int = ASYNC_MAX_CONNECTIONS) -> redis.asyncio.Redis:
    """`connect`'s asyncio twin, for the APIs' event loop: waiting on Redis there holds no thread.

    Its pool blocks a command when all ``max_connections`` are busy, rather than failing it: a
    thousand waiting requests share a few connections (a job wait holds one only for a GET; a
    followed stream for one ``XREAD`` of at most a second).
    """
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=SOCKET_TIMEOUT_S,
        retry=AsyncRetry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries), **_OPTIONS,
    )
    return redis.asyncio.Redis(connection_pool=pool)


def endpoint(client: redis.Redis) -> str:
    """``host:port`` (or the socket path) of a client's server — never its credentials."""
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return str(kwargs["path"])
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"


@contextmanager
def translate_connection_errors(client: redis.Redis) -> Iterator[None]:
    """Re-raise Redis connection errors and timeouts inside the block as ``StoreUnavailable``.

    The APIs answer ``StoreUnavailable`` with 503, which tells a client to retry
    later; any other Redis error is a bug and stays as it is.
    """
    try:
        yield
    except redis.AuthenticationError as exc:
        raise StoreUnavailable(describe_auth_error(client, exc)) from exc
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise StoreUnavailable(f"Redis at {endpoint(client)} unreachable: {exc}") from exc


def describe_auth_error(client: redis.Redis, exc: redis.AuthenticationError) -> str:
    """What to tell an operator whose Redis URL carries a wrong (or no) password — without the password."""
    return (f"Redis at {endpoint(client)} refused vlmq's credentials ({exc}): check the user and password "
            "in VLMQ_BROKER_URL / VLMQ_STORE_URL (redis://[user]:password@host:port/db)")


def set_buffers(client: redis.Redis, key: str, buffers: Sequence[bytes | memoryview], *, ex: int, nx: bool) -> bool:
    """``SET key value EX ex [NX]`` with ``value`` the buffers back to back; True if it was set.

    redis-py takes a value as one buffer, so a value made of parts (a container's
    header, tensor and metadata) would be copied whole just to be sent; here the
    parts go to the socket as they are.
    """
    size = sum(memoryview(buffer).nbytes for buffer in buffers)
    name = key.encode()
    options = [b"EX", str(ex).encode(), *([b"NX"] if nx else [])]
    head = b"*%d\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n" % (3 + len(options), len(name), name, size)
    tail = b"\r\n" + b"".join(b"$%d\r\n%s\r\n" % (len(option), option) for option in options)
    command = _coalesce([head, *buffers, tail])
    [reply] = _round_trip(client, lambda connection: command, replies=1)
    return reply is not None


def pipelined(client: redis.Redis, *commands: tuple) -> list:
    """The raw replies of ``commands``, sent in one round trip.

    What a redis-py pipeline does without its per-command bookkeeping, which on a
    small reply costs more than the round trip itself (the store's read path).
    """
    return _round_trip(client, lambda connection: connection.pack_commands(commands), replies=len(commands))


def _round_trip(client: redis.Redis, pack: Callable[[Connection], list], replies: int) -> list:
    """Send what ``pack`` makes on one pooled connection, read ``replies`` replies; retried and
    reconnected like any client command. Replies are read off the socket by `ReplyReader` where
    the connection allows it (bulk strings then come back as ``bytearray``, received once)."""
    pool = client.connection_pool
    connection = pool.get_connection()

    def send() -> list:
        connection.send_packed_command(pack(connection))
        sock = idle_socket(connection)
        if sock is None:
            return [connection.read_response() for _ in range(replies)]
        reader = ReplyReader(sock, connection)
        answers = [reader.read() for _ in range(replies)]
        if reader.has_unread():  # a RESP3 push right behind the replies: never leave a connection out of step
            connection.disconnect()
        return answers

    try:
        return connection.retry.call_with_retry(send, lambda error: connection.disconnect())
    except BaseException:
        connection.disconnect()  # an error reply may leave later replies unread on it
        raise
    finally:
        pool.release(connection)


# Parts below this size are joined to their neighbours: one send call each would cost more than the copy.
_COPY_CUTOFF = 6000


def _coalesce(parts: list[bytes | memoryview]) -> list[bytes | memoryview]:
    """``parts`` with every run of small ones joined into one buffer; large ones stay uncopied."""
    out: list[bytes | memoryview] = []
    small: list[bytes | memoryview] = []
    for part in parts:
        if memoryview(part).nbytes < _COPY_CUTOFF:
            small.append(part)
            continue
        if small:
            out.append(b"".join(small))
            small = []
        out.append(part)
    if small:
        out.append(b"".join(small))
    return out
