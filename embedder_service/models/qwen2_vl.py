"""Qwen2-VL and Qwen2.5-VL's image side: a dynamic-resolution ViT and its 2×2 patch merger, in plain torch.

Matches `Qwen2VLForConditionalGeneration.get_image_features` (and Qwen2.5-VL's).
An image is its patches ([t·h·w, C·T·P·P], `preprocess.qwen2_vl`) and its grid
(t, h, w). The tower embeds each patch (the Conv3d as one GEMM), rotates queries
and keys by the patch's (row, column) — the 2D vision RoPE — and runs its blocks;
the merger then joins each 2×2 block of patches into one row of the language
model's width, so an image gives t·(h/2)·(w/2) rows, in row-major order of the
merged grid.

Several images of different sizes run in one batch: their patches are
concatenated and every attention is limited to one frame of one image (the
reference's `cu_seqlens`). The variants differ by config fields only:

| | Qwen2-VL | Qwen2.5-VL |
|---|---|---|
| norms | LayerNorm | RMSNorm |
| MLP | fc1–act–fc2 (`mlp_ratio`) | SwiGLU with biases (`intermediate_size`) |
| attention | whole image | windows of `window_size` px, whole image in `fullatt_block_indexes` |
| widths | `embed_dim`, merger out `hidden_size` | `hidden_size`, merger out `out_hidden_size` |

Parameter names are the checkpoint's under `visual.`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from embedder_service.models import VisionModel, image_groups
from embedder_service.models.attention import Segments, VisionAttention, rope_2d
from embedder_service.models.blocks import GatedVisionMLP, VisionMLP, embed_patches
from embedder_service.models.gemm import activation, linear
from embedder_service.preprocess.qwen2_vl import PatchedImage, Qwen2VLPreprocessor
from shared.config.errors import CheckpointError, InvalidInput
from shared.modeling.checkpoint import Checkpoint
from shared.modeling.layers import RMSNorm, RopeConfig, rope_inverse_frequencies

VISION_PREFIX = "visual."
NORM_EPS = 1e-6  # fixed in both references' vision blocks and merger
VARIANTS = ("qwen2_vl", "qwen2_5_vl")


@dataclass(frozen=True)
class Qwen2VLVisionConfig:
    """The vision tower of a Qwen2-VL / Qwen2.5-VL `config.json`; missing keys take transformers' defaults."""

    depth: int
    embed_dim: int  # the tower's width
    num_heads: int
    intermediate_size: int
    hidden_act: str
    out_hidden_size: int  # the merger's output: the language model's hidden size
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    rope_theta: float = 10000.0
    rms_norm: bool = False  # Qwen2.5-VL: RMSNorm in the blocks and the merger; Qwen2-VL: LayerNorm
    gated_mlp: bool = False  # Qwen2.5-VL: down(act(gate(x)) · up(x)), biases on all three
    window_size: int | None = None  # Qwen2.5-VL: side in pixels of the attention windows; None: no windows
    fullatt_block_indexes: tuple[int, ...] = ()  # blocks that attend over the whole image even with windows

    @classmethod
    def from_config(cls, config: dict) -> Qwen2VLVisionConfig:
        variant = config.get("model_type")
        if variant not in VARIANTS:
            raise CheckpointError(f"model_type {variant!r} is not one of {', '.join(VARIANTS)}")
        v = {k: x for k, x in (config.get("vision_config") or {}).items() if x is not None}
        common = dict(
            depth=int(v.get("depth", 32)),
            num_heads=int(v.get("num_heads", 16)),
            in_channels=int(v.get("in_channels", v.get("in_chans", 3))),  # published configs say in_chans
            patch_size=int(v.get("patch_size", 14)),
            temporal_patch_size=int(v.get("temporal_patch_size", 2)),
            spatial_merge_size=int(v.get("spatial_merge_size", 2)),
            rope_theta=float((v.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
        )
        if variant == "qwen2_vl":
            embed_dim = int(v.get("embed_dim", 1280))
            out = cls(**common, embed_dim=embed_dim, intermediate_size=int(embed_dim * v.get("mlp_ratio", 4)),
                      hidden_act=v.get("hidden_act", "quick_gelu"), out_hidden_size=int(v.get("hidden_size", 3584)))
        else:
            out = cls(**common, embed_dim=int(v.get("hidden_size", 3584)), intermediate_size=int(v.get("intermediate_size", 3420)),
                      hidden_act=v.get("hidden_act", "silu"), out_hidden_size=int(v.get("out_hidden_size", 3584)),
                      rms_norm=True, gated_mlp=True, window_size=int(v.get("window_size", 112)),
                      fullatt_block_indexes=tuple(int(i) for i in v.get("fullatt_block_indexes", (7, 15, 23, 31))))
        activation(out.hidden_act)  # fail at load, not at the first image
        if out.embed_dim % out.num_heads or out.head_dim % 4:
            raise CheckpointError(f"vision embed_dim {out.embed_dim} / num_heads {out.num_heads} must give a head size divisible by 4 (2D RoPE)")
        if out.window_size is not None and out.window_cells < 1:
            raise CheckpointError(f"window_size {out.window_size} is smaller than one merged patch ({out.patch_size * out.spatial_merge_size} px)")
        return out

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values per flattened patch: C·T·P·P."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        """Patches joined into one output row."""
        return self.spatial_merge_size**2

    @property
    def window_cells(self) -> int:
        """Side of an attention window in merged patches."""
        return self.window_size // self.spatial_merge_size // self.patch_size


# --- which tokens attend to which ------------------------------------------------------------------


def frame_segments(grids: list[tuple[int, int, int]]) -> Segments:
    """Every frame of every image attends within itself (the reference's cu_seqlens)."""
    return Segments(lengths=[h * w for t, h, w in grids for _ in range(t)])


def window_segments(grids: list[tuple[int, int, int]], config: Qwen2VLVisionConfig, device) -> Segments:
    """Qwen2.5-VL's windows: squares of `window_cells`² merged patches, tiling each frame from its top left.

    The reference reorders the tokens window by window and cuts them with
    cu_window_seqlens; gathering each window's tokens instead gives the same groups
    and leaves the tokens in place (no reordering before the merger, nor undoing after).
    """
    m, ws, unit = config.spatial_merge_size, config.window_cells, config.merge_unit
    windows, offset = [], 0
    for t, h, w in grids:
        lh, lw = h // m, w // m
        cells = torch.arange(t * lh * lw).view(t, lh, lw) + offset // unit  # merged patch numbers, batch-wide
        cells = F.pad(cells, (0, -lw % ws, 0, -lh % ws), value=-1)  # [t, nh·ws, nw·ws], -1 outside the image
        nh, nw = cells.shape[1] // ws, cells.shape[2] // ws
        cells = cells.view(t, nh, ws, nw, ws).permute(0, 1, 3, 2, 4).reshape(t * nh * nw, ws * ws)  # one row per window
        tokens = torch.where(cells[..., None] >= 0, cells[..., None] * unit + torch.arange(unit), -1)  # a cell's `unit` patches
        windows.append(tokens.view(t * nh * nw, ws * ws * unit))
        offset += t * h * w
    return Segments(index=torch.cat(windows).to(device))


def patch_positions(grids: list[tuple[int, int, int]], merge: int) -> Tensor:
    """[N, 2] (row, column) of every patch, in the preprocessor's block-by-block order."""
    out = []
    for t, h, w in grids:
        rows = torch.arange(h)[:, None].expand(h, w)
        cols = torch.arange(w)[None, :].expand(h, w)
        blocked = [p.reshape(h // merge, merge, w // merge, merge).transpose(1, 2).flatten() for p in (rows, cols)]
        out.append(torch.stack(blocked, dim=-1).repeat(t, 1))
    return torch.cat(out)


# --- modules (the checkpoint's names) --------------------------------------------------------------


def _norm(config: Qwen2VLVisionConfig) -> nn.Module:
    return RMSNorm(config.embed_dim, NORM_EPS) if config.rms_norm else nn.LayerNorm(config.embed_dim, eps=NORM_EPS)


class PatchEmbed(nn.Module):
    def __init__(self, config: Qwen2VLVisionConfig):
        super().__init__()
        kernel = (config.temporal_patch_size, config.patch_size, config.patch_size)
        self.proj = nn.Conv3d(config.in_channels, config.embed_dim, kernel_size=kernel, stride=kernel, bias=False)

    def forward(self, patches: Tensor) -> Tensor:
        # patches: [N, C·T·P·P], each in the weight's (C, T, P, P) order → [N, D]
        return embed_patches(self.proj, patches)


class Qwen2VLBlock(nn.Module):
    def __init__(self, config: Qwen2VLVisionConfig):
        super().__init__()
        D, inner = config.embed_dim, config.intermediate_size
        self.norm1, self.norm2 = _norm(config), _norm(config)
        self.attn = VisionAttention(D, config.num_heads, bias=True, rope=True, fused_qkv=True, out_name="proj")
        self.mlp = GatedVisionMLP(D, inner, config.hidden_act, bias=True) if config.gated_mlp else VisionMLP(D, inner, config.hidden_act)

    def forward(self, x: Tensor, segments: Segments, rotations: Tensor) -> Tensor:
        # x: [N, D], pre-norm residual blocks; the residual adds are proj's and the MLP's last GEMM's (`linear`)
        x = self.attn(self.norm1(x), x, segments, rotations)
        return self.mlp(self.norm2(x), x)


class Qwen2VLPatchMerger(nn.Module):
    """Norm, then each merge block's patches side by side ([unit·D]) → Linear–GELU–Linear → the LM's width."""

    def __init__(self, config: Qwen2VLVisionConfig):
        super().__init__()
        self.ln_q = _norm(config)
        wide = config.embed_dim * config.merge_unit
        self.mlp = nn.Sequential(nn.Linear(wide, wide), nn.GELU(), nn.Linear(wide, config.out_hidden_size))

    def forward(self, x: Tensor) -> Tensor:
        # x: [N, D] with each block's patches consecutive → [N / unit, unit·D] → [N / unit, out]
        first, last = self.mlp[0], self.mlp[2]
        h = self.ln_q(x).view(-1, first.weight.shape[1])
        return linear(linear(h, first.weight, first.bias, act="gelu"), last.weight, last.bias)


class Qwen2VisionTower(nn.Module):
    def __init__(self, config: Qwen2VLVisionConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.blocks = nn.ModuleList(Qwen2VLBlock(config) for _ in range(config.depth))
        self.merger = Qwen2VLPatchMerger(config)

    def rotations(self, grids: list[tuple[int, int, int]], device) -> Tensor:
        """[N, 1, hd/2] complex: the first hd/4 pairs turn with the patch's row, the rest with its column, at the same speeds."""
        c = self.config
        inv_freq = rope_inverse_frequencies(RopeConfig(theta=c.rope_theta), c.head_dim // 2)  # [hd/4]
        rows, cols = patch_positions(grids, c.spatial_merge_size).float().unbind(1)  # [N] each
        return rope_2d(rows, cols, inv_freq, inv_freq).to(device)

    def forward(self, patches: Tensor, grids: list[tuple[int, int, int]]) -> Tensor:
        """patches: [N, C·T·P·P] of the images in `grids` order → [N / unit, out], image after image."""
        c, device = self.config, patches.device
        if patches.shape != (sum(t * h * w for t, h, w in grids), c.patch_dim):
            raise InvalidInput(f"patches {list(patches.shape)} do not fit grids {grids} of {c.patch_dim}-value patches")
        whole = frame_segments(grids)
        windows = window_segments(grids, c, device) if c.window_size is not None else whole
        rotations = self.rotations(grids, device)
        x = self.patch_embed(patches)  # [N, D]
        for i, block in enumerate(self.blocks):
            x = block(x, whole if c.window_size is None or i in c.fullatt_block_indexes else windows, rotations)
        return self.merger(x)


# --- the embedder's model -------------------------------------------------------------------------------


class Qwen2VLVisionModel(VisionModel):
    """Images → rows for the language model: t·(h/m)·(w/m) of them per image, `out_hidden_size` wide."""

    def __init__(self, config: Qwen2VLVisionConfig):
        super().__init__()
        self.config = config
        self.visual = Qwen2VisionTower(config)
        self.preprocessor: Qwen2VLPreprocessor | None = None  # set by from_checkpoint

    @classmethod
    def build(cls, ckpt: Checkpoint) -> Qwen2VLVisionModel:
        config = Qwen2VLVisionConfig.from_config(ckpt.config)
        preprocessor = Qwen2VLPreprocessor.from_checkpoint(ckpt)
        tower_sizes = (config.patch_size, config.temporal_patch_size, config.spatial_merge_size)
        if (preprocessor.patch_size, preprocessor.temporal_patch_size, preprocessor.merge_size) != tower_sizes:
            raise CheckpointError(
                f"{ckpt.path}: the preprocessor's patch, temporal patch and merge sizes "
                f"{(preprocessor.patch_size, preprocessor.temporal_patch_size, preprocessor.merge_size)} differ from the vision tower's {tower_sizes}"
            )
        with torch.device("meta"):
            model = cls(config)
        model.preprocessor = preprocessor
        return model

    def checkpoint_parts(self) -> dict[str, nn.Module]:
        """The whole tower and merger: every tensor under `visual.` is read."""
        return {VISION_PREFIX: self.visual}

    def forward(self, patches: Tensor, grids: list[tuple[int, int, int]]) -> Tensor:
        """patches: [N, C·T·P·P] (images concatenated), grids: each image's (t, h, w) in patches → [N / unit, hidden]."""
        return self.visual(patches.to(self.device, self.dtype), grids)

    @torch.inference_mode()
    def embed_batch(self, images: list[PatchedImage]) -> list[Tensor]:
        """Preprocessed images of any sizes → one [t·(h/m)·(w/m), hidden] tensor each, through the tower a few together."""
        if not images:
            return []
        rows = []
        for group in image_groups([image.patches.shape[0] for image in images]):  # a few images per pass
            grids = [images[i].grid for i in group]
            out = self(torch.cat([images[i].patches for i in group]), grids)
            rows += out.split([t * h * w // self.config.merge_unit for t, h, w in grids])
        return rows

    def grid_for(self, image: PatchedImage) -> tuple[int, int, int]:
        """(t, h, w) of the merged grid: the rows' layout, which the language model's M-RoPE reads."""
        t, h, w = image.grid
        m = self.config.spatial_merge_size
        return t, h // m, w // m

    def processed_size(self, image: PatchedImage) -> tuple[int, int]:
        """(height, width) of the resized image."""
        return image.height, image.width

    @property
    def hidden_size(self) -> int:
        return self.config.out_hidden_size
