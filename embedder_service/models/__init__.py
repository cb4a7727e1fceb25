"""Vision models of the embedder: one file per family, chosen by `shared.registry` from `config.json`.

Every family's model has the same surface: `from_checkpoint(ckpt, device, dtype)`,
`forward(pixels)`, `embed(images) -> list[[N, hidden]]`, `preprocessor`,
`fingerprint`, `hidden_size`, `layout`, `grid_for(pixels)`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from shared.checkpoint import Checkpoint
from shared.registry import family_for


def load_vision_model(ckpt: Checkpoint | str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str = "auto") -> torch.nn.Module:
    """The vision model (tower + projector) of any supported checkpoint; CheckpointError otherwise."""
    ckpt = ckpt if isinstance(ckpt, Checkpoint) else Checkpoint(ckpt)
    return family_for(ckpt.config).load_vision_class().from_checkpoint(ckpt, device=device, dtype=dtype)


def embed_images(model: torch.nn.Module, images: list[Image.Image]) -> list[torch.Tensor]:
    """Decoded RGB images → one [num_tokens, hidden] tensor per image (token counts may differ by family)."""
    return model.embed(images)
