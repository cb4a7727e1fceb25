"""Job state, waiting, and claim-check blobs against a real redis-server."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from shared.config.errors import Forbidden, NotFound
from shared.store.jobs import JobStore, job_key
from shared.store.redis_conn import connect


@pytest.fixture
def jobs(redis_client, key_prefix) -> JobStore:
    return JobStore(redis_client, key_prefix, ttl_s=600)


def test_create_stores_a_queued_job_with_ttl(jobs, redis_client, key_prefix):
    job_id = jobs.create("embed", "acme")
    job = jobs.get(job_id)
    assert len(job_id) == 32
    assert job == {
        "id": job_id,
        "kind": "embed",
        "tenant": "acme",
        "status": "queued",
        "error": None,
        "result": None,
        "attempts": 0,
        "created_at": job["created_at"],
        "updated_at": job["created_at"],
    }
    assert 595 <= redis_client.ttl(job_key(key_prefix, job_id)) <= 600


def test_create_with_a_given_id_refuses_to_overwrite(jobs):
    assert jobs.create("embed", "acme", job_id="fixed") == "fixed"
    with pytest.raises(ValueError, match="fixed"):
        jobs.create("generate", "acme", job_id="fixed")
    assert jobs.get("fixed")["kind"] == "embed"


def test_lifecycle_to_succeeded(jobs):
    job_id = jobs.create("embed", "acme")
    running = jobs.mark_running(job_id)
    assert (running["status"], running["attempts"]) == ("running", 1)
    done = jobs.mark_succeeded(job_id, {"container_id": "abc"})
    assert (done["status"], done["result"], done["error"]) == ("succeeded", {"container_id": "abc"}, None)
    assert jobs.get(job_id) == done
    assert done["updated_at"] >= running["updated_at"]


def test_failed_job_carries_code_and_message(jobs):
    job_id = jobs.create("embed", "acme")
    jobs.mark_running(job_id)
    failed = jobs.mark_failed(job_id, "invalid_input", "not an image")
    assert failed["status"] == "failed"
    assert failed["error"] == {"code": "invalid_input", "message": "not an image"}


def test_finished_jobs_are_final(jobs):
    job_id = jobs.create("embed", "acme")
    jobs.mark_succeeded(job_id, {"container_id": "abc"})
    # A redelivered task sees the job already done and changes nothing.
    assert jobs.mark_running(job_id)["status"] == "succeeded"
    assert jobs.mark_failed(job_id, "worker_lost", "late")["status"] == "succeeded"
    assert jobs.get(job_id)["attempts"] == 0


def test_concurrent_updates_are_not_lost(jobs, redis_url, key_prefix):
    job_id = jobs.create("embed", "acme")

    def start_attempt(_):
        # Own client per thread, so the WATCH transactions really interleave.
        JobStore(connect(redis_url), key_prefix, 600).mark_running(job_id)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(start_attempt, range(40)))
    assert jobs.get(job_id)["attempts"] == 40


def test_jobs_of_other_tenants_are_forbidden_and_unknown_jobs_not_found(jobs):
    job_id = jobs.create("embed", "acme")
    with pytest.raises(Forbidden, match=f"job of another tenant: {job_id}"):
        jobs.get(job_id, tenant="evil")
    with pytest.raises(NotFound, match="nope"):
        jobs.get("nope")
    with pytest.raises(NotFound, match="nope"):
        jobs.mark_running("nope")


def test_every_waiter_wakes_when_the_job_finishes(jobs, redis_url, key_prefix):
    job_id = jobs.create("generate", "acme")
    jobs.mark_running(job_id)
    woke: list[tuple[float, str]] = []

    def wait():
        job = JobStore(connect(redis_url), key_prefix, 600).wait(job_id, timeout_s=10)
        woke.append((time.monotonic(), job["status"]))

    waiters = [threading.Thread(target=wait) for _ in range(3)]
    for waiter in waiters:
        waiter.start()
    time.sleep(0.3)  # let them block
    finished_at = time.monotonic()
    jobs.mark_succeeded(job_id, {"text": "a cat"})
    for waiter in waiters:
        waiter.join(timeout=5)
    assert [status for _, status in woke] == ["succeeded"] * 3
    assert max(at for at, _ in woke) - finished_at < 0.5
    # A late waiter returns at once.
    started = time.monotonic()
    assert jobs.wait(job_id, timeout_s=10)["result"] == {"text": "a cat"}
    assert time.monotonic() - started < 0.2


def test_wait_returns_the_unfinished_job_after_the_timeout(jobs):
    job_id = jobs.create("generate", "acme")
    jobs.mark_running(job_id)
    started = time.monotonic()
    job = jobs.wait(job_id, timeout_s=0.3)
    assert job["status"] == "running"
    assert 0.25 <= time.monotonic() - started < 1.0


def test_wait_checks_the_tenant(jobs):
    job_id = jobs.create("generate", "acme")
    with pytest.raises(Forbidden):
        jobs.wait(job_id, timeout_s=0.1, tenant="evil")


def test_blobs_round_trip_with_ttl_and_delete(jobs, redis_client, key_prefix):
    key = jobs.put_blob(b"\x89PNG image bytes")
    assert key.startswith(f"{key_prefix}in:")
    assert 595 <= redis_client.ttl(key) <= 600
    assert jobs.get_blob(key) == b"\x89PNG image bytes"
    assert jobs.delete_blob(key) is True
    assert jobs.delete_blob(key) is False
    with pytest.raises(NotFound, match="upload not found"):
        jobs.get_blob(key)


def test_blob_keys_outside_the_upload_space_are_refused(jobs, key_prefix):
    with pytest.raises(ValueError, match="not an upload key"):
        jobs.get_blob(f"{key_prefix}c:some-container")


@pytest.mark.parametrize("timeout_s", [0.0004, 0.001, 0.004])
def test_a_wait_of_under_a_millisecond_returns_instead_of_blocking_forever(jobs, timeout_s):
    # BLMOVE with a timeout that rounds to 0 ms blocks until the socket gives up (10 s).
    job_id = jobs.create("generate", "acme")
    started = time.monotonic()
    assert jobs.wait(job_id, timeout_s)["status"] == "queued"
    assert time.monotonic() - started < 1
