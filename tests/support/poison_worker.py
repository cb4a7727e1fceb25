"""A test-only embed worker that also serves `vlmq.embed.poison`: a task that SIGKILLs its own worker.

It stands for any input that crashes the process running it (a native-code
segfault, the kernel's OOM killer). The task uses the production attempt limit
(`AttemptLimitedTask`) unchanged, and the worker is the production embed worker
(real pipeline, real `vlmq.embed` task, heartbeat) with the poison task added.
Nothing of this is in the services: it lives in tests/ and runs as

    python -m tests.support.poison_worker --model PATH
"""

from __future__ import annotations

import argparse
import os
import signal

from embedder_service.tasks import register_embed_task
from embedder_service.worker import build_pipeline
from shared.config.settings import get_settings
from shared.queue.celery_app import EMBED_QUEUE, AttemptLimitedTask, create_celery_app
from shared.queue.worker import run_celery_worker

POISON_TASK = "vlmq.embed.poison"  # routed to the embed queue like every vlmq.embed* task


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    args = parser.parse_args()
    settings = get_settings()
    pipeline = build_pipeline(settings, args.model, "cpu")
    app = create_celery_app(settings)
    register_embed_task(app, lambda: pipeline)

    @app.task(name=POISON_TASK, base=AttemptLimitedTask, bind=True)
    def poison(self: AttemptLimitedTask, job_id: str) -> None:
        self.jobs.mark_running(job_id)
        os.kill(os.getpid(), signal.SIGKILL)

    # One thread: the poison job is the only job this worker holds when it dies,
    # so its deaths cost no other job an attempt.
    run_celery_worker(app, EMBED_QUEUE, concurrency=1, device="cpu", model_path=args.model)


if __name__ == "__main__":
    main()
