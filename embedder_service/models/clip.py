"""CLIP ViT vision tower (the one LLaVA-1.5 uses), in plain torch.

Parameter names are those under `vision_tower.vision_model.` in a Hugging Face
checkpoint, so `Checkpoint.load_into` fills the modules strictly. The tower is
built only as deep as the deepest hidden state the caller needs: LLaVA-1.5
reads layer −2, so the last encoder layer (and `post_layernorm`) is never
built, loaded or run. Its layers (SigLIP's too) are pre-norm blocks of
`attention.VisionAttention` (QKV one GEMM after `prepare()`) and `blocks.VisionMLP`
(quick_gelu folded into silu), every image's tokens attending among themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn

from embedder_service.models.attention import Segments, VisionAttention
from embedder_service.models.blocks import (
    VisionMLP,
    embed_patches,
    hidden_states,
    image_patches,
)
from embedder_service.models.gemm import activation
from shared.config.errors import CheckpointError, InvalidInput

# Names under `vision_model.` a CLIPVisionModel may hold that the tower does not build: the end LLaVA never
# reads, and `position_ids`, a buffer older transformers saved.
UNREAD_NAMES = ("post_layernorm.", "embeddings.position_ids")


@dataclass(frozen=True)
class ClipVisionConfig:
    """`vision_config` of a checkpoint; missing keys take `CLIPVisionConfig`'s defaults, as transformers does."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_dict(cls, config: dict) -> ClipVisionConfig:
        out = cls(**{f.name: config[f.name] for f in fields(cls) if config.get(f.name) is not None})
        if out.hidden_size % out.num_attention_heads:
            raise CheckpointError(f"hidden_size {out.hidden_size} is not divisible by num_attention_heads {out.num_attention_heads}")
        activation(out.hidden_act)  # fail at load, not at the first image
        return out

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2


def embed_fixed_size(pixel_values: torch.Tensor, conv: nn.Conv2d, config: ClipVisionConfig) -> torch.Tensor:
    """The patch convolution of config-sized images, as one GEMM (`blocks.embed_patches`): [B, C, H, W] → [B, N, D]."""
    C, H, W = pixel_values.shape[1:]
    if (C, H, W) != (config.num_channels, config.image_size, config.image_size):
        raise InvalidInput(f"pixel_values must be [B, {config.num_channels}, {config.image_size}, {config.image_size}], got {list(pixel_values.shape)}")
    return embed_patches(conv, image_patches(pixel_values, config.patch_size))  # [B, N, D]


class ClipEmbeddings(nn.Module):
    def __init__(self, config: ClipVisionConfig):
        super().__init__()
        self.config = config
        D, C, P = config.hidden_size, config.num_channels, config.patch_size
        self.class_embedding = nn.Parameter(torch.empty(D))
        self.patch_embedding = nn.Conv2d(C, D, kernel_size=P, stride=P, bias=False)
        self.position_embedding = nn.Embedding(config.num_patches + 1, D)

    def prepare(self) -> None:
        """Drop `position_ids`, the buffer older transformers saved (registered only for the strict load: see llava)."""
        self._buffers.pop("position_ids", None)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values: [B, C, H, W] → [B, 1 + N, D]
        B, D = pixel_values.shape[0], self.config.hidden_size
        x = embed_fixed_size(pixel_values, self.patch_embedding, self.config)  # [B, N, D]
        cls = self.class_embedding.view(1, 1, D).expand(B, 1, D)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight  # [B, 1 + N, D]


class ClipEncoderLayer(nn.Module):
    def __init__(self, config: ClipVisionConfig):
        super().__init__()
        D = config.hidden_size
        self.layer_norm1 = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.self_attn = VisionAttention(D, config.num_attention_heads, bias=True)
        self.layer_norm2 = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(D, config.intermediate_size, config.hidden_act)

    def forward(self, x: torch.Tensor, images: Segments) -> torch.Tensor:
        # x: [B, N, D], pre-norm residual blocks; the residual adds are out_proj's and fc2's (`linear`)
        x = self.self_attn(self.layer_norm1(x), x, images)
        return self.mlp(self.layer_norm2(x), x)


class ClipEncoder(nn.Module):
    def __init__(self, config: ClipVisionConfig, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(ClipEncoderLayer(config) for _ in range(num_layers))

    def forward(self, x: torch.Tensor, keep: tuple[int, ...]) -> dict[int, torch.Tensor]:
        """x: [B, N, D] → {k: hidden state after k layers} for each k in `keep` (0: x), each image attending within itself."""
        B, N = x.shape[:2]
        return hidden_states(x, self.layers, keep, Segments(lengths=[N] * B))


class ClipVisionTower(nn.Module):
    """CLIP ViT truncated to its first `num_layers` encoder layers; no post_layernorm (LLaVA never reads it)."""

    def __init__(self, config: ClipVisionConfig, num_layers: int):
        super().__init__()
        if not 0 <= num_layers <= config.num_hidden_layers:
            raise CheckpointError(f"cannot build {num_layers} of the {config.num_hidden_layers} CLIP layers")
        self.config = config
        self.embeddings = ClipEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # sic: the checkpoint's name
        self.encoder = ClipEncoder(config, num_layers)

    def forward(self, pixel_values: torch.Tensor, keep: tuple[int, ...]) -> dict[int, torch.Tensor]:
        """Hidden states after k layers for each k in `keep` (0 = embeddings after pre_layrnorm), each [B, 1 + N, D].

        The indices are those of transformers' `hidden_states` tuple with negative ones resolved.
        """
        return self.encoder(self.pre_layrnorm(self.embeddings(pixel_values)), keep)
