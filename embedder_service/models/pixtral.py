"""Pixtral's image side, for Pixtral (LLaVA + Pixtral vision) and Mistral 3.1 (`mistral3`), in plain torch.

Matches `get_image_features` of `LlavaForConditionalGeneration` with a
`PixtralVisionConfig` and of `Mistral3ForConditionalGeneration`:

- the tower takes images at their own (patch-multiple) sizes: patch conv →
  RMSNorm `ln_pre` → blocks of RMSNorm + attention with a 2D rotary embedding
  over each patch's (row, col) + RMSNorm + gated MLP (SiLU). Several images go
  through together as one packed sequence of patches; attention stays inside
  each image (what the reference's block-diagonal mask does), computed per
  image so it costs Σ n_i², not (Σ n_i)²;
- Pixtral: the hidden states of `vision_feature_layer` → LLaVA's projector
  (Linear–GELU–Linear);
- Mistral 3.1: RMSNorm → 2×2 patch merger (`spatial_merge_size`) → the same
  projector, so an image gives (rows / 2) · (cols / 2) rows.

The container layout, `PixtralProcessor`'s `[IMG]`/`[IMG_BREAK]`/`[IMG_END]`
rows, is the family's: `shared.modeling.families.pixtral`.

The attention (2D RoPE, each image within itself) and the gated MLP are the towers'
shared `attention.VisionAttention` and `blocks.GatedVisionMLP`, as Qwen2-VL's are; only
the RoPE's frequencies, the names and the projectors are Pixtral's.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from embedder_service.models import VisionModel, check_tower_names, image_groups
from embedder_service.models.attention import Segments, VisionAttention, rope_2d
from embedder_service.models.blocks import (
    GatedVisionMLP,
    embed_patches,
    hidden_states,
    image_patches,
)
from embedder_service.models.gemm import activation, linear
from embedder_service.models.llava import (
    LlavaProjector,
    feature_layers,
    select_features,
)
from embedder_service.preprocess.pixtral import PixtralPreprocessor
from shared.config.errors import CheckpointError, InvalidInput
from shared.modeling.checkpoint import Checkpoint
from shared.modeling.layers import RMSNorm, RopeConfig, rope_inverse_frequencies

VISION_PREFIX = "vision_tower."
PROJECTOR_PREFIX = "multi_modal_projector."
NORM_EPS = 1e-5  # PixtralRMSNorm's eps in ln_pre and every block: fixed in the reference, not configured


@dataclass(frozen=True)
class PixtralVisionConfig:
    """`vision_config` of a checkpoint; missing keys take transformers' `PixtralVisionConfig` defaults."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    patch_size: int = 16
    hidden_act: str = "gelu"
    rope_theta: float = 10000.0

    @classmethod
    def from_dict(cls, config: dict) -> PixtralVisionConfig:
        rope = config.get("rope_parameters") or {}
        if rope.get("rope_type", "axial") != "axial":
            raise CheckpointError(f"Pixtral's vision RoPE must be axial, got {rope.get('rope_type')!r}")
        values = {f.name: config[f.name] for f in fields(cls) if config.get(f.name) is not None}
        values["rope_theta"] = float(rope.get("rope_theta", config.get("rope_theta", cls.rope_theta)))
        out = cls(**values)
        if out.hidden_size % out.num_attention_heads or out.head_dim % 4:
            raise CheckpointError(f"Pixtral head size {out.hidden_size}/{out.num_attention_heads} must be a whole multiple of 4 (2D RoPE)")
        activation(out.hidden_act)  # fail at load, not at the first image
        return out

    @property
    def head_dim(self) -> int:
        # transformers recomputes it from the sizes, whatever `head_dim` the config holds
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class PixtralModelConfig:
    vision: PixtralVisionConfig
    feature_layers: tuple[int, ...]  # hidden-state indices in [0, L] (0: after ln_pre), concatenated in order
    merge: int  # spatial_merge_size: 1 for Pixtral, 2 for Mistral 3.1
    projector_norm_eps: float | None  # Mistral 3.1's RMSNorm before the merger; None for Pixtral
    projector_act: str
    projector_bias: bool
    lm_hidden_size: int

    @classmethod
    def from_config(cls, config: dict) -> PixtralModelConfig:
        """From a `llava` (Pixtral) or `mistral3` config.json; missing keys take LlavaConfig's / Mistral3Config's defaults."""
        mistral3 = config.get("model_type") == "mistral3"
        vision = PixtralVisionConfig.from_dict(config.get("vision_config") or {})
        text = config.get("text_config") or {}
        layers = feature_layers(config, vision.num_hidden_layers, default=-1 if mistral3 else -2)  # 0: after ln_pre
        if mistral3 and len(layers) != 1:
            raise CheckpointError("Mistral 3.1's patch merger takes one vision feature layer, not a list")
        strategy = config.get("vision_feature_select_strategy", "default")
        if not mistral3 and strategy != "full":
            # "default" drops the first token of the packed sequence, which the reference then cannot split per image.
            raise CheckpointError(f"Pixtral needs vision_feature_select_strategy 'full', got {strategy!r}")
        act = config.get("projector_hidden_act", "gelu")
        activation(act)
        merge = int(config.get("spatial_merge_size", 2)) if mistral3 else 1
        if merge < 1:
            raise CheckpointError(f"spatial_merge_size must be positive, got {merge}")
        return cls(
            vision=vision,
            feature_layers=layers,
            merge=merge,
            projector_norm_eps=float(text.get("rms_norm_eps", 1e-6)) if mistral3 else None,  # MistralConfig's default
            projector_act=act,
            projector_bias=bool(config.get("multimodal_projector_bias", not mistral3)),
            lm_hidden_size=int(text.get("hidden_size", 5120 if mistral3 else 4096)),
        )

    @property
    def num_layers(self) -> int:
        """Blocks to build and run: up to the deepest selected hidden state."""
        return max(self.feature_layers)

    @property
    def block(self) -> int:
        """Pixels per side of one language-model token: patch × merge."""
        return self.vision.patch_size * self.merge


# ---------------------------------------------------------------------------
# The tower


class PixtralBlock(nn.Module):
    """Pre-norm block: x + attention(norm(x)), then + feed_forward(norm(x))."""

    def __init__(self, config: PixtralVisionConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, NORM_EPS)
        self.attention = VisionAttention(config.hidden_size, config.num_attention_heads, bias=False, rope=True, out_name="o_proj")
        self.ffn_norm = RMSNorm(config.hidden_size, NORM_EPS)
        self.feed_forward = GatedVisionMLP(config.hidden_size, config.intermediate_size, config.hidden_act, bias=False)

    def forward(self, x: Tensor, images: Segments, rotations: Tensor) -> Tensor:
        x = self.attention(self.attention_norm(x), x, images, rotations)
        return self.feed_forward(self.ffn_norm(x), x)


class PixtralTransformer(nn.Module):
    def __init__(self, config: PixtralVisionConfig, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(PixtralBlock(config) for _ in range(num_layers))


class PixtralVisionTower(nn.Module):
    """`PixtralVisionModel` truncated to its first `num_layers` blocks (the deepest hidden state read)."""

    def __init__(self, config: PixtralVisionConfig, num_layers: int):
        super().__init__()
        if not 0 <= num_layers <= config.num_hidden_layers:
            raise CheckpointError(f"cannot build {num_layers} of the {config.num_hidden_layers} Pixtral layers")
        self.config = config
        P = config.patch_size
        self.patch_conv = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=P, stride=P, bias=False)
        self.ln_pre = RMSNorm(config.hidden_size, NORM_EPS)
        self.transformer = PixtralTransformer(config, num_layers)

    def rotations(self, grids: list[tuple[int, int]], device) -> Tensor:
        """Each patch's 2D RoPE, images in order: [N, 1, hd/2] complex64.

        Rotation pair i < hd/4 turns with the patch's row at the even frequencies, pair hd/4 + i with its
        column at the odd ones (the reference's "H-W" recomposition of the frequencies).
        """
        inv_freq = rope_inverse_frequencies(RopeConfig(theta=self.config.rope_theta), self.config.head_dim).to(device)  # [hd/2]
        rows = torch.cat([torch.arange(h, device=device).repeat_interleave(w) for h, w in grids]).float()  # [N]
        cols = torch.cat([torch.arange(w, device=device).repeat(h) for h, w in grids]).float()  # [N]
        return rope_2d(rows, cols, inv_freq[0::2], inv_freq[1::2])

    def forward(self, pixels: list[Tensor], keep: tuple[int, ...]) -> dict[int, Tensor]:
        """B × [C, H_i, W_i] (sides multiples of the patch) → {k: hidden states after k blocks [N, D]}, images packed."""
        P = self.config.patch_size
        grids = [(p.shape[-2] // P, p.shape[-1] // P) for p in pixels]
        patches = torch.cat([image_patches(p, P) for p in pixels])  # [N, C·P·P], each image's row-major
        x = self.ln_pre(embed_patches(self.patch_conv, patches))  # [N, D]
        images = Segments(lengths=[h * w for h, w in grids])  # each image attends within itself
        return hidden_states(x, self.transformer.layers, keep, images, self.rotations(grids, x.device))


# ---------------------------------------------------------------------------
# Projectors


class Mistral3PatchMerger(nn.Module):
    """Mistral 3.1: each m×m block of patches → one vector (concatenated as `unfold` orders it) → Linear."""

    def __init__(self, hidden_size: int, merge: int):
        super().__init__()
        self.merge = merge
        self.merging_layer = nn.Linear(hidden_size * merge * merge, hidden_size, bias=False)

    def forward(self, x: Tensor, grids: list[tuple[int, int]]) -> Tensor:
        """x: [N, D] packed images, grids: each image's (rows, cols) in patches → [N / m², D]."""
        m, D = self.merge, x.shape[-1]
        blocks = []
        for image, (h, w) in zip(x.split([h * w for h, w in grids]), grids):
            # [h, w, D] → [h/m, w/m, D, m, m]: per merged cell, channel-major then the m×m offsets (unfold's order)
            cells = image.view(h // m, m, w // m, m, D).permute(0, 2, 4, 1, 3)
            blocks.append(cells.reshape((h // m) * (w // m), D * m * m))
        return linear(torch.cat(blocks), self.merging_layer.weight, None)


class Mistral3Projector(LlavaProjector):
    """RMSNorm → patch merger → LLaVA's Linear–act–Linear (Mistral3MultiModalProjector's parameter names)."""

    def __init__(self, vision_hidden: int, hidden_size: int, act: str, bias: bool, merge: int, eps: float):
        super().__init__(vision_hidden, hidden_size, act, bias)
        self.norm = RMSNorm(vision_hidden, eps)
        self.patch_merger = Mistral3PatchMerger(vision_hidden, merge)

    def forward(self, x: Tensor, grids: list[tuple[int, int]]) -> Tensor:
        # x: [N, D] → [N / m², D] → [N / m², hidden]
        return super().forward(self.patch_merger(self.norm(x), grids))


# ---------------------------------------------------------------------------
# The model the embedder runs


class PixtralVisionModel(VisionModel):
    """Preprocessed images [3, H_i, W_i] → projected rows, (H_i / block) · (W_i / block) per image."""

    def __init__(self, config: PixtralModelConfig):
        super().__init__()
        self.config = config
        v = config.vision
        self.vision_tower = PixtralVisionTower(v, config.num_layers)
        in_features = v.hidden_size * len(config.feature_layers)
        if config.projector_norm_eps is None:
            self.multi_modal_projector = LlavaProjector(in_features, config.lm_hidden_size, config.projector_act, config.projector_bias)
        else:
            self.multi_modal_projector = Mistral3Projector(
                in_features, config.lm_hidden_size, config.projector_act, config.projector_bias, config.merge, config.projector_norm_eps
            )
        self.preprocessor: PixtralPreprocessor | None = None  # set by from_checkpoint

    @classmethod
    def build(cls, ckpt: Checkpoint) -> PixtralVisionModel:
        config = PixtralModelConfig.from_config(ckpt.config)
        preprocessor = PixtralPreprocessor.from_checkpoint(ckpt, patch_size=config.block)
        if preprocessor.patch_size != config.block:
            raise CheckpointError(
                f"{ckpt.path}: the processor resizes to multiples of {preprocessor.patch_size} pixels, but the vision tower "
                f"needs multiples of patch {config.vision.patch_size} × merge {config.merge} = {config.block}"
            )
        vision = config.vision
        with torch.device("meta"):
            full = PixtralVisionTower(vision, vision.num_hidden_layers)
            check_tower_names(ckpt, VISION_PREFIX, full, f"a {vision.num_hidden_layers}-layer Pixtral tower")
            model = cls(config)
        model.preprocessor = preprocessor
        return model

    def checkpoint_parts(self) -> dict[str, nn.Module]:
        """Module by module, so blocks past the deepest selected one are never read."""
        tower = self.vision_tower
        return {
            VISION_PREFIX + "patch_conv.": tower.patch_conv,
            VISION_PREFIX + "ln_pre.": tower.ln_pre,
            **{f"{VISION_PREFIX}transformer.layers.{i}.": layer for i, layer in enumerate(tower.transformer.layers)},
            PROJECTOR_PREFIX: self.multi_modal_projector,
        }

    def forward(self, pixels: list[Tensor]) -> list[Tensor]:
        """B × [3, H_i, W_i] on the model's device and dtype → B × [rows_i · cols_i, hidden]."""
        c = self.config
        for p in pixels:
            if p.dim() != 3 or p.shape[0] != c.vision.num_channels or p.shape[1] % c.block or p.shape[2] % c.block or 0 in p.shape:
                raise InvalidInput(f"pixel values must be [{c.vision.num_channels}, H, W] with H and W positive multiples of {c.block}, got {list(p.shape)}")
        states = self.vision_tower(pixels, keep=tuple(set(c.feature_layers)))  # k → [N, D]
        features = select_features(states, c.feature_layers)  # [N, D·k]
        if isinstance(self.multi_modal_projector, Mistral3Projector):
            P = c.vision.patch_size
            rows = self.multi_modal_projector(features, [(p.shape[1] // P, p.shape[2] // P) for p in pixels])
        else:
            rows = self.multi_modal_projector(features)  # [N, hidden]
        return list(rows.split([self.num_tokens(p) for p in pixels]))

    @torch.inference_mode()
    def embed_batch(self, pixels: list[Tensor]) -> list[Tensor]:
        """Preprocessed images of any sizes → one [rows · cols, hidden] tensor each (on the model's device), a few per pass."""
        P = self.config.vision.patch_size
        rows = []
        for group in image_groups([(p.shape[-2] // P) * (p.shape[-1] // P) for p in pixels]):
            rows += self([pixels[i].to(self.device, self.dtype) for i in group])
        return rows

    def grid_size(self, pixels: Tensor) -> tuple[int, int]:
        """(rows, cols) of language-model tokens of a preprocessed image: after merging."""
        return pixels.shape[-2] // self.config.block, pixels.shape[-1] // self.config.block

    def num_tokens(self, pixels: Tensor) -> int:
        rows, cols = self.grid_size(pixels)
        return rows * cols

    def grid_for(self, pixels: Tensor) -> tuple[int, int, int]:
        """(1, rows, cols) after merging: the row layout of the container."""
        return (1, *self.grid_size(pixels))

    @property
    def hidden_size(self) -> int:
        """The language model's hidden size: the width of every embedding row."""
        return self.config.lm_hidden_size
