"""All configuration in one place, read from the environment (prefix ``VLMQ_``)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from typing_extensions import Annotated


def _split_list(value: object) -> object:
    # Env vars carry lists as comma-separated text; JSON lists work too.
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            import json

            return json.loads(text)
        return [item.strip() for item in text.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VLMQ_", extra="ignore")

    broker_url: str = Field("redis://127.0.0.1:6379/0", description="Celery broker (Redis URL; rediss:// for TLS, certificates verified)")
    store_url: str | None = Field(None, description="Redis for containers, uploads and results; defaults to the broker")
    key_prefix: str = Field("vlmq:", description="Prefix of every key vlmq writes in the store")
    container_ttl_s: int = Field(7 * 24 * 3600, gt=0, description="Lifetime of an embedding container")
    job_ttl_s: int = Field(24 * 3600, gt=0, description="Lifetime of job state, uploads and token streams")
    max_upload_bytes: int = Field(20 * 1024 * 1024, gt=0, description="Largest accepted image upload")
    max_image_pixels: int = Field(40_000_000, gt=0, description="Largest decoded image (width × height)")
    max_container_bytes: int = Field(256 * 1024 * 1024, gt=0, description="Largest container blob accepted on decode")
    max_prompt_tokens: int = Field(32768, gt=0, description="Longest prompt after alias expansion")
    max_new_tokens: int = Field(4096, gt=0, description="Upper bound on max_tokens per request")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Accepted API keys (comma-separated); each key is a tenant. Empty: no auth"
    )
    allowed_path_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="Folders images may be read from by path (comma-separated). Empty: no paths"
    )
    device: str = Field("cpu", description="Torch device of a worker: cpu, cuda, cuda:N")
    dtype: str = Field("auto", description="Model dtype: auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16, float16")
    max_attempts: int = Field(3, gt=0, description="Deliveries of a job before it is marked failed (`worker_lost`)")
    visibility_timeout_s: int = Field(
        3600, gt=0, description="Seconds before a dead worker's unacknowledged job is redelivered; must exceed the longest task"
    )
    embed_max_batch: int = Field(8, gt=0, description="Images per batched vision forward")
    embed_max_wait_ms: int = Field(20, ge=0, description="How long the embedder waits to fill a batch")
    generate_max_batch: int = Field(8, gt=0, description="Requests decoded together by one generator worker")

    _split = field_validator("api_keys", "allowed_path_roots", mode="before")(_split_list)

    @property
    def effective_store_url(self) -> str:
        return self.store_url or self.broker_url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
