"""Gemma 3 against transformers: vision + projector, prompt expansion, Gemma 3 text logits and generation.

One tiny checkpoint built with transformers (`build_tiny_gemma3`): SigLIP 32 px / patch 4 (8 × 8 patches
pooled to 16 tokens), a 4-layer Gemma 3 text model with a sliding window of 8 — shorter than one
image — on layers 0, 1, 3 and a global layer 2, and a tokenizer that merges runs of newlines.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from embedder_service.models import load_vision_model
from embedder_service.models.gemma3 import Gemma3VisionModel
from generator_service.engine import Engine, GenerationRequest
from generator_service.models.gemma3 import Gemma3ForCausalLM
from generator_service.sampling import SamplingParams
from generator_service.tokenizer import Tokenizer
from shared.config.errors import CheckpointError
from shared.modeling.registry import family_for
from shared.store.container import EmbeddingContainer, Layout
from shared.store.token_ids import EMBEDDING_INDEX_BASE as BASE
from tests.support.tiny_models import (
    build_tiny_gemma3,
    gemma3_processor,
    load_gemma3_reference,
)

ATOL = 1e-4
SIZES = [(80, 60), (30, 97), (32, 32)]  # (width, height)
GREEDY = SamplingParams(temperature=0, max_tokens=32)


@pytest.fixture(scope="module")
def s(tmp_path_factory):
    path = build_tiny_gemma3(tmp_path_factory.mktemp("gemma3"))
    return SimpleNamespace(
        path=path, ref=load_gemma3_reference(path), processor=gemma3_processor(path), vision=Gemma3VisionModel.from_checkpoint(path),
        lm=Gemma3ForCausalLM.from_checkpoint(path), tok=Tokenizer.from_checkpoint(path),
    )


def images(sizes=SIZES, seed=0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def reference_features(s, imgs) -> list[torch.Tensor]:
    pixels = s.processor.image_processor(imgs, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        return list(s.ref.get_image_features(pixel_values=pixels).pooler_output)


def containers(s, imgs) -> list[EmbeddingContainer]:
    pixels = [s.vision.preprocessor(image) for image in imgs]
    return [
        EmbeddingContainer(id=f"img{i}", model="tiny", tenant="t", first_token_id=BASE + 1000 * i + 7, num_tokens=r.shape[0],
                           embeddings=r, layout=s.vision.layout_for(p))
        for i, (r, p) in enumerate(zip(s.vision.embed_batch(pixels), pixels))
    ]


def reference_ids(s, ids: list[int]) -> list[int]:
    """Our prompt with container rows as the reference's image token (start/end of image are text in both)."""
    return [s.ref.config.image_token_id if i >= BASE else i for i in ids]


def encode(s, prompt: str, cs) -> list[int]:
    """`prompt` with `<start_of_image>` standing for each image, as our aliases of `cs`, encoded by our tokenizer."""
    pieces = prompt.split("<start_of_image>")
    aliased = pieces[0] + "".join(c.alias + piece for c, piece in zip(cs, pieces[1:]))
    return s.tok.encode_prompt(aliased, {c.alias: c for c in cs}).ids


def encode_chat(s, messages, cs) -> list[int]:
    """`messages` through the generator's chat path: the template's `<start_of_image>` for each image part replaced
    by its container's IDs (and the layout's text around them)."""
    placeholder = s.vision.image_prompt.placeholder(s.tok)
    assert placeholder == "<start_of_image>"
    return s.tok.encode_with_images(s.tok.render_chat(messages, placeholder), cs, add_special_tokens=False).ids


def reference_inputs(s, prompt: str, imgs, **kwargs) -> dict:
    """What Gemma3Processor gives the model for `prompt` (images at `<start_of_image>`): ids, pixels, token types."""
    return s.processor(text=prompt, images=imgs or None, return_tensors="pt", **kwargs)


# --- registry and vision ----------------------------------------------------------------------------------


def test_registry_maps_gemma3_with_siglip(s):
    config = json.loads((s.path / "config.json").read_text())
    family = family_for(config)
    assert family.name == "gemma3" and family.load_language_class() is Gemma3ForCausalLM
    assert isinstance(load_vision_model(s.path, dtype="float32"), Gemma3VisionModel)


@pytest.mark.parametrize("count", [1, 3])
def test_vision_and_projector_match_get_image_features(s, count, gemm_paths):
    imgs = images(SIZES[:count])
    expected = reference_features(s, imgs)
    got = s.vision.embed(imgs)
    assert gemm_paths is None or gemm_paths[0] > 0  # the packed run packed
    assert [g.shape for g in got] == [e.shape for e in expected] == [(16, 64)] * count
    assert max((g - e).abs().max().item() for g, e in zip(got, expected)) <= ATOL


def test_bfloat16(s):
    model = Gemma3VisionModel.from_checkpoint(s.path, dtype=torch.bfloat16)
    for got, expected in zip(model.embed(images()), reference_features(s, images())):
        assert got.dtype == torch.bfloat16
        assert (got.float() - expected).abs().max() <= 0.05 * expected.abs().max()


def test_checkpoint_in_transformers_5_module_layout_loads_the_same(s, tmp_path):
    """`model.vision_tower.…` (no `vision_model.`), `model.multi_modal_projector.…`, `model.language_model.…`."""
    shutil.copytree(s.path, tmp_path / "ckpt")
    renamed = {}
    for name, tensor in load_file(tmp_path / "ckpt" / "model.safetensors").items():
        name = name.replace("vision_tower.vision_model.", "vision_tower.").replace("language_model.model.", "language_model.")
        renamed["model." + name] = tensor
    save_file(renamed, tmp_path / "ckpt" / "model.safetensors", metadata={"format": "pt"})
    pixels = [s.vision.preprocessor(image) for image in images()]
    moved = Gemma3VisionModel.from_checkpoint(tmp_path / "ckpt")
    assert all(torch.equal(a, b) for a, b in zip(moved.embed_batch(pixels), s.vision.embed_batch(pixels)))
    ids = torch.tensor([2, 50, 60, 70])
    moved_lm = Gemma3ForCausalLM.from_checkpoint(tmp_path / "ckpt")
    assert torch.equal(moved_lm.prefill(ids, moved_lm.new_cache(1, 8), 0), s.lm.prefill(ids, s.lm.new_cache(1, 8), 0))


def test_a_published_style_config_reads_the_same(s, tmp_path):
    """google/gemma-3-*-it configs predate per-layer-type RoPE: `rope_theta`, `rope_scaling` (global layers only),
    `rope_local_base_freq`, and a `sliding_window_pattern` instead of `layer_types`. Both readings must agree."""
    shutil.copytree(s.path, tmp_path / "ckpt")
    config_file = tmp_path / "ckpt" / "config.json"
    config = json.loads(config_file.read_text())
    text = config["text_config"]
    assert text.pop("layer_types") == ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
    rope = text.pop("rope_parameters")
    text |= {"sliding_window_pattern": 3, "rope_theta": rope["full_attention"]["rope_theta"],
             "rope_local_base_freq": rope["sliding_attention"]["rope_theta"],
             "rope_scaling": {"rope_type": "linear", "factor": rope["full_attention"]["factor"]}}
    config_file.write_text(json.dumps(config))
    old = Gemma3ForCausalLM.from_checkpoint(tmp_path / "ckpt")
    assert old.config == s.lm.config
    prompt = "Look:\n<start_of_image>\nWhat is it?"
    cs = containers(s, images(SIZES[:1]))
    expected = reference_logits(s, prompt, images(SIZES[:1]), load_gemma3_reference(tmp_path / "ckpt"))
    assert (prefill_logits(old, encode(s, prompt, cs), cs) - expected).abs().max() <= ATOL


def test_unexpected_vision_tensor_is_named(s, tmp_path):
    shutil.copytree(s.path, tmp_path / "ckpt")
    tensors = load_file(tmp_path / "ckpt" / "model.safetensors")
    tensors["vision_tower.vision_model.encoder.layers.5.mlp.fc1.weight"] = torch.zeros(2)
    save_file(tensors, tmp_path / "ckpt" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"unexpected vision tensors.*layers\.5"):
        Gemma3VisionModel.from_checkpoint(tmp_path / "ckpt")


@pytest.mark.parametrize("edit, message", [
    ({"text_config": {"use_bidirectional_attention": True}}, "use_bidirectional_attention"),
    ({"text_config": {"hidden_activation": "relu"}}, "hidden_act"),
    ({"text_config": {"layer_types": ["full_attention"]}}, "layer_types"),
    ({"mm_tokens_per_image": 15}, "mm_tokens_per_image"),
])
def test_unsupported_configs_are_refused(s, tmp_path, edit, message):
    shutil.copytree(s.path, tmp_path / "ckpt")
    config_file = tmp_path / "ckpt" / "config.json"
    config = json.loads(config_file.read_text())
    for key, value in edit.items():
        config[key] = config[key] | value if isinstance(value, dict) else value
    config_file.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        if "text_config" in edit:
            Gemma3ForCausalLM.from_checkpoint(tmp_path / "ckpt")
        else:
            Gemma3VisionModel.from_checkpoint(tmp_path / "ckpt")


# --- prompt expansion -------------------------------------------------------------------------------------

PROMPTS = [
    "<start_of_image>",
    "Describe<start_of_image>please.",
    "Look:\n<start_of_image>\nWhat is it?",
    "Two newlines\n\n<start_of_image>\n\n\nthree after.",
    "Two pictures:\n<start_of_image><start_of_image>\nCompare them.",
    "A cat.\n\n\n<start_of_image>",
]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_ids_around_an_alias_equal_gemma3_processor(s, prompt):
    cs = containers(s, images(SIZES[: prompt.count("<start_of_image>")]))
    expected = reference_inputs(s, prompt, images(SIZES[: len(cs)]))["input_ids"][0].tolist()
    assert reference_ids(s, encode(s, prompt, cs)) == expected


def test_the_layout_text_is_what_makes_the_ids_equal(s):
    """Without its newlines tokenized with the neighbouring text, the expansion differs from the processor's:
    the tokenizer merges the processor's "\\n\\n" with a prompt's own newlines (so the test above can fail)."""
    prompt = PROMPTS[2]
    (c,) = containers(s, images(SIZES[:1]))
    expected = reference_inputs(s, prompt, images(SIZES[:1]))["input_ids"][0].tolist()
    pieces = prompt.split("<start_of_image>")
    as_ids = Layout(before=(*s.tok.encode("\n\n", add_special_tokens=False), *c.layout.before),
                    after=(*c.layout.after, *s.tok.encode("\n\n", add_special_tokens=False)))
    naive = replace(c, layout=as_ids)  # the newlines as IDs of their own
    ids = s.tok.encode_prompt(pieces[0] + naive.alias + pieces[1], {naive.alias: naive}).ids
    assert reference_ids(s, ids) != expected


def chat_messages(count: int) -> list[dict]:
    return [
        {"role": "system", "content": [{"type": "text", "text": "You are a careful describer."}]},
        {"role": "user", "content": [*({"type": "image"} for _ in range(count)), {"type": "text", "text": "Describe the picture."}]},
    ]


@pytest.mark.parametrize("count", [1, 2])
def test_chat_template_ids_equal_gemma3_processor(s, count):
    text = s.tok.apply_chat_template(chat_messages(count), add_generation_prompt=True)
    assert text == s.processor.apply_chat_template(chat_messages(count), add_generation_prompt=True, tokenize=False)
    cs = containers(s, images(SIZES[:count]))
    expected = reference_inputs(s, text, images(SIZES[:count]), add_special_tokens=False)["input_ids"][0].tolist()
    assert reference_ids(s, encode_chat(s, chat_messages(count), cs)) == expected


# --- the language model --------------------------------------------------------------------------------------


def prefill_logits(lm, ids: list[int], cs) -> torch.Tensor:
    ranges = torch.tensor([[c.first_token_id, c.num_tokens] for c in cs]) if cs else None
    rows = torch.cat([c.embeddings for c in cs]) if cs else None
    return lm.prefill(torch.tensor(ids), lm.new_cache(1, 256), 0, ranges=ranges, rows=rows, all_logits=True)


def reference_logits(s, prompt: str, imgs, ref=None) -> torch.Tensor:
    inputs = reference_inputs(s, prompt, imgs)
    with torch.inference_mode():
        return (ref or s.ref)(**inputs).logits[0]


@pytest.mark.parametrize("count", [0, 1, 2], ids=["text", "one-image", "two-images"])
def test_logits_match(s, count):
    prompt = "The quick brown fox" + " <start_of_image> and then" * count + " jumps over the lazy dog near the river bank."
    imgs = images(SIZES[:count])
    cs = containers(s, imgs)
    ids = encode(s, prompt, cs)
    expected = reference_logits(s, prompt, imgs)
    got = prefill_logits(s.lm, ids, cs)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= ATOL
    assert len(ids) > 3 * s.lm.config.sliding_window  # the window slides, inside images too


def test_softcapping_in_the_config_is_ignored_as_by_the_reference(s, tmp_path):
    """Gemma3ForConditionalGeneration caps neither logits nor attention scores, whatever the config says."""
    path = build_tiny_gemma3(tmp_path / "softcap", softcapping=3.0)
    lm, ref = Gemma3ForCausalLM.from_checkpoint(path), load_gemma3_reference(path)
    prompt = "A photo of<start_of_image>a cat."
    imgs = images(SIZES[:1])
    vision = Gemma3VisionModel.from_checkpoint(path)
    (rows,) = vision.embed(imgs)
    c = EmbeddingContainer(id="x", model="m", tenant="t", first_token_id=BASE, num_tokens=16, embeddings=rows,
                           layout=vision.layout_for(None))
    got = prefill_logits(lm, encode(s, prompt, [c]), [c])
    expected = reference_logits(s, prompt, imgs, ref)
    assert expected.abs().max() > 3.0 and (got - expected).abs().max() <= ATOL


def test_image_attention_is_bidirectional(s):
    """The same weights with causal attention inside images give other logits: the match above depends on it."""
    prompt = "Look:\n<start_of_image>\nWhat is it?"
    imgs = images(SIZES[:1])
    cs = containers(s, imgs)
    ids = encode(s, prompt, cs)
    expected = reference_logits(s, prompt, imgs)
    causal = copy.copy(s.lm)
    causal.config = replace(s.lm.config, bidirectional_images=False)
    assert (prefill_logits(causal, ids, cs) - expected).abs().max() > 100 * ATOL
    assert (prefill_logits(s.lm, ids, cs) - expected).abs().max() <= ATOL


def test_bfloat16_language_model(s):
    """Gemma's norms and QK-norm scale in float32 before casting back; the embedding scale is rounded to bfloat16."""
    from transformers import Gemma3ForConditionalGeneration

    lm = Gemma3ForCausalLM.from_checkpoint(s.path, dtype=torch.bfloat16)
    ref = Gemma3ForConditionalGeneration.from_pretrained(s.path, dtype=torch.bfloat16).eval()
    prompt = "Look:\n<start_of_image>\nWhat is it?"
    imgs = images(SIZES[:1])
    cs = containers(s, imgs)
    inputs = reference_inputs(s, prompt, imgs)
    with torch.inference_mode():
        expected = ref(**inputs | {"pixel_values": inputs["pixel_values"].bfloat16()}).logits[0].float()
        features = ref.get_image_features(pixel_values=inputs["pixel_values"].bfloat16()).pooler_output[0]
    c = replace(cs[0], embeddings=features)  # the reference's own bfloat16 image rows
    got = prefill_logits(lm, encode(s, prompt, [c]), [c])
    assert (got - expected).abs().max() <= 0.05 * expected.abs().max()


def generate_alone(s, ids, params, cs=()) -> list[int]:
    engine = Engine(s.lm, max_batch=1, max_seq_len=256, eos_token_ids=s.tok.eos_token_ids)
    handle = engine.submit(GenerationRequest(ids, params, cs))
    engine.run_until_idle()
    return handle.result().token_ids


def test_greedy_32_tokens_match_generate(s):
    text = s.tok.apply_chat_template(chat_messages(2), add_generation_prompt=True)
    imgs = images(SIZES[:2])
    cs = containers(s, imgs)
    ids = encode_chat(s, chat_messages(2), cs)
    inputs = reference_inputs(s, text, imgs, add_special_tokens=False)
    with torch.inference_mode():
        out = s.ref.generate(**inputs, max_new_tokens=32, do_sample=False)
    expected = out[0, inputs["input_ids"].shape[1]:].tolist()
    assert len(expected) >= 8  # a real sequence, not an immediate end of turn
    assert generate_alone(s, ids, GREEDY, cs) == expected


def test_batched_requests_equal_one_by_one(s):
    a, b, c = containers(s, images())
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompts = [encode(s, "Look:\n<start_of_image>\nWhat is it?", [a]), encode(s, "<start_of_image>\n<start_of_image>Compare.", [b, c]),
               s.tok.encode("The quick brown fox"), encode(s, "A photo of<start_of_image>", [c])]
    bound = [[a], [b, c], [], [c]]
    alone = [generate_alone(s, ids, params, cs) for ids, cs in zip(prompts, bound)]
    engine = Engine(s.lm, max_batch=4, max_seq_len=256, eos_token_ids=s.tok.eos_token_ids)
    handles = [engine.submit(GenerationRequest(ids, params, cs)) for ids, cs in zip(prompts, bound)]
    engine.run_until_idle()
    assert [h.result().token_ids for h in handles] == alone
