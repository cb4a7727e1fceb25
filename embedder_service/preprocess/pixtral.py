"""Pixtral image preprocessing (Pixtral, Mistral 3.1), pixel-exact with `transformers`' `PixtralImageProcessorPil`.

Variable resolution: the image keeps its aspect ratio, is scaled down (never up)
to fit `longest_edge` with the sides floored, then each side is rounded *up* to
a whole number of patches, and resized there with Pillow (bicubic) on the uint8
image; then rescale + normalize (one lookup table, `preprocess.common`). The
result is [3, H, W] with H and W multiples of the patch, so an image is
(H / patch) × (W / patch) tokens.

`patch_size` here is what `PixtralProcessor` passes to its image processor:
the vision patch times `spatial_merge_size` (16 × 1 for Pixtral, 14 × 2 for
Mistral 3.1), so the merged grid is whole. The reference pads a batch to its
largest image; we never pad — each image keeps its own size.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from PIL import Image

from embedder_service.preprocess.common import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    apply_table,
    check_processor_type,
    config_value,
    per_channel,
    resample_filter,
    rescale_normalize_table,
    rgb_image,
    uint8_chw,
)
from shared.config.errors import CheckpointError, InvalidInput

_PROCESSOR_TYPES = ("PixtralImageProcessor", "PixtralImageProcessorFast", "PixtralImageProcessorPil")


@dataclass(frozen=True)
class PixtralPreprocessor:
    """`preprocessor_config.json` of a Pixtral image processor, made callable: PIL image → [3, H, W] float32."""

    do_convert_rgb: bool = True
    do_resize: bool = True
    max_height: int = 1024  # size {"longest_edge": n} is n × n
    max_width: int = 1024
    patch_size: int = 16  # sides become multiples of this (the processor's patch_size × spatial_merge_size)
    resample: int = int(Image.Resampling.BICUBIC)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD

    def __post_init__(self) -> None:
        if min(self.max_height, self.max_width, self.patch_size) < 1:
            raise CheckpointError(f"Pixtral sizes must be positive: max {self.max_height}×{self.max_width}, patch {self.patch_size}")
        lut = rescale_normalize_table(self.do_rescale, self.rescale_factor, self.do_normalize, self.image_mean, self.image_std)
        object.__setattr__(self, "_lut", lut)  # [3, 256] float32

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: dict, patch_size: int | None = None) -> PixtralPreprocessor:
        """From the dict in `preprocessor_config.json`; missing keys take PixtralImageProcessor's defaults.

        `patch_size`, when given, overrides the config's, as `PixtralProcessor` does.
        """
        check_processor_type(config, _PROCESSOR_TYPES, "Pixtral")
        d = cls()

        def get(key: str, default):
            return config_value(config, key, default)

        if get("do_center_crop", False):
            raise CheckpointError("a Pixtral preprocessor with do_center_crop is not supported (images keep their own sizes)")
        if not get("do_resize", True):
            raise CheckpointError("a Pixtral preprocessor without do_resize is not supported (sides must be whole patches)")
        size = get("size", {"longest_edge": d.max_height})
        if isinstance(size, int):
            size = {"longest_edge": size}
        if size.get("longest_edge") is not None:
            max_height = max_width = size["longest_edge"]
        elif size.get("height") is not None and size.get("width") is not None:
            max_height, max_width = size["height"], size["width"]
        else:
            raise CheckpointError(f"a Pixtral size needs longest_edge, or height and width; got {size!r}")
        return cls(
            do_convert_rgb=bool(get("do_convert_rgb", d.do_convert_rgb)),
            max_height=int(max_height),
            max_width=int(max_width),
            patch_size=int(patch_size) if patch_size is not None else _square_patch(get("patch_size", d.patch_size)),
            resample=resample_filter(get("resample", d.resample)),
            do_rescale=bool(get("do_rescale", d.do_rescale)),
            rescale_factor=float(get("rescale_factor", d.rescale_factor)),
            do_normalize=bool(get("do_normalize", d.do_normalize)),
            image_mean=per_channel(get("image_mean", d.image_mean), "image_mean"),
            image_std=per_channel(get("image_std", d.image_std), "image_std"),
        )

    @classmethod
    def from_checkpoint(cls, ckpt, patch_size: int | None = None) -> PixtralPreprocessor:
        """From `preprocessor_config.json` (or `processor_config.json`'s `image_processor`).

        The processor resizes to multiples of its `patch_size × spatial_merge_size`
        (`processor_config.json`); where that file does not say, `patch_size` (the
        model's vision patch × merge) is used.
        """
        config = ckpt.optional_json("preprocessor_config.json")
        processor = ckpt.optional_json("processor_config.json")
        if not config:
            config = processor.get("image_processor", {})
        if not config:
            raise CheckpointError(f"{ckpt.path}: no preprocessor_config.json (nor an image_processor in processor_config.json)")
        if processor.get("patch_size") is not None:
            patch_size = int(processor["patch_size"]) * int(processor.get("spatial_merge_size") or 1)
        return cls.from_config(config, patch_size)

    def settings(self) -> dict:
        """Everything that determines the pixels: part of a container's content address."""
        out = asdict(self)
        out["image_mean"], out["image_std"] = list(self.image_mean), list(self.image_std)
        return {"processor": "pixtral", **out}

    # --- processing ---------------------------------------------------------------------------

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after resizing: transformers' pixtral `get_resize_output_image_size`, same float arithmetic."""
        ratio = max(height / self.max_height, width / self.max_width)
        if ratio > 1:  # floor, not round: the result never exceeds the bound
            height, width = math.floor(height / ratio), math.floor(width / ratio)
        p = self.patch_size
        # Whole patches, rounding up: (n - 1) // p + 1 is ceil(n / p), and 0 for n = 0.
        return ((height - 1) // p + 1) * p, ((width - 1) // p + 1) * p

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """One PIL image → pixel values [3, H, W] float32, H and W multiples of `patch_size`."""
        image = rgb_image(image, self.do_convert_rgb)
        height, width = self.output_size(image.height, image.width)
        if height == 0 or width == 0:  # the reference fails here too (a 0-pixel resize)
            raise InvalidInput(
                f"image of {image.width}×{image.height} would be resized to {width}×{height}: aspect ratio too extreme"
            )
        image = image.resize((width, height), resample=self.resample)  # Pillow on uint8, reducing_gap=None: as the reference
        return apply_table(self._lut, uint8_chw(image))  # [3, H, W] float32

    def grid(self, pixels: torch.Tensor) -> tuple[int, int]:
        """(rows, cols) of `patch_size` blocks in a preprocessed image [3, H, W]."""
        return pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size


def _square_patch(value) -> int:
    """patch_size as configs write it: an int or {"height": p, "width": p}."""
    if isinstance(value, dict):
        if value.get("height") != value.get("width"):
            raise CheckpointError(f"only square Pixtral patches are supported, got {value!r}")
        value = value["height"]
    return int(value)
