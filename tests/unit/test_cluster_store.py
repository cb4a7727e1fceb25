"""The store on a real 3-master Redis Cluster (tests/support/redis_topologies.py): containers, jobs, streams,
token IDs, and both kinds of pub/sub listener, through a `redis+cluster://` URL."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import redis
import torch

from shared.store.cancel_watch import CancelWatch
from shared.store.container import EmbeddingContainer
from shared.store.containers import ContainerStore
from shared.store.jobs import JobStore, done_key, job_key, stream_key
from shared.store.redis_conn import by_node, connect, connect_async, endpoint, mget
from shared.store.streams import TokenStreams
from shared.store.token_ids import EMBEDDING_INDEX_BASE, allocate_token_ids
from shared.store.waiting import JobWaiters
from tests.support.redis_topologies import LocalCluster


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(masters=3) as cluster:
        yield cluster


@pytest.fixture
def client(cluster):
    client = connect(cluster.url)
    yield client
    client.flushall()  # FLUSHALL goes to every primary
    client.close()


def _command_calls(node: redis.Redis, command: str) -> int:
    return node.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0)


def _container(cid: str, fill: float) -> EmbeddingContainer:
    return EmbeddingContainer(id=cid, model="m", tenant="acme", first_token_id=EMBEDDING_INDEX_BASE, num_tokens=4,
                              embeddings=torch.full((4, 8), fill))


def test_a_cluster_url_gives_redis_pys_cluster_client_on_every_startup_node(cluster, client):
    assert isinstance(client, redis.RedisCluster)
    assert {node.port for node in client.get_primaries()} == {node.port for node in cluster.masters}
    assert endpoint(client).startswith("cluster 127.0.0.1:")


def test_containers_spread_over_the_nodes_are_read_back_grouped_by_node_with_an_mget_per_slot(client):
    store = ContainerStore(client, "t:", ttl_s=600)
    ids = [f"img{i}" for i in range(12)]
    for i, cid in enumerate(ids):
        store.put(_container(cid, float(i)))
    groups = by_node(client, [store.key(cid) for cid in ids])
    assert len(groups) == 3  # twelve keys land on all three masters
    primaries = client.get_primaries()
    keys_on = {node.port: [store.key(cid) for cid in ids if client.get_node_from_key(store.key(cid)).port == node.port]
               for node in primaries}
    nodes = {node.port: client.get_redis_connection(node) for node in primaries}

    def calls() -> dict[int, list[int]]:
        return {port: [_command_calls(n, c) for c in ("mget", "pttl", "get")] for port, n in nodes.items()}

    before = calls()
    found = store.get_many(list(reversed(ids)))
    assert [c.id for c in found] == list(reversed(ids))
    assert [c.embeddings[0, 0].item() for c in found] == [float(i) for i in reversed(range(12))]
    assert all(c.expires_at is not None for c in found)
    after = calls()
    # One group per node (one pipelined call each): each node answered an MGET per slot of its keys and a
    # PTTL per key, and no GET.
    for port, keys in keys_on.items():
        slots = {client.keyslot(key) for key in keys}
        assert [a - b for a, b in zip(after[port], before[port])] == [len(slots), len(keys), 0], port


def test_put_is_content_addressed_and_pin_touch_delete_work_on_a_cluster(client):
    store = ContainerStore(client, "t:", ttl_s=600)
    first = store.put(_container("same", 1.0))
    assert store.put(_container("same", 2.0)).embeddings[0, 0].item() == first.embeddings[0, 0].item() == 1.0
    store.pin("same")
    assert store.get("same").expires_at is None
    store.unpin("same")
    assert store.get("same").expires_at is not None
    assert store.delete("same", "acme") and not store.exists("same")


def test_a_jobs_keys_share_one_slot_and_its_lifecycle_runs_on_a_cluster(client):
    jobs = JobStore(client, "t:", ttl_s=600)
    job_id = jobs.create("generate", "acme")
    slots = {client.keyslot(key("t:", job_id)) for key in (job_key, done_key, stream_key)}
    assert len(slots) == 1
    jobs.mark_running(job_id)
    streams = TokenStreams(client, "t:", 600)
    streams.add_text(job_id, "a cat", 2)
    streams.end(job_id, "stop")
    assert jobs.mark_succeeded(job_id, {"text": "a cat"})["status"] == "succeeded"
    assert jobs.wait(job_id, timeout_s=1)["result"] == {"text": "a cat"}  # BLMOVE on the done list
    assert client.llen(done_key("t:", job_id)) == 1
    assert [e[1][b"e"] for e in client.xrange(stream_key("t:", job_id))][-1].startswith(b'{"type": "end"')


def test_concurrent_updates_of_one_job_are_not_lost_on_a_cluster(cluster, client):
    jobs = JobStore(client, "t:", ttl_s=600)
    job_id = jobs.create("embed", "acme")
    threads = [threading.Thread(target=lambda: JobStore(connect(cluster.url), "t:", 600).mark_running(job_id))
               for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert jobs.get(job_id)["attempts"] == 8


def test_token_id_ranges_never_overlap_on_a_cluster(client):
    firsts = [allocate_token_ids(client, "t:", 100) for _ in range(5)]
    assert firsts == [EMBEDDING_INDEX_BASE + 100 * i for i in range(5)]


def test_mget_reads_keys_of_every_node(client):
    keys = [f"t:k{i}" for i in range(20)]
    for key in keys:
        client.set(key, key)
    assert mget(client, keys) == [key.encode() for key in keys]


def test_a_finish_published_on_any_node_wakes_the_async_waiters(cluster, client):
    """The waiters subscribe on one node (redis-py's asyncio cluster has no pub/sub); Redis Cluster
    forwards every PUBLISH to every node, so the finish reaches them from the job's node."""
    jobs = JobStore(client, "t:", ttl_s=600)
    job_ids = [jobs.create("generate", "acme") for _ in range(6)]  # on every node

    async def scenario() -> list[tuple[str, float]]:
        waiters = JobWaiters(connect_async(cluster.url), "t:")
        await waiters.start()
        try:
            await asyncio.sleep(0.5)  # subscribed
            tasks = [asyncio.create_task(waiters.wait(job_id, timeout_s=20)) for job_id in job_ids]
            await asyncio.sleep(0.2)
            began = time.monotonic()
            await asyncio.to_thread(lambda: [jobs.mark_succeeded(job_id, {}) for job_id in job_ids])
            done = await asyncio.gather(*tasks)
            return [(job["status"], time.monotonic() - began) for job in done]
        finally:
            await waiters.stop()

    woke = asyncio.run(scenario())
    assert [status for status, _ in woke] == ["succeeded"] * 6
    assert max(seconds for _, seconds in woke) < 2  # woken by the PUBLISH, not the 20 s timeout


def test_a_cancel_reaches_the_workers_watch_on_a_cluster(cluster, client):
    jobs = JobStore(client, "t:", ttl_s=600)
    job_id = jobs.create("generate", "acme")
    jobs.mark_running(job_id)
    cancelled = threading.Event()
    watch = CancelWatch(connect(cluster.url), JobStore(connect(cluster.url), "t:", 600))
    with watch.watch(job_id, cancelled.set):
        time.sleep(0.5)  # the listening thread has subscribed
        jobs.cancel(job_id, "acme")
        assert cancelled.wait(5)
