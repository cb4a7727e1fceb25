"""The generation engine: batched decoding of token-ID requests over one KV cache.

It knows nothing about text. A request is prompt token IDs (container IDs ≥
EMBEDDING_INDEX_BASE included), the containers those IDs belong to, sampling
parameters and optional callbacks; the caller (the worker) tokenizes, detokenizes
and matches stop strings, and tells the engine to stop by returning True from
`on_token`.

Threading: `submit()` and `RequestHandle.cancel()` may be called from any thread;
`step()`, `run_until_idle()` and `run_forever()` from one engine thread only, which
is also where the callbacks run. Requests join and leave between steps: each step
prefills the waiting requests that fit into free cache rows, then decodes one token
for every running request, each row at its own position.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from generator_service.sampling import SamplingParams, make_generator, next_token
from generator_service.tokenizer import check_token_ids
from shared.config.errors import InvalidInput, ModelMismatch, VlmqError
from shared.store.token_ids import EMBEDDING_INDEX_BASE

log = logging.getLogger(__name__)

FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED, FINISH_ERROR = "stop", "length", "cancelled", "error"


@dataclass
class GenerationRequest:
    """One generation. `containers` are EmbeddingContainer-like (first_token_id, num_tokens, embeddings).

    on_token(token_id) runs on the engine thread after each new token; returning True
    ends the request with finish_reason "stop" (stop strings). on_finish(result) runs
    once at the end, whatever the reason.
    """

    prompt_ids: Sequence[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    containers: Sequence[Any] = ()
    on_token: Callable[[int], bool | None] | None = None
    on_finish: Callable[[GenerationResult], None] | None = None
    request_id: str | None = None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    image_tokens: int  # prompt tokens that are container rows


@dataclass(frozen=True)
class GenerationResult:
    request_id: str
    token_ids: list[int]  # generated tokens; a stop token that ended generation is the last one
    finish_reason: str  # "stop" | "length" | "cancelled" | "error"
    usage: Usage
    error: BaseException | None = None


class RequestHandle:
    """The caller's side of a submitted request (thread-safe)."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        self._done = threading.Event()
        self._cancelled = threading.Event()
        self._result: GenerationResult | None = None

    def cancel(self) -> None:
        """Ask the engine to end the request at its next step (finish_reason "cancelled")."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Wait for the result; a request that failed raises its error."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
        assert self._result is not None
        if self._result.error is not None:
            raise self._result.error
        return self._result

    def _finish(self, result: GenerationResult) -> None:
        self._result = result
        self._done.set()


@dataclass(eq=False)
class _Sequence:
    """Engine-side state of one request."""

    request: GenerationRequest
    handle: RequestHandle
    prompt: Tensor  # Long[P] on the model's device
    ranges: Tensor | None  # Long[C, 2] (first, count) sorted, or None without containers
    rows: Tensor | None  # [Σ count, D] in the model's dtype
    image_tokens: int
    max_new_tokens: int
    stop_ids: frozenset[int]
    generator: torch.Generator
    seen: Tensor | None  # Bool[V]: text tokens so far, for the repetition penalty
    positions: Tensor | None  # the prompt's RoPE positions from the model (None: 0 … P-1)
    position_offset: int  # RoPE position − cache position of generated tokens (M-RoPE: ≤ 0 after images)
    output: list[int] = field(default_factory=list)
    length: int = 0  # cache positions written
    row: int = -1


class Engine:
    """Runs requests together over one preallocated KV cache of `max_batch` rows × `max_seq_len` positions."""

    def __init__(self, model, max_batch: int = 8, max_seq_len: int = 2048, eos_token_ids: Sequence[int] = ()):
        if max_batch < 1 or max_seq_len < 2:
            raise ValueError(f"need max_batch ≥ 1 and max_seq_len ≥ 2, got {max_batch}, {max_seq_len}")
        self.model = model
        self.max_batch = max_batch
        self.max_seq_len = min(max_seq_len, model.config.max_position_embeddings)
        self.eos_token_ids = tuple(eos_token_ids)
        self.cache = model.new_cache(max_batch, self.max_seq_len)
        self._incoming: queue.SimpleQueue[_Sequence] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._waiting: deque[_Sequence] = deque()
        self._rows: list[_Sequence | None] = [None] * max_batch
        self._ids = itertools.count()

    # -- any thread ---------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Validate and queue a request; raises InvalidInput / ModelMismatch here, in the caller's thread."""
        seq = self._prepare(request)
        self._incoming.put(seq)
        self._wakeup.set()
        return seq.handle

    def _prepare(self, request: GenerationRequest) -> _Sequence:
        model = self.model
        prompt = list(request.prompt_ids)
        if not prompt:
            raise InvalidInput("the prompt is empty")
        if len(prompt) >= self.max_seq_len:
            raise InvalidInput(
                f"prompt of {len(prompt)} tokens does not fit the context of {self.max_seq_len} tokens "
                "(at least one position must remain for the answer)"
            )
        containers = _unique_containers(request.containers)
        check_token_ids(prompt, containers, model.config.vocab_size)
        ranges = rows = None
        if containers:
            for c in containers:
                if c.embeddings.shape[1] != model.config.hidden_size:
                    raise ModelMismatch(
                        f"container {getattr(c, 'id', c.first_token_id)} has hidden size {c.embeddings.shape[1]}, "
                        f"the model {model.config.hidden_size}"
                    )
            ranges = torch.tensor([[c.first_token_id, c.num_tokens] for c in containers], device=model.device)
            # Converted once here, off the engine thread.
            rows = torch.cat([c.embeddings for c in containers]).to(model.device, model.dtype)
        params = request.params
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids.update(self.eos_token_ids)
        prompt_tensor = torch.tensor(prompt, dtype=torch.long, device=model.device)
        seen = None
        if params.needs_penalty:
            seen = torch.zeros(model.config.vocab_size, dtype=torch.bool, device=model.device)
            seen[prompt_tensor[prompt_tensor < EMBEDDING_INDEX_BASE]] = True  # container IDs are not text
        # Computed here, off the engine thread: M-RoPE walks the prompt and its images' grids.
        positions, next_position = model.prompt_positions(prompt, containers)
        request_id = request.request_id or f"req-{next(self._ids)}"
        return _Sequence(
            request=request,
            handle=RequestHandle(request_id),
            prompt=prompt_tensor,
            ranges=ranges,
            rows=rows,
            image_tokens=sum(1 for i in prompt if i >= EMBEDDING_INDEX_BASE),
            max_new_tokens=min(params.max_tokens, self.max_seq_len - len(prompt)),
            stop_ids=frozenset(stop_ids),
            generator=make_generator(params.seed, model.device),
            seen=seen,
            positions=positions,
            position_offset=next_position - len(prompt),
        )

    # -- the engine thread -----------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return sum(seq is not None for seq in self._rows)

    def has_work(self) -> bool:
        return bool(self._waiting) or self.num_running > 0 or not self._incoming.empty()

    @torch.inference_mode()
    def step(self) -> int:
        """Admit and prefill what fits, then decode one token for every running request; returns tokens made."""
        while not self._incoming.empty():
            self._waiting.append(self._incoming.get_nowait())
        for seq in self._rows:
            if seq is not None and seq.handle.cancelled:
                self._finish(seq, FINISH_CANCELLED)
        made = self._prefill_waiting()
        running = [seq for seq in self._rows if seq is not None]
        if running:
            made += self._decode(running)
        return made

    def run_until_idle(self) -> None:
        while self.has_work():
            self.step()

    def run_forever(self, stop: threading.Event, idle_wait_s: float = 0.1) -> None:
        """Step while there is work; sleep until a submission when there is none.

        When `stop` is set, every request not finished yet ends "cancelled", so no
        caller waits forever on a handle.
        """
        while not stop.is_set():
            if self.has_work():
                self.step()
            else:
                self._wakeup.wait(idle_wait_s)
                self._wakeup.clear()
        while not self._incoming.empty():
            self._waiting.append(self._incoming.get_nowait())
        for seq in [*self._waiting, *(s for s in self._rows if s is not None)]:
            self._finish(seq, FINISH_CANCELLED)
        self._waiting.clear()

    def _prefill_waiting(self) -> int:
        made = 0
        while self._waiting and None in self._rows:
            seq = self._waiting.popleft()
            if seq.handle.cancelled:
                self._finish(seq, FINISH_CANCELLED)
                continue
            seq.row = self._rows.index(None)  # lowest free row keeps the decoded batch short
            self._rows[seq.row] = seq
            try:
                logits = self.model.prefill(seq.prompt, self.cache, seq.row, ranges=seq.ranges, rows=seq.rows, positions=seq.positions)
            except Exception as exc:  # noqa: BLE001 - one bad request must not stop the others
                self._fail(seq, exc)
                continue
            seq.length = seq.prompt.shape[0]
            self._accept(seq, self._pick(seq, logits[0]))
            made += 1
        return made

    def _decode(self, running: list[_Sequence]) -> int:
        # Rows 0…n-1 go through the model together; a free row inside that span runs a
        # dummy token at position 0 of its own (unused) cache row.
        n = max(seq.row for seq in running) + 1
        ids, positions, rope_positions = [0] * n, [0] * n, [0] * n
        for seq in running:
            ids[seq.row], positions[seq.row] = seq.output[-1], seq.length
            rope_positions[seq.row] = seq.length + seq.position_offset
        if rope_positions == positions:
            rope_positions = None  # RoPE at the cache positions (every model without M-RoPE): nothing extra to build
        try:
            logits = self.model.decode(torch.tensor(ids, device=self.model.device), positions, self.cache, rope_positions)  # [n, V]
        except Exception as exc:  # noqa: BLE001
            for seq in running:
                self._fail(seq, exc)
            return 0
        argmax = logits.argmax(-1).tolist()  # one host sync for every plain-greedy row
        for seq in running:
            seq.length += 1
            plain_greedy = seq.request.params.greedy and not seq.request.params.needs_penalty
            self._accept(seq, argmax[seq.row] if plain_greedy else self._pick(seq, logits[seq.row]))
        return len(running)

    def _pick(self, seq: _Sequence, logits: Tensor) -> int:
        return next_token(logits, seq.request.params, seq.generator, seq.seen)

    def _accept(self, seq: _Sequence, token: int) -> None:
        seq.output.append(token)
        if seq.seen is not None:
            seq.seen[token] = True
        stop_requested = False
        if seq.request.on_token is not None:
            try:
                stop_requested = bool(seq.request.on_token(token))
            except Exception as exc:  # noqa: BLE001 - the caller's callback failed: end that request only
                self._fail(seq, exc)
                return
        if stop_requested or token in seq.stop_ids:
            self._finish(seq, FINISH_STOP)
        elif len(seq.output) >= seq.max_new_tokens:
            self._finish(seq, FINISH_LENGTH)

    def _fail(self, seq: _Sequence, exc: BaseException) -> None:
        if not isinstance(exc, VlmqError):
            log.exception("request %s failed", seq.handle.request_id, exc_info=exc)
        self._finish(seq, FINISH_ERROR, exc)

    def _finish(self, seq: _Sequence, reason: str, error: BaseException | None = None) -> None:
        if seq.row >= 0 and self._rows[seq.row] is seq:
            self._rows[seq.row] = None
        usage = Usage(seq.prompt.shape[0], len(seq.output), seq.image_tokens)
        result = GenerationResult(seq.handle.request_id, list(seq.output), reason, usage, error)
        seq.handle._finish(result)
        if seq.request.on_finish is not None:
            try:
                seq.request.on_finish(result)
            except Exception:  # noqa: BLE001
                log.exception("on_finish of request %s failed", seq.handle.request_id)


def _unique_containers(containers: Sequence[Any]) -> list[Any]:
    """Containers sorted by first ID, duplicates (same range) once; overlapping ranges are an error."""
    by_first: dict[int, Any] = {}
    for c in containers:
        known = by_first.get(c.first_token_id)
        if known is not None and known.num_tokens != c.num_tokens:
            raise InvalidInput(f"two containers claim token id {c.first_token_id}")
        by_first[c.first_token_id] = c
    ordered = [by_first[k] for k in sorted(by_first)]
    for a, b in zip(ordered, ordered[1:]):
        if b.first_token_id < a.first_token_id + a.num_tokens:
            raise InvalidInput(
                f"containers {getattr(a, 'id', a.first_token_id)} and {getattr(b, 'id', b.first_token_id)} "
                "have overlapping token id ranges"
            )
    return ordered
