"""The language model of Qwen2-VL and Qwen2.5-VL: Qwen2 with M-RoPE, on the Llama decoder.

Qwen2 is Llama with biases on Q, K and V (`DecoderConfig.attention_bias`); the
vision-language models add M-RoPE (`RopeConfig.mrope_section`): every token has
three positions (temporal, height, width) and each run of the head's rotation
pairs turns with one of them. Text tokens have three equal positions, counting
on from the previous token; an image's rows sit on their merged grid — row r,
column c of an image starting at position s is (s, s + r, s + c) — and the text
after it continues from the image's largest position + 1, so a sequence's
positions run behind its length. The engine carries that offset into decoding.

Matches `Qwen2VLForConditionalGeneration` / `Qwen2_5_VLForConditionalGeneration`
(their language models are the same) with `transformers`' `get_rope_index`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

import torch
from torch import Tensor

from generator_service.models.decoder import DecoderConfig
from generator_service.models.llama import LlamaForCausalLM
from shared.config.errors import CheckpointError, InvalidInput
from shared.modeling.layers import RopeConfig, mrope_components
from shared.store.token_ids import EMBEDDING_INDEX_BASE

# transformers' Qwen2VLTextConfig defaults (Qwen2.5-VL's are the same where it matters).
_QWEN2_VL_DEFAULTS = {
    "vocab_size": 152064,
    "hidden_size": 8192,
    "intermediate_size": 29568,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
}
_DEFAULT_THETA = 1000000.0
_DEFAULT_MROPE_SECTION = (16, 24, 24)


def qwen2_vl_config(config: dict) -> DecoderConfig:
    """A `DecoderConfig` from a Qwen2(.5)-VL config.json: its `text_config`, or the top level (published configs)."""
    text = {**_QWEN2_VL_DEFAULTS, **{k: v for k, v in config.get("text_config", config).items() if v is not None}}
    if text.get("use_sliding_window"):
        raise CheckpointError("Qwen2-VL with use_sliding_window is not supported")
    heads = text["num_attention_heads"]
    head_dim = text["hidden_size"] // heads  # the reference ignores any head_dim field
    try:
        rope = RopeConfig.from_config(text, default_theta=_DEFAULT_THETA)
        if rope.mrope_section is None:
            rope = replace(rope, mrope_section=_DEFAULT_MROPE_SECTION)
        mrope_components(rope.mrope_section, head_dim)  # refuses a section that does not fit the head
        return DecoderConfig(
            vocab_size=text["vocab_size"],
            hidden_size=text["hidden_size"],
            intermediate_size=text["intermediate_size"],
            num_layers=text["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=text.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            max_position_embeddings=text["max_position_embeddings"],
            rms_norm_eps=text["rms_norm_eps"],
            rope=rope,
            # Tied if either level says so, as Qwen2VLConfig resolves it.
            tie_word_embeddings=bool(config.get("tie_word_embeddings") or text.get("tie_word_embeddings")),
            attention_bias=True,  # Qwen2: Q, K and V have biases, O has none
            hidden_act=text["hidden_act"],
        )
    except ValueError as exc:
        raise CheckpointError(f"unsupported Qwen2-VL config: {exc}") from None


def mrope_positions(ids: Sequence[int], containers: Sequence[Any]) -> tuple[Tensor, int]:
    """The prompt's M-RoPE positions, Long[3, P] (temporal, height, width), and the first generated token's.

    As `transformers`' `get_rope_index`: text counts on by one; an image — a run of
    one container's IDs, whole and in order — takes positions on its merged grid
    (`container.grid`, (t, h, w)) from the position it starts at, and the text after
    it starts max(h, w) later. A generated token's position is the largest so far + 1.
    """
    by_first = {c.first_token_id: c for c in containers}
    positions = torch.empty(3, len(ids), dtype=torch.long)
    i, start = 0, 0
    while i < len(ids):
        if ids[i] < EMBEDDING_INDEX_BASE:
            j = i
            while j < len(ids) and ids[j] < EMBEDDING_INDEX_BASE:
                j += 1
            positions[:, i:j] = torch.arange(start, start + j - i)
            start += j - i
            i = j
            continue
        image = by_first.get(ids[i])
        if image is None or list(ids[i : i + image.num_tokens]) != list(range(image.first_token_id, image.first_token_id + image.num_tokens)):
            raise InvalidInput(f"token id {ids[i]}: an image's token ids must appear whole and in order (M-RoPE places them on its grid)")
        t, h, w = _grid(image)
        n = image.num_tokens
        positions[0, i : i + n] = start + torch.arange(t).repeat_interleave(h * w)
        positions[1, i : i + n] = start + torch.arange(h).repeat_interleave(w).repeat(t)
        positions[2, i : i + n] = start + torch.arange(w).repeat(t * h)
        start += max(h, w)
        i += n
    return positions, int(positions.max()) + 1 if len(ids) else 0


def _grid(container: Any) -> tuple[int, int, int]:
    grid = getattr(container, "grid", None)
    if grid is None or len(grid) != 3 or grid[0] * grid[1] * grid[2] != container.num_tokens:
        raise InvalidInput(
            f"container {getattr(container, 'id', container.first_token_id)} has grid {grid}, "
            f"not a (t, h, w) of its {container.num_tokens} rows: M-RoPE needs it"
        )
    return tuple(int(n) for n in grid)


class Qwen2VLForCausalLM(LlamaForCausalLM):
    """Qwen2-VL's language model: the Llama decoder with Qwen2's config and M-RoPE positions."""

    read_config = staticmethod(qwen2_vl_config)

    def prompt_positions(self, ids: list[int], containers) -> tuple[Tensor, int]:
        return mrope_positions(ids, containers)
