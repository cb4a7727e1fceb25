"""Gemma 3's image side: SigLIP tower → average pool → Gemma RMSNorm → linear projection.

Matches `Gemma3ForConditionalGeneration.get_image_features`: the SigLIP tower's
`last_hidden_state` (after `post_layernorm`, no CLS) is laid back on its
(image_size / patch)² grid, average-pooled to `mm_tokens_per_image` tokens
(kernel = stride = patches per side / tokens per side), normed by Gemma's RMSNorm
(1 + weight, the vision config's eps) and multiplied by `mm_input_projection_weight`
([vision hidden, LM hidden]). Every image is the same size, so a batch is one stack.

The container layout, `Gemma3Processor`'s "\\n\\n<start_of_image>" + the image tokens +
"<end_of_image>\\n\\n", is the family's: `shared.modeling.families.gemma3`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from embedder_service.models import FixedSizeVisionModel, check_tower_names
from embedder_service.models.gemm import linear
from embedder_service.models.siglip import (
    UNREAD_NAMES,
    SiglipVisionConfig,
    SiglipVisionTower,
)
from embedder_service.preprocess.gemma3 import Gemma3Preprocessor
from shared.config.errors import CheckpointError
from shared.modeling.checkpoint import Checkpoint
from shared.modeling.layers import RMSNorm

VISION_PREFIX = "vision_tower.vision_model."
PROJECTOR_PREFIX = "multi_modal_projector."


@dataclass(frozen=True)
class Gemma3VisionConfig:
    vision: SiglipVisionConfig
    tokens_per_image: int  # mm_tokens_per_image
    lm_hidden_size: int

    @classmethod
    def from_config(cls, config: dict) -> Gemma3VisionConfig:
        """From a Gemma 3 `config.json`; missing keys take Gemma3Config's (and SiglipVisionConfig's) defaults."""
        vision = SiglipVisionConfig.from_dict(config.get("vision_config") or {})
        out = cls(
            vision=vision,
            tokens_per_image=int(config.get("mm_tokens_per_image", 256)),
            lm_hidden_size=int((config.get("text_config") or {}).get("hidden_size", 2304)),  # Gemma3TextConfig's default
        )
        side = vision.image_size // vision.patch_size
        if out.tokens_per_side**2 != out.tokens_per_image or side % out.tokens_per_side:
            raise CheckpointError(
                f"mm_tokens_per_image {out.tokens_per_image} must be a square whose side divides the {side}×{side} patch grid"
            )
        return out

    @property
    def tokens_per_side(self) -> int:
        return round(self.tokens_per_image**0.5)

    @property
    def pool(self) -> int:
        """Patches per side of one pooled token: the average pool's kernel and stride."""
        return self.vision.grid // self.tokens_per_side


class Gemma3Projector(nn.Module):
    """`Gemma3MultiModalProjector`: [B, N, Dv] patch states → [B, tokens, D] LM embeddings."""

    def __init__(self, config: Gemma3VisionConfig):
        super().__init__()
        self.config = config
        self.mm_input_projection_weight = nn.Parameter(torch.empty(config.vision.hidden_size, config.lm_hidden_size))  # [Dv, D]
        self.mm_soft_emb_norm = RMSNorm(config.vision.hidden_size, config.vision.layer_norm_eps, offset=1.0)

    def prepare(self) -> None:
        self.w = self.mm_input_projection_weight.detach().t().contiguous()  # [D, Dv]: `linear`'s layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, N, Dv] → grid [B, Dv, g, g] → pooled [B, Dv, s, s] → [B, s², Dv] → [B, s², D]
        B, _, Dv = x.shape
        g = self.config.vision.grid
        grid = x.transpose(1, 2).reshape(B, Dv, g, g)
        pooled = F.avg_pool2d(grid, self.config.pool).flatten(2).transpose(1, 2)  # the reference's AvgPool2d
        return linear(self.mm_soft_emb_norm(pooled), self.w, None)


class Gemma3VisionModel(FixedSizeVisionModel):
    """Pixels [B, 3, H, W] → projected image embeddings [B, mm_tokens_per_image, hidden_size]."""

    def __init__(self, config: Gemma3VisionConfig):
        super().__init__()
        self.config = config
        self.vision_tower = SiglipVisionTower(config.vision)
        self.multi_modal_projector = Gemma3Projector(config)
        self.preprocessor: Gemma3Preprocessor | None = None  # set by from_checkpoint

    @classmethod
    def build(cls, ckpt: Checkpoint) -> Gemma3VisionModel:
        config = Gemma3VisionConfig.from_config(ckpt.config)
        preprocessor = Gemma3Preprocessor.from_checkpoint(ckpt)
        size = dict(preprocessor.size)
        if (size["height"], size["width"]) != (config.vision.image_size,) * 2:
            raise CheckpointError(
                f"{ckpt.path}: the preprocessor produces {size['height']}×{size['width']} images, "
                f"the vision tower takes {config.vision.image_size}×{config.vision.image_size}"
            )
        with torch.device("meta"):
            model = cls(config)
        layers = config.vision.num_hidden_layers
        check_tower_names(ckpt, VISION_PREFIX, model.vision_tower, f"a {layers}-layer SigLIP", unread=UNREAD_NAMES)
        model.preprocessor = preprocessor
        return model

    def checkpoint_parts(self) -> dict[str, nn.Module]:
        """Module by module, so the pooling head a SigLIP checkpoint may hold is never read."""
        tower = self.vision_tower
        parts = {f"{VISION_PREFIX}{name}.": getattr(tower, name) for name in ("embeddings", "encoder", "post_layernorm")}
        return parts | {PROJECTOR_PREFIX: self.multi_modal_projector}

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values: [B, 3, H, W] → [B, tokens, hidden]
        return self.multi_modal_projector(self.vision_tower(pixel_values))

    @property
    def tokens_per_image(self) -> int:
        return self.config.tokens_per_image

    @property
    def hidden_size(self) -> int:
        """The language model's hidden size: the width of every embedding row."""
        return self.config.lm_hidden_size
