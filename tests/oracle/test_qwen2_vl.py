"""Qwen2-VL and Qwen2.5-VL against transformers: vision + merger, M-RoPE positions, logits, greedy generation."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from embedder_service.models import gemm, load_vision_model
from embedder_service.models.qwen2_vl import Qwen2VLVisionModel
from generator_service.engine import Engine, GenerationRequest
from generator_service.models.qwen2 import Qwen2VLForCausalLM, mrope_positions
from generator_service.sampling import SamplingParams
from generator_service.tokenizer import EncodedPrompt, Tokenizer
from shared.config.errors import CheckpointError, InvalidInput
from shared.modeling.checkpoint import Checkpoint
from shared.modeling.families.qwen2_vl import Qwen2VLImagePrompt
from shared.store.container import EmbeddingContainer, Layout
from shared.store.token_ids import EMBEDDING_INDEX_BASE as BASE
from tests.support.tiny_models import (
    build_tiny_qwen2_vl,
    load_qwen2_vl_reference,
    reference_inputs,
)

ATOL = 1e-4
VARIANTS = ["qwen2_vl", "qwen2_5_vl"]
# (width, height): with 4 to 16 merged patches an image is 2×2 up to 4×4 of them; the odd sizes give
# Qwen2.5-VL's 2×2-cell windows cut at the edges.
SIZES = [(100, 60), (250, 90), (56, 56)]


@pytest.fixture(scope="module", params=VARIANTS)
def setup(request, tmp_path_factory):
    """(variant, path, reference, our vision model, our language model, tokenizer), once per variant."""
    path = build_tiny_qwen2_vl(tmp_path_factory.mktemp(request.param), variant=request.param)
    return request.param, path, load_qwen2_vl_reference(path), Qwen2VLVisionModel.from_checkpoint(path), \
        Qwen2VLForCausalLM.from_checkpoint(path), Tokenizer.from_checkpoint(path)


def images(sizes=SIZES, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def reference_features(ref, pre) -> list[torch.Tensor]:
    pixels, grids = torch.cat([p.patches for p in pre]), torch.tensor([p.grid for p in pre])
    with torch.inference_mode():
        return list(ref.get_image_features(pixel_values=pixels, image_grid_thw=grids).pooler_output)


def containers(vision: Qwen2VLVisionModel, pre, rows: list[torch.Tensor]) -> list[EmbeddingContainer]:
    return [
        EmbeddingContainer(id=f"img{i}", model="tiny", tenant="t", first_token_id=BASE + 1000 * i, num_tokens=r.shape[0],
                           embeddings=r, layout=vision.layout_for(p), grid=vision.grid_for(p))
        for i, (p, r) in enumerate(zip(pre, rows))
    ]


# --- vision -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 3])
def test_vision_and_merger_match_get_image_features(setup, count, gemm_paths, monkeypatch):
    _, _, ref, vision, _, _ = setup
    pre = [vision.preprocessor(im) for im in images(SIZES[:count])]
    expected = reference_features(ref, pre)
    fast = vision.embed_batch(pre)
    assert gemm_paths is None or gemm_paths[0] > 0  # the packed run packed
    monkeypatch.setattr(gemm, "CPU_FAST_PATHS", False)  # the torch-op path every non-CPU device takes
    plain = vision.embed_batch(pre)
    for got in (fast, plain):
        assert [g.shape for g in got] == [e.shape for e in expected]
        assert [g.shape[0] for g in got] == [t * h * w // 4 for t, h, w in (p.grid for p in pre)]
        assert max((g - e).abs().max().item() for g, e in zip(got, expected)) <= ATOL
    assert len({g.shape[0] for g in fast}) == count  # the batch really mixes sizes


def test_each_image_attends_only_to_itself(setup):
    """An image's rows are the same alone and in a batch with others (block-diagonal attention)."""
    _, _, _, vision, _, _ = setup
    pre = [vision.preprocessor(im) for im in images()]
    together = vision.embed_batch(pre)
    for p, rows in zip(pre, together):
        assert (vision.embed_batch([p])[0] - rows).abs().max() <= 1e-5


def test_container_shape_grid_and_layout(setup):
    variant, path, _, vision, _, _ = setup
    config = json.loads((path / "config.json").read_text())
    p = vision.preprocessor(images([(250, 90)])[0])
    assert p.grid == (1, 4, 12) and vision.grid_for(p) == (1, 2, 6)  # the LM's grid: patches / merge size
    assert vision.layout_for(p) == Layout(before=(config["vision_start_token_id"],), after=(config["vision_end_token_id"],))
    assert vision.processed_size(p) == (56, 168)  # scaled down to max_pixels
    assert vision.hidden_size == 64 and vision.fingerprint == Checkpoint(path).fingerprint
    assert isinstance(load_vision_model(path, dtype="float32"), Qwen2VLVisionModel)


# --- language model --------------------------------------------------------------------------------


def chat_prompt(tok: Tokenizer, path, conts: list[EmbeddingContainer], question: str) -> tuple[str, EncodedPrompt]:
    """One user turn of the images then `question`: the chat template's text, and our IDs for it (the generator's chat path)."""
    messages = [{"role": "user", "content": [*({"type": "image"} for _ in conts), {"type": "text", "text": question}]}]
    placeholder = Qwen2VLImagePrompt(Checkpoint(path)).placeholder(tok)
    assert placeholder == "<|vision_start|><|image_pad|><|vision_end|>"
    text = tok.apply_chat_template(messages, add_generation_prompt=True)
    return text, tok.encode_with_images(tok.render_chat(messages, placeholder), conts, add_special_tokens=False)


@pytest.mark.parametrize("count", [1, 2])
def test_prompt_logits_and_greedy_tokens_match_the_reference(setup, count):
    """Our tokens for the chat equal the processor's expansion; logits ≤ 1e-4; greedy 32 tokens identical."""
    _, path, ref, vision, lm, tok = setup
    ims = images(SIZES[:count])
    pre = [vision.preprocessor(im) for im in ims]
    conts = containers(vision, pre, vision.embed_batch(pre))
    text, encoded = chat_prompt(tok, path, conts, "Compare these." if count > 1 else "Describe this image.")
    inputs = reference_inputs(path, text, ims)
    image_token = ref.config.image_token_id
    assert [image_token if i >= BASE else i for i in encoded.ids] == inputs["input_ids"][0].tolist()

    with torch.inference_mode():
        expected = ref(**inputs).logits[0]
    positions, _ = lm.prompt_positions(encoded.ids, encoded.containers)
    ranges = torch.tensor([[c.first_token_id, c.num_tokens] for c in conts])
    got = lm.prefill(torch.tensor(encoded.ids), lm.new_cache(1, 256), 0, ranges=ranges, rows=torch.cat([c.embeddings for c in conts]),
                     all_logits=True, positions=positions)
    assert (got - expected).abs().max() <= ATOL

    with torch.inference_mode():
        out = ref.generate(**inputs, max_new_tokens=32, do_sample=False)
    expected_tokens = out[0, inputs["input_ids"].shape[1]:].tolist()
    engine = Engine(lm, max_batch=2, max_seq_len=256, eos_token_ids=tok.eos_token_ids)
    handle = engine.submit(GenerationRequest(encoded.ids, SamplingParams(temperature=0, max_tokens=32), encoded.containers))
    engine.run_until_idle()
    assert handle.result().token_ids == expected_tokens
    assert len(expected_tokens) == 32  # no early EOS: every decoded position is compared


def test_mrope_positions_equal_get_rope_index(setup):
    _, _, ref, vision, _, _ = setup
    pre = [vision.preprocessor(im) for im in images()]
    conts = containers(vision, pre, [torch.zeros(t * h * w // 4, 64) for t, h, w in (p.grid for p in pre)])
    ids = [5, 6, *conts[0].token_ids(), 7, *conts[1].token_ids(), *conts[2].token_ids(), 8, 9, 10]
    expected, delta = ref.model.get_rope_index(
        torch.tensor([[ref.config.image_token_id if i >= BASE else i for i in ids]]),
        mm_token_type_ids=torch.tensor([[int(i >= BASE) for i in ids]]),
        image_grid_thw=torch.tensor([p.grid for p in pre]),
    )
    positions, next_position = mrope_positions(ids, conts)
    assert torch.equal(positions, expected[:, 0])
    assert next_position == len(ids) + int(delta) < len(ids)  # decoding continues behind the length


def test_batched_generation_equals_one_by_one(setup):
    """Rows whose positions run behind their lengths by different amounts decode together correctly."""
    _, path, _, vision, lm, tok = setup
    pre = [vision.preprocessor(im) for im in images()]
    conts = containers(vision, pre, vision.embed_batch(pre))
    prompts = [
        chat_prompt(tok, path, conts[:1], "What is it?")[1],
        tok.encode_prompt("<|im_start|>user\nJust text.<|im_end|>\n<|im_start|>assistant\n", {}, add_special_tokens=False),
        chat_prompt(tok, path, conts[1:], "Both?")[1],
    ]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)

    def engine() -> Engine:
        return Engine(lm, max_batch=3, max_seq_len=256, eos_token_ids=tok.eos_token_ids)

    alone = []
    for p in prompts:
        e = engine()
        handle = e.submit(GenerationRequest(p.ids, params, p.containers))
        e.run_until_idle()
        alone.append(handle.result().token_ids)
    together = engine()
    handles = [together.submit(GenerationRequest(p.ids, params, p.containers)) for p in prompts]
    together.run_until_idle()
    assert [h.result().token_ids for h in handles] == alone


def test_image_ids_out_of_order_are_refused(setup):
    _, _, _, vision, lm, _ = setup
    pre = [vision.preprocessor(images([(56, 56)])[0])]
    (c,) = containers(vision, pre, [torch.zeros(4, 64)])
    with pytest.raises(InvalidInput, match="whole and in order"):
        lm.prompt_positions([5, c.first_token_id + 1, c.first_token_id, 6], [c])
    gridless = EmbeddingContainer(id="x", model="m", tenant="t", first_token_id=BASE, num_tokens=4, embeddings=torch.zeros(4, 64))
    with pytest.raises(InvalidInput, match="grid"):
        lm.prompt_positions([5, *gridless.token_ids()], [gridless])


# --- loading ---------------------------------------------------------------------------------------


def test_published_config_and_names_load_the_same(setup, tmp_path):
    """Published layout: text fields at the top level, `rope_scaling: mrope`, no vision model_type, `in_chans`;
    tensors as transformers 5 keeps them in memory (`model.visual.…`, `model.language_model.…`)."""
    variant, path, _, vision, lm, _ = setup
    shutil.copytree(path, tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    text, visual = config.pop("text_config"), config.pop("vision_config")
    rope = text.pop("rope_parameters")
    visual.pop("model_type")
    visual["in_chans"] = visual.pop("in_channels")
    config |= text | {"rope_theta": rope["rope_theta"], "rope_scaling": {"type": "mrope", "mrope_section": rope["mrope_section"]},
                      "vision_config": visual, "model_type": variant}
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    tensors = load_file(path / "model.safetensors")
    renamed = {("model.language_model." + k[len("model."):] if k.startswith("model.") else "model." + k if k.startswith("visual.") else k): v
               for k, v in tensors.items()}
    assert any(k.startswith("model.visual.") for k in renamed) and any(k.startswith("model.language_model.") for k in renamed)
    save_file(renamed, tmp_path / "ckpt" / "model.safetensors", metadata={"format": "pt"})

    pre = [vision.preprocessor(im) for im in images()]
    published = Qwen2VLVisionModel.from_checkpoint(tmp_path / "ckpt")
    assert all(torch.equal(a, b) for a, b in zip(published.embed_batch(pre), vision.embed_batch(pre)))
    other_lm = Qwen2VLForCausalLM.from_checkpoint(tmp_path / "ckpt")
    assert other_lm.config == lm.config
    ids = torch.arange(5, 40)
    assert torch.equal(other_lm.prefill(ids, other_lm.new_cache(1, 64), 0), lm.prefill(ids, lm.new_cache(1, 64), 0))


def test_tied_embeddings_match(tmp_path):
    path = build_tiny_qwen2_vl(tmp_path / "tied", tie_word_embeddings=True)
    ref, ours = load_qwen2_vl_reference(path), Qwen2VLForCausalLM.from_checkpoint(path)
    assert ours.config.tie_word_embeddings and ours.lm_head is None
    ids = torch.randint(7, 400, (40,), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        expected = ref(input_ids=ids[None]).logits[0]
    assert (ours.prefill(ids, ours.new_cache(1, 64), 0, all_logits=True) - expected).abs().max() <= ATOL


def test_preprocessor_that_does_not_fit_the_tower_is_refused(setup, tmp_path):
    _, path, _, _, _, _ = setup
    shutil.copytree(path, tmp_path / "ckpt")
    pre = tmp_path / "ckpt" / "preprocessor_config.json"
    pre.write_text(json.dumps(json.loads(pre.read_text()) | {"merge_size": 1}))
    with pytest.raises(CheckpointError, match="merge sizes"):
        Qwen2VLVisionModel.from_checkpoint(tmp_path / "ckpt")
