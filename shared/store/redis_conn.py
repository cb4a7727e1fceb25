"""Redis clients for vlmq, and the translation of "Redis is down" into ``StoreUnavailable``.

A URL names one of three deployments, each served by redis-py's own client for it:

- ``redis://`` / ``rediss://`` (TLS): one server — ``redis.Redis``;
- ``redis+cluster://[user:password@]host:port[,host:port…]`` (``rediss+cluster://`` for TLS): a
  Redis Cluster, the listed nodes only a start (the client learns the rest) — ``redis.RedisCluster``;
- ``sentinel://[user:password@]host:port[/db]?master_name=NAME[;sentinel://host:port…]``: the master
  a group of Sentinels names, found again after a failover — ``Sentinel.master_for``. Celery's
  multi-Sentinel form; credentials, database and ``master_name`` go on the first entry, where kombu
  reads them too (docs/SCALING.md).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.sentinel
import redis.sentinel
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialWithJitterBackoff
from redis.cluster import ClusterNode
from redis.connection import Connection, parse_url
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    RedisClusterUnreachableError,
    SlotNotCoveredError,
    TryAgainError,
)
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

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
SENTINEL_SCHEME = "sentinel"
DEFAULT_SENTINEL_PORT = 26379
# What a cluster answers while a slot moves or a failover is under way: worth a refreshed map and a retry.
CLUSTER_TRANSIENT_ERRORS = (redis.ConnectionError, redis.TimeoutError, MovedError, AskError, TryAgainError,
                            ClusterDownError, SlotNotCoveredError)

_OPTIONS = dict(
    socket_timeout=SOCKET_TIMEOUT_S,
    socket_connect_timeout=CONNECT_TIMEOUT_S,
    socket_keepalive=True,
    health_check_interval=30,
    decode_responses=False,
)
_SENTINEL_OPTIONS = dict(socket_timeout=SOCKET_TIMEOUT_S, socket_connect_timeout=CONNECT_TIMEOUT_S)

Client = redis.Redis | redis.RedisCluster
T = TypeVar("T")


def _backoff() -> ExponentialWithJitterBackoff:
    return ExponentialWithJitterBackoff(base=0.05, cap=1.0)


def is_cluster(client) -> bool:
    """Whether ``client`` is redis-py's cluster client (sync or asyncio). Not ``isinstance``: redis-py's client
    classes are typing Protocols, whose isinstance costs a microsecond — on the store's hot path."""
    return getattr(client, "nodes_manager", None) is not None


def is_cluster_url(url: str) -> bool:
    return urlsplit(url).scheme in CLUSTER_SCHEMES


def is_sentinel_url(url: str) -> bool:
    return urlsplit(url).scheme == SENTINEL_SCHEME


def _cluster_parts(url: str) -> tuple[str, list[tuple[str, int]]]:
    """A cluster URL as redis-py's: the first node's ``redis(s)://`` URL (credentials, TLS options), and every node."""
    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    nodes = [(host, int(port or 6379)) for host, _, port in (entry.rpartition(":") for entry in hosts.split(","))]
    scheme = parts.scheme.removesuffix("+cluster")
    first = urlunsplit((scheme, f"{userinfo}@{hosts.split(',')[0]}" if userinfo else hosts.split(",")[0], "", parts.query, ""))
    return first, nodes


def sentinel_parts(url: str) -> tuple[list[tuple[str, int]], str, str]:
    """A Sentinel URL's Sentinels, the master's name, and the URL without ``master_name`` (what Celery is given,
    with the name in its transport options)."""
    entries = url.split(";")
    sentinels = [(p.hostname or "localhost", p.port or DEFAULT_SENTINEL_PORT) for p in map(urlsplit, entries)]
    first = urlsplit(entries[0])
    query = parse_qs(first.query)
    names = query.pop("master_name", None)
    if not names:
        raise ValueError(f"a sentinel:// URL needs ?master_name=NAME on its first entry: {mask(url)}")
    entries[0] = urlunsplit(first._replace(query=urlencode(query, doseq=True)))
    return sentinels, names[-1], ";".join(entries)


def _master_options(url: str) -> dict[str, Any]:
    """Credentials and database of a Sentinel URL's first entry, for the connections to the master."""
    options = parse_url(urlunsplit(urlsplit(sentinel_parts(url)[2].split(";")[0])._replace(scheme="redis")))
    return {key: options[key] for key in ("username", "password", "db") if options.get(key) is not None}


def mask(url: str) -> str:
    """``url`` with any password replaced by ``**``."""
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    return urlunsplit(parts._replace(netloc=f"{user}{colon and ':**'}{at}{hosts}")) if at else url


def connect(url: str, *, retries: int = RETRIES) -> Client:
    """A client for ``url`` (see the module's docstring for the three kinds).

    Replies are bytes (``decode_responses=False``): containers are binary. Commands
    that fail on a connection error or timeout are retried with backoff, and idle
    connections are health-checked before reuse, so clients survive Redis restarts
    (and, through Sentinel or the cluster's own failover, a master's loss).
    """
    retry = Retry(_backoff(), retries)
    if is_cluster_url(url):
        first, nodes = _cluster_parts(url)
        try:  # redis-py's cluster client reads the slot map as it is made: no node answering is an outage now
            return redis.RedisCluster.from_url(first, startup_nodes=[ClusterNode(h, p) for h, p in nodes], retry=retry,
                                               **_OPTIONS)
        except RedisClusterUnreachableError as exc:
            raise StoreUnavailable(f"Redis Cluster at {','.join(f'{h}:{p}' for h, p in nodes)} unreachable: {exc}") from exc
    if is_sentinel_url(url):
        sentinels, master, _ = sentinel_parts(url)
        return redis.sentinel.Sentinel(sentinels, sentinel_kwargs=_SENTINEL_OPTIONS).master_for(
            master, retry=retry, **_OPTIONS, **_master_options(url))
    return redis.Redis.from_url(url, retry=retry, **_OPTIONS)


def connect_async(url: str, *, retries: int = RETRIES, max_connections: int = ASYNC_MAX_CONNECTIONS):
    """`connect`'s asyncio twin, for the APIs' event loop: waiting on Redis there holds no thread.

    A single server's pool blocks a command when all ``max_connections`` are busy, rather than
    failing it: a thousand waiting requests share a few connections (a job wait holds one only for
    a GET; a followed stream for one ``XREAD`` of at most a second). A cluster has that many per node.
    """
    retry = AsyncRetry(_backoff(), retries)
    if is_cluster_url(url):
        first, nodes = _cluster_parts(url)
        return redis.asyncio.RedisCluster.from_url(
            first, startup_nodes=[redis.asyncio.cluster.ClusterNode(h, p) for h, p in nodes], retry=retry,
            max_connections=max_connections, **_OPTIONS)
    if is_sentinel_url(url):
        sentinels, master, _ = sentinel_parts(url)
        return redis.asyncio.sentinel.Sentinel(sentinels, sentinel_kwargs=_SENTINEL_OPTIONS).master_for(
            master, retry=retry, max_connections=max_connections, **_OPTIONS, **_master_options(url))
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=SOCKET_TIMEOUT_S, retry=retry, **_OPTIONS,
    )
    return redis.asyncio.Redis(connection_pool=pool)


def subscriber(client: Client) -> redis.client.PubSub:
    """A pub/sub object on ``client``'s deployment. In a cluster a PUBLISH reaches the subscribers of
    every node, so any node will do: a random one, so that after losing a node the next try likely
    lands on a live one."""
    if is_cluster(client):
        return client.pubsub(node=client.get_random_node(), ignore_subscribe_messages=True)
    return client.pubsub(ignore_subscribe_messages=True)


async def async_subscriber(client) -> redis.asyncio.client.PubSub:
    """`subscriber` for an asyncio client. redis-py's asyncio cluster has no pub/sub of its own: a plain
    client on one of its nodes serves (the subscription sees every node's PUBLISH)."""
    if is_cluster(client):
        await client.initialize()
        node = random.choice(client.get_nodes())
        credentials = {k: node.connection_kwargs.get(k) for k in ("username", "password")}
        return redis.asyncio.Redis(host=node.host, port=node.port, **credentials, **_OPTIONS).pubsub(
            ignore_subscribe_messages=True)
    return client.pubsub(ignore_subscribe_messages=True)


def by_node(client: Client, keys: Sequence[str]) -> list[list[list[str]]]:
    """``keys`` grouped by the node that holds them, then by slot (what one multi-key command may touch).

    One server is one node and one group; in a cluster, a node's groups go in one round trip.
    """
    if not is_cluster(client):
        return [[list(keys)]]
    nodes: dict[str, dict[int, list[str]]] = {}
    for key in keys:
        slot = client.keyslot(key)
        nodes.setdefault(client.get_node_from_key(key).name, {}).setdefault(slot, []).append(key)
    return [list(slots.values()) for slots in nodes.values()]


def mget(client: Client, keys: Sequence[str]) -> list:
    """GET of every key: MGET on one server; on a cluster redis-py's per-slot MGETs, one round trip per node."""
    return client.mget_nonatomic(keys) if is_cluster(client) else client.mget(keys)


def on_node_of(client: Client, key: str, call: Callable[[redis.Redis], T]) -> T:
    """``call`` with the client of the server holding ``key``: ``client`` itself, or in a cluster its
    node's client, from redis-py's slot map — refreshed and tried again, as RedisCluster does for its own
    commands, while a failover or a slot move is under way."""
    if not is_cluster(client):
        return call(client)

    def refresh(_error: Exception) -> None:
        try:
            client.nodes_manager.initialize()
        except redis.RedisError:
            pass  # no node answers yet: the next attempt fails and refreshes again

    retry = Retry(_backoff(), RETRIES, supported_errors=CLUSTER_TRANSIENT_ERRORS)
    return retry.call_with_retry(lambda: call(client.get_redis_connection(client.get_node_from_key(key))), refresh)


def endpoint(client) -> str:
    """Where a client connects, for messages — never its credentials: ``host:port`` (or the socket path),
    a cluster's nodes, a Sentinel master's name."""
    if is_cluster(client):
        return "cluster " + ",".join(f"{node.host}:{node.port}" for node in client.get_nodes()[:3])
    pool = client.connection_pool
    if isinstance(pool, (redis.sentinel.SentinelConnectionPool, redis.asyncio.sentinel.SentinelConnectionPool)):
        return f"Sentinel master {pool.service_name}"
    kwargs = pool.connection_kwargs
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
    except (redis.ConnectionError, redis.TimeoutError, ClusterDownError, TryAgainError, SlotNotCoveredError) as exc:
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
    [reply] = on_node_of(client, key, lambda node: _round_trip(node, lambda connection: command, replies=1))
    return reply is not None


def pipelined(client: Client, *commands: tuple) -> list:
    """The raw replies of ``commands``, sent in one round trip.

    What a redis-py pipeline does without its per-command bookkeeping, which on a
    small reply costs more than the round trip itself (the store's read path). In a
    cluster they go to the node of the first command's first key: every key must be
    there (`by_node` groups them so).
    """
    route = next(iter(commands[0][1:]), "")  # keyless commands (PING) only ever go to one server
    return on_node_of(client, route, lambda node: _round_trip(
        node, lambda connection: connection.pack_commands(commands), replies=len(commands)))


def with_connection(client: redis.Redis, use: Callable[[Connection], T]) -> T:
    """``use`` with one pooled connection of ``client`` (one server: a cluster node's client, not the cluster's),
    retried and reconnected like any client command. For what must share a connection: replies read off the
    socket by hand, a ``WAIT`` after the write it waits for."""
    pool = client.connection_pool
    connection = pool.get_connection()
    try:
        return connection.retry.call_with_retry(lambda: use(connection), lambda error: connection.disconnect())
    except BaseException:
        connection.disconnect()  # an error reply may leave later replies unread on it
        raise
    finally:
        pool.release(connection)


def _round_trip(client: redis.Redis, pack: Callable[[Connection], list], replies: int) -> list:
    """Send what ``pack`` makes on one pooled connection, read ``replies`` replies. Replies are read off the
    socket by `ReplyReader` where the connection allows it (bulk strings then come back as ``bytearray``,
    received once)."""

    def send(connection: Connection) -> list:
        connection.send_packed_command(pack(connection))
        sock = idle_socket(connection)
        if sock is None:
            return [connection.read_response() for _ in range(replies)]
        reader = ReplyReader(sock, connection)
        answers = [reader.read() for _ in range(replies)]
        if reader.has_unread():  # a RESP3 push right behind the replies: never leave a connection out of step
            connection.disconnect()
        return answers

    return with_connection(client, send)


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
