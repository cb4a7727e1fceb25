"""All configuration in one place, read from the environment (prefix ``VLMQ_``).

Code reads it through `get_settings()`, cached for the process; a test that changes the
environment builds a fresh `Settings()` instead (or clears the cache). README.md's
configuration table is generated from the fields: `python -m shared.config.settings`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal, get_args

from pydantic import Field, ValidationInfo, field_validator
from pydantic.fields import FieldInfo
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

    broker_url: str = Field(
        "redis://127.0.0.1:6379/0", description="Celery broker: a Redis URL (rediss:// for TLS, certificates verified) or "
        "Sentinel, sentinel://host:port[/db]?master_name=NAME;sentinel://host:port… (a cluster cannot be the broker)"
    )
    store_url: str | None = Field(
        None, description="Redis for containers, uploads and job state; defaults to the broker. Also Sentinel (as the broker) "
        "or a Redis Cluster, redis+cluster://host:port[,host:port…] (docs/SCALING.md)"
    )
    key_prefix: str = Field("vlmq:", description="Prefix of every key vlmq writes in the store")
    container_ttl_s: int = Field(7 * 24 * 3600, gt=0, description="Lifetime of an embedding container")
    job_ttl_s: int = Field(24 * 3600, gt=0, description="Lifetime of job state, uploads and token streams")
    max_upload_bytes: int = Field(20 * 1024 * 1024, gt=0, description="Largest accepted image upload")
    max_image_pixels: int = Field(40_000_000, gt=0, description="Largest decoded image (width × height)")
    max_container_bytes: int = Field(256 * 1024 * 1024, gt=0, description="Largest container blob accepted on decode")
    container_dtype: Literal["model", "float32", "bfloat16", "float16", "int8"] = Field(
        "model", description="How containers store their rows: model (the vision tower's dtype, lossless), a float dtype, "
        "or int8 (one float scale per row, ~half of float16's bytes; dequantized into the LM's dtype when fetched)"
    )
    max_prompt_tokens: int = Field(32768, gt=0, description="Longest prompt after alias expansion")
    max_new_tokens: int = Field(4096, gt=0, description="Upper bound on max_tokens per request")
    max_prompt_chars: int = Field(
        262_144, gt=0, description="Longest prompt (or all of a chat's text) in characters, refused at the API before any work"
    )
    max_images_per_request: int = Field(
        64, gt=0, description="Most images in one generate request: alias occurrences in a prompt, image parts in a chat"
    )
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
    # 8 on a 2-core CPU beat 32 under bench/serve.py's load (2026-12-06: 1.43× vs 1.12× the features-off throughput,
    # TTFT p50 1.9 s vs 3.0 s): more admitted prompts make every step longer. Raise it where decoding dominates.
    generate_max_batch: int = Field(8, gt=0, description="Requests one generator worker runs together, at most "
                                    "(VLMQ_KV_CACHE_TOKENS bounds them too)")
    generate_max_seq_len: int = Field(
        4096, ge=2, description="Positions per request in a generator worker's KV cache (prompt + new tokens), at most the model's context"
    )
    kv_cache_tokens: int = Field(
        32768, gt=0, description="Positions in a generator worker's paged KV pool, shared by all its sequences "
        "(and by its prefix cache)"
    )
    kv_block_tokens: int = Field(16, gt=0, description="Positions per KV block (the unit of paging and of prefix-cache reuse)")
    prefix_cache: Literal["on", "off"] = Field(
        "on", description="Reuse the KV blocks of a prompt prefix (text and images) already computed by this worker"
    )
    prefill_chunk_tokens: int = Field(
        512, ge=0, description="Prompt tokens prefilled per engine step, mixed with the running decodes; 0: whole prompts"
    )
    # Off by default: it trades the prompts' wait for the streams' gaps. On bench-small (bench/generate.py,
    # 2026-12-07) a limit of 2 kept 4 streams' p99 gap within ~3× idle while 8 prompts arrived, and those prompts
    # waited 3.5× as long for their first tokens with Pixtral's 817 (18.8 s vs 5.3), 1.9× with LLaVA's 221.
    max_decode_slowdown: float = Field(
        0.0, ge=0, description="While sequences decode, prefill chunks are cut so that a step takes at most this many "
        "times a step that only decodes (the engine measures both); 0: no limit, VLMQ_PREFILL_CHUNK_TOKENS alone"
    )
    # Switches between a compiled kernel and its torch path (cuda_ext, the vision towers), read once per process.
    packed_weights: Literal["auto", "on", "off"] = Field(
        "auto", description="Vision towers' float32 CPU linears on MKL-packed weights: auto (where that beat oneDNN, "
        "timed once per process), on, off"
    )
    decode_kernel: Literal["auto", "reference"] = Field(
        "auto", description="CPU float32 decode steps and vision activations: auto (the C++ kernels, built on first use; "
        "torch's path where they cannot be), reference (torch's path)"
    )
    decode_weights: Literal["auto", "float32"] = Field(
        "auto", description="The CPU decode kernels' weights: auto (a weight whose every value is exactly a bfloat16 or "
        "float16, as in a checkpoint saved in that type, stays in that type: half the bytes each step reads, the same "
        "results), float32 (always float32)"
    )
    embed_gather: Literal["auto", "kernel", "reference"] = Field(
        "auto", description="Multimodal embedding gather: auto (the CUDA kernel for CUDA tensors, else the torch reference), "
        "kernel (the compiled gather on either device), reference"
    )
    extensions_dir: Path | None = Field(
        None, description="Where the C++/CUDA extensions are built and cached; unset: vlmq/ under $TORCH_EXTENSIONS_DIR "
        "or torch's default (~/.cache/torch_extensions)"
    )

    _split = field_validator("api_keys", "allowed_path_roots", mode="before")(_split_list)

    @field_validator("packed_weights", "decode_kernel", "decode_weights", "embed_gather", "prefix_cache", "container_dtype", mode="before")
    @classmethod
    def _mode(cls, value: object, info: ValidationInfo) -> object:
        # A mode is a word, whatever its case or spacing (" OFF " is off); a bad one names its
        # variable and the choices, where pydantic's own literal error would name only the field.
        choices = get_args(cls.model_fields[info.field_name].annotation)
        mode = value.strip().lower() if isinstance(value, str) else value
        if mode not in choices:
            raise ValueError(f"VLMQ_{info.field_name.upper()}={value!r}: expected one of {', '.join(choices)}")
        return mode

    @field_validator("extensions_dir", mode="before")
    @classmethod
    def _unset_if_empty(cls, value: object) -> object:
        return value or None  # an empty variable is no folder (pydantic would read it as ".")

    @property
    def effective_store_url(self) -> str:
        return self.store_url or self.broker_url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()


def settings_table() -> str:
    """README.md's configuration table: one row per setting, from its field (tests/unit/test_settings.py compares)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    rows += [f"| `VLMQ_{name.upper()}` | {_shown_default(field)} | {field.description} |" for name, field in Settings.model_fields.items()]
    return "\n".join(rows) + "\n"


def _shown_default(field: FieldInfo) -> str:
    default = field.get_default(call_default_factory=True, validated_data={})
    if default is None:
        return "(unset)"
    if default == []:
        return "(empty)"
    return f"`{default}`"


if __name__ == "__main__":
    print(settings_table(), end="")
