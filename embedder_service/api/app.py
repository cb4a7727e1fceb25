"""The embedder's REST API. It validates, enqueues and reads results; it never loads a model."""

from __future__ import annotations

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from embedder_service.api import routes_containers, routes_embeddings, routes_jobs
from shared.api import BodySizeLimit, health_router, install_error_handlers
from shared.celery_app import create_celery_app
from shared.jobs import JobStore
from shared.metrics import WorkerStats, WorkerStatsCollector
from shared.redis_conn import connect
from shared.settings import Settings, get_settings
from shared.store import ContainerStore


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(title="vlmq embedder", version="0.1.0", description="Images in, embedding containers out.")
    client = connect(settings.effective_store_url)
    app.state.settings = settings
    app.state.redis = client
    app.state.store = ContainerStore(client, settings.key_prefix, settings.container_ttl_s, settings.max_container_bytes)
    app.state.jobs = JobStore(client, settings.key_prefix, settings.job_ttl_s)
    app.state.celery = create_celery_app(settings)
    app.state.metrics_registry = CollectorRegistry()
    app.state.metrics_registry.register(WorkerStatsCollector(WorkerStats(client, settings.key_prefix, "embed")))
    install_error_handlers(app)
    for router in (routes_embeddings.router, routes_jobs.router, routes_containers.router, health_router("embed")):
        app.include_router(router)
    # base64 makes a JSON body ~4/3 of the image; leave room for it and the JSON around it.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes * 4 // 3 + 64 * 1024)
    return app
