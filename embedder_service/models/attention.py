"""The vision towers' attention: bidirectional, within groups of tokens, with or without a 2D RoPE.

Every tower's batch is one sequence of patch tokens, image after image ([B, N, D] for
CLIP's and SigLIP's images of one size, [N, D] packed for Qwen2-VL's and Pixtral's of
their own sizes), and attention stays inside groups of those tokens (`Segments`: an
image, a frame of one, a Qwen2.5-VL window). Qwen2-VL and Pixtral rotate queries and
keys by a 2D RoPE over each patch's (row, column) (`rope_2d`).

Where the CPU time goes, and so the shape of this code: attention through the CPU
SDPA kernel is the slowest part of a tower after the GEMMs, about 10% faster when each
head's rows are contiguous, so the RoPE writes Q and K straight into that layout
(`rotate_into_heads`); Q, K and V are one GEMM (`VisionAttention.prepare`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from embedder_service.models.gemm import linear
from shared.modeling.layers import interleave_rope_rows


def rope_2d(rows: Tensor, cols: Tensor, row_freq: Tensor, col_freq: Tensor) -> Tensor:
    """Each token's 2D RoPE from its (row, column), [N] each → [N, 1, hd/2] complex: the first
    hd/4 pairs turn with the row at `row_freq`, the other hd/4 with the column at `col_freq`."""
    angles = torch.cat([rows[:, None] * row_freq, cols[:, None] * col_freq], dim=1)  # [N, hd/2]
    return torch.polar(torch.ones_like(angles), angles).unsqueeze(1)


def rotate_into_heads(qkv: Tensor, rotations: Tensor, num_heads: int) -> Tensor:
    """qkv: [N, 3·H·hd] (Q, K rows RoPE-interleaved), rotations: [N, 1, hd/2] complex → Q, K rotated and V, [3, H, N, hd].

    Head-major, so the attention kernel reads each head's rows contiguously. The rotation
    writes there itself; in half precision it runs in float32 and is rounded once, as the references do.
    """
    n, hd = qkv.shape[0], qkv.shape[1] // (3 * num_heads)
    out = torch.empty(3, num_heads, n, hd, dtype=qkv.dtype, device=qkv.device)
    qk = qkv[:, : 2 * num_heads * hd].view(n, 2, num_heads, hd // 2, 2)  # [N, 2, H, hd/2, 2]: Q and K, in pairs
    turns = rotations.unsqueeze(1)  # [N, 1, 1, hd/2]
    if qkv.dtype == torch.float32:
        torch.mul(torch.view_as_complex(qk), turns, out=torch.view_as_complex(out[:2].view(2, num_heads, n, hd // 2, 2)).permute(2, 0, 1, 3))
    else:
        out[:2].permute(2, 0, 1, 3).copy_(torch.view_as_real(torch.view_as_complex(qk.float()) * turns).flatten(-2))
    out[2].copy_(qkv[:, 2 * num_heads * hd :].view(n, num_heads, hd).transpose(0, 1))
    return out


class Segments:
    """Disjoint groups of tokens (an image, a frame of one, a window) that each attend only within themselves.

    Built once per pass and shared by the blocks. Three layouts, cheapest first:
    equal consecutive groups (a batch of same-size images) are one batched SDPA on
    views; consecutive groups of different sizes (images of different sizes) one
    SDPA each, which costs Σ n_i² where the references' block-diagonal mask costs
    (Σ n_i)²; any other grouping (Qwen2.5-VL's windows, many and small) is gathered
    into a padded [S, L] batch with the padding masked out of the keys, one SDPA.
    """

    def __init__(self, lengths: list[int] | None = None, index: Tensor | None = None):
        """lengths: consecutive groups of these sizes, slices of the sequence; or
        index: [S, L] token indices of each group, -1 where a group is shorter than L."""
        self.lengths = lengths
        if index is not None:
            valid = index >= 0
            self.num_groups, self.length = index.shape
            self.index = index.clamp(min=0)  # padding rows are token 0, masked out as keys and dropped as queries
            self.mask = None if bool(valid.all()) else valid[:, None, None, :]  # [S, 1, 1, L] keys to keep
            self.order = index[valid]  # [N] each gathered row's token, in gathered order
            self.keep = valid.flatten()  # [S·L] gathered rows that are tokens

    def attention(self, qkv: Tensor) -> Tensor:
        """qkv: [3, H, N, hd] → [N, H·hd], each token attending over its own group, scaled by 1/√hd (SDPA's default)."""
        _, h, n, hd = qkv.shape
        q, k, v = qkv.unbind(0)  # [H, N, hd] each
        if self.lengths is not None and len(set(self.lengths)) == 1:
            S, L = len(self.lengths), self.lengths[0]
            q, k, v = (t.view(h, S, L, hd).transpose(0, 1) for t in (q, k, v))  # [S, H, L, hd]
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, h * hd)
        if self.lengths is not None:
            out = torch.empty(n, h, hd, dtype=qkv.dtype, device=qkv.device)
            start = 0
            for length in self.lengths:
                group = slice(start, start + length)
                start += length
                # [1, H, L, hd]: the CPU's flash kernel takes only 4-D inputs (3-D ones ran 4× slower, in the math kernel)
                attended = F.scaled_dot_product_attention(q[None, :, group], k[None, :, group], v[None, :, group])
                out[group] = attended[0].transpose(0, 1)
            return out.view(n, h * hd)
        S, L = self.num_groups, self.length
        q, k, v = (t[:, self.index].transpose(0, 1) for t in (q, k, v))  # [S, H, L, hd]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)  # padding keys masked
        out = out.transpose(1, 2).reshape(S * L, h * hd)[self.keep]  # [N, H·hd] in gathered order
        return torch.empty_like(out).index_copy_(0, self.order, out)


class VisionAttention(nn.Module):
    """Multi-head attention within `Segments`; with `rope`, Q and K turned by each token's 2D RoPE.

    Built with the checkpoint's names: q_proj, k_proj, v_proj (CLIP, SigLIP, Pixtral) or one
    `qkv` (`fused_qkv`: Qwen2-VL), and `out_name` for the output projection (out_proj, o_proj,
    proj). `prepare()` replaces them by one [3D, D] QKV weight, Q's and K's rows RoPE-interleaved
    with `rope` (`shared.modeling.layers.interleave_rope_rows`), and the output's.
    """

    def __init__(self, dim: int, num_heads: int, *, bias: bool, rope: bool = False, fused_qkv: bool = False, out_name: str = "out_proj"):
        super().__init__()
        self.num_heads, self.head_dim, self.rope, self.out_name = num_heads, dim // num_heads, rope, out_name
        if fused_qkv:
            self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        else:
            self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim, bias=bias) for _ in range(3))
        self.add_module(out_name, nn.Linear(dim, dim, bias=bias))

    @torch.no_grad()
    def prepare(self) -> None:
        projections = [self.qkv] if "qkv" in self._modules else [self.q_proj, self.k_proj, self.v_proj]
        out = self._modules[self.out_name]
        self.wqkv = self._fused([p.weight for p in projections])  # [3D, D]
        self.bqkv = None if out.bias is None else self._fused([p.bias for p in projections])  # [3D]
        self.wo, self.bo = out.weight.detach(), None if out.bias is None else out.bias.detach()
        for name in list(self._modules):
            delattr(self, name)

    def _fused(self, tensors: list[Tensor]) -> Tensor:
        """Q, K, V's weights or biases (concatenated in `tensors`) → [3D, ...], with `rope` Q's and K's rows interleaved."""
        if not self.rope:
            return torch.cat(tensors)
        q, k, v = torch.cat(tensors).chunk(3)
        return torch.cat([interleave_rope_rows(q, self.num_heads, self.head_dim), interleave_rope_rows(k, self.num_heads, self.head_dim), v])

    def forward(self, x: Tensor, residual: Tensor, segments: Segments, rotations: Tensor | None = None) -> Tensor:
        # x: [..., D] normed, the segments' tokens in order; residual: as x; rotations: [N, 1, hd/2] complex
        # (with `rope`) → residual + attention(x)
        H, hd = self.num_heads, self.head_dim
        qkv = linear(x, self.wqkv, self.bqkv).view(-1, 3 * H * hd)  # [N, 3D]
        if self.rope:
            heads = rotate_into_heads(qkv, rotations, H)  # [3, H, N, hd], each head's rows contiguous
        else:
            heads = qkv.view(-1, 3, H, hd).permute(1, 2, 0, 3)  # [3, H, N, hd], a view
        out = segments.attention(heads).view(x.shape)
        return linear(out, self.wo, self.bo, residual=residual)
