"""Layers both the vision towers and the language models build from: projections on prepared weights, RMSNorm, RoPE.

Modules are built on the meta device with the checkpoint's own parameter names,
filled by `Checkpoint.load_into`, then `prepare()`d for inference. On the CPU,
`prepare_weight` reorders float32 weights into oneDNN's blocked layout once, which
reads memory at close to the machine's bandwidth where MKL's sgemm reaches about
half of it for the matrix-vector products of decoding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ---------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding parameters: `default`, `linear` or `llama3` scaling.

    `mrope_section` (Qwen2-VL's M-RoPE): the head's rotation pairs split into runs
    turned by a token's temporal, height and width position in turn (sums to head_dim / 2).
    """

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    mrope_section: tuple[int, ...] | None = None

    SUPPORTED = ("default", "linear", "llama3")

    @classmethod
    def from_config(cls, config: dict, default_theta: float = 10000.0) -> RopeConfig:
        """Read `rope_parameters` (transformers ≥ 5) or `rope_scaling` + `rope_theta` (older configs)."""
        params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type == "mrope":  # older Qwen2-VL configs: M-RoPE over the default frequencies, as transformers reads it
            rope_type = "default"
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
            mrope_section=tuple(int(n) for n in params["mrope_section"]) if params.get("mrope_section") else None,
        )



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
    """x @ weightᵀ + bias.  x: [N, K], weight: [M, K] → [N, M].

    weight may also be a layout that computes its own product (`cuda_ext.decode.ops.PanelWeight`):
    an object with `linear(x, bias=None, residual=None)`.
    """
    if not isinstance(weight, Tensor):
        return weight.linear(x, bias)
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def linear_add(x: Tensor, weight: Tensor, residual: Tensor) -> Tensor:
    """x @ weightᵀ + residual in one pass (the residual connection after attention and MLP)."""
    if not isinstance(weight, Tensor):
        return weight.linear(x, residual=residual)
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, None, "add")
    return torch.addmm(residual, x, weight.t())


# ---------------------------------------------------------------------------
# Normalisation


class RMSNorm(nn.Module):
    """x / rms(x) · weight; Gemma's (`offset=1`) scales by 1 + weight, which `prepare()` computes once after loading."""

    def __init__(self, dim: int, eps: float = 1e-6, device=None, dtype=None, offset: float = 0.0):
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def prepare(self) -> None:
        if self.offset:
            self.scale = (self.weight.detach().float() + self.offset).to(self.weight.device)  # [dim] float32, as Gemma's

    @property
    def effective_weight(self) -> Tensor:
        """The [dim] scale applied after normalising (after `prepare()`): 1 + weight for Gemma's."""
        return self.scale if self.offset else self.weight

    def forward(self, x: Tensor) -> Tensor:
        scale = self.effective_weight
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), scale, self.eps)  # one op: it runs twice per layer
        if self.offset:  # Gemma: normalised and scaled in float32, then cast
            return F.rms_norm(x.float(), (x.shape[-1],), scale, self.eps).to(x.dtype)
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


def mrope_components(section: tuple[int, ...], head_dim: int) -> Tensor:
    """Long[head_dim / 2]: which position (0 temporal, 1 height, 2 width) turns each rotation pair.

    transformers' M-RoPE takes run i of the frequencies from position i % 3.
    """
    if sum(section) != head_dim // 2:
        raise ValueError(f"mrope_section {list(section)} must sum to head_dim / 2 = {head_dim // 2}")
    return torch.cat([torch.full((n,), i % 3) for i, n in enumerate(section)])


def rope_rotations(rope: Tensor, positions: Tensor, components: Tensor | None = None) -> Tensor:
    """The RoPE rotations of N tokens: [N, 1, hd/2] complex, from a table `rope_table` made.

    positions: Long[N], or Long[3, N] (temporal, height, width) with `components` from
    `mrope_components` saying which of the three turns each pair.
    """
    if positions.dim() == 1:
        return rope[positions].unsqueeze(1)
    per_pair = positions[components].t()  # [N, hd/2]: each pair's own position
    return rope.gather(0, per_pair).unsqueeze(1)


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
