"""Qwen2VLPreprocessor gives the very patches and grids of transformers' slow (PIL) Qwen2VLImageProcessor."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from embedder_service.preprocess.qwen2_vl import Qwen2VLPreprocessor, smart_resize
from shared.config.errors import CheckpointError, InvalidInput

# Each config is written to preprocessor_config.json; both implementations read that file.
CONFIGS = {
    # Published Qwen2-VL: the bounds as top-level min_pixels / max_pixels.
    "published": {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 16},
    # What transformers 5 saves: size {shortest_edge, longest_edge}; other mean/std, bilinear.
    "size-dict": {"size": {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 40}, "resample": 2,
                  "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
    # Top-level bounds override size, as the reference's constructor does.
    "both": {"size": {"shortest_edge": 10, "longest_edge": 10**9}, "min_pixels": 28 * 28 * 9, "max_pixels": 28 * 28 * 9},
    "temporal-3-no-normalize": {"min_pixels": 3136, "max_pixels": 28 * 28 * 8, "temporal_patch_size": 3, "do_normalize": False},
}

# (width, height): tiny (min_pixels scales it up), odd, square, landscape, portrait, large (max_pixels
# scales it down), an aspect ratio near the limit of 200, and exact multiples of 28.
SIZES = [(1, 1), (3, 7), (56, 56), (300, 100), (90, 301), (1000, 700), (1990, 10), (84, 140)]


@pytest.fixture(scope="module")
def processors(tmp_path_factory):
    """name → (ours, reference), both loaded from the same preprocessor_config.json."""
    from transformers import Qwen2VLImageProcessorPil

    out = {}
    for name, config in CONFIGS.items():
        path = tmp_path_factory.mktemp(name)
        (path / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "Qwen2VLImageProcessor", **config}))
        ours = Qwen2VLPreprocessor.from_config(json.loads((path / "preprocessor_config.json").read_text()))
        out[name] = (ours, Qwen2VLImageProcessorPil.from_pretrained(path))
    return out


def image(width: int, height: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(width * 7 + height)
    rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    return rgb if mode == "RGB" else rgb.convert(mode)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_patches_and_grids_equal_the_reference(processors, name):
    ours, ref = processors[name]
    images = [image(w, h) for w, h in SIZES]
    expected = ref(images, return_tensors="pt")
    got = [ours(im) for im in images]
    assert [list(g.grid) for g in got] == expected["image_grid_thw"].tolist()
    assert torch.equal(torch.cat([g.patches for g in got]), expected["pixel_values"])  # bit for bit


def test_the_sizes_hit_both_pixel_bounds(processors):
    """The comparison covers scaling up to min_pixels and down to max_pixels, not only rounding."""
    ours, _ = processors["published"]

    def rounded_and_resized(w: int, h: int) -> tuple[int, int]:
        height, width = ours.output_size(h, w)
        return round(h / 28) * 28 * round(w / 28) * 28, height * width

    for small in [(1, 1), (3, 7)]:
        rounded, area = rounded_and_resized(*small)
        assert rounded < ours.min_pixels <= area
    rounded, area = rounded_and_resized(1000, 700)
    assert rounded > ours.max_pixels >= area


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_other_modes_become_rgb_as_the_reference(processors, mode):
    ours, ref = processors["published"]
    im = image(70, 45, mode)
    assert torch.equal(ours(im).patches, ref([im], return_tensors="pt")["pixel_values"])


def test_patch_order_puts_each_merge_block_together():
    """Rows 0-3 of the patches are the 2×2 block at the top left, each patch its frame twice (temporal)."""
    pre = Qwen2VLPreprocessor(do_resize=False, do_normalize=False, do_rescale=False)
    pixels = torch.arange(3 * 56 * 56, dtype=torch.float32).view(3, 56, 56)
    patches = pre.patchify(pixels).view(16, 3, 2, 14, 14)  # [h·w, C, T, P, P]
    assert torch.equal(patches[0, :, 0], pixels[:, :14, :14])
    assert torch.equal(patches[1, :, 1], pixels[:, :14, 14:28])  # block-mates: right neighbour
    assert torch.equal(patches[2, :, 0], pixels[:, 14:28, :14])  # then the row below
    assert torch.equal(patches[4, :, 0], pixels[:, :14, 28:42])  # then the next block


def test_extreme_aspect_ratio_is_invalid_input():
    with pytest.raises(InvalidInput, match="aspect ratio"):
        smart_resize(10, 2010, 28, 3136, 12845056)


def test_bad_configs_are_checkpoint_errors():
    with pytest.raises(CheckpointError, match="CLIPImageProcessor"):
        Qwen2VLPreprocessor.from_config({"image_processor_type": "CLIPImageProcessor"})
    with pytest.raises(CheckpointError, match="sizes"):
        Qwen2VLPreprocessor.from_config({"min_pixels": 5000, "max_pixels": 4000})


def test_settings_name_what_determines_the_pixels(processors):
    ours, _ = processors["size-dict"]
    settings = ours.settings()
    assert settings["processor"] == "qwen2_vl"
    assert (settings["min_pixels"], settings["max_pixels"], settings["resample"]) == (56 * 56, 28 * 28 * 40, 2)
    assert settings != processors["published"][0].settings()
