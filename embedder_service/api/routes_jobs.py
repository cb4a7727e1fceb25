"""`/v1/jobs/{id}`: an embed job's state and, when done, its containers; cancelling it."""

from __future__ import annotations

from embedder_service.api.schemas import EmbedJob
from embedder_service.api.views import job_view
from shared.web.job_routes import job_routes

router = job_routes(job_view, EmbedJob)
