"""Turning stored job state into API responses."""

from __future__ import annotations

from embedder_service.api.schemas import EmbedJob


def job_view(job: dict) -> EmbedJob:
    result = job.get("result") or {}
    return EmbedJob(
        id=job["id"],
        status=job["status"],
        error=job.get("error"),
        images=result.get("containers", []),
        created_at=job["created_at"],
        updated_at=job["updated_at"],
    )
