"""The embedder's REST API. It validates, enqueues and reads results; it never loads a model."""

from __future__ import annotations

from fastapi import FastAPI

from embedder_service.api import routes_containers, routes_embeddings, routes_jobs
from shared.config.settings import Settings, get_settings
from shared.web.app import create_service_app


def create_app(settings: Settings | None = None) -> FastAPI:
    return create_service_app(
        "vlmq embedder", "Images in, embedding containers out.", "embed", settings or get_settings(),
        [routes_embeddings.router, routes_jobs.router, routes_containers.router],
    )
