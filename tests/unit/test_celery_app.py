"""The Celery app factory and the attempt limit, with a real worker on a real redis-server."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker
from kombu import Connection

from shared.config.settings import Settings
from shared.queue.celery_app import AttemptLimitedTask, count_attempt, create_celery_app
from shared.store.jobs import JobStore
from shared.store.redis_conn import connect

MAX_ATTEMPTS = 3


@pytest.fixture(scope="module")
def module_settings(redis_server) -> Iterator[Settings]:
    prefix = f"t{uuid.uuid4().hex[:12]}:"
    yield Settings(broker_url=redis_server.url, key_prefix=prefix, max_attempts=MAX_ATTEMPTS)
    client = connect(redis_server.url)
    keys = list(client.scan_iter(match=f"{prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(scope="module")
def app(module_settings) -> Celery:
    app = create_celery_app(module_settings, name="vlmq-test")

    @app.task(name="vlmq.embed.probe", bind=True, base=AttemptLimitedTask)
    def probe(self, job_id: str) -> str:
        # Records each run, then "dies": it never finishes the job, like a worker killed mid-task.
        self.store_redis.incr(f"{module_settings.key_prefix}probe-runs:{job_id}")
        self.jobs.mark_running(job_id)
        return "ran"

    return app


@pytest.fixture(scope="module")
def worker(app, module_settings) -> Iterator[None]:
    client = connect(module_settings.broker_url)
    client.delete("embed", "generate")  # messages left by an earlier run must not reach this worker
    with start_worker(app, pool="solo", perform_ping_check=False, loglevel="ERROR", shutdown_timeout=30):
        yield
    client.close()


@pytest.fixture
def jobs(module_settings) -> JobStore:
    return JobStore(connect(module_settings.broker_url), module_settings.key_prefix, 600)


def test_factory_configures_queues_routes_acks_and_serializers(settings):
    app = create_celery_app(settings)
    conf = app.conf
    assert {q.name for q in conf.task_queues} == {"embed", "generate"}
    assert app.amqp.router.route({}, "vlmq.embed")["queue"].name == "embed"
    assert app.amqp.router.route({}, "vlmq.embed_batch")["queue"].name == "embed"
    assert app.amqp.router.route({}, "vlmq.generate.stream")["queue"].name == "generate"
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.task_serializer == "json" and conf.result_serializer == "json"
    assert set(conf.accept_content) == {"json", "msgpack"}
    assert conf.broker_transport == "shared.queue.broker:Transport"  # the atomic take (test_broker.py)
    assert conf.broker_transport_options["visibility_timeout"] == settings.visibility_timeout_s
    # A dead worker's jobs are swept back every visibility/10 s (1–60 s), on every tick.
    assert conf.broker_transport_options["unacked_restore_interval"] == 60
    assert conf.broker_transport_options["unacked_restore_throttle"] == 1
    assert conf.task_publish_retry_policy["max_retries"] == 3
    assert conf.broker_connection_retry_on_startup is True
    assert conf.task_track_started is True
    assert conf.broker_url == settings.broker_url
    assert conf.result_backend == settings.effective_store_url


def test_tasks_land_in_their_own_queue_only(redis_server, key_prefix):
    broker_url = redis_server.url.rsplit("/", 1)[0] + "/1"  # a database no worker consumes from
    app = create_celery_app(Settings(broker_url=broker_url, store_url=redis_server.url, key_prefix=key_prefix))
    broker = connect(broker_url)
    try:
        with app.connection() as connection:  # declare both queues, as a worker does
            for queue in app.conf.task_queues:
                queue.bind(connection.default_channel).declare()
        app.send_task("vlmq.embed", args=["job-e"], ignore_result=True)
        app.send_task("vlmq.generate.stream", args=["job-g"], ignore_result=True)
        with Connection(broker_url) as connection:  # a raw publish to the exchange, as in the pickle test
            connection.Producer().publish({}, exchange="embed", routing_key="embed", headers={"task": "raw"})
        tasks = {q: [json.loads(m)["headers"]["task"] for m in broker.lrange(q, 0, -1)] for q in ("embed", "generate")}
        assert tasks == {"embed": ["raw", "vlmq.embed"], "generate": ["vlmq.generate.stream"]}
    finally:
        broker.flushdb()  # database 1 is this test's alone
        broker.close()


def _wait_until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_worker_refuses_pickled_messages_and_runs_json_ones(app, worker, jobs, module_settings, tmp_path: Path, caplog):
    marker = tmp_path / "unpickled"
    # A pickle that creates `marker` when loaded: were the worker to unpickle it, the file would exist.
    payload = b"cbuiltins\nopen\n(S'" + str(marker).encode() + b"'\nS'w'\ntR."
    pickled_job = jobs.create("embed", "acme")
    with Connection(module_settings.broker_url) as connection:
        connection.Producer().publish(
            payload,
            exchange="embed",
            routing_key="embed",
            content_type="application/x-python-serialize",
            content_encoding="binary",
            headers={"lang": "py", "task": "vlmq.embed.probe", "id": uuid.uuid4().hex, "argsrepr": pickled_job},
        )
    json_job = jobs.create("embed", "acme")
    assert app.tasks["vlmq.embed.probe"].delay(json_job).get(timeout=20) == "ran"
    # FIFO and one message at a time: the pickled one was handled before the json one.
    assert not marker.exists()
    assert any("Refusing to deserialize untrusted content of type pickle" in r.getMessage() for r in caplog.records)
    runs = connect(module_settings.broker_url)
    assert runs.get(f"{module_settings.key_prefix}probe-runs:{pickled_job}") is None
    assert runs.get(f"{module_settings.key_prefix}probe-runs:{json_job}") == b"1"
    assert runs.llen("embed") == 0  # refused and dropped, not requeued forever


def test_a_task_delivered_past_max_attempts_fails_its_job(app, worker, jobs, module_settings):
    job_id = jobs.create("embed", "acme")
    task_id = uuid.uuid4().hex
    deliveries = MAX_ATTEMPTS + 2
    # Redeliveries of one message look like this to the worker: the same task id again.
    for _ in range(deliveries):
        app.tasks["vlmq.embed.probe"].apply_async(args=[job_id], task_id=task_id)
    client = connect(module_settings.broker_url)
    _wait_until(lambda: client.get(f"{module_settings.key_prefix}attempts:{task_id}") == str(deliveries).encode())
    _wait_until(lambda: client.llen("embed") == 0)
    job = jobs.wait(job_id, timeout_s=10)
    assert job["status"] == "failed"
    assert job["error"] == {
        "code": "worker_lost",
        "message": f"gave up after {MAX_ATTEMPTS} attempts: the worker died (or lost Redis) while running this job",
    }
    assert job["attempts"] == MAX_ATTEMPTS
    assert client.get(f"{module_settings.key_prefix}probe-runs:{job_id}") == str(MAX_ATTEMPTS).encode()


def test_count_attempt_counts_per_task_id_with_ttl(redis_client, key_prefix):
    assert [count_attempt(redis_client, key_prefix, "task-a", 60) for _ in range(3)] == [1, 2, 3]
    assert count_attempt(redis_client, key_prefix, "task-b", 60) == 1
    assert 55 <= redis_client.ttl(f"{key_prefix}attempts:task-a") <= 60
