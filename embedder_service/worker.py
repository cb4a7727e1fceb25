"""An embedder worker process: load the vision model once, then serve the `embed` queue."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from embedder_service.pipeline import EmbedPipeline
from embedder_service.tasks import register_embed_task
from shared.config.settings import Settings
from shared.modeling.checkpoint import Checkpoint, resolve_dtype
from shared.modeling.registry import family_for
from shared.queue.celery_app import EMBED_QUEUE, create_celery_app
from shared.queue.metrics import WorkerStats
from shared.queue.worker import run_celery_worker
from shared.store.containers import ContainerStore
from shared.store.redis_conn import connect


def load_vision_model(model_path: str, device: str, dtype_name: str) -> torch.nn.Module:
    checkpoint = Checkpoint(model_path)
    model_class = family_for(checkpoint.config).load_vision_class()
    return model_class.from_checkpoint(checkpoint, device=device, dtype=resolve_dtype(dtype_name, device)).eval()


def build_pipeline(settings: Settings, model_path: str, device: str,
                   turns: AbstractContextManager = nullcontext()) -> EmbedPipeline:
    """turns: see `EmbedPipeline`."""
    client = connect(settings.effective_store_url)
    model = load_vision_model(model_path, device, settings.dtype)
    store = ContainerStore(client, settings.key_prefix, settings.container_ttl_s, settings.max_container_bytes)
    pipeline = EmbedPipeline(model, store, client, settings, turns)
    pipeline.warm_up()
    stats = WorkerStats(client, settings.key_prefix, "embed")
    pipeline.batcher.on_batch = lambda size, seconds: stats.observe("batch_size", size)
    return pipeline


def run(settings: Settings, model_path: str, device: str, concurrency: int | None = None) -> None:
    pipeline = build_pipeline(settings, model_path, device)
    app = create_celery_app(settings)
    register_embed_task(app, lambda: pipeline)
    # Enough concurrent jobs to fill a batch: each thread holds one job while the batcher runs.
    concurrency = concurrency or settings.embed_max_batch
    run_celery_worker(app, EMBED_QUEUE, concurrency=concurrency, device=device, model_path=model_path)
