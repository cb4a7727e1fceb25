"""SigLIP vision tower (the one Gemma 3 uses), in plain torch.

A SigLIP ViT is CLIP's encoder — the same pre-norm blocks, parameter names and
attention — with a different stem and end: the patch convolution has a bias,
position embeddings are learned per patch with no CLS token, there is no
pre-encoder LayerNorm, and `post_layernorm` closes the tower (its output is
`last_hidden_state`). The blocks are `ClipEncoderLayer`s (fused QKV, the CPU's
packed GEMMs and tanh-GELU kernel). The attention-pooling `head`, which Gemma 3
does not use, is neither built nor read (`UNREAD_NAMES`).

Parameter names are those under `vision_tower.vision_model.` of a checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from embedder_service.models.clip import ClipEncoder, ClipVisionConfig, embed_fixed_size

UNREAD_NAMES = ("head.",)  # the attention-pooling head's tensors (`vision_use_head`), under `vision_model.`


@dataclass(frozen=True)
class SiglipVisionConfig(ClipVisionConfig):
    """`vision_config` of a checkpoint; missing keys take transformers' `SiglipVisionConfig` defaults."""

    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6


class SiglipEmbeddings(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.config = config
        D, C, P = config.hidden_size, config.num_channels, config.patch_size
        self.patch_embedding = nn.Conv2d(C, D, kernel_size=P, stride=P)
        self.position_embedding = nn.Embedding(config.num_patches, D)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values: [B, C, H, W] → [B, N, D]: patches (with the conv's bias) + one learned position each
        return embed_fixed_size(pixel_values, self.patch_embedding, self.config) + self.position_embedding.weight


class SiglipVisionTower(nn.Module):
    """`SiglipVisionModel` up to `last_hidden_state`: embeddings → encoder → post_layernorm."""

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = SiglipEmbeddings(config)
        self.encoder = ClipEncoder(config, config.num_hidden_layers)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values: [B, C, H, W] → last hidden state [B, N, D]
        depth = self.config.num_hidden_layers
        return self.post_layernorm(self.encoder(self.embeddings(pixel_values), keep=(depth,))[depth])
