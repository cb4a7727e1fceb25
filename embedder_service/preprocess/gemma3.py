"""Gemma 3 image preprocessing, pixel-exact with `transformers`' `Gemma3ImageProcessorPil`.

Fixed resolution: the uint8 RGB image is resized with Pillow to `size` (height × width,
bilinear unless configured), then rescaled and normalized (mean = std = 0.5 by default).
Those are the steps of the CLIP processor without its crop, so this is `ClipPreprocessor`
with Gemma 3's defaults and names.

Pan-and-scan (extra crops of very wide or tall images, each 256 more tokens with text
between them) is never applied: `Gemma3Processor` passes its own `do_pan_and_scan=False`
to the image processor, over whatever preprocessor_config.json says, so the reference
crops only when a caller asks for it per call — which vlmq's requests cannot. A config
that turns it on is therefore read as the reference reads it: off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from PIL import Image

from embedder_service.preprocess.clip import ClipPreprocessor
from shared.config.errors import CheckpointError

IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class Gemma3Preprocessor(ClipPreprocessor):
    """`preprocessor_config.json` of a Gemma 3 image processor, made callable: PIL image → [3, H, W] float32."""

    size: tuple[tuple[str, int], ...] = (("height", 224), ("width", 224))
    resample: int = int(Image.Resampling.BILINEAR)
    do_center_crop: bool = False
    image_mean: tuple[float, float, float] = IMAGENET_STANDARD_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STANDARD_STD

    PROCESSOR_TYPES: ClassVar[tuple[str, ...]] = ("Gemma3ImageProcessor", "Gemma3ImageProcessorFast", "Gemma3ImageProcessorPil")
    FAMILY: ClassVar[str] = "Gemma 3"
    NAME: ClassVar[str] = "gemma3"
    SQUARE_SIZE: ClassVar[bool] = True

    @classmethod
    def from_config(cls, config: dict) -> Gemma3Preprocessor:
        """From the dict in `preprocessor_config.json`; missing keys take Gemma3ImageProcessor's defaults.
        The pan-and-scan settings are not read (see the module docstring)."""
        out = super().from_config(config)
        if out.do_center_crop or not out.do_resize or set(dict(out.size)) != {"height", "width"}:
            raise CheckpointError(f"a Gemma 3 preprocessor must resize to a fixed height × width without cropping, got size {dict(out.size)}")
        return out
