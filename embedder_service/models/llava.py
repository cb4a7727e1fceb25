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

from embedder_service.models import FixedSizeVisionModel, open_checkpoint
from embedder_service.models.clip import (
    ClipVisionConfig,
    ClipVisionTower,
    activation,
    linear,
)
from embedder_service.preprocess.clip import ClipPreprocessor
from shared.config.errors import CheckpointError
from shared.modeling.checkpoint import Checkpoint
from shared.store.container import Layout

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
        layer = config.get("vision_feature_layer", -2)
        layers = [layer] if isinstance(layer, int) else list(layer)
        num_states = vision.num_hidden_layers + 1  # embeddings + one per layer
        if not layers or not all(isinstance(i, int) and -num_states <= i < num_states for i in layers):
            raise CheckpointError(f"vision_feature_layer {layer!r} must be an index (or list of indices) in [-{num_states}, {num_states - 1}]")
        strategy = config.get("vision_feature_select_strategy", "default")
        if strategy not in STRATEGIES:
            raise CheckpointError(f"vision_feature_select_strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
        act = config.get("projector_hidden_act", "gelu")
        activation(act)
        return cls(
            vision=vision,
            feature_layers=tuple(i % num_states for i in layers),
            select_strategy=strategy,
            projector_act=act,
            projector_bias=bool(config.get("multimodal_projector_bias", True)),
            lm_hidden_size=int((config.get("text_config") or {}).get("hidden_size", 4096)),  # LlamaConfig's default
        )

    @property
    def num_layers(self) -> int:
        """Encoder layers to build and run: up to the deepest selected hidden state."""
        return max(self.feature_layers)


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
    def from_checkpoint(
        cls, ckpt: Checkpoint | str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32
    ) -> LlavaVisionModel:
        ckpt, dtype = open_checkpoint(cls, ckpt, device, dtype)
        config = LlavaVisionConfig.from_config(ckpt.config)
        preprocessor = ClipPreprocessor.from_checkpoint(ckpt)
        _check_preprocessor(preprocessor, config.vision, ckpt.path)
        _check_vision_names(ckpt, config.vision)

        with torch.device("meta"):
            model = cls(config)
        tower = model.vision_tower
        # Module by module, so deeper layers and post_layernorm are never read; each load is strict.
        embedding_names = ckpt.tensor_names(VISION_PREFIX + "embeddings.")
        if VISION_PREFIX + "embeddings.position_ids" in embedding_names:  # a buffer older transformers saved
            tower.embeddings.register_buffer("position_ids", torch.empty(1, config.vision.num_patches + 1, device="meta"))
        ckpt.load_into(tower.embeddings, VISION_PREFIX + "embeddings.", dtype, device)
        tower.embeddings._buffers.pop("position_ids", None)
        ckpt.load_into(tower.pre_layrnorm, VISION_PREFIX + "pre_layrnorm.", dtype, device)
        for i, layer in enumerate(tower.encoder.layers):
            ckpt.load_into(layer, f"{VISION_PREFIX}encoder.layers.{i}.", dtype, device)
        ckpt.load_into(model.multi_modal_projector, PROJECTOR_PREFIX, dtype, device)

        model.requires_grad_(False).eval()
        tower.fuse_()
        model.preprocessor = preprocessor
        model._fingerprint = ckpt.fingerprint
        return model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values: [B, 3, H, W] → [B, N, hidden]
        layers = self.config.feature_layers
        states = self.vision_tower(pixel_values, keep=tuple(set(layers)))  # k → [B, 1 + P, D]
        start = 1 if self.config.select_strategy == "default" else 0  # "default" drops CLS
        selected = [states[k][:, start:] for k in layers]
        features = selected[0] if len(selected) == 1 else torch.cat(selected, dim=-1)  # [B, N, D·k]
        return self.multi_modal_projector(features)

    @property
    def tokens_per_image(self) -> int:
        return self.config.vision.num_patches + (1 if self.config.select_strategy == "full" else 0)

    @property
    def hidden_size(self) -> int:
        """The language model's hidden size: the width of every embedding row."""
        return self.config.lm_hidden_size

    @property
    def layout(self) -> Layout:
        """LLaVA-1.5's processor expands `<image>` into image tokens only: nothing before, after or between rows."""
        return Layout()

    def layout_for(self, pixel_values: torch.Tensor) -> Layout:
        """The same for every image."""
        return self.layout


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


def _check_vision_names(ckpt: Checkpoint, vision: ClipVisionConfig) -> None:
    """Refuse vision tensors a CLIP of this config does not have, anywhere in the tower, read or not."""
    known = ClipVisionTower.checkpoint_names(vision)
    unexpected = [n for n in ckpt.tensor_names("vision_tower.") if not (n.startswith(VISION_PREFIX) and n[len(VISION_PREFIX) :] in known)]
    if unexpected:
        raise CheckpointError(f"{ckpt.path}: unexpected vision tensors for a {vision.num_hidden_layers}-layer CLIP: {unexpected}")
