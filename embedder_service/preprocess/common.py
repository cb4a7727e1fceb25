"""Pieces every family's image preprocessing shares, each as `transformers`' PIL backend does it.

The reference converts to RGB, resizes the uint8 image with Pillow, rescales in
float64 and casts to float32, then normalizes in float32. Because the image is
still uint8 when it is rescaled and normalized, both steps together are one
lookup table of 256 float32 values per channel, built with exactly the
reference's arithmetic: the same bits, at the cost of one gather.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from shared.config.errors import CheckpointError, InvalidInput
from shared.media.images import to_rgb

# transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD: the class defaults of the CLIP and Qwen2-VL processors.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def config_value(config: dict, key: str, default):
    """`config[key]`, with a missing key or JSON null meaning the default, as in transformers."""
    value = config.get(key)
    return default if value is None else value


def check_processor_type(config: dict, supported: tuple[str, ...], family: str) -> None:
    kind = config.get("image_processor_type")
    if kind is not None and kind not in supported:
        raise CheckpointError(f"image processor {kind!r} is not a {family} image processor; supported: {', '.join(supported)}")


def resample_filter(value) -> int:
    """A Pillow resampling filter number from a config; CheckpointError for an unknown one."""
    if value not in {int(r) for r in Image.Resampling}:
        raise CheckpointError(f"unknown resample filter {value!r}")
    return int(value)


def per_channel(value, name: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    if len(value) != 3:
        raise CheckpointError(f"{name} must have 3 values (RGB), got {value!r}")
    return tuple(float(v) for v in value)


def rgb_image(image: Image.Image, do_convert_rgb: bool) -> Image.Image:
    """The image as RGB (or refused when the processor does not convert), never empty."""
    if do_convert_rgb:
        image = to_rgb(image)
    elif image.mode != "RGB":
        raise InvalidInput(f"image mode {image.mode} is not RGB and the preprocessor does not convert")
    if image.width == 0 or image.height == 0:
        raise InvalidInput(f"image has 0 pixels ({image.width}×{image.height})")
    return image


def uint8_chw(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image → [3, H, W] uint8 (a writable copy)."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def rescale_normalize_table(
    do_rescale: bool, rescale_factor: float, do_normalize: bool, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """[3, 256] float32: the value each uint8 level of each channel becomes after rescale and normalize."""
    levels = np.arange(256, dtype=np.float64)
    if do_rescale:
        values = (levels * rescale_factor).astype(np.float32)  # float64 multiply, then float32: as the reference
    else:
        values = levels.astype(np.float32)
    values = np.broadcast_to(values, (3, 256))
    if do_normalize:
        values = (values - np.array(mean, dtype=np.float32)[:, None]) / np.array(std, dtype=np.float32)[:, None]  # float32, as the reference
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))


def apply_table(table: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """table: [3, 256] float32, pixels: [3, H, W] uint8 → [3, H, W] float32."""
    return table.gather(1, pixels.reshape(3, -1).long()).view(pixels.shape)
