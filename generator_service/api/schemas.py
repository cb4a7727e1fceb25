"""Request and response bodies of the generator API (vlmq's own and the OpenAI-compatible ones)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from generator_service.sampling import SAMPLING_FIELDS
from shared.web.schemas import JobFields


def _encodable(text: str) -> str:
    # JSON may escape a lone surrogate ("\ud800"), which is no character: the tokenizer cannot take it,
    # so the request is refused here rather than failing in the worker.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"holds a lone surrogate (U+{ord(text[exc.start]):04X} at character {exc.start}), which is not text") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]  # text that reaches the tokenizer


class SamplingFields(BaseModel):
    max_tokens: int = Field(256, ge=1, description="Most new tokens to generate")
    temperature: float = Field(1.0, ge=0, le=100, description="0 is greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0 disables top-k")
    repetition_penalty: float = Field(1.0, gt=0, le=100)
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Same seed, same text")
    ignore_eos: bool = Field(False, description="Generate past end-of-sequence up to max_tokens (benchmarks, as vLLM's)")
    stop: Text | list[Text] | None = Field(None, description="Stop strings (not included in the text)")
    stream: bool = Field(False, description="Server-Sent Events of text pieces")

    def sampling(self) -> dict:
        return {k: getattr(self, k) for k in SAMPLING_FIELDS}

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class GenerateRequest(SamplingFields):
    model_config = ConfigDict(extra="forbid")

    prompt: Text = Field(..., description="Text with image aliases: `<image:{container_id}>` or your own bound in `images`")
    images: dict[Text, str] = Field(default_factory=dict, description="alias → container id")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    image_tokens: int
    cached_tokens: int = Field(0, description="Prompt tokens whose keys and values came from the worker's prefix cache")
    total_tokens: int


class GenerateJob(JobFields):
    text: str | None = None
    token_ids: list[int] | None = None
    finish_reason: str | None = None
    usage: Usage | None = None


class JobAccepted(BaseModel):
    job_id: str
    status: str
    status_url: str
    stream_url: str


# --- OpenAI-compatible chat ---------------------------------------------------------------


class ImageURL(BaseModel):
    url: str = Field(..., description="`data:image/...;base64,...` or `vlmq://container/{id}`")


class ContentPart(BaseModel):
    type: Literal["text", "image_url"]
    text: Text | None = None
    image_url: ImageURL | None = None


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Text | list[ContentPart]


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(SamplingFields):
    model: str | None = None
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # type: ignore[assignment]
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=1, description="Only one choice is supported")
    stream_options: StreamOptions | None = None

    def sampling(self) -> dict:
        fields = super().sampling()
        fields["max_tokens"] = self.max_completion_tokens or self.max_tokens or 256
        return fields
