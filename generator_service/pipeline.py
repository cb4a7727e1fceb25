"""A generate request → text: fetch its images' containers, encode, run the engine, stream.

Requests come as JSON-able payloads (from the Celery task):

    {"prompt": str} or {"messages": [chat messages]},   # exactly one
    "images": {alias: container_id},                  # explicit bindings (optional)
    "sampling": {temperature, top_p, top_k, repetition_penalty, max_tokens, seed},
    "stop": [str], "stream": bool

A prompt names its images by alias: default aliases `<image:{id}>` resolve
without explicit bindings. Chat messages name theirs in their image parts,
`{"type": "image", "container_id": id}`: the chat template's text is cut where it
writes each image part (the family's placeholder, `<image>` for LLaVA) and each
container's IDs go in its place, with no alias in between. All containers are
fetched in one round trip, within the caller's tenant, and must come from this
model with this hidden size.
"""

from __future__ import annotations

import queue
from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Iterator

import torch

from generator_service.chat_template import image_parts
from generator_service.engine import Engine, GenerationRequest
from generator_service.sampling import SAMPLING_FIELDS, SamplingParams
from generator_service.stops import StopMatcher
from generator_service.tokenizer import EncodedPrompt, Tokenizer, default_alias_ids
from shared.config.errors import ContainerFormatError, InvalidInput, ModelMismatch
from shared.config.settings import Settings
from shared.store.container import EmbeddingContainer
from shared.store.containers import ContainerStore



class GeneratePipeline:
    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, engine: Engine, store: ContainerStore,
                 settings: Settings, fingerprint: str, image_placeholder: str | None):
        self.model, self.tokenizer, self.engine, self.store = model, tokenizer, engine, store
        self.settings = settings
        self.fingerprint = fingerprint
        self.image_placeholder = image_placeholder  # what the chat template writes for an image part
        self.hidden_size = model.config.hidden_size

    # -- prompt ---------------------------------------------------------------------------

    def encode(self, tenant: str, payload: dict) -> EncodedPrompt:
        if (payload.get("prompt") is None) == (payload.get("messages") is None):
            raise InvalidInput("give exactly one of `prompt` or `messages`")
        max_length = min(self.settings.max_prompt_tokens, self.engine.max_seq_len - 1)
        if payload.get("messages") is None:
            self._check_chars(len(payload["prompt"]))
            return self._encode_prompt(tenant, payload["prompt"], payload.get("images") or {}, max_length)
        if payload.get("images"):
            raise InvalidInput("`images` binds the aliases of a `prompt`; chat messages name their containers in their image parts")
        return self._encode_chat(tenant, payload["messages"], max_length)

    def _encode_prompt(self, tenant: str, prompt: str, explicit: dict[str, str], max_length: int) -> EncodedPrompt:
        by_id = self._containers(tenant, [*default_alias_ids(prompt), *explicit.values()])
        bindings: dict[str, EmbeddingContainer] = {f"<image:{c.id}>": c for c in by_id.values()}
        bindings.update({alias: by_id[cid] for alias, cid in explicit.items()})
        return self.tokenizer.encode_prompt(prompt, bindings, add_special_tokens=True, max_length=max_length,
                                            max_images=self.settings.max_images_per_request)

    def _check_chars(self, chars: int) -> None:
        # The API refuses these first; a request queued by other means (a chain, a script) is checked here.
        if chars > self.settings.max_prompt_chars:
            raise InvalidInput(f"the prompt is {chars} characters, over the limit of {self.settings.max_prompt_chars} (VLMQ_MAX_PROMPT_CHARS)")

    def _encode_chat(self, tenant: str, messages: list[dict], max_length: int) -> EncodedPrompt:
        if self.tokenizer.chat_template is None:
            raise InvalidInput("this model has no chat template; use /v1/generate with a prompt")
        ids = [part.get("container_id") for part in image_parts(messages)]
        if len(ids) > self.settings.max_images_per_request:
            raise InvalidInput(f"the chat holds {len(ids)} images, over the limit of {self.settings.max_images_per_request} (VLMQ_MAX_IMAGES_PER_REQUEST)")
        pieces = self.tokenizer.render_chat(messages, self.image_placeholder)
        self._check_chars(sum(map(len, pieces)))
        for index, cid in enumerate(ids):
            if not isinstance(cid, str) or not cid:
                raise InvalidInput(f"image part {index} names no container (`container_id`)")
        by_id = self._containers(tenant, ids)
        # The template writes BOS itself where the model wants it.
        return self.tokenizer.encode_with_images(pieces, [by_id[cid] for cid in ids], add_special_tokens=False, max_length=max_length)

    def _containers(self, tenant: str, ids: list[str]) -> dict[str, EmbeddingContainer]:
        """The containers named, by id, fetched in one round trip, each checked to be this model's, with their rows
        in the model's dtype (int8 ones dequantized)."""
        wanted = list(dict.fromkeys(ids))
        by_id = {c.id: c.dequantized(self.model.dtype) for c in self.store.get_many(wanted, tenant=tenant)}
        for container in by_id.values():
            self._check_container(container)
        return by_id

    def _check_container(self, container: EmbeddingContainer) -> None:
        if container.model != self.fingerprint:
            raise ModelMismatch(f"container {container.id} was made by model {container.model}, not by this model ({self.fingerprint})")
        if container.hidden_size != self.hidden_size:
            raise ModelMismatch(f"container {container.id} has hidden size {container.hidden_size}, this model needs {self.hidden_size}")
        # A container written by hand (or by a broken embedder) may hold NaN or Inf, which would reach every logit.
        if not bool(torch.isfinite(container.embeddings).all()):
            raise ContainerFormatError(f"container {container.id} holds non-finite embeddings (NaN or Inf)")

    def sampling_params(self, sampling: dict) -> SamplingParams:
        unknown = set(sampling) - set(SAMPLING_FIELDS)
        if unknown:
            raise InvalidInput(f"unknown sampling fields: {sorted(unknown)}")
        params = SamplingParams(**sampling)  # the engine adds the tokenizer's EOS ids unless ignore_eos
        if params.max_tokens > self.settings.max_new_tokens:
            raise InvalidInput(f"max_tokens must be ≤ {self.settings.max_new_tokens}, got {params.max_tokens}")
        return params

    # -- generation -----------------------------------------------------------------------

    def generate(self, tenant: str, payload: dict, on_text: Callable[[str, int], None] | None = None,
                 watch_cancel: Callable[[Callable[[], None]], ContextManager] | None = None) -> dict[str, Any]:
        """Run one request to the end; `on_text(text, tokens)` gets each piece of text as it becomes final,
        with the number of tokens generated up to it.

        `watch_cancel(cancel)` is entered while the request runs and calls `cancel` (from any thread)
        to end it at the engine's next step, with finish_reason "cancelled".
        """
        encoded = self.encode(tenant, payload)
        params = self.sampling_params(payload.get("sampling") or {})
        decoder = self.tokenizer.stream_decoder()
        stops = StopMatcher(payload.get("stop") or [])
        pieces: list[str] = []
        # Text is handed from the engine thread to this one, so a slow `on_text` (a Redis
        # write per piece) never holds up the other requests decoding in the same batch.
        handoff: queue.SimpleQueue[tuple[str, int] | None] = queue.SimpleQueue()
        tokens = 0

        def emit(text: str) -> None:
            if text:
                pieces.append(text)
                if on_text is not None:  # a handoff wakes this thread: only for a reader of the pieces
                    handoff.put((text, tokens))

        def on_token(token_id: int) -> bool:
            nonlocal tokens
            tokens += 1
            text, stopped = stops.push(decoder.push(token_id))
            emit(text)
            return stopped

        def on_finish(_) -> None:
            if not stops.stopped:
                emit(stops.flush(decoder.flush()))  # text held back for a stop string that never came
            handoff.put(None)

        # Salted with the tenant: no tenant's prompt reuses (or times) another tenant's cached text.
        handle = self.engine.submit(GenerationRequest(encoded.ids, params, encoded.containers, on_token=on_token, on_finish=on_finish,
                                                      cache_salt=tenant))
        with watch_cancel(handle.cancel) if watch_cancel is not None else nullcontext():
            for text, tokens_so_far in _drained(handoff):
                if on_text is not None:
                    on_text(text, tokens_so_far)
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
                "cached_tokens": result.usage.cached_tokens,
                "total_tokens": result.usage.prompt_tokens + result.usage.completion_tokens,
            },
        }


def _drained(handoff: queue.SimpleQueue[tuple[str, int] | None]) -> Iterator[tuple[str, int]]:
    """The (text, tokens) put on `handoff` until None, each time joined with those already waiting behind it:
    a consumer slower than the engine (a Redis write per call) falls behind by one call, not by a token per call."""
    while True:
        pieces = [handoff.get()]
        while pieces[-1] is not None:
            try:
                pieces.append(handoff.get_nowait())
            except queue.Empty:
                break
        texts = [piece for piece in pieces if piece is not None]
        if texts:
            yield "".join(text for text, _ in texts), texts[-1][1]
        if pieces[-1] is None:
            return
