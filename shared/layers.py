"""Layers shared by the decoder-only language models (Llama now; Qwen2, Mistral, Gemma3 next).

A family's file builds its blocks from these; what differs between families is a
field of `DecoderConfig` (QKV biases, RoPE scaling, tied head so far; Gemma's norm
offset and embedding scale, sliding windows … are to be added the same way), not
a subclass.

Modules are built on the meta device with the checkpoint's own parameter names,
filled by `Checkpoint.load_into`, then `prepare()`d for inference: projections
sharing an input are fused (QKV, gate/up), the RoPE rows of Q and K are
interleaved so rotation is one complex multiply, and on the CPU the weights are
reordered into oneDNN's blocked layout, which reads memory at close to the
machine's bandwidth where MKL's sgemm reaches about half of it for the
matrix-vector products of decoding. After `prepare()` the state dict no longer
mirrors the checkpoint: these modules are inference-only.

Token tensors are flat, `[N, D]` with N the tokens of this forward (one per row
when decoding, one sequence's tokens when prefilling); `ForwardBatch` says where
each token sits in the KV cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ---------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding parameters: `default`, `linear` or `llama3` scaling."""

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None

    SUPPORTED = ("default", "linear", "llama3")

    @classmethod
    def from_config(cls, config: dict, default_theta: float = 10000.0) -> RopeConfig:
        """Read `rope_parameters` (transformers ≥ 5) or `rope_scaling` + `rope_theta` (older configs)."""
        params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in cls.SUPPORTED:
            raise ValueError(f"unsupported RoPE type {rope_type!r}; supported: {', '.join(cls.SUPPORTED)}")
        theta = params.get("rope_theta", config.get("rope_theta", default_theta))
        original = params.get("original_max_position_embeddings", config.get("original_max_position_embeddings"))
        if rope_type == "llama3" and original is None:
            original = config.get("max_position_embeddings")  # what transformers falls back to
        return cls(
            rope_type=rope_type,
            theta=float(theta),
            factor=float(params.get("factor", 1.0)),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=original,
        )


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
    hidden_act: str = "silu"

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; supported: silu")
        if self.mlp_bias:
            raise ValueError("mlp_bias is not supported yet")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


# ---------------------------------------------------------------------------
# Linear projections on prepared weights


def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def prepare_weight(weight: Tensor) -> Tensor:
    """The weight in the layout `linear` reads fastest: oneDNN-blocked for CPU float32, as is otherwise."""
    weight = weight.detach().contiguous()
    if weight.device.type == "cpu" and weight.dtype == torch.float32 and _onednn_available():
        # batch_size=None: one layout good for 1-row decoding, batched decoding and prefill alike.
        return torch.ops.mkldnn._reorder_linear_weight(weight, None)
    return weight


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ weightᵀ + bias.  x: [N, K], weight: [M, K] → [N, M]."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def linear_add(x: Tensor, weight: Tensor, residual: Tensor) -> Tensor:
    """x @ weightᵀ + residual in one pass (the residual connection after attention and MLP)."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, None, "add")
    return torch.addmm(residual, x, weight.t())


# ---------------------------------------------------------------------------
# Normalisation


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # one op: it runs twice per layer
        # Normalised in float32, scaled in the input dtype: transformers' rounding in half precision.
        return F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype) * self.weight


# ---------------------------------------------------------------------------
# Rotary position embeddings


def rope_inverse_frequencies(rope: RopeConfig, head_dim: int) -> Tensor:
    """Per-pair rotation speeds [head_dim / 2], with the configured scaling (as transformers computes them)."""
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.rope_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.rope_type == "llama3":
        # Llama 3.1: slow frequencies (long wavelengths) are divided by `factor`, fast ones kept,
        # and the band between is interpolated smoothly.
        old_context = rope.original_max_position_embeddings
        low_freq_wavelen = old_context / rope.low_freq_factor
        high_freq_wavelen = old_context / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_context / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_table(rope: RopeConfig, head_dim: int, max_positions: int, device) -> Tensor:
    """Unit complex rotations for every position: [max_positions, head_dim / 2] complex64."""
    inv_freq = rope_inverse_frequencies(rope, head_dim)
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
    return torch.polar(torch.ones_like(angles), angles).to(device)


def interleave_rope_rows(weight: Tensor, num_heads: int, head_dim: int) -> Tensor:
    """Reorder each head's output rows from transformers' halves layout to interleaved pairs.

    transformers rotates dimension i with dimension i + head_dim/2 ("rotate_half").
    With the rows of Q and K permuted the same way the pairs become adjacent, so
    rotation is a complex multiply, and q·k is unchanged (a permutation of both).
    Works on weights [H*hd, K] and biases [H*hd].
    """
    rest = weight.shape[1:]
    w = weight.reshape(num_heads, 2, head_dim // 2, *rest)
    return w.transpose(1, 2).reshape(num_heads * head_dim, *rest)


def apply_rope(x: Tensor, rotations: Tensor) -> Tensor:
    """x: [N, heads, hd] (interleaved pairs), rotations: [N, 1, hd/2] complex → rotated [N, heads, hd]."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * rotations).flatten(-2).to(x.dtype)


# ---------------------------------------------------------------------------
# KV cache and the description of one forward


class KVCache:
    """Keys and values for up to `max_batch` sequences of `max_seq_len` tokens, allocated once.

    k, v: [layers, max_batch, kv_heads, max_seq_len, head_dim]. Row `b` belongs to
    one sequence; the owner (the engine) tracks how many positions of it are valid.
    """

    def __init__(self, config: DecoderConfig, max_batch: int, max_seq_len: int, dtype: torch.dtype, device):
        shape = (config.num_layers, max_batch, config.num_kv_heads, max_seq_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


@dataclass
class ForwardBatch:
    """Where the N tokens of one forward go, computed once and shared by every layer.

    Two shapes of forward:
    - prefill: N consecutive tokens of one sequence in cache row `row`, positions
      `start … start+N-1`;
    - decode: one token for each of cache rows 0 … N-1, row b at position `positions[b]`.
    """

    rotations: Tensor  # [N, 1, hd/2] complex: RoPE of each token
    decode: bool
    row: int = 0  # prefill
    start: int = 0  # prefill
    write_index: Tensor | None = None  # decode: [N * kv_heads] flat cache rows to write, see `for_decode`
    kv_len: int = 0  # keys each query attends over (a prefix of the cache rows)
    mask: Tensor | None = None  # decode: [N, 1, 1, kv_len] additive (0 / -inf); None when every row sees all kv_len

    @classmethod
    def for_prefill(cls, rope: Tensor, row: int, start: int, length: int) -> ForwardBatch:
        rotations = rope[start : start + length].unsqueeze(1)
        return cls(rotations=rotations, decode=False, row=row, start=start, kv_len=start + length)

    @classmethod
    def for_decode(cls, rope: Tensor, positions: list[int], cache: KVCache, num_kv_heads: int, dtype) -> ForwardBatch:
        """positions[b]: where row b's token goes; host ints, so building the batch needs no device sync."""
        device = rope.device
        n, kv_len = len(positions), max(positions) + 1
        pos = torch.tensor(positions, device=device)  # [N]
        # The cache layer viewed as [max_batch * kv_heads * max_seq_len, hd]: row b, head h, position p
        # is entry (b * kv_heads + h) * max_seq_len + p, so writing every row's new key is one index_copy_.
        rows = torch.arange(n, device=device)[:, None] * num_kv_heads + torch.arange(num_kv_heads, device=device)
        write_index = (rows * cache.max_seq_len + pos[:, None]).reshape(-1)  # [N * Hkv]
        mask = None
        if any(p != kv_len - 1 for p in positions):  # rows of different lengths: hide each row's unused tail
            keep = torch.arange(kv_len, device=device)[None, :] <= pos[:, None]  # [N, T]
            mask = torch.zeros(n, 1, 1, kv_len, dtype=dtype, device=device)
            mask.masked_fill_(~keep[:, None, None, :], float("-inf"))
        return cls(rotations=rope[pos].unsqueeze(1), decode=True, write_index=write_index, kv_len=kv_len, mask=mask)


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

    def prepare(self) -> None:
        """Fuse Q, K, V into one projection with RoPE-interleaved rows; drop the originals.

        The softmax scale 1/√head_dim is folded into Q's rows (exact for the usual
        power-of-two head sizes), so attention needs no separate scaling op.
        """
        c = self.config
        scale = c.head_dim**-0.5
        weights = [
            interleave_rope_rows(self.q_proj.weight, c.num_heads, c.head_dim) * scale,
            interleave_rope_rows(self.k_proj.weight, c.num_kv_heads, c.head_dim),
            self.v_proj.weight,
        ]
        self.wqkv = prepare_weight(torch.cat(weights))
        self.bqkv = None
        if c.attention_bias:
            self.bqkv = torch.cat([
                interleave_rope_rows(self.q_proj.bias, c.num_heads, c.head_dim) * scale,
                interleave_rope_rows(self.k_proj.bias, c.num_kv_heads, c.head_dim),
                self.v_proj.bias,
            ]).detach()
        self.wo = prepare_weight(self.o_proj.weight)
        del self.q_proj, self.k_proj, self.v_proj, self.o_proj

    def forward(self, x: Tensor, residual: Tensor, k_cache: Tensor, v_cache: Tensor, batch: ForwardBatch) -> Tensor:
        """x: [N, D] normed input, residual: [N, D]; k/v_cache: [B, Hkv, S, hd] → residual + attention: [N, D]."""
        c = self.config
        n, h, hkv, hd = x.shape[0], c.num_heads, c.num_kv_heads, c.head_dim
        qkv = linear(x, self.wqkv, self.bqkv)  # [N, (H + 2 Hkv) hd]
        qk = apply_rope(qkv[:, : c.q_size + c.kv_size].view(n, h + hkv, hd), batch.rotations)  # [N, H + Hkv, hd]
        q, k = qk[:, :h], qk[:, h:]  # [N, H, hd], [N, Hkv, hd]
        v = qkv[:, c.q_size + c.kv_size :].view(n, hkv, hd)  # [N, Hkv, hd]

        if batch.decode:
            # One query per cache row. The heads sharing a KV head are stacked as that
            # head's queries ([N, Hkv, group, hd]), so grouped-query attention reads the
            # cache in place, with no repeated keys. Plain matmul/softmax: for one query
            # per row the CPU SDPA kernel costs several times more, masked or not.
            k_cache.view(-1, hd).index_copy_(0, batch.write_index, k.reshape(-1, hd))
            v_cache.view(-1, hd).index_copy_(0, batch.write_index, v.reshape(-1, hd))
            keys = k_cache[:n, :, : batch.kv_len]  # [N, Hkv, T, hd]
            values = v_cache[:n, :, : batch.kv_len]
            scores = torch.matmul(q.reshape(n, hkv, h // hkv, hd), keys.transpose(2, 3))  # [N, Hkv, group, T]
            if batch.mask is not None:
                scores.add_(batch.mask)
            out = torch.matmul(scores.softmax(-1), values)  # [N, Hkv, group, hd]
        else:
            end = batch.start + n
            k_cache[batch.row, :, batch.start : end] = k.transpose(0, 1)
            v_cache[batch.row, :, batch.start : end] = v.transpose(0, 1)
            q = q.transpose(0, 1).unsqueeze(0)  # [1, H, N, hd]
            if batch.start == 0:
                keys, values = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)  # [1, Hkv, N, hd]
                out = F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=1.0, enable_gqa=True)
            else:
                # Continuing a cached prefix: query i sees positions ≤ start + i.
                keys = k_cache[batch.row : batch.row + 1, :, :end]
                values = v_cache[batch.row : batch.row + 1, :, :end]
                mask = torch.ones(n, end, dtype=torch.bool, device=x.device).tril(batch.start)
                out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=1.0, enable_gqa=True)
            out = out[0].transpose(0, 1)  # [N, H, hd]
        return linear_add(out.reshape(n, c.q_size), self.wo, residual)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) (transformers' parameter names)."""

    def __init__(self, config: DecoderConfig, device=None, dtype=None):
        super().__init__()
        d, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, i, bias=False, device=device, dtype=dtype)
        self.up_proj = nn.Linear(d, i, bias=False, device=device, dtype=dtype)
        self.down_proj = nn.Linear(i, d, bias=False, device=device, dtype=dtype)

    def prepare(self) -> None:
        """Fuse gate and up into one projection (one weight read, one call)."""
        self.w_gate_up = prepare_weight(torch.cat([self.gate_proj.weight, self.up_proj.weight]))
        self.w_down = prepare_weight(self.down_proj.weight)
        del self.gate_proj, self.up_proj, self.down_proj

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        """x: [N, D] normed input → residual + MLP(x): [N, D]."""
        gate, up = linear(x, self.w_gate_up).chunk(2, dim=-1)  # [N, I] each
        return linear_add(F.silu(gate).mul_(up), self.w_down, residual)


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attention(norm(x)), then + mlp(norm(x))."""

    def __init__(self, config: DecoderConfig, device=None, dtype=None):
        super().__init__()
        self.self_attn = Attention(config, device, dtype)
        self.mlp = GatedMLP(config, device, dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, device, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, device, dtype)

    def prepare(self) -> None:
        self.self_attn.prepare()
        self.mlp.prepare()

    def forward(self, x: Tensor, k_cache: Tensor, v_cache: Tensor, batch: ForwardBatch) -> Tensor:
        # .forward() directly: per-layer module-call overhead is a measurable share of a CPU decode step.
        x = self.self_attn.forward(self.input_layernorm.forward(x), x, k_cache, v_cache, batch)
        return self.mlp.forward(self.post_attention_layernorm.forward(x), x)
