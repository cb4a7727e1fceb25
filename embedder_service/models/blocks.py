"""The vision towers' other building blocks: patch embedding, the two MLPs, and the layer loop.

Modules carry the checkpoint's parameter names, so `Checkpoint.load_into` fills them
strictly, and `prepare()` rewrites their weights after loading where that is faster (the
same function). Every GEMM is `gemm.linear`, the residual add in its epilogue.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from embedder_service.models.gemm import (
    QUICK_GELU_SCALE,
    activation,
    gated_activation_,
    linear,
)


def image_patches(pixels: Tensor, patch: int) -> Tensor:
    """[..., C, H, W] (sides multiples of `patch`) → [..., (H/P)·(W/P), C·P·P]: the patches row-major,
    each flattened in the (C, P, P) order of a patch convolution's weight."""
    *lead, C, H, W = pixels.shape
    P, h, w, n = patch, H // patch, W // patch, len(lead)
    grid = pixels.reshape(*lead, C, h, P, w, P)
    return grid.permute(*range(n), n + 1, n + 3, n, n + 2, n + 4).reshape(*lead, h * w, C * P * P)


def embed_patches(conv: nn.Conv2d | nn.Conv3d, patches: Tensor) -> Tensor:
    """A patch convolution (kernel = stride: one output per patch) as one GEMM.  patches: [..., C·∏kernel],
    each flattened in the weight's (C, *kernel) order → [..., D].

    `conv` only holds the checkpoint's weight [D, C, *kernel] (and bias): the GEMM is the same kernel
    as the rest of the tower, on par with oneDNN's conv when measured here, and converts no layout.
    """
    weight = conv.weight
    return linear(patches.to(weight.dtype), weight.view(weight.shape[0], -1), conv.bias)


def hidden_states(x: Tensor, layers: nn.ModuleList, keep: tuple[int, ...], *args) -> dict[int, Tensor]:
    """{k: the hidden state after k of `layers`} for each k in `keep` (0: `x` itself); each layer is called (x, *args)."""
    states = {0: x} if 0 in keep else {}
    for k, layer in enumerate(layers, start=1):
        x = layer(x, *args)
        if k in keep:
            states[k] = x
    return states


class VisionMLP(nn.Module):
    """fc2(act(fc1(x))) with biases: CLIP's, SigLIP's and Qwen2-VL's MLP, the checkpoints' names."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)
        self.act = activation(act)

    @torch.no_grad()
    def prepare(self) -> None:
        """quick_gelu(h) = silu(1.702 h) / 1.702: scale fc1 by 1.702 and fc2 by 1/1.702, and the
        activation becomes silu, one in-place pass (the CPU kernels') instead of three.

        float32 only: in bfloat16/float16 rescaling the weights would round them a second time.
        """
        if self.act == "quick_gelu" and self.fc1.weight.dtype == torch.float32:
            self.fc1.weight.mul_(QUICK_GELU_SCALE)
            self.fc1.bias.mul_(QUICK_GELU_SCALE)
            self.fc2.weight.div_(QUICK_GELU_SCALE)
            self.act = "silu"

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        # x: [..., D] normed → [..., I] → residual + [..., D]
        h = linear(x, self.fc1.weight, self.fc1.bias, act=self.act)
        return linear(h, self.fc2.weight, self.fc2.bias, residual=residual)


class GatedVisionMLP(nn.Module):
    """down(act(gate(x)) · up(x)): Qwen2.5-VL's (with biases) and Pixtral's (without), the checkpoints' names.

    Two GEMMs for gate and up rather than one over their concatenated weights, each
    output contiguous for the one pass (the CPU kernels' `activation_`) that writes
    act(gate) · up over gate. (The language model's decode, one row at a time, runs the
    single fused GEMM: `generator_service.models.decoder.GatedMLP`.)
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
