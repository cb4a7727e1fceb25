"""Redis clients for vlmq, and the translation of "Redis is down" into ``StoreUnavailable``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from shared.errors import StoreUnavailable

# Blocking reads in vlmq (job waits) block for at most ~1 s per call, so a read that
# takes longer than this means the server is gone or wedged.
SOCKET_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 5.0
# A Redis restart takes about a second: retrying 6 times with jittered exponential
# backoff (50 ms doubling, capped at 1 s) rides through it without hanging a caller long.
RETRIES = 6


def connect(url: str, *, retries: int = RETRIES) -> redis.Redis:
    """A client for ``url`` (``redis://``, ``rediss://`` for TLS, ``redis://user:password@host:port/db``).

    Replies are bytes (``decode_responses=False``): containers are binary. Commands
    that fail on a connection error or timeout are retried with backoff, and idle
    connections are health-checked before reuse, so clients survive Redis restarts.
    """
    return redis.Redis.from_url(
        url,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_keepalive=True,
        health_check_interval=30,
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries),
        decode_responses=False,
    )


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
