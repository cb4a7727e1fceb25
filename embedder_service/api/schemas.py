"""Request and response bodies of the embedder API."""

from __future__ import annotations

from pydantic import BaseModel, Field, model_validator

from shared.web.schemas import JobFields


class ImageInput(BaseModel):
    """One image: exactly one of `base64` (the file's bytes) or `path` (under an allowed root)."""

    base64: str | None = Field(None, description="The image file, base64-encoded")
    path: str | None = Field(None, description="A file path under one of VLMQ_ALLOWED_PATH_ROOTS")

    @model_validator(mode="after")
    def _exactly_one(self) -> "ImageInput":
        if (self.base64 is None) == (self.path is None):
            raise ValueError("give exactly one of `base64` or `path`")
        return self


class EmbeddingsRequest(BaseModel):
    images: list[ImageInput] = Field(..., min_length=1, max_length=64)


class JobAccepted(BaseModel):
    job_id: str
    status: str
    status_url: str


class ContainerInfo(BaseModel):
    id: str
    alias: str
    model: str
    first_token_id: int
    num_tokens: int
    hidden_size: int
    dtype: str
    grid: list[int] | None = None
    layout: dict
    image: dict
    created_at: float
    expires_at: float | None = None


class EmbedJob(JobFields):
    images: list[ContainerInfo] = []
