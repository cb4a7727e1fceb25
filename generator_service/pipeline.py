"""A generate request → text: resolve aliases in the store, encode, run the engine, stream.

Requests come as JSON-able payloads (from the Celery task):

    {"prompt": str} or {"messages": [chat messages]},   # exactly one
    "images": {alias: container_id},                  # explicit bindings (optional)
    "sampling": {temperature, top_p, top_k, repetition_penalty, max_tokens, seed},
    "stop": [str], "stream": bool

Chat messages' image parts are `{"type": "image", "container_id": id}`; the
model's chat template renders each as its image token (`<image>` for LLaVA),
which is then bound, in order, to those containers. Default aliases
`<image:{id}>` in a prompt resolve without explicit bindings. All containers are
fetched in one round trip, within the caller's tenant, and must come from this
model with this hidden size.
"""

from __future__ import annotations

import queue
from typing import Any, Callable

import torch

from generator_service.engine import Engine, GenerationRequest
from generator_service.sampling import SamplingParams
from generator_service.stops import StopMatcher
from generator_service.tokenizer import EncodedPrompt, Tokenizer, default_alias_ids
from shared.config.errors import InvalidInput, ModelMismatch
from shared.config.settings import Settings
from shared.store.container import EmbeddingContainer
from shared.store.containers import ContainerStore

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty", "max_tokens", "seed")


class GeneratePipeline:
    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, engine: Engine, store: ContainerStore,
                 settings: Settings, fingerprint: str, image_token: str | None):
        self.model, self.tokenizer, self.engine, self.store = model, tokenizer, engine, store
        self.settings = settings
        self.fingerprint = fingerprint
        self.image_token = image_token  # what the chat template writes for an image part
        self.hidden_size = model.config.hidden_size

    # -- prompt ---------------------------------------------------------------------------

    def _render_chat(self, messages: list[dict]) -> tuple[str, list[str]]:
        """The chat prompt text with each image part as a default alias, and those containers' ids."""
        if self.tokenizer.chat_template is None:
            raise InvalidInput("this model has no chat template; use /v1/generate with a prompt")
        image_ids = [part["container_id"] for m in messages if isinstance(m.get("content"), list)
                     for part in m["content"] if part.get("type") == "image"]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        if not image_ids:
            return text, []
        if self.image_token is None or text.count(self.image_token) != len(image_ids):
            raise InvalidInput(
                f"the chat has {len(image_ids)} images but its rendered prompt has {text.count(self.image_token or '')} "
                f"image tokens {self.image_token!r} (message text must not contain that token)"
            )
        pieces = text.split(self.image_token)
        aliased = pieces[0] + "".join(f"<image:{cid}>" + piece for cid, piece in zip(image_ids, pieces[1:]))
        return aliased, image_ids

    def encode(self, tenant: str, payload: dict) -> EncodedPrompt:
        if (payload.get("prompt") is None) == (payload.get("messages") is None):
            raise InvalidInput("give exactly one of `prompt` or `messages`")
        if payload.get("messages") is not None:
            text, _ = self._render_chat(payload["messages"])
            add_special_tokens = False  # the template writes BOS itself where the model wants it
        else:
            text, add_special_tokens = payload["prompt"], True
        explicit: dict[str, str] = payload.get("images") or {}
        wanted = list(dict.fromkeys([*default_alias_ids(text), *explicit.values()]))
        by_id = {c.id: c for c in self.store.get_many(wanted, tenant=tenant)} if wanted else {}
        for container in by_id.values():
            self._check_container(container)
        bindings: dict[str, EmbeddingContainer] = {f"<image:{c.id}>": c for c in by_id.values()}
        bindings.update({alias: by_id[cid] for alias, cid in explicit.items()})
        max_length = min(self.settings.max_prompt_tokens, self.engine.max_seq_len - 1)
        return self.tokenizer.encode_prompt(text, bindings, add_special_tokens=add_special_tokens, max_length=max_length)

    def _check_container(self, container: EmbeddingContainer) -> None:
        if container.model != self.fingerprint:
            raise ModelMismatch(f"container {container.id} was made by model {container.model}, not by this model ({self.fingerprint})")
        if container.hidden_size != self.hidden_size:
            raise ModelMismatch(f"container {container.id} has hidden size {container.hidden_size}, this model needs {self.hidden_size}")

    def sampling_params(self, sampling: dict) -> SamplingParams:
        unknown = set(sampling) - set(SAMPLING_FIELDS)
        if unknown:
            raise InvalidInput(f"unknown sampling fields: {sorted(unknown)}")
        params = SamplingParams(**sampling, stop_token_ids=self.tokenizer.eos_token_ids)
        if params.max_tokens > self.settings.max_new_tokens:
            raise InvalidInput(f"max_tokens must be ≤ {self.settings.max_new_tokens}, got {params.max_tokens}")
        return params

    # -- generation -----------------------------------------------------------------------

    def generate(self, tenant: str, payload: dict, on_text: Callable[[str], None] | None = None) -> dict[str, Any]:
        """Run one request to the end; `on_text` gets each piece of text as it becomes final."""
        encoded = self.encode(tenant, payload)
        params = self.sampling_params(payload.get("sampling") or {})
        decoder = self.tokenizer.stream_decoder()
        stops = StopMatcher(payload.get("stop") or [])
        pieces: list[str] = []
        # Text is handed from the engine thread to this one, so a slow `on_text` (a Redis
        # write per piece) never holds up the other requests decoding in the same batch.
        handoff: queue.SimpleQueue[str | None] = queue.SimpleQueue()

        def emit(text: str) -> None:
            if text:
                pieces.append(text)
                handoff.put(text)

        def on_token(token_id: int) -> bool:
            text, stopped = stops.push(decoder.push(token_id))
            emit(text)
            return stopped

        def on_finish(_) -> None:
            if not stops.stopped:
                emit(stops.flush(decoder.flush()))  # text held back for a stop string that never came
            handoff.put(None)

        handle = self.engine.submit(GenerationRequest(encoded.ids, params, encoded.containers, on_token=on_token, on_finish=on_finish))
        while (piece := handoff.get()) is not None:
            if on_text is not None:
                on_text(piece)
        result = handle.result()
        finish_reason = "stop" if stops.stopped else result.finish_reason
        return {
            "text": "".join(pieces),
            "token_ids": result.token_ids,
            "finish_reason": finish_reason,
            "usage": {
                "prompt_tokens": result.usage.prompt_tokens,
                "completion_tokens": result.usage.completion_tokens,
                "image_tokens": result.usage.image_tokens,
                "total_tokens": result.usage.prompt_tokens + result.usage.completion_tokens,
            },
        }
