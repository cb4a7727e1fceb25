"""`GET /v1/jobs/{id}`: an embed job's state and, when done, its containers."""

from __future__ import annotations

from fastapi import APIRouter

from embedder_service.api.schemas import EmbedJob
from embedder_service.api.views import job_view
from shared.web.app import Tenant
from shared.web.deps import JobsDep

router = APIRouter(prefix="/v1", tags=["jobs"])


@router.get("/jobs/{job_id}", response_model=EmbedJob)
def get_job(job_id: str, tenant: Tenant, jobs: JobsDep) -> EmbedJob:
    return job_view(jobs.get(job_id, tenant=tenant))
