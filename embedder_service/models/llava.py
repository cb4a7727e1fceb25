"""LLaVA-1.5's image side: CLIP ViT → selected hidden states → Linear–GELU–Linear projector.

Matches `LlavaForConditionalGeneration.get_image_features`: the hidden states
of `vision_feature_layer` (an index into transformers' `hidden_states` tuple
[embeddings after pre_layrnorm, layer 1, …, layer L], negative from the end; a
list is concatenated on the feature dim in its order), CLS dropped by the
`default` strategy and kept by `full`, then `multi_modal_projector`.
Only the vision and projector tensors are read, and of the vision tower only
the layers up to the deepest selected one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from embedder_service.models import FixedSizeVisionModel, check_tower_names
from embedder_service.models.clip import UNREAD_NAMES, ClipVisionConfig, ClipVisionTower
from embedder_service.models.gemm import activation, linear
from embedder_service.preprocess.clip import ClipPreprocessor
from shared.config.errors import CheckpointError
from shared.modeling.checkpoint import Checkpoint

VISION_PREFIX = "vision_tower.vision_model."
PROJECTOR_PREFIX = "multi_modal_projector."
STRATEGIES = ("default", "full")


@dataclass(frozen=True)
class LlavaVisionConfig:
    vision: ClipVisionConfig
    feature_layers: tuple[int, ...]  # hidden-state indices in [0, L], negative ones resolved, in concatenation order
    select_strategy: str  # "default": drop the CLS token; "full": keep it
    projector_act: str
    projector_bias: bool
    lm_hidden_size: int

    @classmethod
    def from_config(cls, config: dict) -> LlavaVisionConfig:
        """From a LLaVA `config.json`; missing keys take LlavaConfig's defaults."""
        vision = ClipVisionConfig.from_dict(config.get("vision_config") or {})
        strategy = config.get("vision_feature_select_strategy", "default")
        if strategy not in STRATEGIES:
            raise CheckpointError(f"vision_feature_select_strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
        act = config.get("projector_hidden_act", "gelu")
        activation(act)
        return cls(
            vision=vision,
            feature_layers=feature_layers(config, vision.num_hidden_layers, default=-2),
            select_strategy=strategy,
            projector_act=act,
            projector_bias=bool(config.get("multimodal_projector_bias", True)),
            lm_hidden_size=int((config.get("text_config") or {}).get("hidden_size", 4096)),  # LlamaConfig's default
        )

    @property
    def num_layers(self) -> int:
        """Encoder layers to build and run: up to the deepest selected hidden state."""
        return max(self.feature_layers)


def feature_layers(config: dict, num_layers: int, default: int) -> tuple[int, ...]:
    """`vision_feature_layer` of a LLaVA-style `config.json`: indices into the hidden states (embeddings, then one
    per each of `num_layers` layers), negative ones resolved, in concatenation order."""
    layer = config.get("vision_feature_layer", default)
    layers = [layer] if isinstance(layer, int) else list(layer)
    num_states = num_layers + 1
    if not layers or not all(isinstance(i, int) and -num_states <= i < num_states for i in layers):
        raise CheckpointError(f"vision_feature_layer {layer!r} must be an index (or list of indices) in [-{num_states}, {num_states - 1}]")
    return tuple(i % num_states for i in layers)


def select_features(states: dict[int, torch.Tensor], layers: tuple[int, ...], start: int = 0) -> torch.Tensor:
    """The hidden states of `layers`, each [..., N, D] from token `start` on, side by side: [..., N - start, D·k]."""
    selected = [states[k][..., start:, :] for k in layers]
    return selected[0] if len(selected) == 1 else torch.cat(selected, dim=-1)


class LlavaProjector(nn.Module):
    def __init__(self, in_features: int, hidden_size: int, act: str, bias: bool):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden_size, bias=bias)
        self.linear_2 = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, N, D·k] → [B, N, hidden] → [B, N, hidden]
        h = linear(x, self.linear_1.weight, self.linear_1.bias, act=self.act)
        return linear(h, self.linear_2.weight, self.linear_2.bias)


class LlavaVisionModel(FixedSizeVisionModel):
    """Pixels [B, 3, H, W] → projected image embeddings [B, tokens_per_image, hidden_size]."""

    def __init__(self, config: LlavaVisionConfig):
        super().__init__()
        self.config = config
        self.vision_tower = ClipVisionTower(config.vision, config.num_layers)
        self.multi_modal_projector = LlavaProjector(
            config.vision.hidden_size * len(config.feature_layers), config.lm_hidden_size, config.projector_act, config.projector_bias
        )
        self.preprocessor: ClipPreprocessor | None = None  # set by from_checkpoint

    @classmethod
    def build(cls, ckpt: Checkpoint) -> LlavaVisionModel:
        config = LlavaVisionConfig.from_config(ckpt.config)
        preprocessor = ClipPreprocessor.from_checkpoint(ckpt)
        _check_preprocessor(preprocessor, config.vision, ckpt.path)
        vision = config.vision
        with torch.device("meta"):
            full = ClipVisionTower(vision, vision.num_hidden_layers)
            check_tower_names(ckpt, VISION_PREFIX, full, f"a {vision.num_hidden_layers}-layer CLIP", unread=UNREAD_NAMES)
            model = cls(config)
            if VISION_PREFIX + "embeddings.position_ids" in ckpt.tensor_names(VISION_PREFIX + "embeddings."):
                # a buffer older transformers saved: loaded, for a strict load, then dropped by `prepare()`
                model.vision_tower.embeddings.register_buffer("position_ids", torch.empty(1, vision.num_patches + 1))
        model.preprocessor = preprocessor
        return model

    def checkpoint_parts(self) -> dict[str, nn.Module]:
        """Module by module, so deeper layers and post_layernorm are never read."""
        tower = self.vision_tower
        return {
            VISION_PREFIX + "embeddings.": tower.embeddings,
            VISION_PREFIX + "pre_layrnorm.": tower.pre_layrnorm,
            **{f"{VISION_PREFIX}encoder.layers.{i}.": layer for i, layer in enumerate(tower.encoder.layers)},
            PROJECTOR_PREFIX: self.multi_modal_projector,
        }

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values: [B, 3, H, W] → [B, N, hidden]
        layers = self.config.feature_layers
        states = self.vision_tower(pixel_values, keep=tuple(set(layers)))  # k → [B, 1 + P, D]
        start = 1 if self.config.select_strategy == "default" else 0  # "default" drops CLS
        return self.multi_modal_projector(select_features(states, layers, start))  # [B, N, D·k] → [B, N, hidden]

    @property
    def tokens_per_image(self) -> int:
        return self.config.vision.num_patches + (1 if self.config.select_strategy == "full" else 0)

    @property
    def hidden_size(self) -> int:
        """The language model's hidden size: the width of every embedding row."""
        return self.config.lm_hidden_size


def _check_preprocessor(preprocessor: ClipPreprocessor, vision: ClipVisionConfig, path: Path) -> None:
    """CLIP's position embeddings fix the input size; the preprocessor must produce exactly it."""
    if preprocessor.do_center_crop:
        size = preprocessor.crop_size
    elif preprocessor.do_resize and {"height", "width"} <= dict(preprocessor.size).keys():
        size = (dict(preprocessor.size)["height"], dict(preprocessor.size)["width"])
    else:
        raise CheckpointError(f"{path}: the preprocessor does not produce fixed-size images, but CLIP needs {vision.image_size}×{vision.image_size}")
    if size != (vision.image_size, vision.image_size):
        raise CheckpointError(f"{path}: the preprocessor produces {size[0]}×{size[1]} images, the vision tower takes {vision.image_size}×{vision.image_size}")
