"""What the dynamic-resolution vision towers share: Qwen2-VL / Qwen2.5-VL and Pixtral / Mistral 3.1.

Their images come at their own sizes, so a batch is one packed sequence of patch
tokens [N, D], image after image, and attention stays inside groups of tokens (a
frame of an image, a Qwen2.5-VL window). Both rotate queries and keys by a 2D RoPE
over each patch's (row, column) with the projection's Q and K rows interleaved
(`shared.modeling.layers.interleave_rope_rows`), and both have a gated MLP (Qwen2.5-VL's,
Pixtral's).

Where the CPU time goes, and so the shape of this code: the GEMMs run close to the
matmul roofline; attention through the CPU SDPA kernel is the slowest part, about
10% faster when each head's rows are contiguous, so the RoPE writes Q and K
straight into that layout (`rotate_into_heads`); the gated MLP's activation and
product over the [N, intermediate] activations are one in-place pass (`GatedVisionMLP`); and a
large batch runs through the tower a few whole images at a time (`image_groups`),
so activations stay cache-sized instead of being fresh, page-faulted allocations
of hundreds of MB.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from embedder_service.models.clip import activation, gated_activation_, linear

# Tokens one pass through a tower takes at most (a larger image goes alone): enough rows for the GEMMs
# to run at full speed, few enough that a block's activations (~16 MB at ViT-B width) stay in cache.
TOKENS_PER_PASS = 1024


def image_groups(num_tokens: list[int], budget: int = TOKENS_PER_PASS) -> list[range]:
    """Consecutive images, in runs of at most `budget` tokens (an image larger than that alone), covering all."""
    groups, start, total = [], 0, 0
    for i, n in enumerate(num_tokens):
        if i > start and total + n > budget:
            groups.append(range(start, i))
            start, total = i, 0
        total += n
    return groups + [range(start, len(num_tokens))] if num_tokens else groups


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
    """Disjoint groups of tokens (a frame of an image, a window) that each attend only within themselves.

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

    def attention(self, qkv: Tensor, scale: float) -> Tensor:
        """qkv: [3, H, N, hd] (`rotate_into_heads`) → [N, H·hd], each token attending over its own group."""
        _, h, n, hd = qkv.shape
        q, k, v = qkv.unbind(0)  # [H, N, hd] each
        if self.lengths is not None and len(set(self.lengths)) == 1:
            S, L = len(self.lengths), self.lengths[0]
            q, k, v = (t.view(h, S, L, hd).transpose(0, 1) for t in (q, k, v))  # [S, H, L, hd]
            return F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2).reshape(n, h * hd)
        if self.lengths is not None:
            out = torch.empty(n, h, hd, dtype=qkv.dtype, device=qkv.device)
            start = 0
            for length in self.lengths:
                group = slice(start, start + length)
                start += length
                # [1, H, L, hd]: the CPU's flash kernel takes only 4-D inputs (3-D ones ran 4× slower, in the math kernel)
                attended = F.scaled_dot_product_attention(q[None, :, group], k[None, :, group], v[None, :, group], scale=scale)
                out[group] = attended[0].transpose(0, 1)
            return out.view(n, h * hd)
        S, L = self.num_groups, self.length
        q, k, v = (t[:, self.index].transpose(0, 1) for t in (q, k, v))  # [S, H, L, hd]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, scale=scale)  # padding keys masked
        out = out.transpose(1, 2).reshape(S * L, h * hd)[self.keep]  # [N, H·hd] in gathered order
        return torch.empty_like(out).index_copy_(0, self.order, out)


class GatedVisionMLP(nn.Module):
    """down(act(gate(x)) · up(x)): Qwen2.5-VL's (with biases) and Pixtral's (without), the checkpoints' names.

    Two GEMMs for gate and up rather than one over their concatenated weights, each
    output contiguous for the one pass (the CPU kernels' `activation_`) that writes
    act(gate) · up over gate. (The language model's decode, one row at a time, runs the
    single fused GEMM: `shared.modeling.layers.GatedMLP`.)
    """

    def __init__(self, hidden_size: int, intermediate_size: int, act: str, bias: bool):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act = activation(act)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        # x: [N, D] normed → gate, up: [N, I] → residual + [N, D]
        gate = linear(x, self.gate_proj.weight, self.gate_proj.bias)
        hidden = gated_activation_(gate, linear(x, self.up_proj.weight, self.up_proj.bias), self.act)  # act(gate) · up
        return linear(hidden, self.down_proj.weight, self.down_proj.bias, residual=residual)
