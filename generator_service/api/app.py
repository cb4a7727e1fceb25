"""The generator's REST API: vlmq's own `/v1/generate` and OpenAI-compatible chat. It never loads a model."""

from __future__ import annotations

from fastapi import FastAPI

from generator_service.api import routes_chat, routes_generate
from shared.config.settings import Settings, get_settings
from shared.web.app import create_service_app


def create_app(settings: Settings | None = None) -> FastAPI:
    return create_service_app(
        "vlmq generator", "Prompts with image aliases in, text out.", "generate", settings or get_settings(),
        [routes_generate.router, routes_generate.jobs_router, routes_chat.router],
    )
