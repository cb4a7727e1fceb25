"""`GET /v1/jobs/{id}` and its cancellation (`DELETE /v1/jobs/{id}`, `POST /v1/jobs/{id}/cancel`), for either API."""

from __future__ import annotations

from typing import Callable

from fastapi import APIRouter
from pydantic import BaseModel

from shared.web.app import Tenant
from shared.web.deps import JobsDep


def job_routes(view: Callable[[dict], BaseModel], model: type[BaseModel]) -> APIRouter:
    """The job routes of an API whose jobs `view` turns into `model` responses."""
    router = APIRouter(prefix="/v1", tags=["jobs"])

    @router.get("/jobs/{job_id}", response_model=model)
    def get_job(job_id: str, tenant: Tenant, jobs: JobsDep) -> BaseModel:
        return view(jobs.get(job_id, tenant=tenant))

    @router.delete("/jobs/{job_id}", response_model=model)
    @router.post("/jobs/{job_id}/cancel", response_model=model)
    def cancel_job(job_id: str, tenant: Tenant, jobs: JobsDep) -> BaseModel:
        """Cancel a queued or running job (its worker stops at its next step); a finished job is returned as it is."""
        return view(jobs.cancel(job_id, tenant))

    return router
