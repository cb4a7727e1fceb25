"""The generation engine: batched decoding of token-ID requests over one paged KV cache.

It knows nothing about text. A request is prompt token IDs (container IDs ≥
EMBEDDING_INDEX_BASE included), the containers those IDs belong to, sampling
parameters and optional callbacks; the caller (the worker) tokenizes, detokenizes
and matches stop strings, and tells the engine to stop by returning True from
`on_token`.

Threading: `submit()` and `RequestHandle.cancel()` may be called from any thread;
`step()`, `run_until_idle()` and `run_forever()` from one engine thread only, which
is also where the callbacks run.

Each step (docs/DESIGN.md §11):
1. admits waiting requests first come, first served while the KV pool can promise every
   block they may need (prompt + max_tokens), taking the blocks of their longest cached
   prefix (`kv_blocks`); the first that does not fit waits, and the ones behind it too;
2. plans up to `prefill_chunk_tokens` prompt tokens in chunks of the admitted prompts, in
   order (a long prompt advances a chunk per step; a Gemma 3 image longer than that, which must
   go whole, advances a few layers per step);
3. decodes one token for every sequence whose prompt is done, in one batch, with every chunk in
   the same forward (one read of the weights for all).
"""

from __future__ import annotations

import itertools
import logging
import queue
import secrets
import statistics
import threading
import time
from collections import deque
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor

from generator_service.kv_blocks import BlockPool, block_hashes, chain_root
from generator_service.models.decoder import Chunk
from generator_service.sampling import SamplingParams, make_generator, next_token
from generator_service.tokenizer import check_token_ids
from shared.config.errors import InvalidInput, ModelMismatch, VlmqError
from shared.config.settings import get_settings
from shared.queue.metrics import HISTOGRAMS, Histogram
from shared.store.token_ids import EMBEDDING_INDEX_BASE

log = logging.getLogger(__name__)

FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED, FINISH_ERROR = "stop", "length", "cancelled", "error"
# The prefill chunk of the first steps beside decoding sequences, which measure what a prompt token costs: one
# token's cost would drown in the step's noise.
PROBE_CHUNK_TOKENS = 8
# Weight of the newest step in the engine's moving average of what a prompt token costs.
STEP_COST_WEIGHT = 0.2
# The latest decode-only steps, whose median is a decode step's cost. A moving average took in the host's stalls
# (this machine's vCPUs lose 6-20 ms in ~0.7% of steps, 2026-12-07), and one stall in the steps before prompts
# arrive set every budget while they prefilled, there being no decode-only step among them.
DECODE_STEPS_KEPT = 16
# The warm-up's prompt when prompts are prefilled whole (no chunk size to match), and its new tokens.
WARM_UP_PROMPT_TOKENS, WARM_UP_NEW_TOKENS = 512, 4


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
    # Requests share prefix-cache blocks only under one salt (the tenant): no timing side channel on text either.
    cache_salt: str = ""


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    image_tokens: int  # prompt tokens that are container rows
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache


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
    prompt_ids: list[int]
    prompt: Tensor  # Long[P] on the model's device
    ranges: Tensor | None  # Long[C, 2] (first, count) sorted, or None without containers
    rows: Tensor | None  # [Σ count, D] in the model's dtype
    image_tokens: int
    max_new_tokens: int
    stop_ids: frozenset[int]
    generator: torch.Generator
    seen: Tensor | None  # Bool[V]: text tokens so far, for the repetition penalty
    positions: Tensor | None  # the prompt's RoPE positions from the model, Long[P] or Long[3, P] (None: 0 … P-1)
    position_offset: int  # RoPE position − cache position of generated tokens (M-RoPE: ≤ 0 after images)
    hashes: list[bytes]  # prefix-cache hash of each full block so far (the prompt's from submit, then as decoding fills them)
    submitted_at: float
    output: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)  # the block table
    promised: int = 0  # blocks the pool promised at admission and has not handed out yet
    computed: int = 0  # prompt positions in the cache (a cached prefix, then prefilled chunks)
    length: int = 0  # positions in the cache once the prompt is done (prompt + generated tokens fed back)
    cached_tokens: int = 0  # the prompt prefix found in the prefix cache
    last_token_at: float = 0.0
    in_layers: _ImageInLayers | None = None  # a prefill chunk part way through the layers


@dataclass(frozen=True)
class _ImageInLayers:
    """A bidirectional image (Gemma 3) longer than a step's prefill budget, going through the layers over several
    steps, all of its tokens at each: prompt positions [computed, end), through layers 0 … layer-1 so far, `hidden`
    [S, D] the input of layer `layer`. Its attention sees the whole image at every layer, as the reference's does."""

    end: int
    layer: int
    hidden: Tensor


@dataclass(frozen=True)
class _Planned:
    """A prefill chunk of this step: prompt positions [start, end) of `seq` through `layers` (None: all); `cost`, in
    prompt tokens through every layer, what it takes of the step's budget."""

    seq: _Sequence
    start: int
    end: int
    cost: int
    layers: tuple[int, int] | None = None


@dataclass
class EngineStats:
    """What the engine counts for /metrics since it started (`generator_service.engine_metrics` publishes it)."""

    prefix_lookup_tokens: int = 0  # prompt tokens of admitted requests
    prefix_hit_tokens: int = 0  # of those, found in the prefix cache
    ttft: Histogram = field(default_factory=lambda: Histogram(HISTOGRAMS["ttft_seconds"]))  # submit → first token
    itl: Histogram = field(default_factory=lambda: Histogram(HISTOGRAMS["itl_seconds"]))  # between a request's tokens


class Engine:
    """Runs up to `max_batch` requests together over a paged KV pool of `kv_cache_tokens` positions.

    kv_cache_tokens: the pool, in positions of `block_tokens` each block (default: max_batch × max_seq_len,
    the memory of an unpaged cache); a request waits until the pool can promise its prompt and
    answer. prefix_cache: reuse the blocks of prompt prefixes computed before. prefill_chunk_tokens:
    prompt tokens prefilled per step (0: whole prompts). max_decode_slowdown: while sequences decode, the
    chunks are cut so that a step takes at most this many times a decode-only step, by step costs the engine
    measures as it runs (0: no cut). Left out, these four are the settings' (VLMQ_KV_BLOCK_TOKENS,
    VLMQ_PREFIX_CACHE, VLMQ_PREFILL_CHUNK_TOKENS, VLMQ_MAX_DECODE_SLOWDOWN), so a whole test run can switch them.
    """

    def __init__(
        self, model, max_batch: int = 8, max_seq_len: int = 2048, eos_token_ids: Sequence[int] = (),
        kv_cache_tokens: int | None = None, block_tokens: int | None = None, prefix_cache: bool | None = None,
        prefill_chunk_tokens: int | None = None, max_decode_slowdown: float | None = None,
    ):
        settings = get_settings()
        block_tokens = settings.kv_block_tokens if block_tokens is None else block_tokens
        prefix_cache = settings.prefix_cache == "on" if prefix_cache is None else prefix_cache
        prefill_chunk_tokens = settings.prefill_chunk_tokens if prefill_chunk_tokens is None else prefill_chunk_tokens
        max_decode_slowdown = settings.max_decode_slowdown if max_decode_slowdown is None else max_decode_slowdown
        if max_batch < 1 or max_seq_len < 2 or block_tokens < 1 or prefill_chunk_tokens < 0:
            raise ValueError(f"need max_batch ≥ 1, max_seq_len ≥ 2, block_tokens ≥ 1, prefill_chunk_tokens ≥ 0, got "
                             f"{max_batch}, {max_seq_len}, {block_tokens}, {prefill_chunk_tokens}")
        self.model = model
        self.max_batch = max_batch
        self.block_tokens = block_tokens
        num_blocks = -(-(kv_cache_tokens or max_batch * max_seq_len) // block_tokens)
        self.kv_tokens = num_blocks * block_tokens
        context = min(max_seq_len, model.config.max_position_embeddings)
        self.max_seq_len = min(context, self.kv_tokens)  # a request longer than the whole pool could never run
        self._limit = "context" if context <= self.kv_tokens else "KV cache"
        self.eos_token_ids = tuple(eos_token_ids)
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.max_decode_slowdown = max_decode_slowdown
        self._decode_steps: deque[float] = deque(maxlen=DECODE_STEPS_KEPT)  # seconds of the latest decode-only steps
        self._chunk_token_s: float | None = None  # moving average: what a prompt token adds to a step that decodes
        self.cache = model.new_cache(num_blocks, block_tokens)
        self.pool = BlockPool(num_blocks, prefix_cache)
        self.stats = EngineStats()
        self._incoming: queue.SimpleQueue[_Sequence] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []  # admitted, in admission order
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
                f"prompt of {len(prompt)} tokens does not fit the {self._limit} of {self.max_seq_len} tokens "
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
        # Computed here, off the engine thread: M-RoPE walks the prompt and its images' grids; the hashes read every ID.
        positions, next_position = model.prompt_positions(prompt, containers)
        hashes = []
        if self.pool.prefix_cache:
            hashes = block_hashes(prompt, self.block_tokens, request.cache_salt, model.config.bidirectional_images)
        request_id = request.request_id or f"req-{next(self._ids)}"
        return _Sequence(
            request=request,
            handle=RequestHandle(request_id),
            prompt_ids=prompt,
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
            hashes=hashes,
            submitted_at=time.perf_counter(),
        )

    # -- the engine thread -----------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def has_work(self) -> bool:
        return bool(self._waiting) or bool(self._running) or not self._incoming.empty()

    @torch.inference_mode()
    def step(self) -> int:
        """Admit what the pool allows, prefill up to the chunk budget, decode one token for every sequence past its
        prompt (with the first chunk in the same forward); returns tokens made."""
        while not self._incoming.empty():
            self._waiting.append(self._incoming.get_nowait())
        for seq in [*self._waiting, *self._running]:
            if seq.handle.cancelled:
                self._finish(seq, FINISH_CANCELLED)
        self._admit()
        started = time.perf_counter()
        decoding = [seq for seq in self._running if seq.output]
        chunks = self._plan_chunks(self._prefill_budget(bool(decoding)))
        # The streams' next tokens and every chunk in one forward: each weight read once for all of them, so
        # prompts arriving cost the streams their chunks' compute per step, not whole prefills.
        made = self._forward(decoding, chunks)
        if decoding:
            self._learn_step_cost(time.perf_counter() - started, sum(chunk.cost for chunk in chunks))
        elif chunks:  # what this step prefilled decodes at once, as it would alone
            made += self._forward([seq for seq in self._running if seq.output], [])
        return made

    @property
    def _decode_step_s(self) -> float | None:
        """A decode-only step's cost: the median of the latest (None before the first)."""
        return statistics.median(self._decode_steps) if self._decode_steps else None

    def _prefill_budget(self, decoding: bool) -> int:
        """Prompt tokens this step may prefill: the chunk size, cut while sequences decode so that the step stays
        within `max_decode_slowdown` of a decode-only step (their inter-token latency) by the costs measured so far."""
        if not self.prefill_chunk_tokens:
            return self.kv_tokens  # whole prompts: no chunks to cut
        budget = self.prefill_chunk_tokens
        if not decoding or not self.max_decode_slowdown:
            return budget
        decode_s = self._decode_step_s
        if decode_s is None or self._chunk_token_s is None:
            return min(budget, PROBE_CHUNK_TOKENS)
        affordable = (self.max_decode_slowdown - 1) * decode_s / self._chunk_token_s
        # At least a token, so that a long prompt advances. A floor of more breaks the bound where streams deep into
        # their context make every token dear: with 8, bench-small Pixtral's steps under arrivals at a slowdown of 2
        # ran at 2.6-2.9× the streams' idle step (2026-12-07).
        return min(budget, max(1, int(affordable)))

    def _learn_step_cost(self, seconds: float, prompt_tokens: int) -> None:
        """Fold a step that decoded (with `prompt_tokens` of prefill, or none) into the step costs."""
        if not prompt_tokens:
            self._decode_steps.append(seconds)
        elif (decode_s := self._decode_step_s) is not None:
            self._chunk_token_s = _moving_average(self._chunk_token_s, max(seconds - decode_s, 0.0) / prompt_tokens)

    def run_until_idle(self) -> None:
        while self.has_work():
            self.step()

    def warm_up(self) -> None:
        """Prefill a chunk-sized prompt and decode a few tokens, then forget it: the stats, the step costs learned,
        and (under a salt of its own) any use of its cached blocks. A new worker's first steps otherwise pay one-off
        costs in its first requests' time — each op's first run, the heap growing to a step's working set (page
        faults): on bench-small the first 32 captions took ~1.3 s longer than the next 32. Call it on the thread
        that will run the steps, before it serves: glibc's heap arena and the OpenMP team it warms are that
        thread's."""
        length = max(1, min(self.prefill_chunk_tokens or WARM_UP_PROMPT_TOKENS, self.max_seq_len - WARM_UP_NEW_TOKENS))
        params = SamplingParams(temperature=0.0, max_tokens=WARM_UP_NEW_TOKENS, ignore_eos=True)
        handle = self.submit(GenerationRequest([0] * length, params, request_id="warm-up", cache_salt=secrets.token_hex(16)))
        self.run_until_idle()
        handle.result()  # raises what failed it: a model that cannot run a plain prompt says so before serving
        self.stats = EngineStats()
        self._chunk_token_s = None
        self._decode_steps.clear()

    def run_forever(self, stop: threading.Event, idle_wait_s: float = 0.1,
                    turns: AbstractContextManager = nullcontext()) -> None:
        """Step while there is work; sleep until a submission when there is none. Each step runs inside `turns`
        (a `shared.modeling.turns.Turns` where another model shares the process and its cores).

        When `stop` is set, every request not finished yet ends "cancelled", so no
        caller waits forever on a handle.
        """
        while not stop.is_set():
            if self.has_work():
                with turns:
                    self.step()
            else:
                self._wakeup.wait(idle_wait_s)
                self._wakeup.clear()
        while not self._incoming.empty():
            self._waiting.append(self._incoming.get_nowait())
        for seq in [*self._waiting, *self._running]:
            self._finish(seq, FINISH_CANCELLED)

    def _admit(self) -> None:
        bs = self.block_tokens
        while self._waiting and len(self._running) < self.max_batch:
            seq = self._waiting[0]
            prompt_len = len(seq.prompt_ids)
            # At least the prompt's last token is computed here: its logits give the first new token.
            cached = self.pool.lookup(seq.hashes[: (prompt_len - 1) // bs])
            positions = prompt_len + seq.max_new_tokens - 1  # the last new token is never fed back
            if not self.pool.admit(cached, -(-positions // bs) - len(cached)):
                break  # first come, first served: the ones behind wait too
            self._waiting.popleft()
            seq.blocks, seq.promised = list(cached), -(-positions // bs) - len(cached)
            seq.computed = seq.cached_tokens = len(cached) * bs
            self._running.append(seq)
            self._copy_partial_block(seq)
            self.stats.prefix_lookup_tokens += prompt_len
            self.stats.prefix_hit_tokens += seq.cached_tokens

    def _copy_partial_block(self, seq: _Sequence) -> None:
        """Past its cached blocks, give `seq` the keys and values of the cached block whose first positions are its
        next ones: a second question about an image that ends inside a block shares the image's last positions
        of that block, and a block-by-block lookup cannot hit them. Copied into a block of its own, since the rest
        of the block differs. With bidirectional images (Gemma 3) the copy stops before an image it would end in or
        at: that image's keys depend on its tokens past the copy, which may differ; every position before it saw
        only the shared tokens."""
        bs, pool = self.block_tokens, self.pool
        if not pool.prefix_cache:
            return
        start = len(seq.blocks) * bs
        ids = seq.prompt_ids[start : min(start + bs, len(seq.prompt_ids) - 1)]  # the prompt's last token is computed
        before = seq.hashes[len(seq.blocks) - 1] if seq.blocks else chain_root(seq.request.cache_salt)
        found = pool.longest_partial(before, ids) if ids else None
        if found is not None and self.model.config.bidirectional_images:
            same = found[1]
            while same and ids[same - 1] >= EMBEDDING_INDEX_BASE:
                same -= 1
            found = (found[0], same) if same else None
        # The source is pinned while the new block is taken, so that taking it cannot evict the source.
        if found is None or not pool.admit([found[0]], 0):
            return
        source, same = found
        self._grow(seq, start + 1)
        self.cache.copy_positions(source, seq.blocks[-1], same)
        pool.release([source])
        seq.computed += same
        seq.cached_tokens += same

    def _plan_chunks(self, budget: int) -> list[_Planned]:
        """This step's prefill chunks: the admitted prompts in order, up to the budget.

        A prompt whose next block an earlier prompt is computing right now (two questions about one image,
        arriving together) waits for it, then takes it from the prefix cache, instead of computing it twice.
        """
        chunks = []
        computing: set[bytes] = set()  # hashes of the blocks earlier prompts are computing
        for seq in [s for s in self._running if s.computed < len(s.prompt_ids)]:
            if self.pool.prefix_cache and self._waits_for_shared_prefix(seq, computing):
                continue
            if budget <= 0:
                break
            chunk = self._next_chunk(seq, budget)
            if chunks and chunk.cost > budget:
                break  # an image that goes whole (bidirectional) and overruns the budget in one layer: a step of its own
            budget -= chunk.cost
            chunks.append(chunk)
        return chunks

    def _next_chunk(self, seq: _Sequence, budget: int) -> _Planned:
        """`seq`'s next prefill chunk within `budget`. A bidirectional image longer than the budget goes whole
        through as many layers as the budget pays for (at least one), then on from there in the steps after."""
        num_layers, start = self.model.config.num_layers, seq.computed
        if seq.in_layers is None:
            end, first = self._chunk_end(seq, budget), 0
            if end - start <= budget:
                return _Planned(seq, start, end, end - start)
        else:
            end, first = seq.in_layers.end, seq.in_layers.layer
        last = min(num_layers, first + max(1, budget * num_layers // (end - start)))
        layers = None if (first, last) == (0, num_layers) else (first, last)
        return _Planned(seq, start, end, -(-(end - start) * (last - first) // num_layers), layers)

    def _waits_for_shared_prefix(self, seq: _Sequence, computing: set[bytes]) -> bool:
        """Take the blocks of `seq`'s prompt that other sequences cached since it was admitted; True when its
        next block is in `computing` (it waits a step); else add the blocks it has yet to compute to `computing`."""
        bs = self.block_tokens
        limit = (len(seq.prompt_ids) - 1) // bs  # as at admission: the prompt's last token is always computed
        block, filled = divmod(seq.computed, bs)
        # The next block is not grown yet, or holds only its first positions (a chunk ended inside it, or they were
        # copied from a cached block at admission): a cached copy of the whole block replaces it.
        if len(seq.blocks) == block + (filled > 0):
            found = self.pool.lookup(seq.hashes[block:limit])
            if found:
                if filled:
                    self.pool.unallocate(seq.blocks.pop())
                    seq.promised += 1
                self.pool.share(found)
                seq.blocks += found
                seq.promised -= len(found)
                seq.computed = (block + len(found)) * bs
                seq.cached_tokens += len(found) * bs - filled
                self.stats.prefix_hit_tokens += len(found) * bs - filled
            if seq.computed // bs < limit and seq.hashes[seq.computed // bs] in computing:
                return True
        computing.update(seq.hashes[seq.computed // bs : limit])
        return False

    def _positions(self, seq: _Sequence, start: int, end: int) -> Tensor | None:
        return None if seq.positions is None else seq.positions[..., start:end]

    def _prefilled(self, chunk: _Planned, finals: Iterator[Tensor], hidden: Iterator[Tensor]) -> int:
        """`chunk` ran: keep the next of `hidden` where it stopped before the last layer (the step's chunks that did,
        in order); else the prompt is in the cache up to its end: cache the blocks now final, and at the prompt's end
        pick the first token from the next of `finals` (the logits of the step's chunks that end their prompt)."""
        seq, end, bs = chunk.seq, chunk.end, self.block_tokens
        if chunk.layers is not None and chunk.layers[1] < self.model.config.num_layers:
            seq.in_layers = _ImageInLayers(end, chunk.layers[1], next(hidden))
            return 0
        seq.in_layers = None
        for i in range(seq.computed // bs, min(end // bs, len(seq.hashes))):  # prompt blocks: their hashes cover the prompt
            self._register(seq, i, seq.prompt_ids[i * bs : (i + 1) * bs])
        seq.computed = end
        if end < len(seq.prompt_ids):
            return 0
        seq.length = end
        self._accept(seq, self._pick(seq, next(finals)))
        return 1

    def _chunk_end(self, seq: _Sequence, budget: int) -> int:
        """Where the next prefill chunk of `seq` ends: `budget` tokens on, or the prompt's end. With bidirectional
        images (Gemma 3) a chunk never ends inside an image: it ends before the image, or, when it starts inside
        that image (after a cached prefix), at the image's end."""
        ids, start = seq.prompt_ids, seq.computed
        end = min(len(ids), start + budget)
        if not self.model.config.bidirectional_images:
            return end
        image_start = end
        while start < image_start < len(ids) and ids[image_start] >= EMBEDDING_INDEX_BASE and ids[image_start - 1] >= EMBEDDING_INDEX_BASE:
            image_start -= 1
        if image_start == end or image_start > start:
            return image_start
        while end < len(ids) and ids[end] >= EMBEDDING_INDEX_BASE:
            end += 1
        return end

    def _grow(self, seq: _Sequence, positions: int) -> None:
        """Give `seq` the blocks for its first `positions` positions (promised at admission)."""
        while len(seq.blocks) * self.block_tokens < positions:
            seq.blocks.append(self.pool.allocate())
            seq.promised -= 1

    def _forward(self, running: list[_Sequence], chunks: list[_Planned]) -> int:
        """One forward: a token for each of `running` and the prefill `chunks`; returns the tokens made. Decoding
        alone runs the model's decode (the fused kernel where there is one)."""
        if not running and not chunks:
            return 0
        ids, positions, rope_positions = [], [], []
        for seq in running:
            self._grow(seq, seq.length + 1)
            ids.append(seq.output[-1])
            positions.append(seq.length)
            rope_positions.append(seq.length + seq.position_offset)
        if rope_positions == positions:
            rope_positions = None  # RoPE at the cache positions (every model without M-RoPE): nothing extra to build
        ids, tables = torch.tensor(ids, dtype=torch.long, device=self.model.device), [seq.blocks for seq in running]
        try:
            if chunks:
                for chunk in chunks:
                    self._grow(chunk.seq, chunk.end)
                logits, chunk_logits, hidden = self.model.step(ids, positions, self.cache, rope_positions, tables, [
                    Chunk(c.seq.prompt[c.start:c.end], c.seq.blocks, c.start, c.seq.ranges, c.seq.rows,
                          self._positions(c.seq, c.start, c.end), final=c.end == len(c.seq.prompt_ids), layers=c.layers,
                          hidden=None if c.seq.in_layers is None else c.seq.in_layers.hidden)
                    for c in chunks])  # [N, V], [chunks that end their prompt, V], [chunks that stop before the last layer][S, D]
            else:
                logits, chunk_logits, hidden = self.model.decode(ids, positions, self.cache, rope_positions, tables=tables), (), ()
        except Exception as exc:  # noqa: BLE001 - one bad step must not stop the engine
            for seq in [*running, *(chunk.seq for chunk in chunks)]:
                self._fail(seq, exc)
            return 0
        argmax = logits.argmax(-1).tolist()  # one host sync for every plain-greedy row
        for i, seq in enumerate(running):
            seq.length += 1
            if seq.length % self.block_tokens == 0:
                self._register_filled(seq)
            plain_greedy = seq.request.params.greedy and not seq.request.params.needs_penalty
            self._accept(seq, argmax[i] if plain_greedy else self._pick(seq, logits[i]))
        finals, hidden = iter(chunk_logits), iter(hidden)
        return len(running) + sum(self._prefilled(chunk, finals, hidden) for chunk in chunks)

    def _register_filled(self, seq: _Sequence) -> None:
        """Cache the block decoding just filled (generated tokens are text: no image runs on past it)."""
        index, bs = seq.length // self.block_tokens - 1, self.block_tokens
        if not self.pool.prefix_cache or index < len(seq.hashes):
            return
        ids = (seq.prompt_ids + seq.output)[index * bs : (index + 1) * bs]
        seq.hashes += block_hashes(ids, bs, seq.request.cache_salt, previous=seq.hashes[-1] if seq.hashes else None)
        self._register(seq, index, ids)

    def _register(self, seq: _Sequence, index: int, ids: list[int]) -> None:
        """Cache block `index` of `seq` (its token `ids`), full and final, under its hash, filed after the hash before it."""
        before = seq.hashes[index - 1] if index else chain_root(seq.request.cache_salt)
        self.pool.register(seq.blocks[index], seq.hashes[index], before, ids)

    def _pick(self, seq: _Sequence, logits: Tensor) -> int:
        return next_token(logits, seq.request.params, seq.generator, seq.seen)

    def _accept(self, seq: _Sequence, token: int) -> None:
        now = time.perf_counter()
        if seq.output:
            self.stats.itl.observe(now - seq.last_token_at)
        else:
            self.stats.ttft.observe(now - seq.submitted_at)
        seq.last_token_at = now
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
        if seq in self._running:
            self._running.remove(seq)
            self.pool.release(seq.blocks, seq.promised)
            seq.blocks, seq.promised = [], 0
        elif seq in self._waiting:
            self._waiting.remove(seq)
        usage = Usage(seq.prompt.shape[0], len(seq.output), seq.image_tokens, seq.cached_tokens)
        result = GenerationResult(seq.handle.request_id, list(seq.output), reason, usage, error)
        seq.handle._finish(result)
        if seq.request.on_finish is not None:
            try:
                seq.request.on_finish(result)
            except Exception:  # noqa: BLE001
                log.exception("on_finish of request %s failed", seq.handle.request_id)


def _moving_average(average: float | None, value: float) -> float:
    return value if average is None else average + STEP_COST_WEIGHT * (value - average)


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
