"""Qwen2-VL / Qwen2.5-VL image preprocessing, equal to `transformers`' `Qwen2VLImageProcessorPil`.

Dynamic resolution: `smart_resize` picks the size nearest the image's whose
sides are multiples of patch × merge (28) and whose area lies in
[min_pixels, max_pixels]; Pillow resizes the uint8 image to it (bicubic); then
rescale + normalize (one table lookup, `preprocess.common`). The vision tower
takes patches, not an image: each 14×14 patch flattened in (C, T, P, P) order,
the frame duplicated `temporal_patch_size` times (a still image is a clip of T
identical frames for the Conv3d), and the patches ordered block by block — the
`merge_size`² patches the PatchMerger joins are consecutive.
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

_PROCESSOR_TYPES = ("Qwen2VLImageProcessor", "Qwen2VLImageProcessorFast", "Qwen2VLImageProcessorPil")
MAX_ASPECT_RATIO = 200  # the reference refuses anything more elongated


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """transformers' `smart_resize`: sides multiples of `factor`, area in [min_pixels, max_pixels], aspect kept.

    `round` is Python's (half to even), as the reference's.
    """
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise InvalidInput(f"image of {width}×{height}: aspect ratio over {MAX_ASPECT_RATIO} is not supported by this model")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True, eq=False)
class PatchedImage:
    """One preprocessed image: what the Qwen2-VL vision tower takes.

    patches: [t·h·w, C·T·P·P] float32, merge blocks consecutive (see the module doc);
    grid: (t, h, w) in patches, `image_grid_thw` of the reference.
    """

    patches: torch.Tensor
    grid: tuple[int, int, int]
    patch_size: int

    @property
    def height(self) -> int:
        return self.grid[1] * self.patch_size

    @property
    def width(self) -> int:
        return self.grid[2] * self.patch_size


@dataclass(frozen=True)
class Qwen2VLPreprocessor:
    """`preprocessor_config.json` of a Qwen2-VL image processor, made callable: PIL image → PatchedImage."""

    do_convert_rgb: bool = True
    do_resize: bool = True
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    resample: int = int(Image.Resampling.BICUBIC)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2

    def __post_init__(self) -> None:
        lut = rescale_normalize_table(self.do_rescale, self.rescale_factor, self.do_normalize, self.image_mean, self.image_std)
        object.__setattr__(self, "_lut", lut)  # [3, 256] float32

    @classmethod
    def from_config(cls, config: dict) -> Qwen2VLPreprocessor:
        """From the dict in `preprocessor_config.json`; missing keys take Qwen2VLImageProcessor's defaults.

        The pixel bounds are `size: {shortest_edge, longest_edge}` (transformers ≥ 4.5x),
        overridden by top-level `min_pixels` / `max_pixels` (the published configs), as
        the reference's constructor does; `size: {min_pixels, max_pixels}` is read too.
        """
        check_processor_type(config, _PROCESSOR_TYPES, "Qwen2-VL")
        d = cls()

        def get(key: str, default):
            return config_value(config, key, default)

        size = dict(get("size", {}))
        min_pixels = get("min_pixels", size.get("shortest_edge", size.get("min_pixels", d.min_pixels)))
        max_pixels = get("max_pixels", size.get("longest_edge", size.get("max_pixels", d.max_pixels)))
        out = cls(
            do_convert_rgb=bool(get("do_convert_rgb", d.do_convert_rgb)),
            do_resize=bool(get("do_resize", d.do_resize)),
            min_pixels=int(min_pixels),
            max_pixels=int(max_pixels),
            resample=resample_filter(get("resample", d.resample)),
            do_rescale=bool(get("do_rescale", d.do_rescale)),
            rescale_factor=float(get("rescale_factor", d.rescale_factor)),
            do_normalize=bool(get("do_normalize", d.do_normalize)),
            image_mean=per_channel(get("image_mean", d.image_mean), "image_mean"),
            image_std=per_channel(get("image_std", d.image_std), "image_std"),
            patch_size=int(get("patch_size", d.patch_size)),
            temporal_patch_size=int(get("temporal_patch_size", d.temporal_patch_size)),
            merge_size=int(get("merge_size", d.merge_size)),
        )
        if min(out.patch_size, out.temporal_patch_size, out.merge_size) < 1 or not 0 < out.min_pixels <= out.max_pixels:
            raise CheckpointError(f"invalid Qwen2-VL preprocessor sizes: {config!r}")
        return out

    @classmethod
    def from_checkpoint(cls, ckpt) -> Qwen2VLPreprocessor:
        config = ckpt.optional_json("preprocessor_config.json") or ckpt.optional_json("processor_config.json").get("image_processor", {})
        if not config:
            raise CheckpointError(f"{ckpt.path}: no preprocessor_config.json (nor an image_processor in processor_config.json)")
        return cls.from_config(config)

    def settings(self) -> dict:
        """Everything that determines the pixels: part of a container's content address."""
        out = asdict(self)
        out["image_mean"], out["image_std"] = list(self.image_mean), list(self.image_std)
        return {"processor": "qwen2_vl", **out}

    @property
    def factor(self) -> int:
        """Processed sides are multiples of this: one merge block of patches."""
        return self.patch_size * self.merge_size

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after resizing."""
        if not self.do_resize:
            return height, width
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

    def __call__(self, image: Image.Image) -> PatchedImage:
        image = rgb_image(image, self.do_convert_rgb)
        height, width = self.output_size(image.height, image.width)
        if height % self.factor or width % self.factor:  # only without do_resize
            raise InvalidInput(f"image of {width}×{height} is not a whole number of {self.factor}-pixel blocks")
        if (height, width) != (image.height, image.width):
            image = image.resize((width, height), resample=self.resample)  # Pillow on uint8, as the reference
        pixels = apply_table(self._lut, uint8_chw(image))  # [3, H, W] float32
        return PatchedImage(self.patchify(pixels), (1, height // self.patch_size, width // self.patch_size), self.patch_size)

    def patchify(self, pixels: torch.Tensor) -> torch.Tensor:
        """[C, H, W] → [h·w, C·T·P·P]: patches block by block, each frame repeated T times (the reference's order)."""
        C, H, W = pixels.shape
        P, m, T = self.patch_size, self.merge_size, self.temporal_patch_size
        h, w = H // P, W // P
        blocks = pixels.view(C, h // m, m, P, w // m, m, P).permute(1, 4, 2, 5, 0, 3, 6)  # [h/m, w/m, m, m, C, P, P]
        frames = blocks.unsqueeze(5).expand(*blocks.shape[:5], T, P, P)  # [h/m, w/m, m, m, C, T, P, P]
        return frames.reshape(h * w, C * T * P * P)
