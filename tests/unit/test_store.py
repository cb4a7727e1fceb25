"""The container store against a real redis-server."""

from __future__ import annotations

import hashlib
import multiprocessing
import re
import time

import pytest
import torch

from shared.config.errors import Forbidden, NotFound, TooLarge
from shared.store.container import EmbeddingContainer, Layout
from shared.store.containers import ContainerStore, container_id
from shared.store.redis_conn import connect
from shared.store.token_ids import allocate_token_ids


def make_container(client, prefix, cid="img1", tenant="acme", fill=1.0, rows=4) -> EmbeddingContainer:
    return EmbeddingContainer(
        id=cid,
        model="model-fp",
        tenant=tenant,
        first_token_id=allocate_token_ids(client, prefix, rows),
        num_tokens=rows,
        embeddings=torch.full((rows, 8), fill),
        layout=Layout(before=(5,), after=(6,)),
    )


@pytest.fixture
def store(redis_client, key_prefix) -> ContainerStore:
    return ContainerStore(redis_client, key_prefix, ttl_s=600)


def test_put_then_get_returns_the_container(store, redis_client, key_prefix):
    put = store.put(make_container(redis_client, key_prefix))
    got = store.get("img1")
    assert got.first_token_id == put.first_token_id
    assert got.token_ids() == put.token_ids()
    assert torch.equal(got.embeddings, put.embeddings)
    assert redis_client.exists(f"{key_prefix}c:img1")


def test_put_sets_ttl_and_expires_at(store, redis_client, key_prefix):
    before = time.time()
    put = store.put(make_container(redis_client, key_prefix))
    assert 595 <= redis_client.ttl(f"{key_prefix}c:img1") <= 600
    assert before + 600 <= put.expires_at <= time.time() + 600
    assert store.get("img1").expires_at == pytest.approx(put.expires_at, abs=2)


def test_container_expires_after_its_ttl(redis_client, key_prefix):
    store = ContainerStore(redis_client, key_prefix, ttl_s=1)
    store.put(make_container(redis_client, key_prefix))
    assert store.exists("img1")
    time.sleep(1.1)
    assert not store.exists("img1")
    with pytest.raises(NotFound, match="img1"):
        store.get("img1")


def test_second_put_of_an_id_returns_the_first_container(store, redis_client, key_prefix):
    first = store.put(make_container(redis_client, key_prefix, fill=1.0))
    second = store.put(make_container(redis_client, key_prefix, fill=2.0))  # fresh IDs, other rows
    assert second.first_token_id == first.first_token_id
    assert torch.equal(second.embeddings, first.embeddings)
    assert store.get("img1").first_token_id == first.first_token_id


def _race_puts(url, prefix, ids, barrier, results, worker):
    client = connect(url)
    store = ContainerStore(client, prefix, ttl_s=600)
    outcomes = []
    for cid in ids:
        container = make_container(client, prefix, cid=cid, fill=float(worker))
        barrier.wait()
        winner = store.put(container)
        outcomes.append((winner.first_token_id, winner.embeddings[0, 0].item()))
    results.put(outcomes)


def test_concurrent_puts_from_two_processes_agree_on_one_winner(store, redis_url, key_prefix):
    ids = [f"race{i}" for i in range(20)]
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    workers = [
        ctx.Process(target=_race_puts, args=(redis_url, key_prefix, ids, barrier, results, w)) for w in (1, 2)
    ]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=10)
    assert outcomes[0] == outcomes[1]  # both callers got the same container, round after round
    for cid, (first_token_id, fill) in zip(ids, outcomes[0]):
        stored = store.get(cid)
        assert (stored.first_token_id, stored.embeddings[0, 0].item()) == (first_token_id, fill)


def _command_calls(client, command: str) -> int:
    return client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0)


def test_get_many_reads_all_containers_with_one_mget(store, redis_client, key_prefix):
    for i in range(3):
        store.put(make_container(redis_client, key_prefix, cid=f"img{i}", fill=float(i)))
    mgets, gets = _command_calls(redis_client, "mget"), _command_calls(redis_client, "get")
    found = store.get_many(["img2", "img0", "img1"])
    assert [c.id for c in found] == ["img2", "img0", "img1"]
    assert [c.embeddings[0, 0].item() for c in found] == [2.0, 0.0, 1.0]
    assert _command_calls(redis_client, "mget") == mgets + 1
    assert _command_calls(redis_client, "get") == gets


def test_get_many_names_every_missing_id(store, redis_client, key_prefix):
    store.put(make_container(redis_client, key_prefix, cid="here"))
    with pytest.raises(NotFound) as caught:
        store.get_many(["gone1", "here", "gone2"])
    assert "gone1, gone2" in caught.value.message
    assert "here" not in caught.value.message.split(":")[-1]


def test_other_tenants_containers_are_forbidden(store, redis_client, key_prefix):
    store.put(make_container(redis_client, key_prefix, cid="mine", tenant="acme"))
    assert store.get("mine", tenant="acme").tenant == "acme"
    with pytest.raises(Forbidden, match="container of another tenant: mine"):
        store.get("mine", tenant="evil")
    with pytest.raises(Forbidden, match="mine"):
        store.get_many(["mine"], tenant="evil")
    with pytest.raises(NotFound, match="gone"):  # a missing id is named first
        store.get_many(["mine", "gone"], tenant="evil")
    with pytest.raises(Forbidden, match="mine"):
        store.delete("mine", tenant="evil")
    assert store.exists("mine")


def test_delete(store, redis_client, key_prefix):
    store.put(make_container(redis_client, key_prefix))
    assert store.delete("img1", tenant="acme") is True
    assert store.delete("img1") is False
    with pytest.raises(NotFound):
        store.get("img1")


def test_touch_pin_and_unpin_change_the_lifetime(redis_client, key_prefix):
    store = ContainerStore(redis_client, key_prefix, ttl_s=60)
    store.put(make_container(redis_client, key_prefix))
    key = f"{key_prefix}c:img1"
    store.touch("img1", ttl_s=3600)
    assert 3590 <= redis_client.ttl(key) <= 3600
    assert store.get("img1").expires_at == pytest.approx(time.time() + 3600, abs=5)
    store.pin("img1")
    assert redis_client.ttl(key) == -1
    assert store.get("img1").expires_at is None
    store.unpin("img1")
    assert 55 <= redis_client.ttl(key) <= 60
    for change in (store.touch, store.pin, store.unpin):
        with pytest.raises(NotFound, match="nope"):
            change("nope")


def test_put_refuses_containers_over_the_size_limit(redis_client, key_prefix):
    store = ContainerStore(redis_client, key_prefix, max_container_bytes=1000)
    with pytest.raises(TooLarge, match="over the store limit"):
        store.put(make_container(redis_client, key_prefix, rows=64))
    assert not store.exists("img1")


def test_container_id_is_a_sha256_of_all_inputs():
    cid = container_id("acme", "fp", {"size": 336, "mode": "pad"}, b"\x89PNG")
    assert re.fullmatch(r"[0-9a-f]{64}", cid)
    parts = [b"acme", b"fp", b'{"mode":"pad","size":336}', b"\x89PNG"]  # the settings as canonical JSON
    assert cid == hashlib.sha256(b"".join(len(p).to_bytes(8, "big") + p for p in parts)).hexdigest()
    assert cid == container_id("acme", "fp", {"mode": "pad", "size": 336}, b"\x89PNG")  # key order is irrelevant
    others = {
        container_id("other", "fp", {"size": 336, "mode": "pad"}, b"\x89PNG"),
        container_id("acme", "fp2", {"size": 336, "mode": "pad"}, b"\x89PNG"),
        container_id("acme", "fp", {"size": 224, "mode": "pad"}, b"\x89PNG"),
        container_id("acme", "fp", {"size": 336, "mode": "pad"}, b"\x89PNH"),
        container_id("acmef", "p", {"size": 336, "mode": "pad"}, b"\x89PNG"),  # same concatenation
    }
    assert cid not in others and len(others) == 5
