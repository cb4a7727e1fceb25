"""The one Celery app factory, and the attempt limit Redis cannot give us.

Tasks named ``vlmq.embed*`` go to the ``embed`` queue, ``vlmq.generate*`` to
``generate``. Messages are acknowledged late and requeued when a worker dies,
so a job survives a SIGKILL. The Redis transport has no delivery count, so a
job that kills its worker every time would be redelivered forever: vlmq tasks
use ``AttemptLimitedTask``, which counts deliveries per task id and, past
``settings.max_attempts``, marks the job failed instead of running it again.
"""

from __future__ import annotations

import logging
import ssl
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis
from celery import Celery, Task
from celery.exceptions import Reject
from kombu import Exchange, Queue

from shared.config.errors import StoreUnavailable, VlmqError
from shared.config.settings import Settings
from shared.queue.broker import SENTINEL_TRANSPORT
from shared.queue.broker import TRANSPORT as BROKER_TRANSPORT
from shared.store.jobs import FAILED, JobStore
from shared.store.redis_conn import (
    CONNECT_TIMEOUT_S,
    SOCKET_TIMEOUT_S,
    connect,
    is_cluster_url,
    is_sentinel_url,
    sentinel_parts,
    translate_connection_errors,
)

EMBED_QUEUE = "embed"
GENERATE_QUEUE = "generate"
QUEUES = (EMBED_QUEUE, GENERATE_QUEUE)
log = logging.getLogger(__name__)

WORKER_LOST_CODE = "worker_lost"
INTERNAL_ERROR_CODE = VlmqError.code  # "internal_error": a failure that is no caller's mistake (HTTP 500)

# A message that cannot be published while the broker is down is retried this
# often, under 2 s in all, then the caller gets kombu's OperationalError (the
# APIs answer 503). Celery's default policy is similar; it is spelled out here
# because an unbounded retry would hang every API request during an outage.
PUBLISH_RETRY_POLICY = {"max_retries": 3, "interval_start": 0.1, "interval_step": 0.5, "interval_max": 1.0}
# A task that finds the store down puts its message back after this pause, so a
# Redis outage does not make workers spin on redeliveries.
STORE_DOWN_REQUEUE_DELAY_S = 1.0

_CERT_REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}


def redis_ssl_options(url: str) -> dict[str, Any] | None:
    """Celery's ``broker_use_ssl`` / ``redis_backend_use_ssl`` for ``url``: None unless it is ``rediss://``.

    The TLS parameters are read from the URL's query, as redis-py's ``from_url``
    reads them for vlmq's own clients (``ssl_cert_reqs``, ``ssl_ca_certs``,
    ``ssl_certfile``, ``ssl_keyfile``), so one URL configures every client alike.
    Certificates are verified unless the URL says ``ssl_cert_reqs=none``: kombu
    on its own would connect to a ``rediss://`` broker without verifying anything.
    """
    parts = urlsplit(url)
    if parts.scheme != "rediss":
        return None
    query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    reqs = query.get("ssl_cert_reqs", "required").lower().removeprefix("cert_")
    if reqs not in _CERT_REQS:
        raise ValueError(f"ssl_cert_reqs must be one of {', '.join(_CERT_REQS)}, got {query['ssl_cert_reqs']!r}")
    options: dict[str, Any] = {"ssl_cert_reqs": _CERT_REQS[reqs]}
    for key in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        if key in query:
            options[key] = query[key]
    return options


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    """How kombu's Redis transport times out connections and brings back unacked messages.

    A delivered message sits in the ``unacked`` hash (scored by delivery time in
    ``unacked_index``) until its task is acked. When a worker dies, nothing acks
    it: every live worker sweeps ``unacked_index`` each ``unacked_restore_interval``
    seconds (on every sweep: throttle 1) and puts back messages older than
    ``visibility_timeout``. So a dead worker's jobs run again after between
    ``visibility_timeout`` and ``visibility_timeout + interval`` seconds. The sweep
    holds a mutex; a worker killed while holding it blocks sweeps until the mutex
    expires, so that expiry is bounded by the visibility timeout too.
    """
    visibility = settings.visibility_timeout_s
    return {
        "visibility_timeout": visibility,
        # vlmq sends no priorities: one list per queue, which shared.queue.broker's atomic take needs.
        "priority_steps": [0],
        "unacked_restore_interval": max(1, min(60, visibility // 10)),
        "unacked_restore_throttle": 1,
        "unacked_mutex_expire": max(1, min(300, visibility)),
        # Without these a publish to a broker that vanished without closing the
        # connection (a host gone, a firewall) would wait forever.
        "socket_timeout": SOCKET_TIMEOUT_S,
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
    }


def celery_url(url: str) -> tuple[str, dict[str, Any]]:
    """A vlmq Redis URL as Celery takes it, and the transport options it needs: a Sentinel URL without its
    ``master_name``, which goes to the options. A cluster URL is refused: Celery's Redis transport and
    result backend speak one server (or Sentinel), not Cluster."""
    if is_cluster_url(url):
        raise ValueError("Celery cannot use a Redis Cluster: VLMQ_BROKER_URL must be a redis:// or sentinel:// URL "
                         "(the store, VLMQ_STORE_URL, may be a cluster; docs/SCALING.md)")
    if is_sentinel_url(url):
        _, master, url = sentinel_parts(url)
        return url, {"master_name": master}
    return url, {}


def result_backend_url(settings: Settings) -> str:
    """Where Celery keeps results: the store, unless the store is a cluster, which Celery's Redis backend cannot
    use; then the broker. vlmq sends every task with ``ignore_result`` (outcomes live in the job store), so the
    backend holds next to nothing either way."""
    store = settings.effective_store_url
    return settings.broker_url if is_cluster_url(store) else store


def create_celery_app(settings: Settings, name: str = "vlmq") -> Celery:
    """A Celery app on ``settings.broker_url`` whose results (small: keys and status) go to the store Redis."""
    broker, broker_options = celery_url(settings.broker_url)
    backend, backend_options = celery_url(result_backend_url(settings))
    app = Celery(name, broker=broker, backend=backend)
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
        # kombu's Redis transport with a take that cannot lose a message (see shared.queue.broker).
        broker_transport=SENTINEL_TRANSPORT if is_sentinel_url(settings.broker_url) else BROKER_TRANSPORT,
        # Unacked messages return to the queue after this long; it must exceed the longest task.
        broker_transport_options=broker_transport_options(settings) | broker_options,
        broker_connection_retry_on_startup=True,
        task_publish_retry_policy=PUBLISH_RETRY_POLICY,
        # TLS as the URLs say (rediss://), with certificates verified by default.
        broker_use_ssl=redis_ssl_options(settings.broker_url),
        redis_backend_use_ssl=redis_ssl_options(result_backend_url(settings)),
        # The result backend's Redis calls give up like vlmq's own clients do, not after 2 minutes.
        redis_socket_timeout=SOCKET_TIMEOUT_S,
        redis_socket_connect_timeout=CONNECT_TIMEOUT_S,
        # With late acks, a task still running after the broker connection is
        # lost will be redelivered anyway: stop it rather than run it twice.
        worker_cancel_long_running_tasks_on_connection_loss=True,
        result_expires=settings.job_ttl_s,
        # Results live in the store Redis under vlmq's prefix, like every other store key.
        result_backend_transport_options={"global_keyprefix": settings.key_prefix, **backend_options},
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
    """Base class of vlmq tasks: every job reaches a final state.

    Every delivery of a task id is counted in the store Redis before the task
    body runs. A count above ``settings.max_attempts`` means earlier deliveries
    never finished (the worker died running them), so instead of running again
    the job fails (``worker_lost``). An exception the task body lets through —
    anything but a store outage, which requeues — fails the job
    (``internal_error``) and acks the message. vlmq tasks take the job id as their
    first argument (or ``job_id=``).

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
        job_id = kwargs["job_id"] if "job_id" in kwargs else args[0]  # vlmq tasks take it first or as job_id=
        try:
            attempts = count_attempt(self.store_redis, settings.key_prefix, task_id, settings.job_ttl_s)
            if attempts > settings.max_attempts:
                return self.fail_job(
                    job_id,
                    WORKER_LOST_CODE,
                    f"gave up after {settings.max_attempts} attempts: the worker died (or lost Redis) while running this job",
                )
            try:
                return super().__call__(*args, **kwargs)
            except StoreUnavailable:
                raise
            except Exception as exc:  # a bug, or a library's error: not the request's fault, and running it again would not help
                log.exception("task %s (job %s) raised", self.name, job_id)
                # The type only: a message can carry the request's data, and the traceback is the worker log's to keep.
                message = f"internal error ({type(exc).__name__}); the worker's log has the details"
                return self.fail_job(job_id, INTERNAL_ERROR_CODE, message)
        except StoreUnavailable as exc:
            # The store is down (a Redis restart, say): the job has neither failed nor
            # finished. Acking would lose it, so the message goes back to the queue to
            # run once Redis answers again (if the broker is down too, the requeue fails
            # and the unacked message comes back after the visibility timeout instead).
            time.sleep(STORE_DOWN_REQUEUE_DELAY_S)
            raise Reject(f"store unavailable, requeued: {exc.message}", requeue=True) from exc

    def fail_job(self, job_id: str, code: str, message: str) -> Any:
        """Mark the job failed, let `on_job_failed` tell its readers, and return `result_of_job` of it (what a chained
        task receives). A job that already finished stays as it was."""
        job = self.jobs.mark_failed(job_id, code, message)
        if job["status"] == FAILED:
            self.on_job_failed(job)
        return self.result_of_job(job)

    def on_job_failed(self, job: dict[str, Any]) -> None:
        """After `fail_job`: a task whose job has other readers than its state (a token stream) tells them here."""

    def result_of_job(self, job: dict[str, Any]) -> Any:
        """The task's return value for a finished ``job``. A task whose result feeds a chain overrides it
        (``embedder_service.tasks.EmbedTask``), so the next task gets the same shape either way."""
        return {"job_id": job["id"], "status": job["status"], "error": job["error"]}
