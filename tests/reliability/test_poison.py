"""Poison jobs: a job that kills its worker every time ends `failed` after VLMQ_MAX_ATTEMPTS, not in a loop.

The Redis transport keeps no delivery count, so without the attempt limit the
poison message would come back after every death forever. Here a supervisor
restarts the worker each time it dies (as systemd or Kubernetes would); the
poison job's deliveries are counted by `AttemptLimitedTask` in the store, and
the delivery past the limit marks the job failed instead of running it. Real
embed jobs sent through the REST API around it all finish.
"""

from __future__ import annotations

import sys
import time

import httpx

from embedder_service.api.app import create_app
from shared.queue.celery_app import create_celery_app
from shared.store.jobs import JobStore
from shared.store.redis_conn import connect
from tests.support.images import png_bytes
from tests.support.poison_worker import POISON_TASK
from tests.support.reliability import (
    FaultFigures,
    Supervisor,
    deliveries,
    wait_finished,
)
from tests.support.services import REPO, api_server, service_env

MAX_ATTEMPTS = 3
# The restarted worker's startup sweep brings the poison message back once it is this old.
VISIBILITY_TIMEOUT_S = 1
GOOD_JOBS = 6


def test_a_job_that_kills_its_worker_fails_after_max_attempts_and_others_finish(demo_model, settings):
    settings = settings.model_copy(update={"visibility_timeout_s": VISIBILITY_TIMEOUT_S, "max_attempts": MAX_ATTEMPTS})
    client = connect(settings.effective_store_url)
    jobs = JobStore(client, settings.key_prefix, settings.job_ttl_s)
    celery = create_celery_app(settings)
    argv = [sys.executable, "-m", "tests.support.poison_worker", "--model", str(demo_model)]
    started = time.monotonic()
    with Supervisor(argv, service_env(settings), str(REPO)) as supervisor, api_server(create_app(settings)) as url:

        def submit_good(seed: int) -> str:
            response = httpx.post(f"{url}/v1/embeddings", files={"file": ("a.png", png_bytes(seed), "image/png")})
            assert response.status_code == 202, response.text
            return response.json()["job_id"]

        good = [submit_good(seed) for seed in range(GOOD_JOBS // 2)]
        poison_job = jobs.create("embed", "public")
        celery.send_task(POISON_TASK, kwargs={"job_id": poison_job}, task_id=poison_job, ignore_result=True)
        good += [submit_good(seed) for seed in range(GOOD_JOBS // 2, GOOD_JOBS)]

        finished = wait_finished(jobs, [poison_job, *good], timeout_s=60)
        seconds = time.monotonic() - started
        deaths = list(supervisor.deaths)

    delivered = deliveries(client, settings.key_prefix, [poison_job, *good])
    figures = FaultFigures(
        "poison job", submitted=GOOD_JOBS + 1, seconds=seconds,
        completed=sum(1 for j in finished.values() if j["status"] == "succeeded"),
        failed=sum(1 for j in finished.values() if j["status"] == "failed"),
        lost=GOOD_JOBS + 1 - len(finished),
        redelivered=sum(1 for n in delivered.values() if n > 1),
        extra={"worker_deaths": len(deaths), "poison_deliveries": delivered[poison_job]},
    )
    figures.print()

    assert figures.lost == 0
    poisoned = finished[poison_job]
    assert poisoned["status"] == "failed"
    assert poisoned["error"] == {
        "code": "worker_lost",
        "message": f"gave up after {MAX_ATTEMPTS} attempts: the worker died (or lost Redis) while running this job",
    }
    # It ran (and killed the worker) exactly MAX_ATTEMPTS times; the next delivery only marked it failed.
    assert poisoned["attempts"] == MAX_ATTEMPTS
    assert deaths == [-9] * MAX_ATTEMPTS
    assert delivered[poison_job] == MAX_ATTEMPTS + 1
    assert [finished[j]["status"] for j in good] == ["succeeded"] * GOOD_JOBS
    assert all(delivered[j] == 1 for j in good), "an innocent job was run twice"
    # No loop: after giving up, the message was acked; nothing brings it back (a sweep runs every second).
    time.sleep(VISIBILITY_TIMEOUT_S + 1.5)
    assert deliveries(client, settings.key_prefix, [poison_job])[poison_job] == MAX_ATTEMPTS + 1
