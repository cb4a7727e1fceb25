"""Local Redis Cluster and Sentinel deployments for tests and benches, from the same redis-server binary.

No external tool (redis-cli --cluster, docker): a cluster is built as its spec says, with
CLUSTER ADDSLOTS on each master, CLUSTER MEET, and CLUSTER REPLICATE for replicas; a Sentinel
group is a master, its replicas (``replicaof``) and three Sentinels that monitor it.
"""

from __future__ import annotations

import random
import socket
import time
from contextlib import ExitStack
from typing import Self

import redis

from vlmq.redis_server import DISABLED_COMMANDS, EmbeddedRedis

SLOTS = 16384
# Short timeouts so that a test's failover takes a second or two, not production's 15+ s.
NODE_TIMEOUT_MS = 1000
READY_TIMEOUT_S = 30.0


def _wait_for(what: str, check, timeout_s: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"local Redis deployment: {what} did not happen within {timeout_s:.0f} s")
        time.sleep(0.05)


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too; Redis 6.2 has no ``cluster-port`` setting,
    so a node's port must be at most 55535."""
    while True:
        port = random.randrange(20000, 55535)
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port


def _client(server: EmbeddedRedis) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=2.0, decode_responses=True)


def _wait_for_replicas_in_sync(replicas: list[redis.Redis]) -> None:
    _wait_for("every replica in sync", lambda: all(r.info("replication").get("master_link_status") == "up" for r in replicas))


class _Deployment:
    """Servers started together and stopped together, also when one of them or the wiring fails on the way up."""

    def __init__(self):
        self._stack = ExitStack()

    def _servers(self) -> list[EmbeddedRedis]:
        raise NotImplementedError

    def _wire(self) -> None:
        """Connect the started servers into the deployment and wait until it is ready."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            for server in self._servers():
                self._stack.enter_context(server)
            self._wire()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()


class LocalCluster(_Deployment):
    """``masters`` primaries splitting the 16384 slots evenly, each with ``replicas`` replicas.

    A killed master's replica takes over after ``NODE_TIMEOUT_MS`` (the cluster's own failover).
    """

    def __init__(self, masters: int = 3, replicas: int = 0):
        super().__init__()
        config = ["cluster-enabled yes", "cluster-config-file nodes.conf", f"cluster-node-timeout {NODE_TIMEOUT_MS}",
                  # Any replica may take over, however long since it last heard from its master.
                  "cluster-replica-validity-factor 0"]
        self.masters = [EmbeddedRedis(_cluster_port(), config=config) for _ in range(masters)]
        self.replicas = [EmbeddedRedis(_cluster_port(), config=config) for _ in range(masters * replicas)]

    @property
    def nodes(self) -> list[EmbeddedRedis]:
        return self.masters + self.replicas

    @property
    def url(self) -> str:
        """vlmq's cluster URL: every master as a startup node."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in self.masters)

    def _servers(self) -> list[EmbeddedRedis]:
        return self.nodes

    def _wire(self) -> None:
        clients = [self._stack.enter_context(_client(node)) for node in self.nodes]
        per_master = SLOTS // len(self.masters)
        for index, client in enumerate(clients[: len(self.masters)]):
            last = SLOTS if index == len(self.masters) - 1 else (index + 1) * per_master
            client.execute_command("CLUSTER ADDSLOTS", *range(index * per_master, last))
        for client in clients[1:]:
            client.execute_command("CLUSTER MEET", "127.0.0.1", self.nodes[0].port)
        ids = [client.execute_command("CLUSTER MYID") for client in clients]
        _wait_for("every node knowing every other",
                  lambda: all(len(client.execute_command("CLUSTER NODES")) == len(clients) for client in clients))
        for index, client in enumerate(clients[len(self.masters):]):
            client.execute_command("CLUSTER REPLICATE", ids[index % len(self.masters)])
        _wait_for("cluster_state:ok on every node",
                  lambda: all(client.execute_command("CLUSTER INFO")["cluster_state"] == "ok" for client in clients))
        _wait_for_replicas_in_sync(clients[len(self.masters):])


class LocalSentinel(_Deployment):
    """A master with ``replicas`` replicas and three Sentinels watching it as ``master_name``.

    ``url`` is vlmq's (and Celery's) Sentinel URL for it. A killed master is replaced by a
    promoted replica after about ``NODE_TIMEOUT_MS`` plus the Sentinels' election.
    """

    master_name = "vlmq"

    def __init__(self, replicas: int = 1, sentinels: int = 3):
        super().__init__()
        # Sentinel reconfigures the servers with REPLICAOF and CONFIG REWRITE: those must stay.
        kept = tuple(c for c in DISABLED_COMMANDS if c not in ("CONFIG", "SLAVEOF", "REPLICAOF"))
        self.master = EmbeddedRedis(appendonly=True, disabled_commands=kept)
        self.replicas = [EmbeddedRedis(appendonly=True, disabled_commands=kept,
                                       config=[f"replicaof 127.0.0.1 {self.master.port}"]) for _ in range(replicas)]
        quorum = sentinels // 2 + 1
        watch = [f"sentinel monitor {self.master_name} 127.0.0.1 {self.master.port} {quorum}",
                 f"sentinel down-after-milliseconds {self.master_name} {NODE_TIMEOUT_MS}",
                 f"sentinel failover-timeout {self.master_name} 5000"]
        self.sentinels = [EmbeddedRedis(config=watch, disabled_commands=(), sentinel=True) for _ in range(sentinels)]

    def url(self, db: int = 0) -> str:
        """vlmq's Sentinel URL: Celery's ``sentinel://…;sentinel://…`` form, the database and master's name on the first entry."""
        first, *others = [f"sentinel://127.0.0.1:{s.port}" for s in self.sentinels]
        return ";".join([f"{first}/{db}?master_name={self.master_name}", *others])

    def current_master_port(self) -> int:
        with _client(self.sentinels[0]) as client:
            return int(client.sentinel_get_master_addr_by_name(self.master_name)[1])

    def server_on(self, port: int) -> EmbeddedRedis:
        return next(server for server in [self.master, *self.replicas] if server.port == port)

    def _servers(self) -> list[EmbeddedRedis]:
        return [self.master, *self.replicas, *self.sentinels]

    def _wire(self) -> None:
        replicas = [self._stack.enter_context(_client(r)) for r in self.replicas]
        sentinels = [self._stack.enter_context(_client(s)) for s in self.sentinels]
        _wait_for_replicas_in_sync(replicas)
        _wait_for("every Sentinel seeing the other Sentinels and the replicas", lambda: all(
            (master := s.sentinel_master(self.master_name))["num-other-sentinels"] == len(sentinels) - 1
            and master["num-slaves"] == len(replicas) for s in sentinels))
