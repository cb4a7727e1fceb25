"""Response bodies both APIs share."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ErrorInfo(BaseModel):
    code: str
    message: str


class JobFields(BaseModel):
    """What every job response carries; each API adds its results."""

    id: str
    status: str = Field(..., description="queued, running, succeeded, failed or cancelled")
    error: ErrorInfo | None = None
    created_at: float
    updated_at: float
