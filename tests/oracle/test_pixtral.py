"""Pixtral and Mistral 3.1 against transformers: vision + projector, container layout, Mistral logits and generation.

Two tiny checkpoints built with transformers: Pixtral (`LlavaForConditionalGeneration`
with a Pixtral tower, Mistral LM with a sliding window of 16 so every prompt here
slides) and Mistral 3.1 (`Mistral3ForConditionalGeneration`: 2×2 patch merger, no window).
"""

from __future__ import annotations

import json
import shutil
import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from embedder_service.models import load_vision_model
from embedder_service.models.pixtral import PixtralVisionModel
from generator_service.engine import Engine, GenerationRequest
from generator_service.models.llama import LlamaForCausalLM
from generator_service.sampling import SamplingParams
from generator_service.tokenizer import Tokenizer
from shared.config.errors import CheckpointError
from shared.modeling.registry import family_for
from shared.store.container import EmbeddingContainer
from shared.store.token_ids import EMBEDDING_INDEX_BASE as BASE
from tests.support.tiny_models import build_tiny_pixtral, load_pixtral_reference

ATOL = 1e-4
FAMILIES = ["pixtral", "mistral3"]
SLIDING_WINDOW = 16
SIZES = [(80, 60), (30, 97), (64, 64)]  # (width, height): three sizes and aspect ratios
GREEDY = SamplingParams(temperature=0, max_tokens=32)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """family → (path, reference, our vision model, our LM, tokenizer), each built once."""
    built = {}

    def get(family: str):
        if family not in built:
            window = SLIDING_WINDOW if family == "pixtral" else None
            path = build_tiny_pixtral(tmp_path_factory.mktemp(family), family=family, sliding_window=window)
            built[family] = SimpleNamespace(
                path=path, ref=load_pixtral_reference(path), vision=PixtralVisionModel.from_checkpoint(path),
                lm=LlamaForCausalLM.from_checkpoint(path), tok=Tokenizer.from_checkpoint(path),
            )
        return built[family]

    return get


def images(sizes=SIZES, seed=0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def reference_inputs(s, imgs) -> dict:
    """What PixtralProcessor gives the model: padded pixels and each image's size (resized to patch × merge)."""
    from transformers import PixtralImageProcessorPil

    block = s.vision.config.block
    return PixtralImageProcessorPil.from_pretrained(s.path)(imgs, patch_size={"height": block, "width": block}, return_tensors="pt")


def reference_features(s, imgs) -> list[torch.Tensor]:
    inputs = reference_inputs(s, imgs)
    kwargs = {"vision_feature_select_strategy": "full"} if s.ref.config.model_type == "llava" else {}
    with torch.inference_mode():
        out = s.ref.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"], vision_feature_layer=-1, **kwargs)
    return list(out.pooler_output)


def containers(s, imgs) -> list[EmbeddingContainer]:
    pixels = [s.vision.preprocessor(image) for image in imgs]
    rows = s.vision.embed_batch(pixels)
    return [
        EmbeddingContainer(id=f"img{i}", model="tiny", tenant="t", first_token_id=BASE + 1000 * i + 7, num_tokens=r.shape[0],
                           embeddings=r, layout=s.vision.layout_for(p), grid=s.vision.grid_for(p))
        for i, (r, p) in enumerate(zip(rows, pixels))
    ]


def reference_ids(s, ids: list[int]) -> list[int]:
    """Our prompt with container rows as the reference's image token (break/end tokens are text in both)."""
    return [s.ref.config.image_token_index if i >= BASE else i for i in ids]


# --- registry and vision ----------------------------------------------------------------------------------


def test_registry_maps_llava_with_pixtral_and_mistral3(setup):
    for family in FAMILIES:
        config = json.loads((setup(family).path / "config.json").read_text())
        found = family_for(config)
        assert found.name == family
        assert found.load_language_class() is LlamaForCausalLM
        assert isinstance(load_vision_model(setup(family).path, dtype="float32"), PixtralVisionModel)
    assert family_for({"model_type": "llava", "vision_config": {"model_type": "clip_vision_model"}}).name == "llava"


@pytest.mark.parametrize("count", [1, 3], ids=["one-image", "three-sizes"])
@pytest.mark.parametrize("family", FAMILIES)
def test_vision_and_projector_match_get_image_features(setup, family, count, gemm_paths):
    s = setup(family)
    imgs = images(SIZES[:count])
    expected = reference_features(s, imgs)
    got = s.vision.embed(imgs)
    assert gemm_paths is None or gemm_paths[0] > 0  # the packed run packed
    assert [g.shape for g in got] == [e.shape for e in expected]
    assert all(g.shape[1] == s.vision.hidden_size for g in got)
    assert max((g - e).abs().max().item() for g, e in zip(got, expected)) <= ATOL


def test_a_batch_gives_each_image_what_it_gives_alone(setup):
    """Attention stays within each image: batching changes an image's rows by GEMM rounding only."""
    s = setup("pixtral")
    pixels = [s.vision.preprocessor(image) for image in images()]
    together = s.vision.embed_batch(pixels)
    for p, rows in zip(pixels, together):
        assert (s.vision.embed_batch([p])[0] - rows).abs().max() <= ATOL


@pytest.fixture(scope="module")
def processor_expansion():
    """transformers' PixtralProcessor.replace_image_token, called unbound (the processor itself requires torchvision,
    which is not a test dependency; its module only needs the resize helper the PIL image processor also defines)."""
    name = "transformers.models.pixtral.image_processing_pixtral"
    try:
        __import__(name)
    except ImportError:
        from transformers.models.pixtral import image_processing_pil_pixtral

        stub = types.ModuleType(name)
        stub.get_resize_output_image_size = image_processing_pil_pixtral.get_resize_output_image_size
        sys.modules[name] = stub
    from transformers.models.pixtral.processing_pixtral import PixtralProcessor

    def expand(patch: int, merge: int, height: int, width: int) -> str:
        processor = SimpleNamespace(patch_size=patch, spatial_merge_size=merge, image_token="[IMG]",
                                    image_break_token="[IMG_BREAK]", image_end_token="[IMG_END]")
        return PixtralProcessor.replace_image_token(processor, {"image_sizes": [(height, width)]}, 0)

    return expand


@pytest.mark.parametrize("family", FAMILIES)
def test_layout_and_grid_expand_as_the_reference_processor(setup, processor_expansion, family):
    s = setup(family)
    sizes = reference_inputs(s, images())["image_sizes"].tolist()
    for container, (height, width) in zip(containers(s, images()), sizes):
        text = "".join("[IMG]" if i >= BASE else s.tok.id_to_token(i) for i in container.token_ids())
        assert text == processor_expansion(s.vision.config.vision.patch_size, s.vision.config.merge, height, width)
        block = s.vision.config.block
        assert container.grid == (1, height // block, width // block)
        assert container.num_tokens == (height // block) * (width // block)


def test_checkpoint_in_transformers_5_module_layout_loads_the_same(setup, tmp_path):
    """`model.vision_tower.…`, `model.multi_modal_projector.…`, `model.language_model.…`, `lm_head.…` names."""
    s = setup("mistral3")
    shutil.copytree(s.path, tmp_path / "ckpt")
    tensors = load_file(tmp_path / "ckpt" / "model.safetensors")
    renamed = {}
    for name, tensor in tensors.items():
        if name.startswith("language_model.lm_head."):
            renamed[name.removeprefix("language_model.")] = tensor
        elif name.startswith("language_model.model."):
            renamed["model.language_model." + name.removeprefix("language_model.model.")] = tensor
        else:
            renamed["model." + name] = tensor
    save_file(renamed, tmp_path / "ckpt" / "model.safetensors", metadata={"format": "pt"})
    pixels = [s.vision.preprocessor(image) for image in images()]
    moved = PixtralVisionModel.from_checkpoint(tmp_path / "ckpt")
    assert all(torch.equal(a, b) for a, b in zip(moved.embed_batch(pixels), s.vision.embed_batch(pixels)))
    ids = torch.tensor([1, 5, 9, 12])
    moved_lm = LlamaForCausalLM.from_checkpoint(tmp_path / "ckpt")
    assert torch.equal(moved_lm.prefill(ids, moved_lm.new_cache(1, 8), 0), s.lm.prefill(ids, s.lm.new_cache(1, 8), 0))


def test_bfloat16(setup):
    s = setup("mistral3")
    model = PixtralVisionModel.from_checkpoint(s.path, dtype=torch.bfloat16)
    for got, expected in zip(model.embed(images()), reference_features(s, images())):
        assert got.dtype == torch.bfloat16
        assert (got.float() - expected).abs().max() <= 0.05 * expected.abs().max()  # bfloat16 keeps ~3 significant digits


@pytest.mark.parametrize("edit, message", [
    ({"vision_feature_select_strategy": "default"}, "vision_feature_select_strategy 'full'"),
    ({"vision_feature_layer": 9}, "vision_feature_layer 9"),
])
def test_bad_pixtral_configs_are_refused(setup, tmp_path, edit, message):
    shutil.copytree(setup("pixtral").path, tmp_path / "ckpt")
    config_file = tmp_path / "ckpt" / "config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | edit))
    with pytest.raises(CheckpointError, match=message):
        PixtralVisionModel.from_checkpoint(tmp_path / "ckpt")


def test_unexpected_vision_tensor_is_named(setup, tmp_path):
    shutil.copytree(setup("pixtral").path, tmp_path / "ckpt")
    tensors = load_file(tmp_path / "ckpt" / "model.safetensors")
    tensors["vision_tower.transformer.layers.7.attention.q_proj.weight"] = torch.zeros(2)
    save_file(tensors, tmp_path / "ckpt" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"unexpected vision tensors.*layers\.7"):
        PixtralVisionModel.from_checkpoint(tmp_path / "ckpt")


# --- the language model --------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2], ids=["one-image", "two-sizes"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_with_images_match(setup, family, count):
    s = setup(family)
    imgs = images(SIZES[:count])
    cs = containers(s, imgs)
    ids = [s.tok.bos_token_id, 20, 30]
    for c in cs:
        ids += c.token_ids() + [40, 41, 42]
    inputs = reference_inputs(s, imgs)
    with torch.inference_mode():
        expected = s.ref(input_ids=torch.tensor([reference_ids(s, ids)]), pixel_values=inputs["pixel_values"],
                         image_sizes=inputs["image_sizes"]).logits[0]
    ranges = torch.tensor([[c.first_token_id, c.num_tokens] for c in cs])
    got = s.lm.prefill(torch.tensor(ids), s.lm.new_cache(1, 256), 0, ranges=ranges, rows=torch.cat([c.embeddings for c in cs]), all_logits=True)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= ATOL
    if s.lm.config.sliding_window is not None:
        assert len(ids) > 2 * s.lm.config.sliding_window  # the window really slides


def test_a_stored_head_unlike_the_table_is_used_when_the_config_defaults_to_tied(setup, tmp_path):
    """Mistral3Config defaults tie_word_embeddings to True; published configs that leave it out store their own
    head, which transformers then keeps (it ties only a copy of the table). So do we."""
    shutil.copytree(setup("mistral3").path, tmp_path / "ckpt")
    config_file = tmp_path / "ckpt" / "config.json"
    config = json.loads(config_file.read_text())
    del config["tie_word_embeddings"]
    config_file.write_text(json.dumps(config))
    ours = LlamaForCausalLM.from_checkpoint(tmp_path / "ckpt")
    ref = load_pixtral_reference(tmp_path / "ckpt")
    assert ref.config.tie_word_embeddings and ours.config.tie_word_embeddings  # the config says tied …
    ids = torch.tensor([1, 5, 9, 12, 40, 41])
    with torch.inference_mode():
        expected = ref(input_ids=ids[None]).logits[0]
    got = ours.prefill(ids, ours.new_cache(1, 8), 0, all_logits=True)
    assert (got - expected).abs().max() <= ATOL  # … and both use the stored head


def chat_prompt(s, cs) -> list[int]:
    """A chat turn with the images through the generator's chat path: the template's `[IMG]` for each image part
    replaced by its container's IDs."""
    messages = [{"role": "user", "content": [*({"type": "image"} for _ in cs), {"type": "text", "text": "Describe the picture."}]}]
    placeholder = s.vision.image_prompt.placeholder(s.tok)
    assert placeholder == "[IMG]"
    return s.tok.encode_with_images(s.tok.render_chat(messages, placeholder), cs, add_special_tokens=False).ids


def generate_alone(s, ids, params, cs=()) -> list[int]:
    engine = Engine(s.lm, max_batch=1, max_seq_len=256, eos_token_ids=s.tok.eos_token_ids)
    handle = engine.submit(GenerationRequest(ids, params, cs))
    engine.run_until_idle()
    return handle.result().token_ids


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_32_tokens_match_generate(setup, family):
    s = setup(family)
    imgs = images(SIZES[:2])
    cs = containers(s, imgs)
    ids = chat_prompt(s, cs)
    inputs = reference_inputs(s, imgs)
    ref_ids = reference_ids(s, ids)
    with torch.inference_mode():
        out = s.ref.generate(input_ids=torch.tensor([ref_ids]), pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                             max_new_tokens=32, do_sample=False)
    expected = out[0, len(ref_ids):].tolist()
    assert len(expected) >= 8  # a real sequence, not an immediate EOS
    assert generate_alone(s, ids, GREEDY, cs) == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_requests_equal_one_by_one(setup, family):
    s = setup(family)
    a, b, c = containers(s, images())
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompts = [chat_prompt(s, [a]), chat_prompt(s, [b, c]), s.tok.encode("The quick brown fox"), chat_prompt(s, [c])]
    bound = [[a], [b, c], [], [c]]
    alone = [generate_alone(s, ids, params, cs) for ids, cs in zip(prompts, bound)]
    engine = Engine(s.lm, max_batch=4, max_seq_len=256, eos_token_ids=s.tok.eos_token_ids)
    handles = [engine.submit(GenerationRequest(ids, params, cs)) for ids, cs in zip(prompts, bound)]
    engine.run_until_idle()
    assert [h.result().token_ids for h in handles] == alone
