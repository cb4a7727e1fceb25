"""`vlmq worker all`: an embed and a generate worker in one process, their models taking turns on the cores.

For one machine that both embeds and generates on its CPUs (a private `vlmq
caption` stack, a small deployment): two worker processes must split the cores
between them, and the one with more work — generating, in captioning — waits on
its half while the other half idles. In one process each forward gets every
core in turn (`shared.modeling.turns`).
"""

from __future__ import annotations

from embedder_service.tasks import register_embed_task
from embedder_service.worker import build_pipeline as build_embed_pipeline
from generator_service.tasks import register_generate_task
from generator_service.worker import build_pipeline as build_generate_pipeline
from shared.config.settings import Settings
from shared.modeling.turns import Turns
from shared.queue.celery_app import QUEUES, create_celery_app
from shared.queue.worker import run_celery_worker


def run(settings: Settings, model_path: str, device: str, concurrency: int | None = None) -> None:
    turns = Turns()
    embed = build_embed_pipeline(settings, model_path, device, turns)
    generate = build_generate_pipeline(settings, model_path, device, turns)
    app = create_celery_app(settings)
    register_embed_task(app, lambda: embed)
    register_generate_task(app, lambda: generate)
    # Each kind of job as many threads as a worker of its own would have (a batch's worth).
    concurrency = concurrency or settings.embed_max_batch + settings.generate_max_batch
    run_celery_worker(app, QUEUES, concurrency=concurrency, device=device, model_path=model_path)
