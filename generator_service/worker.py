"""A generator worker process: load the LM and tokenizer once, run the engine loop, serve `generate`."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from contextlib import AbstractContextManager, nullcontext

from generator_service.engine import Engine
from generator_service.engine_metrics import publish_engine_stats
from generator_service.pipeline import GeneratePipeline
from generator_service.tasks import register_generate_task
from generator_service.tokenizer import Tokenizer
from shared.config.settings import Settings
from shared.modeling.checkpoint import Checkpoint, resolve_dtype
from shared.modeling.registry import family_for
from shared.queue.celery_app import GENERATE_QUEUE, create_celery_app
from shared.queue.metrics import WorkerStats
from shared.queue.worker import run_celery_worker
from shared.store.containers import ContainerStore
from shared.store.redis_conn import connect


def build_pipeline(settings: Settings, model_path: str, device: str,
                   turns: AbstractContextManager = nullcontext()) -> GeneratePipeline:
    """turns: held around each engine step (see `Engine.run_forever`)."""
    checkpoint = Checkpoint(model_path)
    family = family_for(checkpoint.config)
    model = family.load_language_class().from_checkpoint(checkpoint, device=device, dtype=resolve_dtype(settings.dtype, device))
    tokenizer = Tokenizer.from_checkpoint(checkpoint)
    engine = Engine(model, max_batch=settings.generate_max_batch, max_seq_len=settings.generate_max_seq_len, eos_token_ids=tokenizer.eos_token_ids,
                    kv_cache_tokens=settings.kv_cache_tokens, block_tokens=settings.kv_block_tokens,
                    prefix_cache=settings.prefix_cache == "on", prefill_chunk_tokens=settings.prefill_chunk_tokens,
                    max_decode_slowdown=settings.max_decode_slowdown)
    start_engine(engine, turns)
    client = connect(settings.effective_store_url)
    publish_engine_stats(engine, WorkerStats(client, settings.key_prefix, "generate"), threading.Event())
    store = ContainerStore(client, settings.key_prefix, settings.container_ttl_s, settings.max_container_bytes)
    image_placeholder = family.image_prompt(checkpoint).placeholder(tokenizer)
    return GeneratePipeline(model, tokenizer, engine, store, settings, checkpoint.fingerprint, image_placeholder)


def start_engine(engine: Engine, turns: AbstractContextManager) -> None:
    """The engine thread: it warms up (`Engine.warm_up`), then serves; returns once warm, raising what warming
    raised, so that a worker whose model cannot run fails at start, not on its first request."""
    warm: Future[None] = Future()

    def serve() -> None:
        try:
            with turns:
                engine.warm_up()
        except BaseException as exc:
            warm.set_exception(exc)
            return
        warm.set_result(None)
        engine.run_forever(threading.Event(), turns=turns)

    threading.Thread(target=serve, name="vlmq-engine", daemon=True).start()
    warm.result()


def run(settings: Settings, model_path: str, device: str, concurrency: int | None = None) -> None:
    pipeline = build_pipeline(settings, model_path, device)
    app = create_celery_app(settings)
    register_generate_task(app, lambda: pipeline)
    # One thread per request decoded together: the engine batches whatever the threads submit.
    concurrency = concurrency or settings.generate_max_batch
    run_celery_worker(app, GENERATE_QUEUE, concurrency=concurrency, device=device, model_path=model_path)
