"""The one Celery app factory, and the attempt limit Redis cannot give us.

Tasks named ``vlmq.embed*`` go to the ``embed`` queue, ``vlmq.generate*`` to
``generate``. Messages are acknowledged late and requeued when a worker dies,
so a job survives a SIGKILL. The Redis transport has no delivery count, so a
job that kills its worker every time would be redelivered forever: vlmq tasks
use ``AttemptLimitedTask``, which counts deliveries per task id and, past
``settings.max_attempts``, marks the job failed instead of running it again.
"""

from __future__ import annotations

from typing import Any

import redis
from celery import Celery, Task
from kombu import Exchange, Queue

from shared.jobs import JobStore
from shared.redis_conn import connect, translate_connection_errors
from shared.settings import Settings

EMBED_QUEUE = "embed"
GENERATE_QUEUE = "generate"
QUEUES = (EMBED_QUEUE, GENERATE_QUEUE)
WORKER_LOST_CODE = "worker_lost"


def create_celery_app(settings: Settings, name: str = "vlmq") -> Celery:
    """A Celery app on ``settings.broker_url`` whose results (small: keys and status) go to the store Redis."""
    app = Celery(name, broker=settings.broker_url, backend=settings.effective_store_url)
    app.conf.update(
        # Each queue on its own direct exchange and routing key. A bare Queue(name)
        # is bound to Celery's default exchange under the default routing key, so
        # a message published to that exchange would be copied into both queues.
        task_queues=tuple(Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES),
        task_routes={
            "vlmq.embed*": {"queue": EMBED_QUEUE},
            "vlmq.generate*": {"queue": GENERATE_QUEUE},
        },
        # At-least-once: a message is acked after its task ran, and requeued
        # (not dropped) when the worker process running it dies.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # A worker reserves one message at a time, so a queued job waits for a
        # free worker instead of behind a busy one.
        worker_prefetch_multiplier=1,
        # Never pickle: a pickled message is code the worker would run.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json", "msgpack"],
        result_accept_content=["json", "msgpack"],
        # Unacked messages return to the queue after this long; it must exceed the longest task.
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        broker_connection_retry_on_startup=True,
        # With late acks, a task still running after the broker connection is
        # lost will be redelivered anyway: stop it rather than run it twice.
        worker_cancel_long_running_tasks_on_connection_loss=True,
        result_expires=settings.job_ttl_s,
        # Results live in the store Redis under vlmq's prefix, like every other store key.
        result_backend_transport_options={"global_keyprefix": settings.key_prefix},
        task_track_started=True,
    )
    app.vlmq_settings = settings
    return app


def count_attempt(client: redis.Redis, key_prefix: str, task_id: str, ttl_s: int) -> int:
    """Count one more delivery of ``task_id`` and return the count (1 on the first delivery)."""
    key = f"{key_prefix}attempts:{task_id}"
    with translate_connection_errors(client):
        pipe = client.pipeline(transaction=True)
        pipe.incr(key)
        pipe.expire(key, ttl_s)
        count, _ = pipe.execute()
    return count


class AttemptLimitedTask(Task):
    """Base class of vlmq tasks: a delivery past ``settings.max_attempts`` is not run.

    Every delivery of a task id is counted in the store Redis before the task
    body runs. A count above the limit means earlier deliveries never finished
    (the worker died running them), so instead of running again the task calls
    ``on_attempts_exhausted`` — by default: mark the job failed. vlmq tasks take
    the job id as their first argument (or ``job_id=``).

    Use with ``@app.task(base=AttemptLimitedTask, ...)`` on an app made by ``create_celery_app``.
    """

    _store_redis: redis.Redis | None = None

    @property
    def vlmq_settings(self) -> Settings:
        return self.app.vlmq_settings

    @property
    def store_redis(self) -> redis.Redis:
        """This process's client for the store Redis (made on first use, after the worker forks)."""
        if self._store_redis is None:
            # Set on the instance: Celery keeps one instance of each task per process.
            self._store_redis = connect(self.vlmq_settings.effective_store_url)
        return self._store_redis

    @property
    def jobs(self) -> JobStore:
        settings = self.vlmq_settings
        return JobStore(self.store_redis, settings.key_prefix, settings.job_ttl_s)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        task_id = self.request.id
        if task_id is None:  # called as a plain function, not delivered: nothing to count
            return super().__call__(*args, **kwargs)
        settings = self.vlmq_settings
        attempts = count_attempt(self.store_redis, settings.key_prefix, task_id, settings.job_ttl_s)
        if attempts > settings.max_attempts:
            return self.on_attempts_exhausted(settings.max_attempts, args, kwargs)
        return super().__call__(*args, **kwargs)

    def on_attempts_exhausted(self, attempts: int, args: tuple, kwargs: dict) -> None:
        """Mark the task's job failed; override for tasks that track something else."""
        job_id = kwargs["job_id"] if "job_id" in kwargs else args[0]
        self.jobs.mark_failed(
            job_id,
            WORKER_LOST_CODE,
            f"gave up after {attempts} attempts: the worker died while running this job",
        )
