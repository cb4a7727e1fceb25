"""Llama, the language model of LLaVA-1.5, in vlmq's own torch code.

Loads `language_model.*` tensors of a Hugging Face checkpoint (the `text_config`
of the multimodal config) and matches `transformers`' `LlamaForCausalLM`
numerically. Two forwards, both over a `KVCache` the caller owns:

- `prefill`: one sequence's prompt into cache row `row`; prompt IDs ≥
  EMBEDDING_INDEX_BASE read their container's rows (`cuda_ext.multimodal_embedding`);
- `decode`: one new token for each of cache rows 0…N-1, each at its own position.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cuda_ext import multimodal_embedding
from shared.checkpoint import Checkpoint
from shared.errors import CheckpointError
from shared.layers import (
    DecoderConfig,
    DecoderLayer,
    ForwardBatch,
    KVCache,
    RMSNorm,
    RopeConfig,
    linear,
    prepare_weight,
    rope_table,
)
from shared.token_ids import EMBEDDING_INDEX_BASE

# transformers' LlamaConfig defaults: LLaVA configs often leave text_config fields at them.
_LLAMA_DEFAULTS = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "attention_bias": False,
    "mlp_bias": False,
    "hidden_act": "silu",
}


def llama_config(config: dict) -> DecoderConfig:
    """A `DecoderConfig` from a checkpoint's config.json (multimodal: its `text_config`)."""
    text = {**_LLAMA_DEFAULTS, **config.get("text_config", config)}
    heads = text["num_attention_heads"]
    try:
        return DecoderConfig(
            vocab_size=text["vocab_size"],
            hidden_size=text["hidden_size"],
            intermediate_size=text["intermediate_size"],
            num_layers=text["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=text.get("num_key_value_heads") or heads,
            head_dim=text.get("head_dim") or text["hidden_size"] // heads,
            max_position_embeddings=text["max_position_embeddings"],
            rms_norm_eps=text["rms_norm_eps"],
            rope=RopeConfig.from_config(text),
            tie_word_embeddings=bool(text.get("tie_word_embeddings", config.get("tie_word_embeddings", False))),
            attention_bias=text["attention_bias"],
            mlp_bias=text["mlp_bias"],
            hidden_act=text["hidden_act"],
        )
    except ValueError as exc:  # unsupported RoPE type or activation, heads not a multiple of KV heads
        raise CheckpointError(f"unsupported Llama config: {exc}") from None


class LlamaModel(nn.Module):
    """Embedding table, decoder layers, final norm (named as `language_model.model.*`)."""

    def __init__(self, config: DecoderConfig, device=None, dtype=None):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, device=device, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(config, device, dtype) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, device, dtype)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: DecoderConfig, device=None, dtype=None):
        super().__init__()
        if config.vocab_size >= EMBEDDING_INDEX_BASE:
            raise CheckpointError(
                f"vocabulary of {config.vocab_size} tokens reaches the embedding ID base {EMBEDDING_INDEX_BASE}"
            )
        self.config = config
        self.model = LlamaModel(config, device, dtype)
        self.lm_head = None
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, device=device, dtype=dtype)
        self.prepared = False

    @classmethod
    def from_checkpoint(
        cls, checkpoint: Checkpoint | str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> LlamaForCausalLM:
        """Build on the meta device, load the language-model tensors only, prepare for inference."""
        ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
        with torch.device("meta"):
            model = cls(llama_config(ckpt.config), dtype=dtype)
        ckpt.load_into(model.model, "language_model.model.", dtype, device)
        if model.lm_head is not None:
            ckpt.load_into(model.lm_head, "language_model.lm_head.", dtype, device)
        # A tied checkpoint that still stores lm_head.weight holds a copy of the table: ignored.
        return model.prepare()

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def prepare(self) -> LlamaForCausalLM:
        """Fuse and reorder the weights for inference (see `shared.layers`), compute the RoPE table."""
        self.eval().requires_grad_(False)
        for layer in self.model.layers:
            layer.prepare()
        head = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        self.head = prepare_weight(head)
        if self.lm_head is not None:
            del self.lm_head
            self.lm_head = None
        self.rope = rope_table(self.config.rope, self.config.head_dim, self.config.max_position_embeddings, self.device)
        self.prepared = True
        return self

    def new_cache(self, max_batch: int, max_seq_len: int) -> KVCache:
        if max_seq_len > self.config.max_position_embeddings:
            raise ValueError(
                f"max_seq_len {max_seq_len} exceeds the model's context of {self.config.max_position_embeddings}"
            )
        return KVCache(self.config, max_batch, max_seq_len, self.dtype, self.device)

    # -- forward pieces -----------------------------------------------------------

    def embed(self, ids: Tensor, ranges: Tensor | None = None, rows: Tensor | None = None) -> Tensor:
        """ids: Long[N] (text IDs, or container IDs when ranges/rows are given) → [N, D]."""
        table = self.model.embed_tokens.weight
        if ranges is None:
            return F.embedding(ids, table)
        return multimodal_embedding(ids, table, ranges, rows)

    def forward(self, x: Tensor, cache: KVCache, batch: ForwardBatch) -> Tensor:
        """x: [N, D] embeddings → [N, D] final hidden states; writes the N tokens' keys and values."""
        for i, layer in enumerate(self.model.layers):
            x = layer.forward(x, cache.k[i], cache.v[i], batch)
        return self.model.norm.forward(x)

    def logits(self, hidden: Tensor) -> Tensor:
        """hidden: [N, D] → [N, V] float32."""
        return linear(hidden, self.head).float()

    # -- the two forwards the engine runs -------------------------------------------

    @torch.inference_mode()
    def prefill(
        self,
        ids: Tensor,
        cache: KVCache,
        row: int,
        start: int = 0,
        ranges: Tensor | None = None,
        rows: Tensor | None = None,
        all_logits: bool = False,
    ) -> Tensor:
        """ids: Long[S], the prompt (from `start` on) of the sequence in cache row `row`.

        ranges/rows: the bound containers (see `cuda_ext.multimodal_embedding`).
        Returns logits [1, V] of the last token, or [S, V] with `all_logits`.
        """
        n = ids.shape[0]
        if not 0 < start + n <= cache.max_seq_len:
            raise ValueError(f"{start + n} positions do not fit a cache of {cache.max_seq_len}")
        batch = ForwardBatch.for_prefill(self.rope, row, start, n)
        hidden = self.forward(self.embed(ids, ranges, rows), cache, batch)
        return self.logits(hidden if all_logits else hidden[-1:])

    @torch.inference_mode()
    def decode(self, ids: Tensor, positions: list[int], cache: KVCache) -> Tensor:
        """ids: Long[N] text tokens for cache rows 0…N-1 at `positions` (host ints) → logits [N, V]."""
        batch = ForwardBatch.for_decode(self.rope, positions, cache, self.config.num_kv_heads, self.dtype)
        return self.logits(self.forward(self.embed(ids), cache, batch))
