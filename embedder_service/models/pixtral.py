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

The container layout is what `PixtralProcessor` writes for an image of
rows × cols tokens: `[IMG]`×cols `[IMG_BREAK]` per row, the last break
replaced by `[IMG_END]`; only the `[IMG]` positions are container rows.

Attention reuses `shared.modeling.layers`' RMSNorm and RoPE helpers: after loading, Q/K/V
are fused with their RoPE rows interleaved and the softmax scale folded into Q
(`prepare()`), as in the language model; every GEMM is the towers' `linear`. The
per-image attention, the MLP and the batching are `embedder_service.models.vision`'s,
shared with Qwen2-VL.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import Tensor, nn

from embedder_service.models import VisionModel, open_checkpoint
from embedder_service.models.clip import activation, linear
from embedder_service.models.llava import LlavaProjector
from embedder_service.models.vision import (
    GatedVisionMLP,
    Segments,
    image_groups,
    rotate_into_heads,
)
from embedder_service.preprocess.pixtral import PixtralPreprocessor
from shared.config.errors import CheckpointError, InvalidInput
from shared.modeling.checkpoint import Checkpoint
from shared.modeling.layers import RMSNorm, interleave_rope_rows
from shared.store.container import Layout

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
        layer = config.get("vision_feature_layer", -1 if mistral3 else -2)
        layers = [layer] if isinstance(layer, int) else list(layer)
        num_states = vision.num_hidden_layers + 1  # after ln_pre + one per layer
        if not layers or not all(isinstance(i, int) and -num_states <= i < num_states for i in layers):
            raise CheckpointError(f"vision_feature_layer {layer!r} must be an index (or list of indices) in [-{num_states}, {num_states - 1}]")
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
            feature_layers=tuple(i % num_states for i in layers),
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


class PixtralAttention(nn.Module):
    """Bidirectional multi-head attention with 2D RoPE (transformers' parameter names, no biases)."""

    def __init__(self, config: PixtralVisionConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def prepare(self) -> None:
        """One QKV projection, Q/K rows RoPE-interleaved (see `shared.modeling.layers`), 1/√hd folded into Q."""
        c = self.config
        h, hd = c.num_attention_heads, c.head_dim
        weights = [
            interleave_rope_rows(self.q_proj.weight, h, hd) * hd**-0.5,
            interleave_rope_rows(self.k_proj.weight, h, hd),
            self.v_proj.weight,
        ]
        self.wqkv = torch.cat(weights)  # [3D, D]
        self.wo = self.o_proj.weight.detach()
        del self.q_proj, self.k_proj, self.v_proj, self.o_proj

    def forward(self, x: Tensor, residual: Tensor, rotations: Tensor, images: Segments) -> Tensor:
        """x: [N, D] normed, residual: [N, D], rotations: [N, 1, hd/2] complex → residual + attention: [N, D]."""
        qkv = rotate_into_heads(linear(x, self.wqkv, None), rotations, self.config.num_attention_heads)  # [3, H, N, hd]
        out = images.attention(qkv, scale=1.0)  # [N, D]; 1/√hd is in Q's weights
        return linear(out, self.wo, None, residual=residual)


class PixtralBlock(nn.Module):
    """Pre-norm block: x + attention(norm(x)), then + feed_forward(norm(x))."""

    def __init__(self, config: PixtralVisionConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, NORM_EPS)
        self.attention = PixtralAttention(config)
        self.ffn_norm = RMSNorm(config.hidden_size, NORM_EPS)
        self.feed_forward = GatedVisionMLP(config.hidden_size, config.intermediate_size, config.hidden_act, bias=False)

    def forward(self, x: Tensor, rotations: Tensor, images: Segments) -> Tensor:
        x = self.attention(self.attention_norm(x), x, rotations, images)
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

    def prepare(self) -> None:
        c = self.config
        # A P×P, stride-P convolution is one GEMM over the flattened (C, P, P) patches.
        self.w_patch = self.patch_conv.weight.detach().reshape(c.hidden_size, -1)  # [D, C·P·P]
        for layer in self.transformer.layers:
            layer.attention.prepare()
        hd = c.head_dim
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float) / hd))  # [hd/2], as the reference
        # Rotation pair i < hd/4 turns with the patch's row at the even frequencies, pair hd/4 + i with its
        # column at the odd ones (the reference's "H-W" recomposition of the frequencies).
        self.row_freq, self.col_freq = inv_freq[0::2].to(self.ln_pre.weight.device), inv_freq[1::2].to(self.ln_pre.weight.device)

    def rotations(self, grids: list[tuple[int, int]], device) -> Tensor:
        """Each patch's 2D RoPE, images in order: [N, 1, hd/2] complex64."""
        rows = torch.cat([torch.arange(h, device=device).repeat_interleave(w) for h, w in grids]).float()  # [N]
        cols = torch.cat([torch.arange(w, device=device).repeat(h) for h, w in grids]).float()  # [N]
        angles = torch.cat([rows[:, None] * self.row_freq, cols[:, None] * self.col_freq], dim=1)  # [N, hd/2]
        return torch.polar(torch.ones_like(angles), angles).unsqueeze(1)

    def forward(self, pixels: list[Tensor], keep: tuple[int, ...]) -> dict[int, Tensor]:
        """B × [C, H_i, W_i] (sides multiples of the patch) → {k: hidden states after k blocks [N, D]}, images packed."""
        c = self.config
        P = c.patch_size
        grids = [(p.shape[-2] // P, p.shape[-1] // P) for p in pixels]
        patches = torch.cat([
            p.view(c.num_channels, h, P, w, P).permute(1, 3, 0, 2, 4).reshape(h * w, -1)  # [h·w, C·P·P], row-major
            for p, (h, w) in zip(pixels, grids)
        ])
        x = self.ln_pre(linear(patches, self.w_patch, None))  # [N, D]
        rotations = self.rotations(grids, x.device)
        images = Segments(lengths=[h * w for h, w in grids])  # each image attends within itself
        states = {0: x} if 0 in keep else {}
        for k, layer in enumerate(self.transformer.layers, start=1):
            x = layer(x, rotations, images)
            if k in keep:
                states[k] = x
        return states


# ---------------------------------------------------------------------------
# Projectors


class PatchMerger(nn.Module):
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
        self.patch_merger = PatchMerger(vision_hidden, merge)

    def forward(self, x: Tensor, grids: list[tuple[int, int]]) -> Tensor:
        # x: [N, D] → [N / m², D] → [N / m², hidden]
        return super().forward(self.patch_merger(self.norm(x), grids))


# ---------------------------------------------------------------------------
# The model the embedder runs


class PixtralVisionModel(VisionModel):
    """Preprocessed images [3, H_i, W_i] → projected rows, (H_i / block) · (W_i / block) per image."""

    def __init__(self, config: PixtralModelConfig, break_id: int = 0, end_id: int = 0):
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
        self.break_id, self.end_id = break_id, end_id  # [IMG_BREAK], [IMG_END]
        self.preprocessor: PixtralPreprocessor | None = None  # set by from_checkpoint

    @classmethod
    def from_checkpoint(
        cls, ckpt: Checkpoint | str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32
    ) -> PixtralVisionModel:
        ckpt, dtype = open_checkpoint(cls, ckpt, device, dtype)
        config = PixtralModelConfig.from_config(ckpt.config)
        preprocessor = PixtralPreprocessor.from_checkpoint(ckpt, patch_size=config.block)
        if preprocessor.patch_size != config.block:
            raise CheckpointError(
                f"{ckpt.path}: the processor resizes to multiples of {preprocessor.patch_size} pixels, but the vision tower "
                f"needs multiples of patch {config.vision.patch_size} × merge {config.merge} = {config.block}"
            )
        break_id, end_id = _layout_token_ids(ckpt)
        _check_vision_names(ckpt, config.vision)

        with torch.device("meta"):
            model = cls(config, break_id, end_id)
        tower = model.vision_tower
        # Module by module, so blocks past the deepest selected one are never read; each load is strict.
        ckpt.load_into(tower.patch_conv, VISION_PREFIX + "patch_conv.", dtype, device)
        ckpt.load_into(tower.ln_pre, VISION_PREFIX + "ln_pre.", dtype, device)
        for i, layer in enumerate(tower.transformer.layers):
            ckpt.load_into(layer, f"{VISION_PREFIX}transformer.layers.{i}.", dtype, device)
        ckpt.load_into(model.multi_modal_projector, PROJECTOR_PREFIX, dtype, device)

        model.requires_grad_(False).eval()
        tower.prepare()
        model.preprocessor = preprocessor
        model._fingerprint = ckpt.fingerprint
        return model

    def forward(self, pixels: list[Tensor]) -> list[Tensor]:
        """B × [3, H_i, W_i] on the model's device and dtype → B × [rows_i · cols_i, hidden]."""
        c = self.config
        for p in pixels:
            if p.dim() != 3 or p.shape[0] != c.vision.num_channels or p.shape[1] % c.block or p.shape[2] % c.block or 0 in p.shape:
                raise InvalidInput(f"pixel values must be [{c.vision.num_channels}, H, W] with H and W positive multiples of {c.block}, got {list(p.shape)}")
        states = self.vision_tower(pixels, keep=tuple(set(c.feature_layers)))  # k → [N, D]
        selected = [states[k] for k in c.feature_layers]
        features = selected[0] if len(selected) == 1 else torch.cat(selected, dim=-1)  # [N, D·k]
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
        for group in image_groups([(p.shape[-2] // P) * (p.shape[-1] // P) for p in pixels]):  # see `vision`
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

    def layout_for(self, pixels: Tensor) -> Layout:
        """`[IMG]`×cols `[IMG_BREAK]` per row, the last break an `[IMG_END]` (PixtralProcessor.replace_image_token)."""
        return Layout(after=(self.end_id,), row_length=self.grid_size(pixels)[1], row_break_id=self.break_id)

    @property
    def hidden_size(self) -> int:
        """The language model's hidden size: the width of every embedding row."""
        return self.config.lm_hidden_size


def _layout_token_ids(ckpt: Checkpoint) -> tuple[int, int]:
    """IDs of the processor's `[IMG_BREAK]` and `[IMG_END]` (token texts from processor_config.json, IDs from tokenizer.json)."""
    from tokenizers import Tokenizer

    processor = ckpt.optional_json("processor_config.json")
    names = (processor.get("image_break_token") or "[IMG_BREAK]", processor.get("image_end_token") or "[IMG_END]")
    file = ckpt.path / "tokenizer.json"
    if not file.is_file():
        raise CheckpointError(f"{ckpt.path}: tokenizer.json is missing (the ids of {names[0]} and {names[1]} come from it)")
    tokenizer = Tokenizer.from_file(str(file))
    ids = [tokenizer.token_to_id(name) for name in names]
    missing = [name for name, i in zip(names, ids) if i is None]
    if missing:
        raise CheckpointError(f"{ckpt.path}: tokenizer.json has no {' or '.join(missing)} token")
    return ids[0], ids[1]


def _check_vision_names(ckpt: Checkpoint, vision: PixtralVisionConfig) -> None:
    """Refuse vision tensors a Pixtral tower of this config does not have, in blocks read or not."""
    with torch.device("meta"):
        known = set(PixtralVisionTower(vision, vision.num_hidden_layers).state_dict())
    unexpected = [n for n in ckpt.tensor_names(VISION_PREFIX) if n[len(VISION_PREFIX) :] not in known]
    if unexpected:
        raise CheckpointError(f"{ckpt.path}: unexpected vision tensors for a {vision.num_hidden_layers}-layer Pixtral tower: {unexpected}")
