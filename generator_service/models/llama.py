"""Llama (LLaVA-1.5) and Mistral (Pixtral, Mistral 3.1), the decoder language models, in vlmq's own torch code.

Loads `language_model.*` tensors of a Hugging Face checkpoint (the `text_config`
of the multimodal config) and matches `transformers`' `LlamaForCausalLM` /
`MistralForCausalLM` numerically: Mistral is Llama with other config defaults
and an optional sliding attention window (a `DecoderConfig` field). Two
forwards, both over a paged `KVCache` the caller owns (each sequence a block table):

- `prefill`: consecutive tokens of one sequence (its prompt, or a chunk of it after a cached or
  earlier part); prompt IDs ≥ EMBEDDING_INDEX_BASE read their container's rows
  (`cuda_ext.gather.ops.multimodal_embedding`);
- `decode`: one new token for each of N sequences, each at its own position.

`new_cache(rows, seq_len)` with an int for the block table is the unpaged case: row b is block b.

Qwen2-VL (`qwen2.py`) and Gemma 3 (`gemma3.py`) are this class with their own
`read_config`. Where layers differ in window and RoPE (Gemma 3's sliding and global
layers), each forward builds one `ForwardBatch` per kind of layer (`kinds`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cuda_ext.decode.ops import cpu_decode_ops, pack_panels
from cuda_ext.gather.ops import multimodal_embedding
from generator_service.models.decoder import (
    Chunk,
    DecoderConfig,
    DecoderLayer,
    ForwardBatch,
    KVCache,
    MixedBatch,
    image_blocks,
    image_limits,
)
from shared.config.errors import CheckpointError
from shared.modeling.checkpoint import Checkpoint
from shared.modeling.layers import (
    RMSNorm,
    RopeConfig,
    linear,
    mrope_components,
    prepare_weight,
    rope_rotations,
    rope_table,
)
from shared.store.token_ids import EMBEDDING_INDEX_BASE

# Up to how many chunk tokens, attending over how many keys in all, a step runs them as decode rows of the
# fused decode kernel (`LlamaForCausalLM._rows_of_one_decode`).
FUSED_CHUNK_TOKENS = 128
FUSED_CHUNK_KEYS = 32768

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


# transformers' MistralConfig defaults, for the fields Pixtral / Mistral 3.1 configs may leave out.
_MISTRAL_DEFAULTS = _LLAMA_DEFAULTS | {
    "intermediate_size": 14336,
    "num_key_value_heads": 8,
    "max_position_embeddings": 4096 * 32,
    "sliding_window": 4096,
}

# text_config model_type → its defaults; a config naming none is Llama (older LLaVA configs).
_TEXT_DEFAULTS = {"llama": _LLAMA_DEFAULTS, "mistral": _MISTRAL_DEFAULTS}


def _tie_word_embeddings(config: dict, text: dict) -> bool:
    """Whether the head is the embedding table, as transformers 5 decides it: by the outer config of a
    multimodal model (Mistral3Config defaults to tied; LlavaConfig also ties when its text_config does)."""
    if "text_config" not in config:
        return bool(config.get("tie_word_embeddings", False))
    if config.get("model_type") == "mistral3":
        return bool(config.get("tie_word_embeddings", True))
    return bool(config.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False))


def llama_config(config: dict) -> DecoderConfig:
    """A `DecoderConfig` from a checkpoint's config.json (multimodal: its `text_config`), Llama or Mistral."""
    text = config.get("text_config", config)
    model_type = text.get("model_type", "llama")
    if model_type not in _TEXT_DEFAULTS:
        raise CheckpointError(f"unsupported language model {model_type!r}; supported: {', '.join(_TEXT_DEFAULTS)}")
    text = {**_TEXT_DEFAULTS[model_type], **text}
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
            tie_word_embeddings=_tie_word_embeddings(config, text),
            attention_bias=text["attention_bias"],
            mlp_bias=text["mlp_bias"],
            hidden_act=text["hidden_act"],
            sliding_window=text.get("sliding_window"),
        )
    except ValueError as exc:  # unsupported RoPE type or activation, heads not a multiple of KV heads
        raise CheckpointError(f"unsupported Llama config: {exc}") from None


class LlamaModel(nn.Module):
    """Embedding table, decoder layers, final norm (named as `language_model.model.*`)."""

    def __init__(self, config: DecoderConfig, device=None, dtype=None):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, device=device, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(config, device, dtype) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, device, dtype, config.norm_offset)


class LlamaForCausalLM(nn.Module):
    read_config = staticmethod(llama_config)  # config.json → DecoderConfig; other families bring their own

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
        """Build on the meta device, load the language-model tensors only, prepare for inference.

        Each decoder layer is prepared as soon as it is loaded, which drops its weights as loaded: a checkpoint
        saved in 16 bits, whose layers the CPU decode kernels keep in 16 bits (`pack_panels`), is then never all in
        `dtype` at once (by arithmetic, LLaVA-1.5-7B's layers in float16 take 13 GB, in float32 26)."""
        ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
        with torch.device("meta"):
            model = cls(cls.read_config(ckpt.config), dtype=dtype)
        prefix = "language_model.model."
        ckpt.check_names(model.model, prefix)  # every name before any tensor is read
        for name in ("embed_tokens", "norm"):
            ckpt.load_into(getattr(model.model, name), f"{prefix}{name}.", dtype, device)
        for i, layer in enumerate(model.model.layers):
            ckpt.load_into(layer, f"{prefix}layers.{i}.", dtype, device).requires_grad_(False).prepare()
        if model.lm_head is not None:
            ckpt.load_into(model.lm_head, "language_model.lm_head.", dtype, device)
        elif ckpt.tensor_names("language_model.lm_head."):
            # Tied by config, yet stored: transformers ties a head that is a copy of the table and keeps one that
            # differs (published Mistral 3.1 configs leave tie_word_embeddings to Mistral3Config's default, True).
            head = ckpt.load_tensors("language_model.lm_head.", dtype, device)["weight"]
            if not torch.equal(head, model.model.embed_tokens.weight):
                model.lm_head = nn.Linear(head.shape[1], head.shape[0], bias=False, device="meta")
                model.lm_head.load_state_dict({"weight": head}, assign=True)
        return model.prepare(layers=False)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def prepare(self, layers: bool = True) -> LlamaForCausalLM:
        """Fuse and reorder the weights for inference (see `shared.modeling.layers`), compute the RoPE tables.
        layers=False: the decoder layers are prepared already (`from_checkpoint` prepares each as it loads it)."""
        c = self.config
        self.eval().requires_grad_(False)
        for layer in self.model.layers if layers else ():
            layer.prepare()
        self.model.norm.prepare()
        head = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        # With the CPU decode kernels the head is packed in panels like the layers' weights: 8 decode rows read
        # bench-small's 49152 × 576 head in 6.5 ms where the row-major kernel took 14.5 (2026-12-06), a third of a
        # batch-8 step. A tied head then costs a second copy of the table, which the lookups read row-major.
        kernels = cpu_decode_ops(self.device, self.dtype) is not None
        self.head = pack_panels(head) if kernels else prepare_weight(head)
        if self.lm_head is not None:
            del self.lm_head
            self.lm_head = None
        self.rope = rope_table(c.rope, c.head_dim, c.max_position_embeddings, self.device)
        rope_local = self.rope if c.rope_local is None else rope_table(c.rope_local, c.head_dim, c.max_position_embeddings, self.device)
        # The layers' attention kinds, (RoPE table, sliding window): one for Llama, Qwen2 and Mistral; Gemma 3's
        # global and sliding layers are two. Every layer of a kind shares one ForwardBatch per forward.
        windows = [c.layer_window(i) for i in range(c.num_layers)]
        distinct = list(dict.fromkeys(windows))
        self.kinds = [(self.rope if w is None else rope_local, w) for w in distinct]
        self.layer_kind = [distinct.index(w) for w in windows]  # layer i → its kind in self.kinds
        # A 0-d tensor in the model dtype: the reference multiplies by √hidden rounded to it.
        self.embed_scale = None if c.embed_scale is None else torch.tensor(c.embed_scale).to(self.device, self.dtype)
        section = c.rope.mrope_section
        self.mrope = None if section is None else mrope_components(section, c.head_dim).to(self.device)
        self.prepared = True
        return self

    def new_cache(self, num_blocks: int, block_size: int) -> KVCache:
        """`num_blocks` blocks of `block_size` positions: a paged pool, or `max_batch` rows of `max_seq_len` (table [row])."""
        return KVCache(self.config, num_blocks, block_size, self.dtype, self.device)

    # -- forward pieces -----------------------------------------------------------

    def embed(self, ids: Tensor, ranges: Tensor | None = None, rows: Tensor | None = None) -> Tensor:
        """ids: Long[N] (text IDs, or container IDs when ranges/rows are given) → [N, D]."""
        table = self.model.embed_tokens.weight
        if ranges is None:
            x = F.embedding(ids, table)  # [N, D]
            return x if self.embed_scale is None else x * self.embed_scale
        x = multimodal_embedding(ids, table, ranges, rows)  # [N, D]
        if self.embed_scale is None:
            return x
        # Gemma scales the text rows only: container rows are the projector's output, used as they are.
        return torch.where((ids < EMBEDDING_INDEX_BASE)[:, None], x * self.embed_scale, x)

    def forward(self, x: Tensor, cache: KVCache, batches: list[ForwardBatch | MixedBatch]) -> Tensor:
        """x: [N, D] embeddings, batches: one per attention kind (`self.kinds`) → [N, D] final hidden states;
        writes the N tokens' keys and values."""
        return self.model.norm.forward(self.run_layers(x, cache, batches, 0, len(self.model.layers)))

    def run_layers(self, x: Tensor, cache: KVCache, batches: list[ForwardBatch | MixedBatch], first: int, last: int) -> Tensor:
        """x: [N, D], the input of layer `first` → [N, D], the output of layer `last` - 1 (not normed)."""
        for i in range(first, last):
            x = self.model.layers[i].forward(x, cache.k[i], cache.v[i], batches[self.layer_kind[i]])
        return x

    def logits(self, hidden: Tensor) -> Tensor:
        """hidden: [N, D] → [N, V] float32."""
        return linear(hidden, self.head).float()

    # -- the two forwards the engine runs -------------------------------------------

    def prompt_positions(self, ids: list[int], containers) -> tuple[Tensor | None, int]:
        """RoPE positions of a prompt for `prefill` (None: 0 … len-1) and of the first generated token."""
        return None, len(ids)

    @torch.inference_mode()
    def prefill(
        self,
        ids: Tensor,
        cache: KVCache,
        row: int | Sequence[int],
        start: int = 0,
        ranges: Tensor | None = None,
        rows: Tensor | None = None,
        all_logits: bool = False,
        positions: Tensor | None = None,
    ) -> Tensor:
        """ids: Long[S], the prompt (from `start` on) of the sequence whose block table is `row`
        (an int b: row b of an unpaged cache), which covers start + S positions.

        ranges/rows: the bound containers (see `cuda_ext.gather.ops.multimodal_embedding`).
        positions: the tokens' RoPE positions, Long[S] or Long[3, S] with M-RoPE (see
        `prompt_positions`); default start … start+S-1.
        Returns logits [1, V] of the last token, or [S, V] with `all_logits`.
        """
        batches = self.prefill_batches(ids, cache, row, start, positions)
        hidden = self.forward(self.embed(ids, ranges, rows), cache, batches)
        return self.logits(hidden if all_logits else hidden[-1:])

    def prefill_batches(self, ids: Tensor, cache: KVCache, row: int | Sequence[int], start: int, positions: Tensor | None) -> list[ForwardBatch]:
        """One `ForwardBatch` per attention kind for a prefill (see `prefill`)."""
        n = ids.shape[0]
        if start + n > self.config.max_position_embeddings:
            raise ValueError(f"{start + n} positions exceed the model's context of {self.config.max_position_embeddings}")
        if positions is not None:
            positions = positions.to(self.device)
        # Gemma 3: each image's tokens see each other both ways; a chunk must hold the rest of an image it starts in
        # and must not end inside one (the engine's chunks do neither).
        blocks = image_blocks(ids, EMBEDDING_INDEX_BASE) if self.config.bidirectional_images else None
        return [
            ForwardBatch.for_prefill(rope, cache, row, start, n,
                                     None if positions is None else rope_rotations(rope, positions, self.mrope),
                                     sliding_window=window, blocks=blocks)
            for rope, window in self.kinds
        ]

    @torch.inference_mode()
    def decode(
        self, ids: Tensor, positions: list[int], cache: KVCache, rope_positions: list[int] | None = None,
        tables: list[list[int]] | None = None,
    ) -> Tensor:
        """ids: Long[N] text tokens of N sequences at `positions` (host ints) → logits [N, V].

        rope_positions: each row's RoPE position where it is not its cache position (M-RoPE).
        tables: each row's block table; None: rows 0…N-1 of an unpaged cache.
        """
        return self.logits(self.forward(self.embed(ids), cache, self.decode_batches(positions, cache, rope_positions, tables)))

    def decode_batches(self, positions: list[int], cache: KVCache, rope_positions: list[int] | None,
                       tables: list[list[int]] | None, limits: list[int] | None = None) -> list[ForwardBatch]:
        """One `ForwardBatch` per attention kind for a decode step (see `decode`; limits: `ForwardBatch.for_decode`'s)."""
        return [
            ForwardBatch.for_decode(rope, positions, cache, self.config.num_kv_heads, self.dtype, rope_positions,
                                    sliding_window=window, tables=tables, limits=limits)
            for rope, window in self.kinds
        ]

    @torch.inference_mode()
    def step(
        self, ids: Tensor, positions: list[int], cache: KVCache, rope_positions: list[int] | None, tables: list[list[int]],
        chunks: Sequence[Chunk],
    ) -> tuple[Tensor, Tensor, list[Tensor]]:
        """`decode(ids, positions, cache, rope_positions, tables)` (no rows: ids empty) and a `prefill` of each chunk in
        one forward, every weight read once for all → (logits [N, V], the last token's [F, V] of each of the F chunks
        that are `final` and run to the last layer, the hidden states [S, D] out of each chunk that stops before it).

        A chunk with `layers` joins the other rows for those layers only: the forward runs in spans of layers
        between the chunks' first and last layers, each span with the rows that run through it."""
        num_layers = len(self.model.layers)
        spans = [c.layers or (0, num_layers) for c in chunks]
        # [N, D] of the decode rows, then [S, D] of each chunk: the input of the layer each starts at
        states = [self.embed(ids)] + [self.embed(c.ids, c.ranges, c.rows) if c.hidden is None else c.hidden for c in chunks]
        bounds = sorted({0, num_layers, *(layer for span in spans for layer in span)})
        for first, last in zip(bounds, bounds[1:]):
            active = [j for j, (a, b) in enumerate(spans) if a <= first and last <= b]
            if not ids.numel() and not active:
                continue
            batches = self._step_batches(ids, positions, cache, rope_positions, tables, [chunks[j] for j in active])
            x = torch.cat([states[0]] + [states[j + 1] for j in active])  # [N + Σ active S, D]
            parts = self.run_layers(x, cache, batches, first, last).split([states[0].shape[0]] + [states[j + 1].shape[0] for j in active])
            for j, part in zip([-1, *active], parts):
                states[j + 1] = part
        finals = [states[j + 1][-1:] for j, c in enumerate(chunks) if c.final and spans[j][1] == num_layers]
        logits = self.logits(self.model.norm.forward(torch.cat([states[0], *finals])))  # [N + F, V]
        n = ids.shape[0]
        return logits[:n], logits[n:], [states[j + 1] for j in range(len(chunks)) if spans[j][1] < num_layers]

    def _step_batches(self, ids: Tensor, positions: list[int], cache: KVCache, rope_positions: list[int] | None,
                      tables: list[list[int]], chunks: Sequence[Chunk]) -> list[ForwardBatch | MixedBatch]:
        """One batch per attention kind for the decode rows and then `chunks`' tokens, in that order."""
        if self._rows_of_one_decode(chunks):
            return self.chunk_rows_batches(positions, cache, rope_positions, tables, chunks)
        parts = [self.prefill_batches(c.ids, cache, c.table, c.start, c.positions) for c in chunks]  # [C][kinds]
        if ids.numel():
            parts.insert(0, self.decode_batches(positions, cache, rope_positions, tables))
        return [MixedBatch(list(kind)) if len(parts) > 1 else kind[0] for kind in zip(*parts)]

    def _rows_of_one_decode(self, chunks: Sequence[Chunk]) -> bool:
        """Whether this step's chunks run as decode rows through the fused decode kernel (`chunk_rows_batches`):
        where there is one, and for chunks that attend over few keys: the kernel attends row by row, rereading a
        sequence's keys for each of its tokens, which for long chunks deep into a prompt costs more than the torch
        layers' overhead (~20-40 ms a step on bench-small) saves. bench-small Pixtral, 2026-12-06: 64 tokens at
        positions 100-300 ran 1.34 ms a token this way and 1.57 in the torch layers; at 750-817, 2.43 and 2.01."""
        tokens = sum(c.ids.shape[0] for c in chunks)
        keys = sum(c.ids.shape[0] * (c.start + c.ids.shape[0]) for c in chunks)
        return 0 < tokens <= FUSED_CHUNK_TOKENS and keys <= FUSED_CHUNK_KEYS and self.model.layers[0].fused_decode is not None

    def chunk_rows_batches(self, positions: list[int], cache: KVCache, rope_positions: list[int] | None,
                           tables: list[list[int]], chunks: Sequence[Chunk]) -> list[ForwardBatch]:
        """One decode `ForwardBatch` per attention kind for the decode rows and every chunk token as a row of its own:
        a prompt token at position p attends over its sequence's first p + 1 positions, as a decoding token there
        would (with bidirectional images, a token of an image over the whole image: chunks never split one), and
        the kernel writes every row's keys before any row attends."""
        spans = [range(c.start, c.start + c.ids.shape[0]) for c in chunks]
        row_positions = positions + [p for span in spans for p in span]
        row_tables = tables + [list(c.table) for c, span in zip(chunks, spans) for _ in span]
        limits = None
        if self.config.bidirectional_images:
            limits = positions + [p for c, span in zip(chunks, spans) for p in image_limits(c.ids, span.start, EMBEDDING_INDEX_BASE)]
        batches = self.decode_batches(row_positions, cache, None, row_tables, limits)
        if rope_positions is None and all(c.positions is None for c in chunks):
            return batches  # RoPE at the cache positions, as decode_batches made it
        decode_rope = torch.tensor(positions if rope_positions is None else rope_positions, dtype=torch.long, device=self.device)
        for (rope, _), batch in zip(self.kinds, batches):
            batch.rotations = torch.cat([rope[decode_rope].unsqueeze(1)] + [
                rope[span.start : span.stop].unsqueeze(1) if c.positions is None else rope_rotations(rope, c.positions.to(self.device), self.mrope)
                for c, span in zip(chunks, spans)])  # [N + ΣS, 1, hd/2]
        return batches
