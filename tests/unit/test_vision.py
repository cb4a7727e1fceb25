"""The vision towers' shared building blocks (embedder_service.models.attention, .blocks, .gemm) against plain reference computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from embedder_service.models import gemm, image_groups
from embedder_service.models.attention import (
    Segments,
    VisionAttention,
    rotate_into_heads,
)
from embedder_service.models.blocks import (
    GatedVisionMLP,
    VisionMLP,
    embed_patches,
    image_patches,
)
from shared.config.errors import CheckpointError
from shared.modeling.layers import apply_rope

H, HD = 2, 8


def test_image_groups_cover_the_batch_in_order_within_the_budget():
    assert image_groups([]) == []
    assert image_groups([600, 300, 200, 1024, 2000, 10], budget=1024) == [range(2), range(2, 3), range(3, 4), range(4, 5), range(5, 6)]
    assert image_groups([16] * 5, budget=1024) == [range(5)]


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


def masked_reference(qkv: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Attention over the whole sequence with a block-diagonal mask: token i sees token j iff groups[i] == groups[j]."""
    q, k, v = qkv.unbind(0)  # [H, N, hd]
    mask = groups[:, None] == groups[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(0, 1).reshape(qkv.shape[2], -1)


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
    torch.testing.assert_close(segments.attention(qkv), masked_reference(qkv, groups), atol=1e-6, rtol=1e-5)


def rotate_half_reference(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """transformers' RoPE: x: [N, H, hd] in the halves layout (dimension i turns with i + hd/2), rotations: [N, 1, hd/2]."""
    cos, sin = (torch.cat([t, t], dim=-1) for t in (rotations.real, rotations.imag))  # [N, 1, hd]
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


@pytest.mark.parametrize("rope, fused_qkv", [(False, False), (True, False), (True, True)])
def test_vision_attention_prepared_matches_the_checkpoint_weights(rope, fused_qkv):
    """After `prepare()` (one QKV GEMM, Q/K rows interleaved for the RoPE) the output is the unprepared weights' attention."""
    torch.manual_seed(3)
    D, groups = H * HD, torch.tensor([0, 0, 0, 1, 1])
    attn = VisionAttention(D, H, bias=True, rope=rope, fused_qkv=fused_qkv, out_name="proj").eval()
    x, residual = torch.randn(5, D), torch.randn(5, D)
    rotations = torch.polar(torch.ones(5, 1, HD // 2), torch.randn(5, 1, HD // 2)) if rope else None
    with torch.no_grad():
        q, k, v = (attn.qkv(x) if fused_qkv else torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], -1)).view(5, 3, H, HD).unbind(1)
        if rope:
            q, k = rotate_half_reference(q, rotations), rotate_half_reference(k, rotations)
        heads = torch.stack([q, k, v]).transpose(1, 2)  # [3, H, N, hd]
        expected = residual + attn.proj(masked_reference(heads, groups))
        attn.prepare()
        got = attn(x, residual, Segments(lengths=[3, 2]), rotations)
    assert not list(attn.children())  # the checkpoint's projections are gone, replaced by the fused weights
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_vision_attention_takes_a_batch_of_same_size_images():
    """[B, N, D] (CLIP's, SigLIP's batches) equals each image's [N, D] through the same module."""
    torch.manual_seed(4)
    attn = VisionAttention(H * HD, H, bias=True).eval()
    attn.prepare()
    x, residual = torch.randn(2, 3, H * HD), torch.randn(2, 3, H * HD)
    with torch.no_grad():
        batched = attn(x, residual, Segments(lengths=[3, 3]))
        alone = [attn(x[i], residual[i], Segments(lengths=[3])) for i in range(2)]
    torch.testing.assert_close(batched, torch.stack(alone), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("lead", [(), (2,)])
def test_embed_patches_is_the_patch_convolution(lead):
    torch.manual_seed(5)
    P = 4
    conv = torch.nn.Conv2d(3, 6, kernel_size=P, stride=P).eval()
    pixels = torch.randn(*lead, 3, 8, 12)
    with torch.no_grad():
        got = embed_patches(conv, image_patches(pixels, P))  # [..., 2·3, 6]
        expected = conv(pixels).flatten(-2).transpose(-1, -2)  # row-major patches
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("act", ["quick_gelu", "gelu", "gelu_pytorch_tanh"])
def test_mlp_prepared_matches_the_checkpoint_weights(act):
    """`prepare()` folds quick_gelu's 1.702 into fc1/fc2 (float32): the output is unchanged."""
    torch.manual_seed(6)
    mlp = VisionMLP(16, 40, act).eval()
    x, residual = torch.randn(7, 16), torch.randn(7, 16)
    with torch.no_grad():
        expected = residual + mlp.fc2(gemm.apply_activation(mlp.fc1(x), gemm.activation(act)))
        mlp.prepare()
        got = mlp(x, residual)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_activation_names_each_config_name_and_refuses_others():
    assert [gemm.activation(n) for n in ("gelu_new", "gelu_pytorch_tanh", "swish", "quick_gelu")] == ["gelu_tanh", "gelu_tanh", "silu", "quick_gelu"]
    with pytest.raises(CheckpointError, match="unsupported activation 'mish'; supported: gelu, gelu_new"):
        gemm.activation("mish")


@pytest.mark.parametrize("bias", [True, False])
def test_gated_mlp_fused_and_torch_op_paths_match(bias, monkeypatch):
    torch.manual_seed(2)
    mlp = GatedVisionMLP(16, 40, "silu", bias=bias).eval()
    x, residual = torch.randn(7, 16), torch.randn(7, 16)
    with torch.inference_mode():
        expected = residual + mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
        fast = mlp(x, residual)
        monkeypatch.setattr(gemm, "CPU_FAST_PATHS", False)
        plain = mlp(x, residual)
    torch.testing.assert_close(fast, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain, expected, atol=1e-5, rtol=1e-5)
