"""PixtralPreprocessor against transformers' PixtralImageProcessorPil: the same pixels and (rows, cols)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from embedder_service.preprocess.pixtral import PixtralPreprocessor
from shared.config.errors import CheckpointError, InvalidInput

LONGEST_EDGE = 64
# (width, height): tiny (smaller than a patch), exact and just-over bounds, small and large, wide and tall.
SIZES = [(1, 1), (5, 3), (8, 8), (17, 15), (64, 64), (65, 64), (64, 65), (200, 30), (30, 200), (640, 480),
         (481, 640), (1, 64), (64, 1), (99, 7), (1000, 63)]
EXTREME = [(1000, 1), (1, 200), (3, 1000)]  # the short side floors to 0 pixels


def reference(patch: int):
    from transformers import PixtralImageProcessorPil

    return PixtralImageProcessorPil(patch_size={"height": patch, "width": patch}, size={"longest_edge": LONGEST_EDGE})


def ours(patch: int) -> PixtralPreprocessor:
    return PixtralPreprocessor.from_config(reference(patch).to_dict())


def random_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")
    return image if mode == "RGBA" else image.convert(mode)


@pytest.mark.parametrize("patch", [8, 16], ids=["pixtral-patch8", "mistral3-patch8x2"])
def test_pixels_and_grid_equal_the_reference_for_many_sizes(patch):
    ref, mine = reference(patch), ours(patch)
    for width, height in SIZES:
        image = random_image(width, height, seed=width * 1000 + height)
        expected = ref(image, return_tensors="pt")
        got = mine(image)
        h, w = expected["image_sizes"][0].tolist()
        assert got.shape == (3, h, w), (width, height)
        assert torch.equal(got, expected["pixel_values"][0]), (width, height)
        assert mine.grid(got) == (h // patch, w // patch)
        assert max(h, w) <= max(LONGEST_EDGE, patch)  # only an image smaller than one patch grows


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "CMYK"])
def test_other_modes_are_converted_as_the_reference_does(mode):
    image = random_image(40, 30, mode)
    expected = reference(8)(image, return_tensors="pt")["pixel_values"][0]
    assert torch.equal(ours(8)(image), expected)


def test_extreme_aspect_ratios_fail_as_in_the_reference():
    ref, mine = reference(8), ours(8)
    for width, height in EXTREME:
        image = random_image(width, height)
        with pytest.raises(ValueError):
            ref(image, return_tensors="pt")
        with pytest.raises(InvalidInput, match="aspect ratio too extreme"):
            mine(image)


def test_height_and_width_bounds_and_processor_patch_override():
    config = reference(8).to_dict() | {"size": {"height": 32, "width": 48}}
    pre = PixtralPreprocessor.from_config(config, patch_size=16)
    assert (pre.max_height, pre.max_width, pre.patch_size) == (32, 48, 16)
    assert pre.output_size(100, 100) == (32, 32)  # ratio max(100/32, 100/48): 32 × 32
    assert pre.settings()["processor"] == "pixtral" and pre.settings()["patch_size"] == 16


@pytest.mark.parametrize("edit, message", [
    ({"do_center_crop": True}, "do_center_crop"),
    ({"do_resize": False}, "do_resize"),
    ({"size": {"shortest_edge": 10}}, "longest_edge"),
    ({"patch_size": {"height": 8, "width": 16}}, "square"),
    ({"image_processor_type": "CLIPImageProcessor"}, "not a Pixtral image processor"),
])
def test_unsupported_configs_are_refused(edit, message):
    with pytest.raises(CheckpointError, match=message):
        PixtralPreprocessor.from_config(reference(8).to_dict() | edit)
