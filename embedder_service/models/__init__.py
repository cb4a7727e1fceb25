"""Vision models of the embedder: one file per family, chosen by `shared.modeling.registry` from `config.json`.

Every family's model is a `VisionModel` with the same surface: `from_checkpoint(ckpt, device, dtype)`,
`preprocessor` (PIL image → what the model takes, "pixels"; its size may vary by image),
`embed_batch(list of pixels) -> list[[N_i, hidden]]`, `embed(images) -> list[[N_i, hidden]]`,
`fingerprint`, `hidden_size`, `device`, `dtype`, and per image `layout_for(pixels)`, `grid_for(pixels)`,
`processed_size(pixels) -> (height, width)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from shared.config.errors import CheckpointError
from shared.modeling.checkpoint import Checkpoint, resolve_dtype
from shared.modeling.registry import family_for


def load_vision_model(ckpt: Checkpoint | str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str = "auto") -> torch.nn.Module:
    """The vision model (tower + projector) of any supported checkpoint; CheckpointError otherwise."""
    ckpt = ckpt if isinstance(ckpt, Checkpoint) else Checkpoint(ckpt)
    return family_for(ckpt.config).load_vision_class().from_checkpoint(ckpt, device=device, dtype=dtype)


def open_checkpoint(
    model_class: type, ckpt: Checkpoint | str | Path, device: str | torch.device, dtype: torch.dtype | str
) -> tuple[Checkpoint, torch.dtype]:
    """What every `from_checkpoint` starts with: the folder, refused unless the registry serves it with
    `model_class` (an unknown architecture lists the supported ones), and the dtype (`auto` resolved for `device`)."""
    ckpt = ckpt if isinstance(ckpt, Checkpoint) else Checkpoint(ckpt)
    family = family_for(ckpt.config)
    if family.vision_model != f"{model_class.__module__}:{model_class.__name__}":
        raise CheckpointError(f"{ckpt.path}: a {family.name} checkpoint is served by {family.vision_model}, not {model_class.__name__}")
    return ckpt, resolve_dtype(dtype, device) if isinstance(dtype, str) else dtype


class VisionModel(torch.nn.Module):
    """The surface every family's vision model shares; a family defines `from_checkpoint` (which sets
    `preprocessor` and `_fingerprint`), `embed_batch`, `hidden_size` and `layout_for`, and overrides
    `grid_for` / `processed_size` where its images need them."""

    preprocessor: Any
    _fingerprint: str | None = None

    def embed(self, images: list[Image.Image]) -> list[torch.Tensor]:
        """PIL images → one [num_tokens, hidden_size] tensor each (token counts may differ by image)."""
        return self.embed_batch([self.preprocessor(image) for image in images])

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            raise RuntimeError("fingerprint is known only for a model loaded with from_checkpoint")
        return self._fingerprint

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def grid_for(self, pixels: Any) -> tuple[int, int, int] | None:
        """The merged (t, h, w) grid a container records; None for a family that needs none (no M-RoPE, no row layout)."""
        return None

    def processed_size(self, pixels: Any) -> tuple[int, int]:
        """(height, width) of a preprocessed image."""
        return pixels.shape[-2], pixels.shape[-1]


class FixedSizeVisionModel(VisionModel):
    """A family whose images all come at its tower's one size (LLaVA's CLIP, Gemma 3's SigLIP): a batch is one stacked tensor."""

    @torch.inference_mode()
    def embed_batch(self, pixels: list[torch.Tensor]) -> list[torch.Tensor]:
        """Preprocessed images, B × [3, H, W] → one [tokens_per_image, hidden_size] tensor each, batched through the model."""
        if not pixels:
            return []
        return list(self(torch.stack(pixels).to(self.device, self.dtype)).unbind(0))


def embed_images(model: torch.nn.Module, images: list[Image.Image]) -> list[torch.Tensor]:
    """Decoded RGB images → one [num_tokens, hidden] tensor per image (token counts may differ by family)."""
    return model.embed(images)
