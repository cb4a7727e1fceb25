"""The vision towers' shared pieces (embedder_service.models.vision) against plain reference computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import embedder_service.models.clip as clip
from embedder_service.models.vision import (
    GatedVisionMLP,
    Segments,
    image_groups,
    rotate_into_heads,
)
from shared.modeling.layers import apply_rope

H, HD = 2, 8


def test_image_groups_cover_the_batch_in_order_within_the_budget():
    assert image_groups([]) == []
    assert image_groups([600, 300, 200, 1024, 2000, 10], budget=1024) == [range(0, 2), range(2, 3), range(3, 4), range(4, 5), range(5, 6)]
    assert image_groups([16] * 5, budget=1024) == [range(0, 5)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotate_into_heads_is_apply_rope_head_major(dtype):
    g = torch.Generator().manual_seed(0)
    n = 5
    qkv = torch.randn(n, 3 * H * HD, generator=g).to(dtype)
    rotations = torch.polar(torch.ones(n, 1, HD // 2), torch.randn(n, 1, HD // 2, generator=g))
    got = rotate_into_heads(qkv, rotations, H)  # [3, H, N, hd]
    qk = apply_rope(qkv[:, : 2 * H * HD].view(n, 2 * H, HD), rotations)  # [N, 2H, hd]
    assert got.dtype == dtype
    assert torch.equal(got[:2], qk.view(n, 2, H, HD).permute(1, 2, 0, 3))
    assert torch.equal(got[2], qkv[:, 2 * H * HD :].view(n, H, HD).transpose(0, 1))


def masked_reference(qkv: torch.Tensor, groups: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention over the whole sequence with a block-diagonal mask: token i sees token j iff groups[i] == groups[j]."""
    q, k, v = qkv.unbind(0)  # [H, N, hd]
    mask = groups[:, None] == groups[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(0, 1).reshape(qkv.shape[2], -1)


@pytest.mark.parametrize("layout", ["equal lengths", "mixed lengths", "gathered windows"])
def test_segments_attend_within_their_groups(layout):
    g = torch.Generator().manual_seed(1)
    if layout == "equal lengths":
        groups, segments = torch.arange(3).repeat_interleave(4), Segments(lengths=[4, 4, 4])
    elif layout == "mixed lengths":
        groups, segments = torch.arange(3).repeat_interleave(torch.tensor([5, 2, 6])), Segments(lengths=[5, 2, 6])
    else:  # tokens 0..6 in two interleaved windows, one shorter than the other
        groups, segments = torch.tensor([0, 1, 0, 1, 0, 1, 0]), Segments(index=torch.tensor([[0, 2, 4, 6], [1, 3, 5, -1]]))
    qkv = torch.randn(3, H, groups.numel(), HD, generator=g)
    torch.testing.assert_close(segments.attention(qkv, scale=0.3), masked_reference(qkv, groups, 0.3), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_gated_mlp_fused_and_torch_op_paths_match(bias, monkeypatch):
    torch.manual_seed(2)
    mlp = GatedVisionMLP(16, 40, "silu", bias=bias).eval()
    x, residual = torch.randn(7, 16), torch.randn(7, 16)
    with torch.inference_mode():
        expected = residual + mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
        fast = mlp(x, residual)
        monkeypatch.setattr(clip, "CPU_FAST_PATHS", False)
        plain = mlp(x, residual)
    torch.testing.assert_close(fast, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain, expected, atol=1e-5, rtol=1e-5)
