"""CLIP image preprocessing (LLaVA-1.5), pixel-exact with `transformers`' `CLIPImageProcessorPil`.

The reference resizes the uint8 RGB image with Pillow (shortest edge, bicubic by
default), center-crops the uint8 array, then rescales and normalizes: one
lookup table per channel (`preprocess.common`), so the same bits.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import ClassVar

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
from shared.config.errors import CheckpointError, TooLarge

_PROCESSOR_TYPES = ("CLIPImageProcessor", "CLIPImageProcessorFast", "CLIPImageProcessorPil")

# The reference resizes the whole image before cropping, so a 1×40000 strip would become a
# 224×8960000 image on the way to a 224×224 crop. We refuse that instead of allocating it.
MAX_RESIZED_PIXELS = 50_000_000


@dataclass(frozen=True)
class ClipPreprocessor:
    """`preprocessor_config.json` of a CLIP image processor, made callable: PIL image → [3, H, W] float32."""

    do_convert_rgb: bool = True
    do_resize: bool = True
    size: tuple[tuple[str, int], ...] = (("shortest_edge", 224),)  # a size dict, frozen as sorted items
    resample: int = int(Image.Resampling.BICUBIC)
    do_center_crop: bool = True
    crop_size: tuple[int, int] = (224, 224)  # (height, width)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD

    # What a fixed-size processor of another family changes besides the defaults (Gemma 3's, a subclass):
    PROCESSOR_TYPES: ClassVar[tuple[str, ...]] = _PROCESSOR_TYPES
    FAMILY: ClassVar[str] = "CLIP"  # in errors
    NAME: ClassVar[str] = "clip"  # in `settings()`, so part of a container's content address
    SQUARE_SIZE: ClassVar[bool] = False  # an int `size` is height = width (else shortest_edge), as the reference reads it

    def __post_init__(self) -> None:
        # [3, 256] float32: the value each uint8 level of each channel becomes.
        lut = rescale_normalize_table(self.do_rescale, self.rescale_factor, self.do_normalize, self.image_mean, self.image_std)
        object.__setattr__(self, "_lut", lut)

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: dict) -> ClipPreprocessor:
        """From the dict in `preprocessor_config.json`; missing keys take CLIPImageProcessor's defaults."""
        check_processor_type(config, cls.PROCESSOR_TYPES, cls.FAMILY)
        d = cls()

        def get(key: str, default):
            return config_value(config, key, default)

        size = _size_dict(get("size", dict(d.size)), default_to_square=cls.SQUARE_SIZE)
        crop = _size_dict(get("crop_size", {"height": d.crop_size[0], "width": d.crop_size[1]}), default_to_square=True)
        if set(crop) != {"height", "width"}:
            raise CheckpointError(f"crop_size must have height and width, got {config['crop_size']!r}")
        return cls(
            do_convert_rgb=bool(get("do_convert_rgb", d.do_convert_rgb)),
            do_resize=bool(get("do_resize", d.do_resize)),
            size=tuple(sorted(size.items())),
            resample=resample_filter(get("resample", d.resample)),
            do_center_crop=bool(get("do_center_crop", d.do_center_crop)),
            crop_size=(int(crop["height"]), int(crop["width"])),
            do_rescale=bool(get("do_rescale", d.do_rescale)),
            rescale_factor=float(get("rescale_factor", d.rescale_factor)),
            do_normalize=bool(get("do_normalize", d.do_normalize)),
            image_mean=per_channel(get("image_mean", d.image_mean), "image_mean"),
            image_std=per_channel(get("image_std", d.image_std), "image_std"),
        )

    @classmethod
    def from_checkpoint(cls, ckpt) -> ClipPreprocessor:
        """From `preprocessor_config.json`, or the `image_processor` entry of `processor_config.json`."""
        config = ckpt.optional_json("preprocessor_config.json")
        if not config:
            config = ckpt.optional_json("processor_config.json").get("image_processor", {})
        if not config:
            raise CheckpointError(f"{ckpt.path}: no preprocessor_config.json (nor an image_processor in processor_config.json)")
        return cls.from_config(config)

    def settings(self) -> dict:
        """Everything that determines the pixels: part of a container's content address."""
        out = asdict(self)
        out["size"] = dict(self.size)
        out["crop_size"] = list(self.crop_size)
        out["image_mean"] = list(self.image_mean)
        out["image_std"] = list(self.image_std)
        return {"processor": self.NAME, **out}

    # --- processing ---------------------------------------------------------------------------

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """One PIL image → pixel values [3, H, W] float32."""
        image = rgb_image(image, self.do_convert_rgb)
        if self.do_resize:
            height, width = self.output_size(image.height, image.width)
            if height * width > MAX_RESIZED_PIXELS:
                raise TooLarge(
                    f"image of {image.width}×{image.height} would be resized to {width}×{height} "
                    f"(over {MAX_RESIZED_PIXELS} pixels): aspect ratio too extreme"
                )
            # Pillow on the uint8 image, as the reference does; reducing_gap=None like the reference.
            image = image.resize((width, height), resample=self.resample)
        pixels = uint8_chw(image)  # [3, H, W] uint8
        if self.do_center_crop:
            pixels = _center_crop(pixels, *self.crop_size)
        return apply_table(self._lut, pixels)  # rescale + normalize: [3, H, W] float32

    def batch(self, images: list[Image.Image]) -> torch.Tensor:
        """[B, 3, H, W] float32; every output has the same size only when center-cropping (or resizing to a fixed size)."""
        return torch.stack([self(image) for image in images])

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after resizing, with the reference's integer rounding."""
        size = dict(self.size)
        if "shortest_edge" in size and "longest_edge" in size:
            return _size_with_aspect_ratio(height, width, size["shortest_edge"], size["longest_edge"])
        if "shortest_edge" in size:
            # transformers.image_transforms.get_resize_output_image_size(default_to_square=False): truncation, not rounding.
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = size["shortest_edge"], int(size["shortest_edge"] * long / short)
            return (new_long, new_short) if width <= height else (new_short, new_long)
        if "height" in size and "width" in size:
            return size["height"], size["width"]
        raise CheckpointError(f"unsupported size {size!r}: need shortest_edge, shortest_edge+longest_edge, or height+width")

def _center_crop(pixels: torch.Tensor, crop_h: int, crop_w: int) -> torch.Tensor:
    """transformers.image_transforms.center_crop on [C, H, W], zero-padding an image smaller than the crop."""
    _, height, width = pixels.shape
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    if top >= 0 and left >= 0:
        return pixels[:, top : top + crop_h, left : left + crop_w].contiguous()
    # The reference pads to max(crop, size) with the image placed at ceil(pad / 2), then crops.
    new_h, new_w = max(crop_h, height), max(crop_w, width)
    top_pad, left_pad = math.ceil((new_h - height) / 2), math.ceil((new_w - width) / 2)
    padded = pixels.new_zeros((pixels.shape[0], new_h, new_w))
    padded[:, top_pad : top_pad + height, left_pad : left_pad + width] = pixels
    top, left = top + top_pad, left + left_pad
    return padded[:, max(0, top) : min(new_h, top + crop_h), max(0, left) : min(new_w, left + crop_w)].contiguous()


def _size_with_aspect_ratio(height: int, width: int, size: int, max_size: int) -> tuple[int, int]:
    """transformers.image_transforms.get_size_with_aspect_ratio."""
    raw_size = None
    small, large = float(min(height, width)), float(max(height, width))
    if large / small * size > max_size:
        raw_size = max_size * small / large
        size = int(round(raw_size))
    if (height <= width and height == size) or (width <= height and width == size):
        return height, width
    if width < height:
        return (int(raw_size * height / width) if raw_size is not None else int(size * height / width)), size
    return size, (int(raw_size * width / height) if raw_size is not None else int(size * width / height))


def _size_dict(value, *, default_to_square: bool) -> dict[str, int]:
    """transformers' get_size_dict for the forms configs use: a dict, an int, or (height, width)."""
    if isinstance(value, dict):
        out = {k: int(v) for k, v in value.items() if v is not None}
    elif isinstance(value, int):
        out = {"height": value, "width": value} if default_to_square else {"shortest_edge": value}
    elif isinstance(value, (list, tuple)) and len(value) == 2:
        out = {"height": int(value[0]), "width": int(value[1])}
    else:
        raise CheckpointError(f"unsupported size {value!r}")
    if any(v <= 0 for v in out.values()):
        raise CheckpointError(f"sizes must be positive, got {value!r}")
    return out
