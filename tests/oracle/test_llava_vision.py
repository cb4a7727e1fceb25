"""LlavaVisionModel against transformers' LlavaForConditionalGeneration.get_image_features, plus loading rules."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from embedder_service.models import embed_images, gemm, load_vision_model
from embedder_service.models.llava import LlavaVisionModel
from shared.config.errors import CheckpointError, InvalidInput
from shared.modeling.checkpoint import Checkpoint, canonical_name
from shared.store.container import Layout
from tests.support.tiny_models import build_tiny_llava, load_reference

ATOL = 1e-4
# (vision_feature_layer, vision_feature_select_strategy); the tiny CLIP has 3 layers, so 4 hidden states.
VARIANTS = [(-2, "default"), (-2, "full"), (-1, "default"), ([-3, -1], "default"), ([-3, -1], "full")]


def variant_id(variant) -> str:
    layer, strategy = variant
    return f"layer{layer}-{strategy}".replace(" ", "")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(layer, strategy, shard) → folder, each built once per module (~1 s a build)."""
    built = {}

    def get(layer=-2, strategy="default", max_shard_size=None):
        key = (json.dumps(layer), strategy, max_shard_size)
        if key not in built:
            path = tmp_path_factory.mktemp("llava")
            built[key] = build_tiny_llava(path, vision_feature_layer=layer, vision_feature_select_strategy=strategy, max_shard_size=max_shard_size)
        return built[key]

    return get


@pytest.fixture(scope="module")
def reference(checkpoint):
    loaded = {}

    def get(layer=-2, strategy="default"):
        key = (json.dumps(layer), strategy)
        if key not in loaded:
            loaded[key] = load_reference(checkpoint(layer, strategy))
        return loaded[key]

    return get


def reference_features(ref, pixels, layer, strategy) -> torch.Tensor:
    with torch.inference_mode():
        out = ref.get_image_features(pixel_values=pixels, vision_feature_layer=layer, vision_feature_select_strategy=strategy)
    # transformers 5: a BaseModelOutputWithPooling whose pooler_output is a list of [N, hidden], one per image
    return torch.stack(list(out.pooler_output))


def pixels(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 56, 56, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("variant", VARIANTS, ids=[variant_id(v) for v in VARIANTS])
def test_matches_get_image_features(checkpoint, reference, variant, batch, gemm_paths):
    layer, strategy = variant
    model = LlavaVisionModel.from_checkpoint(checkpoint(layer, strategy))
    x = pixels(batch)
    expected = reference_features(reference(layer, strategy), x, layer, strategy)
    with torch.inference_mode():
        got = model(x)
    assert gemm_paths is None or gemm_paths[0] > 0  # the packed run packed
    assert got.shape == expected.shape == (batch, model.tokens_per_image, model.hidden_size)
    assert (got - expected).abs().max() <= ATOL


def test_torch_op_path_matches_too(checkpoint, reference, monkeypatch):
    """The oneDNN linears (CPU fast path) and plain F.linear (every other device) agree with the reference."""
    model = LlavaVisionModel.from_checkpoint(checkpoint(-2, "default"))
    x = pixels(2, seed=1)
    expected = reference_features(reference(-2, "default"), x, -2, "default")
    with torch.inference_mode():
        fast = model(x)
        monkeypatch.setattr(gemm, "CPU_FAST_PATHS", False)
        plain = model(x)
    assert (plain - expected).abs().max() <= ATOL
    assert (fast - expected).abs().max() <= ATOL


@pytest.mark.parametrize(
    "act, residual", [(None, False), (None, True), ("silu", False), ("gelu", False), ("gelu_tanh", False), ("relu", False), ("quick_gelu", False)]
)
def test_linear_paths_agree(act, residual, monkeypatch):
    g = torch.Generator().manual_seed(0)
    x, w, b, r = torch.randn(2, 7, 16, generator=g), torch.randn(24, 16, generator=g), torch.randn(24, generator=g), torch.randn(2, 7, 24, generator=g)
    kwargs = {"act": act, "residual": r if residual else None}
    fast = gemm.linear(x, w, b, **kwargs)
    monkeypatch.setattr(gemm, "CPU_FAST_PATHS", False)
    plain = gemm.linear(x, w, b, **kwargs)
    expected = torch.nn.functional.linear(x.double(), w.double(), b.double())
    expected = expected + r.double() if residual else gemm.apply_activation(expected, act) if act else expected
    torch.testing.assert_close(fast.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain.double(), expected, atol=1e-5, rtol=1e-5)


def test_onednn_weight_is_reordered_once_per_weight_and_again_after_an_in_place_change():
    if not gemm.onednn_linear_available():
        pytest.skip("optional path: this torch build has no oneDNN linear (the torch path runs)")
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(24, 16, generator=g), torch.randn(3, 16, generator=g)
    first = gemm.onednn_weight(w)
    assert first.is_mkldnn and gemm.onednn_weight(w) is first
    w.mul_(2)
    second = gemm.onednn_weight(w)
    assert second is not first
    got = torch.ops.mkldnn._linear_pointwise(x, second, None, "none", [], "")
    torch.testing.assert_close(got.double(), x.double() @ w.double().T, atol=1e-5, rtol=1e-5)
    view = torch.randn(24 * 16, generator=g).view(24, 16)  # made per call: reordering it would be per call
    assert gemm.onednn_weight(view) is view


def test_images_end_to_end_match_reference_processor_and_model(checkpoint, reference):
    from transformers import CLIPImageProcessorPil

    path = checkpoint(-2, "default")
    model = LlavaVisionModel.from_checkpoint(path)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in [(80, 60), (41, 97), (56, 56)]]
    ref_pixels = CLIPImageProcessorPil.from_pretrained(path)(images, return_tensors="pt")["pixel_values"]
    expected = reference_features(reference(-2, "default"), ref_pixels, -2, "default")
    got = embed_images(model, images)
    assert len(got) == 3 and all(g.shape == (model.tokens_per_image, model.hidden_size) for g in got)
    assert (torch.stack(got) - expected).abs().max() <= ATOL


def test_properties(checkpoint):
    path = checkpoint(-2, "full")
    model = LlavaVisionModel.from_checkpoint(path)
    assert model.tokens_per_image == (56 // 14) ** 2 + 1  # "full" keeps CLS
    assert LlavaVisionModel.from_checkpoint(checkpoint(-2, "default")).tokens_per_image == (56 // 14) ** 2
    assert model.hidden_size == json.loads((path / "config.json").read_text())["text_config"]["hidden_size"]
    assert model.fingerprint == Checkpoint(path).fingerprint
    assert model.preprocessor.crop_size == (56, 56)
    assert model.layout_for(pixels(1)) == Layout() and model.grid_for(pixels(1)) is None
    assert model.device == torch.device("cpu") and model.dtype == torch.float32


def test_registry_loads_it(checkpoint):
    assert isinstance(load_vision_model(checkpoint(-2, "default"), dtype="float32"), LlavaVisionModel)


def test_bfloat16(checkpoint, reference):
    model = LlavaVisionModel.from_checkpoint(checkpoint(-2, "default"), dtype=torch.bfloat16)
    x = pixels(2)
    expected = reference_features(reference(-2, "default"), x, -2, "default")
    with torch.inference_mode():
        got = model(x)
    assert got.dtype == torch.bfloat16
    assert (got.float() - expected).abs().max() <= 0.05 * expected.abs().max()  # bfloat16 keeps ~3 significant digits


def test_wrong_pixel_size_is_refused(checkpoint):
    model = LlavaVisionModel.from_checkpoint(checkpoint(-2, "default"))
    with pytest.raises(InvalidInput, match=r"pixel_values must be \[B, 3, 56, 56\]"):
        model(torch.zeros(1, 3, 64, 64))


# --- loading -------------------------------------------------------------------------------------


def test_sharded_checkpoint_loads_identical_to_unsharded(checkpoint):
    sharded_path = checkpoint(-2, "default", max_shard_size="20KB")
    assert (sharded_path / "model.safetensors.index.json").is_file()
    assert len(list(sharded_path.glob("*.safetensors"))) > 1
    sharded = LlavaVisionModel.from_checkpoint(sharded_path)
    whole = LlavaVisionModel.from_checkpoint(checkpoint(-2, "default"))
    x = pixels(2)
    with torch.inference_mode():
        assert torch.equal(sharded(x), whole(x))
    assert sharded.fingerprint == whole.fingerprint


def test_only_layers_up_to_the_deepest_selected_are_built_and_read(checkpoint, monkeypatch):
    read: list[str] = []
    original = Checkpoint.load_tensors

    def spy(self, prefix, *args, **kwargs):
        tensors = original(self, prefix, *args, **kwargs)
        read.extend(prefix + name for name in tensors)
        return tensors

    monkeypatch.setattr(Checkpoint, "load_tensors", spy)
    model = LlavaVisionModel.from_checkpoint(checkpoint(-2, "default"))  # 3 layers; -2 = output of layer 2
    assert len(model.vision_tower.encoder.layers) == 2
    names = set(model.state_dict())
    assert not any("layers.2." in n or "post_layernorm" in n for n in names)
    vision_read = [n for n in read if n.startswith("vision_tower.")]
    assert any("layers.1." in n for n in vision_read)
    assert not any("layers.2." in n or "post_layernorm" in n for n in vision_read)

    assert len(LlavaVisionModel.from_checkpoint(checkpoint(-1, "default")).vision_tower.encoder.layers) == 3
    assert len(LlavaVisionModel.from_checkpoint(checkpoint([-3, -1], "default")).vision_tower.encoder.layers) == 3


def rewrite_weights(src, dst, edit) -> None:
    """Copy a single-file checkpoint folder, passing its tensors through `edit(dict) -> dict`."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    save_file(edit(tensors), dst / "model.safetensors", metadata={"format": "pt"})


def stored_name(tensors: dict, name: str) -> str:
    """The name transformers stored a tensor under (its own layout), from the published one."""
    return next(stored for stored in tensors if canonical_name(stored) == name)


@pytest.mark.parametrize(
    "name",
    ["vision_tower.vision_model.encoder.layers.0.mlp.fc1.bias", "vision_tower.vision_model.embeddings.class_embedding", "multi_modal_projector.linear_2.weight"],
)
def test_missing_tensor_is_named(checkpoint, tmp_path, name):
    def drop(tensors):
        del tensors[stored_name(tensors, name)]
        return tensors

    rewrite_weights(checkpoint(-2, "default"), tmp_path / "ckpt", drop)
    with pytest.raises(CheckpointError, match=f"missing.*{name.replace('.', '[.]')}"):
        LlavaVisionModel.from_checkpoint(tmp_path / "ckpt")


@pytest.mark.parametrize(
    "name",
    [
        "vision_tower.vision_model.encoder.layers.0.self_attn.extra.weight",  # inside a layer we load
        "vision_tower.vision_model.encoder.layers.7.mlp.fc1.weight",  # a layer the config does not have
        "vision_tower.vision_model.bogus",
        "multi_modal_projector.linear_3.weight",
    ],
)
def test_unexpected_tensor_is_named(checkpoint, tmp_path, name):
    def add(tensors):
        tensors[name] = torch.zeros(2)
        return tensors

    rewrite_weights(checkpoint(-2, "default"), tmp_path / "ckpt", add)
    with pytest.raises(CheckpointError, match=f"unexpected.*{name.replace('.', '[.]')}"):
        LlavaVisionModel.from_checkpoint(tmp_path / "ckpt")


@pytest.mark.parametrize("field, value", [("model_type", "blip_2"), ("vision_config.model_type", "siglip_vision_model")])
def test_unknown_architecture_lists_the_supported(checkpoint, tmp_path, field, value):
    shutil.copytree(checkpoint(-2, "default"), tmp_path / "ckpt")
    config_file = tmp_path / "ckpt" / "config.json"
    config = json.loads(config_file.read_text())
    if "." in field:
        outer, inner = field.split(".")
        config[outer][inner] = value
    else:
        config[field] = value
    config_file.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=f"unsupported model.*{value}.*supported: llava \\+ clip_vision_model"):
        LlavaVisionModel.from_checkpoint(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="supported: llava"):
        load_vision_model(tmp_path / "ckpt")


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"vision_feature_layer": 4}, "vision_feature_layer 4 must be"),
        ({"vision_feature_layer": -5}, "vision_feature_layer -5 must be"),
        ({"vision_feature_select_strategy": "cls"}, "vision_feature_select_strategy 'cls'"),
        ({"projector_hidden_act": "mish"}, "unsupported activation 'mish'"),
    ],
)
def test_bad_config_values_are_refused(checkpoint, tmp_path, edit, message):
    shutil.copytree(checkpoint(-2, "default"), tmp_path / "ckpt")
    config_file = tmp_path / "ckpt" / "config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | edit))
    with pytest.raises(CheckpointError, match=message):
        LlavaVisionModel.from_checkpoint(tmp_path / "ckpt")


def test_config_disagreeing_with_tensor_shapes_is_a_checkpoint_error(checkpoint, tmp_path):
    shutil.copytree(checkpoint(-2, "default"), tmp_path / "ckpt")
    config_file = tmp_path / "ckpt" / "config.json"
    config = json.loads(config_file.read_text())
    config["text_config"]["hidden_size"] = 48  # the projector's tensors say 64
    config_file.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="(?s)multi_modal_projector.*do not fit config.json.*size mismatch"):
        LlavaVisionModel.from_checkpoint(tmp_path / "ckpt")


def test_position_ids_buffer_of_older_checkpoints_is_accepted(checkpoint, tmp_path):
    def add(tensors):
        tensors["vision_tower.vision_model.embeddings.position_ids"] = torch.arange(17).view(1, 17)
        return tensors

    rewrite_weights(checkpoint(-2, "default"), tmp_path / "ckpt", add)
    model = LlavaVisionModel.from_checkpoint(tmp_path / "ckpt")
    whole = LlavaVisionModel.from_checkpoint(checkpoint(-2, "default"))
    with torch.inference_mode():
        assert torch.equal(model(pixels(1)), whole(pixels(1)))
    assert "embeddings.position_ids" not in set(model.vision_tower.state_dict())


def test_preprocessor_size_must_fit_the_tower(checkpoint, tmp_path):
    shutil.copytree(checkpoint(-2, "default"), tmp_path / "ckpt")
    pre = tmp_path / "ckpt" / "preprocessor_config.json"
    pre.write_text(json.dumps(json.loads(pre.read_text()) | {"crop_size": {"height": 64, "width": 64}}))
    with pytest.raises(CheckpointError, match="64×64 images, the vision tower takes 56×56"):
        LlavaVisionModel.from_checkpoint(tmp_path / "ckpt")
