"""Vision models of the embedder: one file per family, chosen by `shared.registry` from `config.json`.

Every family's model has the same surface: `from_checkpoint(ckpt, device, dtype)`,
`preprocessor` (PIL image → what the model takes, "pixels"; its size may vary by image),
`embed_batch(list of pixels) -> list[[N_i, hidden]]`, `embed(images) -> list[[N_i, hidden]]`,
`fingerprint`, `hidden_size`, and per image `layout_for(pixels)`, `grid_for(pixels)`,
`processed_size(pixels) -> (height, width)`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from shared.checkpoint import Checkpoint, resolve_dtype
from shared.errors import CheckpointError
from shared.registry import family_for


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


def embed_images(model: torch.nn.Module, images: list[Image.Image]) -> list[torch.Tensor]:
    """Decoded RGB images → one [num_tokens, hidden] tensor per image (token counts may differ by family)."""
    return model.embed(images)
