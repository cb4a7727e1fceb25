"""Worker death: SIGKILL an embedder and a generator mid-run; every job still finishes, each exactly once.

Two workers of each kind serve 100 `embed | generate` chains (the `vlmq caption`
path). One worker of each kind is SIGKILLed while jobs are in flight and is not
restarted: the messages it had reserved sit unacked in kombu's `unacked` hash
until a *surviving* worker's periodic sweep (`restore_visible`) finds them older
than the visibility timeout and puts them back on their queue. The test sets
that timeout to 6 s (production: 3600 s, `VLMQ_VISIBILITY_TIMEOUT_S`), so the
sweep runs every second and the whole run is bounded well under a minute.

Without vlmq's atomic take (shared/queue/broker.py), a worker killed between kombu's
BRPOP and its write to `unacked` lost the job outright: 1 of 100 in 2 of 6 runs.
"""

from __future__ import annotations

import os
import signal
import threading
import time

from shared.queue.celery_app import create_celery_app
from shared.store.jobs import JobStore
from shared.store.redis_conn import connect
from tests.support.images import png_bytes
from tests.support.reliability import (
    CAPTION_PAYLOAD,
    Chain,
    FaultFigures,
    deliveries,
    finish_markers,
    submit_chain,
    unacked_task_ids,
    wait_finished,
)
from tests.support.services import worker_processes

JOBS = 100
VISIBILITY_TIMEOUT_S = 6
DEADLINE_S = 50
# Captions long enough that generate jobs queue up behind the generators (3 tokens, the caption
# default, decode in a few ms with the CPU decode kernels: the generators keep up with the embedders
# and a kill would find no generate job reserved; 32 did too once the workers warmed up before their
# first job: a CI run of 2026-12-07 never saw more than 4 in flight in 50 s).
PAYLOAD = {**CAPTION_PAYLOAD, "sampling": {"max_tokens": 96, "temperature": 0.0}}


def test_sigkilled_workers_jobs_are_redelivered_and_finish_exactly_once(demo_model, settings):
    settings = settings.model_copy(update={"visibility_timeout_s": VISIBILITY_TIMEOUT_S, "max_attempts": 3})
    client = connect(settings.effective_store_url)
    jobs = JobStore(client, settings.key_prefix, settings.job_ttl_s)
    celery = create_celery_app(settings)
    figures = FaultFigures("worker death", submitted=JOBS)
    # Concurrency 4: several jobs in flight per worker, so a kill really loses reserved work.
    with worker_processes(["embed", "embed", "generate", "generate"], demo_model, settings, "--concurrency", "4") as procs:
        workers = {"embed": procs[:2], "generate": procs[2:]}
        started = time.monotonic()  # the run's clock starts with every worker up
        chains: list[Chain] = []
        submitter = threading.Thread(target=lambda: chains.extend(
            submit_chain(celery, jobs, png_bytes(1000 + i, size=(40, 32)), payload=PAYLOAD) for i in range(JOBS)))
        submitter.start()
        restored: dict[str, set[str]] = {}
        timers: list[threading.Timer] = []

        def in_flight(kind: str) -> set[str]:
            ours = {c.embed_id if kind == "embed" else c.generate_id for c in chains}
            return unacked_task_ids(client, kind) & ours

        def note_restored(kind: str, held: set[str]) -> None:
            # Half a visibility timeout after the kill the survivor has long acked its own jobs (each
            # takes milliseconds): what is still unacked is the victim's, waiting to be put back.
            restored[kind] = held & in_flight(kind)

        for kind in ("embed", "generate"):
            # Kill while the victim certainly holds jobs: more are reserved than the survivor's 4 threads
            # could hold. (Messages are reserved when a worker takes them, before a thread runs them.)
            while len(in_flight(kind)) <= 4:
                assert time.monotonic() - started < DEADLINE_S, f"never had more {kind} jobs in flight than one worker holds"
                time.sleep(0.005)
            victim = workers[kind][0]
            os.kill(victim.pid, signal.SIGKILL)
            victim.wait()
            timers.append(threading.Timer(VISIBILITY_TIMEOUT_S / 2, note_restored, (kind, in_flight(kind))))
            timers[-1].start()
        submitter.join()
        embed_ids = [c.embed_id for c in chains]
        generate_ids = [c.generate_id for c in chains]

        # What a client sees: each job read once it has finished, then read again at the end.
        finished = wait_finished(jobs, generate_ids, DEADLINE_S - (time.monotonic() - started))
        figures.seconds = time.monotonic() - started
        for timer in timers:
            timer.join()

    embeds = {job_id: jobs.get(job_id) for job_id in embed_ids}
    reread = {job_id: jobs.get(job_id) for job_id in finished}
    markers = finish_markers(client, settings.key_prefix, embed_ids + generate_ids)
    delivered = deliveries(client, settings.key_prefix, embed_ids + generate_ids)
    figures.completed = sum(1 for j in finished.values() if j["status"] == "succeeded")
    figures.failed = sum(1 for j in finished.values() if j["status"] == "failed")
    figures.lost = JOBS - len(finished)
    figures.duplicated = sum(1 for job_id, job in finished.items() if reread[job_id] != job) + sum(
        1 for n in markers.values() if n > 1
    )
    figures.redelivered = sum(len(ids) for ids in restored.values())
    figures.extra["restored_embed"] = len(restored.get("embed", ()))
    figures.extra["restored_generate"] = len(restored.get("generate", ()))
    figures.extra["ran_twice"] = sum(1 for n in delivered.values() if n > 1)
    figures.extra["max_deliveries"] = max(delivered.values())
    figures.print()

    lost = [c for c in chains if c.generate_id not in finished]
    assert figures.lost == 0, f"{figures.lost} jobs never finished: " + "; ".join(
        f"embed {jobs.get(c.embed_id)} generate {jobs.get(c.generate_id)} deliveries {delivered[c.embed_id]}/"
        f"{delivered[c.generate_id]} held {c.generate_id in unacked_task_ids(client, 'generate')} "
        f"queued {[m for m in client.lrange('generate', 0, -1) if c.generate_id.encode() in m] != []}" for c in lost)
    failures = [j["error"] for j in finished.values() if j["status"] != "succeeded"]
    assert not failures, failures
    assert all(j["status"] == "succeeded" for j in embeds.values())
    # Exactly once: a finished job never changes, and each finished exactly once.
    assert figures.duplicated == 0
    assert set(markers.values()) == {1}
    # The kills cost something: work the victims held was delivered again, and finished.
    # The kills cost something: each victim died holding jobs, which came back and finished.
    assert restored.get("embed") and restored.get("generate"), f"a killed worker held no jobs: {restored}"
    # Content addressing: one distinct container per image, whatever ran twice.
    containers = [e["result"]["containers"][0]["id"] for e in embeds.values()]
    assert len(set(containers)) == JOBS
    assert all(len(job["result"]["token_ids"]) >= 1 for job in finished.values())
    assert figures.seconds < DEADLINE_S
