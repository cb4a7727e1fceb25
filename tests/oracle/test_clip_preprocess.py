"""ClipPreprocessor gives the very pixels of transformers' slow (PIL) CLIPImageProcessor."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from embedder_service.preprocess import ClipPreprocessor
from shared.config.errors import CheckpointError, TooLarge
from shared.modeling.checkpoint import Checkpoint

# Each config is written to preprocessor_config.json; both implementations read that file.
CONFIGS = {
    "tiny-56": {"size": {"shortest_edge": 56}, "crop_size": {"height": 56, "width": 56}},
    "llava-336": {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}, "resample": 3},
    "defaults": {},  # every key from CLIPImageProcessor's defaults (224)
    "legacy-int-sizes": {"size": 64, "crop_size": 48},
    "shortest-under-crop": {"size": {"shortest_edge": 40}, "crop_size": {"height": 56, "width": 50}},  # zero-padded crop
    "fixed-resize-bilinear": {"size": {"height": 30, "width": 50}, "do_center_crop": False, "resample": 2},
    "shortest-longest": {"size": {"shortest_edge": 20, "longest_edge": 60}, "do_center_crop": False},
    "no-normalize": {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}, "do_normalize": False},
    "no-rescale-other-mean": {
        "size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}, "do_rescale": False,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    },
}

# (width, height): tiny, odd, square, landscape, portrait, extreme aspect ratios.
SIZES = [(1, 1), (3, 7), (56, 56), (640, 480), (480, 640), (57, 113), (1000, 31), (223, 225)]


@pytest.fixture(scope="module")
def processors(tmp_path_factory):
    """name → (ours, reference), both loaded from the same preprocessor_config.json."""
    from transformers import CLIPImageProcessorPil

    out = {}
    for name, config in CONFIGS.items():
        path = tmp_path_factory.mktemp(name)
        (path / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "CLIPImageProcessor", **config}))
        ours = ClipPreprocessor.from_config(json.loads((path / "preprocessor_config.json").read_text()))
        out[name] = (ours, CLIPImageProcessorPil.from_pretrained(path))
    return out


def image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed + width * 7 + height)
    rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    return rgb if mode == "RGB" else rgb.convert(mode)


def reference_pixels(ref, images) -> torch.Tensor:
    return ref(images, return_tensors="pt")["pixel_values"]


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_pixels_equal_reference(processors, name, size):
    ours, ref = processors[name]
    img = image(*size)
    expected = reference_pixels(ref, [img])[0]
    got = ours(img)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    # Same operations in the same precisions as the reference: the bits are equal, not just close.
    assert torch.equal(got, expected.float()), (got - expected).abs().max()


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "CMYK", "1"])
def test_other_modes_equal_reference(processors, mode):
    ours, ref = processors["tiny-56"]
    img = image(45, 70, mode)
    assert torch.equal(ours(img), reference_pixels(ref, [img])[0])


def test_batch_equals_reference_batch(processors):
    ours, ref = processors["llava-336"]
    images = [image(*size, seed=i) for i, size in enumerate([(640, 480), (200, 900), (336, 336)])]
    batch = ours.batch(images)
    assert batch.shape == (3, 3, 336, 336)
    assert torch.equal(batch, reference_pixels(ref, images))


def test_settings_describe_the_pixels(processors):
    settings = {name: ours.settings() for name, (ours, _) in processors.items()}
    for value in settings.values():
        json.dumps(value)  # goes into a content address: plain JSON
    assert settings["tiny-56"]["crop_size"] == [56, 56] and settings["tiny-56"]["size"] == {"shortest_edge": 56}
    assert len({json.dumps(s, sort_keys=True) for s in settings.values()}) == len(settings)  # every config differs
    assert ClipPreprocessor.from_config(CONFIGS["tiny-56"]).settings() == settings["tiny-56"]  # and is stable


def test_from_checkpoint_reads_preprocessor_or_processor_config(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text("{}")
    save_file({"unused": torch.zeros(1)}, tmp_path / "model.safetensors")
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(CONFIGS["llava-336"]))
    ckpt = Checkpoint(tmp_path)
    assert ClipPreprocessor.from_checkpoint(ckpt).crop_size == (336, 336)
    (tmp_path / "preprocessor_config.json").unlink()
    # transformers 5 saves a whole processor as processor_config.json, the image processor nested in it.
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": CONFIGS["tiny-56"], "image_token": "<image>"}))
    assert ClipPreprocessor.from_checkpoint(ckpt).crop_size == (56, 56)
    (tmp_path / "processor_config.json").unlink()
    with pytest.raises(CheckpointError, match="no preprocessor_config.json"):
        ClipPreprocessor.from_checkpoint(ckpt)


def test_refuses_other_processors():
    with pytest.raises(CheckpointError, match="not a CLIP image processor"):
        ClipPreprocessor.from_config({"image_processor_type": "Qwen2VLImageProcessor"})


def test_refuses_extreme_aspect_ratio_instead_of_allocating_it():
    ours = ClipPreprocessor.from_config(CONFIGS["llava-336"])
    with pytest.raises(TooLarge, match="aspect ratio too extreme"):
        ours(Image.new("RGB", (40_000, 1)))  # would be resized to 13440000×336
