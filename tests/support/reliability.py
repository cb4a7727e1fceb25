"""Helpers of the reliability tests: submitting embed → generate chains, waiting, and the fault figures.

Jobs are sent exactly as `vlmq caption` sends them (an `embed | generate` chain
per image, claim-check blobs in the store), and read back as a client reads
them: from the job store, once finished.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from dataclasses import dataclass, field

import httpx
import redis
from celery import Celery, chain

from shared.config.errors import StoreUnavailable
from shared.queue.tasks import embed_signature, generate_signature
from shared.store.jobs import TERMINAL_STATUSES, JobStore, done_key, job_key
from shared.store.redis_conn import mget
from tests.support.images import png_bytes

CAPTION_PAYLOAD = {
    "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}],
    "sampling": {"max_tokens": 3, "temperature": 0.0},
    "stop": [],
}


@dataclass(frozen=True)
class Chain:
    embed_id: str
    generate_id: str


def submit_chain(celery: Celery, jobs: JobStore, image: bytes, tenant: str = "public", payload: dict | None = None) -> Chain:
    embed_id, embed = embed_signature(celery, jobs, tenant, [image])
    generate_id, generate = generate_signature(celery, jobs, tenant, payload or CAPTION_PAYLOAD)
    chain(embed, generate).apply_async()
    return Chain(embed_id, generate_id)


def wait_finished(jobs: JobStore, job_ids: list[str], timeout_s: float) -> dict[str, dict]:
    """Each job as first seen finished; jobs still unfinished at the deadline are left out (lost)."""
    deadline = time.monotonic() + timeout_s
    finished: dict[str, dict] = {}
    while len(finished) < len(job_ids) and time.monotonic() < deadline:
        for job_id in job_ids:
            if job_id not in finished:
                job = jobs.get(job_id)
                if job["status"] in TERMINAL_STATUSES:
                    finished[job_id] = job
        time.sleep(0.1)
    return finished


def count_finished(client: redis.Redis, prefix: str, job_ids: list[str]) -> int:
    """How many of the jobs have finished, in one round trip (cheap enough to poll tightly)."""
    raws = mget(client, [job_key(prefix, job_id) for job_id in job_ids])
    return sum(1 for raw in raws if raw is not None and json.loads(raw)["status"] in TERMINAL_STATUSES)


def unacked_task_ids(broker: redis.Redis, queue: str) -> set[str]:
    """Task ids of messages delivered from `queue` to some worker and not yet acked (kombu's `unacked` hash)."""
    held = set()
    for raw in broker.hvals("unacked"):
        message, _exchange, routing_key = json.loads(raw)
        if routing_key == queue:
            held.add(message["headers"]["id"])
    return held


def deliveries(client: redis.Redis, prefix: str, task_ids: list[str]) -> dict[str, int]:
    """How many times each task was delivered to a worker (AttemptLimitedTask's count; the task id is the job id)."""
    values = mget(client, [f"{prefix}attempts:{task_id}" for task_id in task_ids])
    return {task_id: int(v or 0) for task_id, v in zip(task_ids, values)}


def finish_markers(client: redis.Redis, prefix: str, job_ids: list[str]) -> dict[str, int]:
    """How many times each job went from running to finished (JobStore pushes one marker per transition)."""
    pipe = client.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.llen(done_key(prefix, job_id))
    return dict(zip(job_ids, pipe.execute()))


@dataclass
class FaultFigures:
    """What a fault test reports: every job submitted is completed, failed visibly, or lost."""

    name: str
    submitted: int = 0
    completed: int = 0
    failed: int = 0
    lost: int = 0
    duplicated: int = 0  # a job whose result the client saw change, or that finished twice
    redelivered: int = 0  # messages delivered again after a fault (a dead worker's, a poison job's)
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def print(self) -> None:
        figures = {k: v for k, v in self.__dict__.items() if k not in ("name", "extra")}
        figures["seconds"] = round(self.seconds, 1)
        print(f"\n[{self.name}] " + json.dumps({**figures, **self.extra}), flush=True)


def small_image(seed: int) -> bytes:
    """The 40 × 32 PNG each fault test's chain embeds (one per seed)."""
    return png_bytes(seed, size=(40, 32))


def submit_until_some_finish(celery: Celery, jobs: JobStore, client: redis.Redis, prefix: str, first_seed: int, count: int,
                             finished: int, timeout_s: float) -> tuple[list[Chain], int]:
    """Submit `count` chains (images from `first_seed` on) and wait until at least `finished` of them are done, as a
    fault test does before its fault; the chains and how many were done. No progress within `timeout_s` fails the test."""
    started = time.monotonic()
    chains = [submit_chain(celery, jobs, small_image(first_seed + i)) for i in range(count)]
    generate_ids = [c.generate_id for c in chains]
    while (done := count_finished(client, prefix, generate_ids)) < finished:
        assert time.monotonic() - started < timeout_s, f"fewer than {finished} chains finished within {timeout_s} s"
        time.sleep(0.02)
    return chains, done


def submit_through_failover(celery: Celery, jobs: JobStore, chains: list[Chain], total: int, first_seed: int) -> int:
    """Submit chains until there are `total`, sending again each one the store refused while no master was
    known (what a client does with an API's 503); returns how many were refused."""
    refused = 0
    while len(chains) < total:
        try:
            chains.append(submit_chain(celery, jobs, small_image(first_seed + len(chains))))
        except StoreUnavailable:
            refused += 1
    return refused


def chains_outcome(name: str, client: redis.Redis, prefix: str, jobs: JobStore, chains: list[Chain], started: float,
                   timeout_s: float) -> tuple[FaultFigures, dict[str, dict]]:
    """Wait for every chain's generate job, then the figures of the run (the caller adds `extra`) and the finished jobs."""
    generate_ids = [c.generate_id for c in chains]
    finished = wait_finished(jobs, generate_ids, timeout_s)
    markers = finish_markers(client, prefix, generate_ids)
    delivered = deliveries(client, prefix, [c.embed_id for c in chains] + generate_ids)
    figures = FaultFigures(
        name, submitted=len(chains), seconds=time.monotonic() - started,
        completed=sum(1 for j in finished.values() if j["status"] == "succeeded"),
        failed=sum(1 for j in finished.values() if j["status"] == "failed"),
        lost=len(chains) - len(finished), duplicated=sum(1 for n in markers.values() if n > 1),
        redelivered=sum(1 for n in delivered.values() if n > 1),
    )
    return figures, finished


def embed_then_generate(embed_url: str, generate_url: str, seed: int, wait_s: float = 60) -> dict:
    """One image through the embed API, then a generate with its alias through the other; the finished generate job."""
    job = httpx.post(f"{embed_url}/v1/embeddings?wait={wait_s}", timeout=wait_s + 10,
                     files={"file": ("a.png", png_bytes(seed), "image/png")}).json()
    assert job["status"] == "succeeded", job
    generated = httpx.post(f"{generate_url}/v1/generate?wait={wait_s}", timeout=wait_s + 10,
                           json={"prompt": f"{job['images'][0]['alias']} hi", "max_tokens": 3, "temperature": 0})
    assert generated.status_code == 200 and generated.json()["status"] == "succeeded", generated.text
    return generated.json()


class Supervisor:
    """Runs a worker command and starts it again whenever it dies, as systemd or Kubernetes would."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: str):
        self.argv, self.env, self.cwd = argv, env, cwd
        self.starts = 0
        self.deaths: list[int] = []  # return codes of the runs that died (-9: SIGKILL)
        self._stopping = threading.Event()
        self._process: subprocess.Popen | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Supervisor":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._process = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd)
            self.starts += 1
            code = self._process.wait()
            if not self._stopping.is_set():
                self.deaths.append(code)

    def __exit__(self, *exc) -> None:
        self._stopping.set()
        process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
        self._thread.join(25)
