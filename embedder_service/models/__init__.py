"""Vision models of the embedder: one file per family, chosen by `shared.modeling.registry` from `config.json`.

A family's file holds only what is its own; the towers are built from `attention` (attention within
groups of tokens, with or without a 2D RoPE), `blocks` (patch embedding, MLPs, the layer loop) and
`gemm` (every GEMM and activation, with the CPU's fast paths; `mkl_packed` for its packed weights).

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
from shared.modeling.families import ImagePrompt
from shared.modeling.registry import family_for
from shared.store.container import Layout

# Tokens one pass through a dynamic-resolution tower takes at most (a larger image goes alone): enough rows for the
# GEMMs to run at full speed, few enough that a block's activations (~16 MB at ViT-B width) stay in cache.
TOKENS_PER_PASS = 1024


def load_vision_model(ckpt: Checkpoint | str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str = "auto") -> torch.nn.Module:
    """The vision model (tower + projector) of any supported checkpoint; CheckpointError otherwise."""
    ckpt = ckpt if isinstance(ckpt, Checkpoint) else Checkpoint(ckpt)
    return family_for(ckpt.config).load_vision_class().from_checkpoint(ckpt, device=device, dtype=dtype)


class VisionModel(torch.nn.Module):
    """The surface every family's vision model shares; a family defines `build` and `checkpoint_parts`
    (which `from_checkpoint` loads with), `embed_batch` and `hidden_size`, and overrides
    `grid_for` / `processed_size` where its images need them."""

    preprocessor: Any
    image_prompt: ImagePrompt  # the family's prompt format (`shared.modeling.families`), set by `from_checkpoint`
    _fingerprint: str | None = None

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint | str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32) -> VisionModel:
        """The model of a checkpoint folder: built on the meta device (`build`), filled strictly part by part
        (`checkpoint_parts`: a tower's layers past the deepest one read are never read), then `prepare()`d.

        CheckpointError unless the registry serves the checkpoint with this class (an unknown
        architecture lists the supported ones); dtype `auto` is resolved for `device`.
        """
        ckpt = ckpt if isinstance(ckpt, Checkpoint) else Checkpoint(ckpt)
        family = family_for(ckpt.config)
        if family.vision_model != f"{cls.__module__}:{cls.__name__}":
            raise CheckpointError(f"{ckpt.path}: a {family.name} checkpoint is served by {family.vision_model}, not {cls.__name__}")
        dtype = resolve_dtype(dtype, device) if isinstance(dtype, str) else dtype
        image_prompt = family.image_prompt(ckpt)  # reads the tokens it needs: a checkpoint without them fails before loading
        model = cls.build(ckpt)
        model.image_prompt = image_prompt
        for prefix, module in model.checkpoint_parts().items():
            ckpt.load_into(module, prefix, dtype, device)
        model.requires_grad_(False).eval()
        model.prepare()
        model._fingerprint = ckpt.fingerprint
        return model

    @classmethod
    def build(cls, ckpt: Checkpoint) -> VisionModel:
        """The family's model for the checkpoint's config, on the meta device, its `preprocessor` set; CheckpointError
        for a config, preprocessor or vision tensor names the family does not take."""
        raise NotImplementedError

    def checkpoint_parts(self) -> dict[str, torch.nn.Module]:
        """Checkpoint name prefix → the module (built) whose tensors are under it; each is loaded strictly."""
        raise NotImplementedError

    def prepare(self) -> None:
        """After loading: every submodule's own `prepare()`, the weight rewrites for speed (fused QKV, folded scales)."""
        for module in list(self.modules())[1:]:
            if hasattr(module, "prepare"):
                module.prepare()

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

    def layout_for(self, pixels: Any) -> Layout:
        """How the container of these preprocessed pixels expands into token IDs: the family's layout for its grid."""
        return self.image_prompt.layout(self.grid_for(pixels))

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


def image_groups(num_tokens: list[int], budget: int = TOKENS_PER_PASS) -> list[range]:
    """Consecutive images, in runs of at most `budget` tokens (an image larger than that alone), covering all.

    A large batch runs through a dynamic-resolution tower a few whole images at a time, so activations
    stay cache-sized instead of being fresh, page-faulted allocations of hundreds of MB.
    """
    groups, start, total = [], 0, 0
    for i, n in enumerate(num_tokens):
        if i > start and total + n > budget:
            groups.append(range(start, i))
            start, total = i, 0
        total += n
    return groups + [range(start, len(num_tokens))] if num_tokens else groups


def check_tower_names(ckpt: Checkpoint, prefix: str, full_tower: torch.nn.Module, what: str, unread: tuple[str, ...] = ()) -> None:
    """Refuse tensors under `vision_tower.` that the whole tower of this config (`full_tower`, built on the meta device)
    does not hold under `prefix`, in layers read or not; `unread`: name prefixes a checkpoint may hold that are never read."""
    known = set(full_tower.state_dict())
    unexpected = [
        n for n in ckpt.tensor_names("vision_tower.")
        if not (n.startswith(prefix) and (n[len(prefix) :] in known or n[len(prefix) :].startswith(unread)))
    ]
    if unexpected:
        raise CheckpointError(f"{ckpt.path}: unexpected vision tensors for {what}: {unexpected}")


def embed_images(model: torch.nn.Module, images: list[Image.Image]) -> list[torch.Tensor]:
    """Decoded RGB images → one [num_tokens, hidden] tensor per image (token counts may differ by family)."""
    return model.embed(images)
