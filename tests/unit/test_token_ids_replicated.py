"""Token-ID ranges on a replicated store: a range is handed out only once a replica has the counter's
increment, so a failover cannot hand it out again (docs/SCALING.md). Real Sentinel and Cluster
deployments (tests/support/redis_topologies.py); a replica is frozen with SIGSTOP to hold replication."""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager

import pytest
import redis

from shared.config.errors import StoreUnavailable
from shared.store import token_ids
from shared.store.redis_conn import connect
from shared.store.token_ids import allocate_token_ids
from tests.support.redis_topologies import LocalCluster, LocalSentinel
from vlmq.redis_server import EmbeddedRedis

KEY = "t:ids:next"


@contextmanager
def frozen(server: EmbeddedRedis):
    os.kill(server.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.pid, signal.SIGCONT)


def _check(client, replica: EmbeddedRedis, monkeypatch, *, cluster: bool = False) -> None:
    reader = redis.Redis(port=replica.port, single_connection_client=True)
    if cluster:
        reader.execute_command("READONLY")  # a cluster replica answers reads of its master's slots only when asked so
    for _ in range(20):
        first = allocate_token_ids(client, "t:", 576)
        assert int(reader.get(KEY)) >= first + 576  # the replica had it when the range was returned
    monkeypatch.setattr(token_ids, "REPLICA_WAIT_MS", 300)
    with frozen(replica), pytest.raises(StoreUnavailable, match="not on a replica"):
        allocate_token_ids(client, "t:", 576)
    reader.close()


def test_behind_sentinel_a_range_is_returned_once_the_replica_has_it(monkeypatch):
    with LocalSentinel(replicas=1) as group:
        _check(connect(group.url()), group.replicas[0], monkeypatch)


def test_on_a_cluster_a_range_is_returned_once_the_counters_replica_has_it(monkeypatch):
    with LocalCluster(masters=3, replicas=1) as cluster:
        client = connect(cluster.url)
        master = client.get_node_from_key(KEY)
        replica_node = client.get_node_from_key(KEY, replica=True)
        assert replica_node is not None and replica_node.port != master.port
        replica = next(node for node in cluster.replicas if node.port == replica_node.port)
        _check(client, replica, monkeypatch, cluster=True)
