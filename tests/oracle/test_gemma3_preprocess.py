"""Gemma3Preprocessor against transformers' Gemma3ImageProcessorPil: the same pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from embedder_service.preprocess.gemma3 import Gemma3Preprocessor
from shared.config.errors import CheckpointError

# (width, height): smaller and larger than the output, square, wide, tall, one pixel.
SIZES = [(1, 1), (5, 3), (32, 32), (33, 31), (200, 30), (30, 200), (640, 480), (481, 640), (1, 64), (1000, 7)]


def reference(**kwargs):
    from transformers import Gemma3ImageProcessorPil

    return Gemma3ImageProcessorPil(**({"size": {"height": 32, "width": 48}} | kwargs))


def ours(ref) -> Gemma3Preprocessor:
    return Gemma3Preprocessor.from_config(ref.to_dict())


def random_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")
    return image if mode == "RGBA" else image.convert(mode)


@pytest.mark.parametrize("kwargs", [
    {},  # Gemma3ImageProcessor's defaults: bilinear, mean = std = 0.5
    {"resample": 3, "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]},
    {"size": {"height": 896, "width": 896}},  # the published checkpoints' size
], ids=["defaults", "bicubic-clip-stats", "896"])
def test_pixels_equal_the_reference_for_many_sizes(kwargs):
    ref = reference(**kwargs)
    mine = ours(ref)
    height, width = dict(mine.size)["height"], dict(mine.size)["width"]
    for w, h in SIZES:
        image = random_image(w, h, seed=w * 1000 + h)
        expected = ref(image, return_tensors="pt")["pixel_values"][0]
        got = mine(image)
        assert got.shape == (3, height, width), (w, h)
        assert torch.equal(got, expected), (w, h)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "CMYK"])
def test_other_modes_are_converted_as_the_reference_does(mode):
    image = random_image(40, 30, mode)
    ref = reference()
    assert torch.equal(ours(ref)(image), ref(image, return_tensors="pt")["pixel_values"][0])


def test_an_int_size_is_square_and_settings_name_the_family():
    pre = Gemma3Preprocessor.from_config({"size": 64})
    assert dict(pre.size) == {"height": 64, "width": 64}
    settings = pre.settings()
    assert settings["processor"] == "gemma3" and settings["resample"] == int(Image.Resampling.BILINEAR)
    assert settings != Gemma3Preprocessor.from_config({"size": 64, "resample": 3}).settings()  # part of the content address


@pytest.mark.parametrize("edit, message", [
    ({"do_center_crop": True}, "without cropping"),
    ({"size": {"shortest_edge": 224}}, "fixed height"),
    ({"image_processor_type": "CLIPImageProcessor"}, "not a Gemma 3 image processor"),
])
def test_unsupported_configs_are_refused(edit, message):
    with pytest.raises(CheckpointError, match=message):
        Gemma3Preprocessor.from_config(reference().to_dict() | edit)


@pytest.mark.parametrize("setting", [None, True], ids=["null", "on"])
def test_pan_and_scan_in_the_config_is_off_as_in_gemma3_processor(setting):
    """Gemma3Processor passes do_pan_and_scan=False over the config's (null in published configs): an image the
    image processor alone would crop gets no crops, the same pixels as ours, and one image's tokens."""
    from transformers import Gemma3Processor

    from tests.support.tiny_models import gemma3_tokenizer

    image = random_image(300, 40)
    ref = reference(do_pan_and_scan=setting, pan_and_scan_min_crop_size=8, pan_and_scan_max_num_crops=4,
                    pan_and_scan_min_ratio_to_activate=1.2)
    if setting:
        assert ref(image, return_tensors="pt")["num_crops"].tolist() == [4]  # what the image processor alone does
    processor = Gemma3Processor(image_processor=ref, tokenizer=gemma3_tokenizer(), image_seq_length=4)
    expected = processor(text="<start_of_image>", images=[image], return_tensors="pt")
    assert expected["input_ids"][0].tolist().count(processor.tokenizer.image_token_id) == 4
    assert torch.equal(ours(ref)(image), expected["pixel_values"][0])
