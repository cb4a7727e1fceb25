"""The decoder blocks of the language models (Llama, Qwen2, Mistral, Gemma 3).

A family's file builds its blocks from these; what differs between families is a
field of `DecoderConfig` (QKV biases, RoPE scaling, tied head; Mistral's sliding window;
Gemma 3's norm offset, embedding scale, post-norms, QK-norm, query scale, GeGLU,
sliding and global layers with two RoPE bases, bidirectional image attention), not
a subclass.

Modules are built on the meta device with the checkpoint's own parameter names,
filled by `Checkpoint.load_into`, then `prepare()`d for inference: projections
sharing an input are fused (QKV, gate/up), the RoPE rows of Q and K are
interleaved so rotation is one complex multiply, and on the CPU the weights are
packed in panels of 16 outputs for the CPU decode kernels (`cuda_ext.decode`), whose
products then run every forward, decode, prefill and mixed (where the kernels are
unavailable: oneDNN's blocked layout for torch's GEMM). After
`prepare()` the state dict no longer mirrors the checkpoint: these modules are
inference-only.

Token tensors are flat, `[N, D]` with N the tokens of this forward (one per sequence
when decoding, one sequence's tokens when prefilling, or several of either: a `MixedBatch`);
`ForwardBatch` says where each token sits in the paged KV cache (`KVCache`) and which
positions it attends over.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cuda_ext.decode.ops import KERNEL_ACTIVATIONS, cpu_decode_ops, pack_panels
from shared.modeling.layers import (
    RMSNorm,
    RopeConfig,
    apply_rope,
    interleave_rope_rows,
    linear,
    linear_add,
    prepare_weight,
)

# The gated MLP's activations by config name: SwiGLU (Llama, Qwen2, Mistral) and Gemma's GeGLU.
GATE_ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
}
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class DecoderConfig:
    """The shape and quirks of a decoder-only transformer language model."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: biases on Q, K, V
    mlp_bias: bool = False
    hidden_act: str = "silu"  # the gated MLP's activation: silu (SwiGLU) or gelu_pytorch_tanh (Gemma's GeGLU)
    # A token attends to the last `sliding_window` positions, itself included: in every layer (Mistral),
    # or in the "sliding_attention" layers of `layer_types` (Gemma 3).
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None  # Gemma 3: "sliding_attention" or "full_attention", one per layer
    rope_local: RopeConfig | None = None  # Gemma 3: the sliding layers' RoPE (its own base); None: `rope`
    norm_offset: float = 0.0  # Gemma: every RMSNorm scales by (offset + weight), in float32
    post_norms: bool = False  # Gemma 3: attention and MLP outputs are normed before their residual adds
    qk_norm: bool = False  # Gemma 3: an RMSNorm over each head of Q and of K, before RoPE
    query_scale: float | None = None  # the softmax scale; None: 1/√head_dim (Gemma 3: query_pre_attn_scalar^-½)
    embed_scale: float | None = None  # Gemma: text embeddings times √hidden; container rows are not scaled
    bidirectional_images: bool = False  # Gemma 3: in prefill, the tokens of one image attend to each other both ways

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.hidden_act not in GATE_ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; supported: {', '.join(GATE_ACTIVATIONS)}")
        if self.mlp_bias:
            raise ValueError("mlp_bias is not supported yet")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be positive, got {self.sliding_window}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers or not set(self.layer_types) <= set(LAYER_TYPES):
                raise ValueError(f"layer_types must name one of {', '.join(LAYER_TYPES)} for each of {self.num_layers} layers, got {list(self.layer_types)}")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ValueError("sliding_attention layers need a sliding_window")

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of layer `layer`; None where it attends to every earlier position."""
        if self.layer_types is None or self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


# ---------------------------------------------------------------------------
# KV cache and the description of one forward


class KVCache:
    """Keys and values in `num_blocks` blocks of `block_size` positions each, allocated once (a paged cache).

    k, v: [layers, num_blocks, kv_heads, block_size, head_dim]. A sequence's positions live in the
    blocks of its block table, in order: position p is at offset p % block_size of block
    table[p // block_size]. The owner (the engine) hands out blocks and tracks which positions are
    valid. `num_blocks` rows of `block_size` positions, with row b's table [b], is the unpaged cache
    of `max_batch` × `max_seq_len` (`LlamaForCausalLM.new_cache`).
    """

    def __init__(self, config: DecoderConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device):
        shape = (config.num_layers, num_blocks, config.num_kv_heads, block_size, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = config.num_kv_heads

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def copy_positions(self, source: int, target: int, count: int) -> None:
        """The keys and values of the first `count` positions of block `source` into block `target`, every layer."""
        self.k[:, target, :, :count] = self.k[:, source, :, :count]
        self.v[:, target, :, :count] = self.v[:, source, :, :count]

    def flat_rows(self, tables: Tensor, positions: Tensor) -> Tensor:
        """tables: Long[R, blocks], positions: Long[R, T] → Long[R, T, kv_heads]: where each (position, KV head)
        of row r sits in a layer's cache viewed as [num_blocks * kv_heads * block_size, hd]."""
        bs, hkv = self.block_size, self.num_kv_heads
        blocks = torch.gather(tables, 1, positions // bs)  # [R, T]
        heads = torch.arange(hkv, device=tables.device)
        return (blocks[..., None] * hkv + heads) * bs + (positions % bs)[..., None]

    def table(self, blocks: Sequence[int] | int, end: int) -> Tensor:
        """A block table as Long[1, n] for positions 0 … end-1; an int b is row b of an unpaged cache ([b])."""
        blocks = [blocks] if isinstance(blocks, int) else list(blocks)
        if not 0 < end <= len(blocks) * self.block_size:
            raise ValueError(f"{end} positions do not fit {len(blocks)} blocks of {self.block_size}")
        if not all(0 <= b < self.num_blocks for b in blocks):
            raise ValueError(f"block table {blocks} names blocks outside the cache's {self.num_blocks}")
        return torch.tensor([blocks], device=self.k.device)


@dataclass
class ForwardBatch:
    """Where the N tokens of one forward go, computed once and shared by every layer of a kind.

    Two shapes of forward:
    - prefill: N consecutive tokens of one sequence, positions `start … start+N-1`;
    - decode: one token for each of N sequences, sequence b at position `positions[b]`.
    Either way every token's keys go to `write_index`, and a query of row r attends over the
    first `kv_len` positions of row r's block table (a prefill is one row).
    """

    rotations: Tensor  # [N, 1, hd/2] complex: RoPE of each token
    decode: bool
    write_index: Tensor  # Long[N * kv_heads]: flat cache rows (see `KVCache.flat_rows`) of each token's K and V
    read_index: Tensor  # Long[R, kv_heads, kv_len]: flat cache rows of the keys each row attends over (the torch path)
    block_table: Tensor  # Long[R, blocks]: each row's blocks (the CPU decode kernel reads through it)
    kv_len: int  # positions each query attends over (a prefix of its row's positions)
    start: int = 0  # prefill: the first token's position
    mask: Tensor | None = None  # decode: [N, 1, 1, kv_len] additive (0 / -inf); None when every row sees all kv_len.
    # prefill: [N, kv_len] bool (True: attend) when it is not plain causal (a sliding window, image blocks), else None.

    @classmethod
    def for_prefill(
        cls, rope: Tensor, cache: KVCache, table: Sequence[int] | int, start: int, length: int, rotations: Tensor | None = None,
        sliding_window: int | None = None, blocks: Tensor | None = None,
    ) -> ForwardBatch:
        """table: the sequence's block table (an int b: row b of an unpaged cache), covering start + length positions.

        rotations: [length, 1, hd/2] when the tokens' RoPE positions are not start … start+length-1 (M-RoPE).
        sliding_window: query at position p sees keys p - window < k ≤ p (transformers' sliding causal mask).
        blocks: Long[length], each token's image block (-1: text), from `image_blocks`: tokens of one
        block also see each other's later positions (Gemma 3). As transformers composes it, the window
        still applies: (causal or same block) and within the window.
        """
        device = rope.device
        end, mask = start + length, None
        tables = cache.table(table, end)  # [1, blocks]
        if rotations is None:
            rotations = rope[start:end].unsqueeze(1)
        windowed = sliding_window is not None and end > sliding_window
        if windowed or blocks is not None:
            query = torch.arange(start, end, device=device)[:, None]  # [N, 1]
            key = torch.arange(end, device=device)[None, :]  # [1, T]
            mask = key <= query  # [N, T]
            if blocks is not None:
                # Keys before `start` are earlier chunks or a cached prefix, all visible already. A chunk may start
                # inside an image whose first tokens are cached: they were computed with the whole image present
                # (the prefix cache keys such a block on the rest of the image too), and this chunk holds the rest.
                key_blocks = F.pad(blocks, (start, 0), value=-1)  # [T]
                mask |= (blocks[:, None] == key_blocks[None, :]) & (blocks[:, None] >= 0)
            if windowed:
                mask &= key > query - sliding_window
        positions = torch.arange(end, device=device)[None, :]  # [1, T]
        rows = cache.flat_rows(tables, positions)  # [1, T, Hkv]
        return cls(rotations=rotations, decode=False, write_index=rows[0, start:].reshape(-1), read_index=rows.transpose(1, 2),
                   block_table=tables, kv_len=end, start=start, mask=mask)

    @classmethod
    def for_decode(
        cls, rope: Tensor, positions: list[int], cache: KVCache, num_kv_heads: int, dtype, rope_positions: list[int] | None = None,
        sliding_window: int | None = None, tables: list[list[int]] | None = None, limits: list[int] | None = None,
    ) -> ForwardBatch:
        """positions[b]: where row b's token goes; host ints, so building the batch needs no device sync.

        rope_positions[b]: row b's RoPE position when it is not its cache position (M-RoPE:
        text after an image continues from the image's largest position + 1).
        tables[b]: row b's block table, covering positions[b] + 1 positions; None: row b of an unpaged cache ([b]).
        limits[b]: the last position row b sees, where not positions[b]: a prompt token inside an image that
        attends both ways (Gemma 3) sees the whole image, whose later tokens are rows of the same forward.
        """
        device = rope.device
        n, kv_len = len(positions), max(positions) + 1
        if tables is None:
            tables = [[b] for b in range(n)]
        width = max(len(t) for t in tables)
        # Shorter tables padded with block 0: the positions they would name are past that row's end, masked.
        table = torch.tensor([t + [0] * (width - len(t)) for t in tables], device=device)  # [N, blocks]
        if kv_len > width * cache.block_size or any(p >= len(t) * cache.block_size for p, t in zip(positions, tables)):
            raise ValueError(f"positions {positions} do not fit block tables {tables} of {cache.block_size}-position blocks")
        pos = torch.tensor(positions, device=device)  # [N]
        write_index = cache.flat_rows(table, pos[:, None]).reshape(-1)  # [N * Hkv]
        read_index = cache.flat_rows(table, torch.arange(kv_len, device=device).expand(n, kv_len)).transpose(1, 2)  # [N, Hkv, T]
        mask = None
        windowed = sliding_window is not None and kv_len > sliding_window
        last = positions if limits is None else limits  # the last position each row sees
        if windowed or any(p != kv_len - 1 for p in last):  # rows of different lengths: hide each row's unused tail
            keys = torch.arange(kv_len, device=device)[None, :]
            keep = keys <= torch.tensor(last, device=device)[:, None]  # [N, T]
            if windowed:  # and the keys that slid out of the window
                keep &= keys > pos[:, None] - sliding_window
            mask = torch.zeros(n, 1, 1, kv_len, dtype=dtype, device=device)
            mask.masked_fill_(~keep[:, None, None, :], float("-inf"))
        rotations = rope[pos if rope_positions is None else torch.tensor(rope_positions, device=device)].unsqueeze(1)
        return cls(rotations=rotations, decode=True, write_index=write_index, read_index=read_index, block_table=table,
                   kv_len=kv_len, mask=mask)


@dataclass
class MixedBatch:
    """Several parts in one forward: a decode batch and prefill chunks of one or more sequences. Their tokens
    (the parts' in order) go through the projections and MLPs together, one read of every weight, and each
    part attends as it would alone."""

    parts: list[ForwardBatch]
    decode = False  # the fused decode kernel does not take a chunk: the torch layer runs

    def __post_init__(self):
        self.sizes = [part.rotations.shape[0] for part in self.parts]  # tokens of each part
        self.rotations = torch.cat([part.rotations for part in self.parts])  # [N, 1, hd/2]
        self.write_index = torch.cat([part.write_index for part in self.parts])  # [N * kv_heads]


@dataclass(frozen=True)
class Chunk:
    """Prompt tokens of one sequence for a forward: ids Long[S] at positions start … start+S-1 of its block
    table; ranges/rows: its bound containers; positions: RoPE positions where they are not the cache's (M-RoPE);
    final: the chunk ends its prompt, and its last token's logits are wanted. layers: the decoder layers
    [first, last) it runs through (None: all), from `hidden` [S, D], its tokens' input to layer `first` (what the
    forward that ran the layers before returned; None from layer 0)."""

    ids: Tensor
    table: Sequence[int]
    start: int = 0
    ranges: Tensor | None = None
    rows: Tensor | None = None
    positions: Tensor | None = None
    final: bool = True
    layers: tuple[int, int] | None = None
    hidden: Tensor | None = None


def image_blocks(ids: Tensor, base: int) -> Tensor | None:
    """ids: Long[N] → Long[N], each run of IDs ≥ `base` (one image's container rows) numbered 0, 1, …, text -1;
    None when there is no image. transformers' `token_type_ids` blocks: a run is one image."""
    is_image = ids >= base  # [N]
    if not bool(is_image.any()):
        return None
    starts = is_image & ~F.pad(is_image, (1, 0))[:-1]  # an image token after a text token
    return torch.where(is_image, starts.cumsum(0) - 1, -1)


def image_limits(ids: Tensor, start: int, base: int) -> list[int]:
    """ids: Long[S] at positions start … start+S-1 → the last position each token attends to where images attend
    both ways: its own for text, its image's last (a run of IDs ≥ `base`, as `image_blocks` counts) for an image's."""
    limits = list(range(start, start + ids.shape[0]))
    is_image = (ids >= base).tolist()
    for i in reversed(range(len(limits) - 1)):
        if is_image[i] and is_image[i + 1]:
            limits[i] = limits[i + 1]
    return limits


# ---------------------------------------------------------------------------
# Attention and MLP


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE over a preallocated KV cache (transformers' parameter names)."""

    def __init__(self, config: DecoderConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        d, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(d, config.q_size, bias=bias, device=device, dtype=dtype)
        self.k_proj = nn.Linear(d, config.kv_size, bias=bias, device=device, dtype=dtype)
        self.v_proj = nn.Linear(d, config.kv_size, bias=bias, device=device, dtype=dtype)
        self.o_proj = nn.Linear(config.q_size, d, bias=False, device=device, dtype=dtype)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, device, dtype, config.norm_offset)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, device, dtype, config.norm_offset)

    def prepare(self, ops: Any | None = None) -> None:
        """Fuse Q, K, V into one projection with RoPE-interleaved rows; drop the originals. ops: the CPU decode
        kernels (`cuda_ext.decode.ops.cpu_decode_ops`): pack the weights for them (`pack_panels`), and attend
        decode rows with their `paged_attention`; None: `prepare_weight`, torch attention.

        The softmax scale (1/√head_dim, or `query_scale`) is folded into Q's rows (exact
        for the usual power-of-two head sizes), so attention needs no separate scaling op.
        With QK-norm the norm would undo that, so the scale goes into Q's norm weight
        instead, and the per-head norm weights are interleaved like the rows they scale.
        """
        c = self.config
        scale = c.head_dim**-0.5 if c.query_scale is None else c.query_scale
        row_scale = 1.0 if c.qk_norm else scale
        weights = [
            interleave_rope_rows(self.q_proj.weight, c.num_heads, c.head_dim) * row_scale,
            interleave_rope_rows(self.k_proj.weight, c.num_kv_heads, c.head_dim),
            self.v_proj.weight,
        ]
        prepare = pack_panels if ops is not None else prepare_weight
        self.paged_attention = None if ops is None else ops.paged_attention.default
        self.wqkv = prepare(torch.cat(weights))
        self.bqkv = None
        if c.attention_bias:
            self.bqkv = torch.cat([
                interleave_rope_rows(self.q_proj.bias, c.num_heads, c.head_dim) * row_scale,
                interleave_rope_rows(self.k_proj.bias, c.num_kv_heads, c.head_dim),
                self.v_proj.bias,
            ]).detach()
        self.qk_scale = None
        if c.qk_norm:
            for norm in (self.q_norm, self.k_norm):
                norm.prepare()
            q_scale = interleave_rope_rows(self.q_norm.scale, 1, c.head_dim) * scale  # [hd] float32
            k_scale = interleave_rope_rows(self.k_norm.scale, 1, c.head_dim)
            self.qk_scale = torch.cat([q_scale.expand(c.num_heads, -1), k_scale.expand(c.num_kv_heads, -1)])  # [H + Hkv, hd]
            del self.q_norm, self.k_norm
        self.wo = prepare(self.o_proj.weight)
        del self.q_proj, self.k_proj, self.v_proj, self.o_proj

    def forward(self, x: Tensor, residual: Tensor | None, k_cache: Tensor, v_cache: Tensor, batch: ForwardBatch) -> Tensor:
        """x: [N, D] normed input, residual: [N, D] or None; k/v_cache: [blocks, Hkv, block_size, hd] → residual + attention: [N, D]
        (the attention output alone without a residual)."""
        c = self.config
        n, h, hkv, hd = x.shape[0], c.num_heads, c.num_kv_heads, c.head_dim
        qkv = linear(x, self.wqkv, self.bqkv)  # [N, (H + 2 Hkv) hd]
        qk = qkv[:, : c.q_size + c.kv_size].view(n, h + hkv, hd)  # [N, H + Hkv, hd]
        if self.qk_scale is not None:  # QK-norm over each head, in float32 (Gemma's norm), softmax scale in Q's weights
            qk = (F.rms_norm(qk.float(), (hd,), None, c.rms_norm_eps) * self.qk_scale).to(x.dtype)
        qk = apply_rope(qk, batch.rotations)  # [N, H + Hkv, hd]
        q, k = qk[:, :h], qk[:, h:]  # [N, H, hd], [N, Hkv, hd]
        v = qkv[:, c.q_size + c.kv_size :].view(n, hkv, hd)  # [N, Hkv, hd]

        # The cache layer viewed as [num_blocks * kv_heads * block_size, hd]: every token's K and V in one index_copy_.
        k_cache.view(-1, hd).index_copy_(0, batch.write_index, k.reshape(-1, hd))
        v_cache.view(-1, hd).index_copy_(0, batch.write_index, v.reshape(-1, hd))
        if isinstance(batch, MixedBatch):  # each part over its own tokens
            out = torch.cat([self.attend(*part_qkv, k_cache, v_cache, part)
                             for *part_qkv, part in zip(q.split(batch.sizes), k.split(batch.sizes), v.split(batch.sizes), batch.parts)])
        else:
            out = self.attend(q, k, v, k_cache, v_cache, batch)
        if residual is None:
            return linear(out.reshape(n, c.q_size), self.wo)
        return linear_add(out.reshape(n, c.q_size), self.wo, residual)


    def attend(self, q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, batch: ForwardBatch) -> Tensor:
        """q: [N, H, hd], this forward's k, v: [N, Hkv, hd] (in the cache layer k/v_cache: [blocks, Hkv,
        block_size, hd] already) → attention output [N, H, hd]."""
        n, h, hd = q.shape
        hkv = k.shape[1]
        if batch.decode and self.paged_attention is not None:
            # Through the block tables, no gathered copy of the keys: a step that prefills too (the decode kernel
            # runs the others whole) attends its decode rows here. 24 rows at 230 keys beside two 216-token chunks,
            # bench-small, 2026-12-06: the gather, matmuls and softmax were ~15% of the step.
            return self.paged_attention(q.contiguous(), k_cache, v_cache, batch.block_table, batch.kv_len, batch.mask)
        k_rows, v_rows = k_cache.view(-1, hd), v_cache.view(-1, hd)  # [blocks * Hkv * block_size, hd]
        if batch.decode:
            # One query per sequence. The heads sharing a KV head are stacked as that head's queries
            # ([N, Hkv, group, hd]), so grouped-query attention reads each key once, with no repeats.
            # Plain matmul/softmax: for one query per row the CPU SDPA kernel costs several times more.
            keys, values = k_rows[batch.read_index], v_rows[batch.read_index]  # [N, Hkv, T, hd], gathered from the blocks
            scores = torch.matmul(q.reshape(n, hkv, h // hkv, hd), keys.transpose(2, 3))  # [N, Hkv, group, T]
            if batch.mask is not None:
                scores.add_(batch.mask)
            return torch.matmul(scores.softmax(-1), values).view(n, h, hd)  # [N, Hkv, group, hd] → [N, H, hd]
        q = q.transpose(0, 1).unsqueeze(0)  # [1, H, N, hd]
        if batch.start == 0 and batch.mask is None:
            keys, values = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)  # [1, Hkv, N, hd]
            out = F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=1.0, enable_gqa=True)
        else:
            # Continuing a cached prefix: query i sees positions ≤ start + i (and within the sliding window).
            keys, values = k_rows[batch.read_index], v_rows[batch.read_index]  # [1, Hkv, T, hd]
            mask = batch.mask if batch.mask is not None else torch.ones(n, batch.kv_len, dtype=torch.bool, device=q.device).tril(batch.start)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=1.0, enable_gqa=True)
        return out[0].transpose(0, 1)  # [N, H, hd]


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), act silu or Gemma's tanh GELU (transformers' parameter names)."""

    def __init__(self, config: DecoderConfig, device=None, dtype=None):
        super().__init__()
        d, i = config.hidden_size, config.intermediate_size
        self.act = GATE_ACTIVATIONS[config.hidden_act]
        self.gate_proj = nn.Linear(d, i, bias=False, device=device, dtype=dtype)
        self.up_proj = nn.Linear(d, i, bias=False, device=device, dtype=dtype)
        self.down_proj = nn.Linear(i, d, bias=False, device=device, dtype=dtype)

    def prepare(self, panels: bool = False) -> None:
        """Fuse gate and up into one projection (one weight read, one call); panels: pack the weights for the CPU
        decode kernels (`pack_panels`), else `prepare_weight`."""
        prepare = pack_panels if panels else prepare_weight
        self.w_gate_up = prepare(torch.cat([self.gate_proj.weight, self.up_proj.weight]))
        self.w_down = prepare(self.down_proj.weight)
        del self.gate_proj, self.up_proj, self.down_proj

    def forward(self, x: Tensor, residual: Tensor | None) -> Tensor:
        """x: [N, D] normed input → residual + MLP(x): [N, D] (MLP(x) alone without a residual)."""
        gate, up = linear(x, self.w_gate_up).chunk(2, dim=-1)  # [N, I] each
        hidden = self.act(gate).mul_(up)  # [N, I]
        if residual is None:
            return linear(hidden, self.w_down)
        return linear_add(hidden, self.w_down, residual)


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attention(norm(x)), then + mlp(norm(x)).

    With `post_norms` (Gemma 3) each output is normed too: x + norm(attention(norm(x))), then
    x + norm(mlp(norm(x))); Gemma names the norms input_layernorm, post_attention_layernorm,
    pre_feedforward_layernorm and post_feedforward_layernorm, where Llama's post_attention_layernorm
    is the norm before the MLP.
    """

    def __init__(self, config: DecoderConfig, device=None, dtype=None):
        super().__init__()
        norm = functools.partial(RMSNorm, config.hidden_size, config.rms_norm_eps, device, dtype, config.norm_offset)
        self.self_attn = Attention(config, device, dtype)
        self.mlp = GatedMLP(config, device, dtype)
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        self.post_norms = config.post_norms
        if config.post_norms:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()

    def prepare(self) -> None:
        """Prepare the blocks; on the CPU in float32 decode steps go to one fused kernel (`cuda_ext.decode`),
        and every product, the torch path's too, to its kernels over panel-packed weights."""
        weight = self.input_layernorm.weight
        ops = cpu_decode_ops(weight.device, weight.dtype)
        self.fused_decode = None if ops is None else ops.decode_layer.default
        self.self_attn.prepare(ops)
        self.mlp.prepare(panels=ops is not None)
        for module in self.children():
            if isinstance(module, RMSNorm):
                module.prepare()
        if ops is not None:  # gathered once: each submodule attribute read is an nn.Module.__getattr__, ~1 µs a step
            attn, mlp, c = self.self_attn, self.mlp, self.self_attn.config
            if self.post_norms:  # Gemma 3: the MLP's input norm, and a norm after each block's output
                mlp_norm, out_norms = self.pre_feedforward_layernorm, (self.post_attention_layernorm, self.post_feedforward_layernorm)
            else:
                mlp_norm, out_norms = self.post_attention_layernorm, (None, None)
            self.fused_weights = (self.input_layernorm.effective_weight, attn.wqkv.data, attn.bqkv, attn.wo.data,
                                  mlp_norm.effective_weight, mlp.w_gate_up.data, mlp.w_down.data)
            self.fused_options = (attn.qk_scale, *(None if n is None else n.effective_weight for n in out_norms),
                                  KERNEL_ACTIVATIONS[c.hidden_act])
            self.fused_eps = c.rms_norm_eps

    def forward(self, x: Tensor, k_cache: Tensor, v_cache: Tensor, batch: ForwardBatch) -> Tensor:
        if batch.decode and self.fused_decode is not None:
            return self.fused_decode(x, *self.fused_weights, k_cache, v_cache, batch.rotations, batch.write_index, batch.block_table,
                                     batch.kv_len, batch.mask, self.fused_eps, *self.fused_options)
        # .forward() directly: per-layer module-call overhead is a measurable share of a CPU decode step.
        if not self.post_norms:
            x = self.self_attn.forward(self.input_layernorm.forward(x), x, k_cache, v_cache, batch)
            return self.mlp.forward(self.post_attention_layernorm.forward(x), x)
        # The residual adds follow the post-norms, so they cannot be fused into the output projections.
        x = x + self.post_attention_layernorm.forward(self.self_attn.forward(self.input_layernorm.forward(x), None, k_cache, v_cache, batch))
        return x + self.post_feedforward_layernorm.forward(self.mlp.forward(self.pre_feedforward_layernorm.forward(x), None))
