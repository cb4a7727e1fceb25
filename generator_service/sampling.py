"""Sampling: the parameters of a request and small pure functions over logits.

The processors run in transformers' order — repetition penalty, temperature,
top-k, top-p — and mean what they mean there. Randomness comes only from the
request's own `torch.Generator`, so a seed gives the same tokens whatever else
runs in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from shared.config.errors import InvalidInput

# What a request payload's "sampling" may hold; stop_token_ids are the engine's (its EOS ids), not a client's.
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty", "max_tokens", "seed", "ignore_eos")

@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens.

    temperature 0 is greedy (argmax); top_k 0 and top_p 1 disable those filters;
    repetition_penalty 1 disables the penalty. stop_token_ids end generation
    (the token is kept in the output), and so do the engine's EOS IDs
    (`Engine(eos_token_ids=Tokenizer.eos_token_ids)`) unless `ignore_eos`.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_tokens: int = 256
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def __post_init__(self):
        def bad(name: str, rule: str):
            raise InvalidInput(f"{name} must be {rule}, got {getattr(self, name)!r}")

        def is_number(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value

        if not is_number(self.temperature) or self.temperature < 0:
            bad("temperature", "a number ≥ 0")
        if not is_number(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "in (0, 1]")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            bad("top_k", "an integer ≥ 0")
        if not is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            bad("repetition_penalty", "a number > 0")
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            bad("max_tokens", "an integer ≥ 1")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0):
            bad("seed", "a non-negative integer or null")
        if not isinstance(self.ignore_eos, bool):
            bad("ignore_eos", "true or false")
        ids = tuple(self.stop_token_ids)
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            bad("stop_token_ids", "a list of non-negative integers")
        object.__setattr__(self, "stop_token_ids", ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def needs_penalty(self) -> bool:
        return self.repetition_penalty != 1.0


def make_generator(seed: int | None, device: str | torch.device = "cpu") -> torch.Generator:
    """A request's own random stream: seeded, or from fresh OS entropy when no seed is given."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """logits: [V], seen: Bool[V] (text tokens of prompt and output) → penalised copy.

    transformers' rule: a seen token's positive logit is divided by the penalty,
    a negative one multiplied. Container IDs never reach `seen` (they are not text).
    """
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_top_k(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits (ties at the k-th kept), -inf elsewhere. logits: [V]."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: Tensor, p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (always ≥ 1). logits: [V]."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    remove_sorted = cumulative <= 1 - p
    remove_sorted[-1] = False  # the most likely token always stays
    remove = torch.zeros_like(remove_sorted).scatter(0, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def sample_from_logits(logits: Tensor, generator: torch.Generator) -> int:
    """Draw one token from softmax(logits) (logits: [V], already tempered and filtered).

    argmax(p / E) with E ~ Exp(1) is an exact draw from p and needs no cumulative
    sum or host sync inside (gpt-fast's trick).
    """
    probs = torch.softmax(logits, dim=-1)
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return int(torch.argmax(probs / noise))


def process_logits(logits: Tensor, params: SamplingParams, seen: Tensor | None) -> Tensor:
    """The filtered, tempered logits ([V], float32) a sampled token is drawn from."""
    if seen is not None and params.needs_penalty:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.temperature != 1.0:
        logits = logits / params.temperature
    logits = apply_top_k(logits, params.top_k)
    return apply_top_p(logits, params.top_p)


def next_token(logits: Tensor, params: SamplingParams, generator: torch.Generator, seen: Tensor | None) -> int:
    """One request's next token from its logits [V]."""
    if params.temperature == 0 or params.top_k == 1:
        if seen is not None and params.needs_penalty:
            logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
        return int(torch.argmax(logits))
    return sample_from_logits(process_logits(logits, params, seen), generator)
