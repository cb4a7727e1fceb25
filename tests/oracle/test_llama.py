"""Our Llama against transformers' LlavaForConditionalGeneration: logits with images, RoPE scalings, tied head."""

from __future__ import annotations

import pytest
import torch

from cuda_ext.decode import ops as decode
from generator_service.models.decoder import DecoderConfig, DecoderLayer
from generator_service.models.llama import LlamaForCausalLM, llama_config
from shared.config.errors import CheckpointError
from shared.modeling.layers import RopeConfig, rope_inverse_frequencies
from shared.store.token_ids import EMBEDDING_INDEX_BASE as BASE
from tests.support.tiny_models import build_tiny_llava, load_reference

TOL = 1e-4
LLAMA3 = {
    "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
    "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
}
LINEAR = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    path = build_tiny_llava(tmp_path_factory.mktemp("llama") / "untied")
    return path, load_reference(path), LlamaForCausalLM.from_checkpoint(path)


def image_features(ref, pixels: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return list(ref.get_image_features(pixel_values=pixels).pooler_output)  # [16, 64] per image


def compare_with_images(ref, ours, segments: list, num_images: int, seed: int = 0) -> float:
    """segments: text-ID lists and None for each image. Returns max |ours - reference| over all logits."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(num_images, 3, 56, 56, generator=g)
    features = image_features(ref, pixels)
    image_token, n = ref.config.image_token_index, features[0].shape[0]
    ref_ids, our_ids, firsts, it = [], [], [], iter(range(num_images))
    for segment in segments:
        if segment is None:
            i = next(it)
            first = BASE + 1000 * i + 7
            firsts.append(first)
            ref_ids += [image_token] * n
            our_ids += list(range(first, first + n))
        else:
            ref_ids += segment
            our_ids += segment
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor([ref_ids]), pixel_values=pixels).logits[0]
    ranges = torch.tensor([[f, n] for f in firsts])
    cache = ours.new_cache(2, 128)
    got = ours.prefill(torch.tensor(our_ids), cache, row=1, ranges=ranges, rows=torch.cat(features), all_logits=True)
    assert got.shape == expected.shape
    return (got - expected).abs().max().item()


def test_logits_with_one_image_match(untied):
    _, ref, ours = untied
    assert compare_with_images(ref, ours, [[1, 55, 66], None, [77, 88, 99, 12]], 1) <= TOL


def test_logits_with_two_images_match(untied):
    _, ref, ours = untied
    assert compare_with_images(ref, ours, [[1, 21], None, [30, 31, 32], None, [40]], 2, seed=1) <= TOL


def test_image_rows_change_the_logits(untied):
    """The comparison is meaningful: different image rows give different logits."""
    _, ref, ours = untied
    features = image_features(ref, torch.randn(2, 3, 56, 56))
    ids = torch.tensor([1, 5] + list(range(BASE, BASE + 16)) + [9])
    cache = ours.new_cache(1, 64)
    a = ours.prefill(ids, cache, 0, ranges=torch.tensor([[BASE, 16]]), rows=features[0])
    b = ours.prefill(ids, cache, 0, ranges=torch.tensor([[BASE, 16]]), rows=features[1])
    assert (a - b).abs().max() > 1e-2


def text_logits_match(path) -> float:
    ref, ours = load_reference(path), LlamaForCausalLM.from_checkpoint(path)
    ids = torch.randint(5, 400, (120,), generator=torch.Generator().manual_seed(3))  # long enough for every band
    with torch.no_grad():
        expected = ref(input_ids=ids[None]).logits[0]
    got = ours.prefill(ids, ours.new_cache(1, 128), 0, all_logits=True)
    return (got - expected).abs().max().item()


@pytest.mark.parametrize("rope", [LINEAR, LLAMA3], ids=["linear", "llama3"])
def test_rope_scaling_matches(tmp_path, rope):
    assert text_logits_match(build_tiny_llava(tmp_path / "m", rope_parameters=rope)) <= TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_a_16_bit_checkpoint_decodes_as_transformers_does_in_float32(tmp_path, dtype):
    """Saved in 16 bits, computed in float32 (the CPU default): the decode kernels keep the weights in the checkpoint's
    type (`pack_panels`), and logits and greedy tokens are transformers' on the same weights in float32."""
    path = build_tiny_llava(tmp_path / "m", tie_word_embeddings=True, dtype=dtype)
    ref, ours = load_reference(path), LlamaForCausalLM.from_checkpoint(path)
    if decode.cpu_decode_ops("cpu", torch.float32) is not None:  # the kernels run here: their weights stay 16-bit
        assert ours.head.data.dtype == dtype and ours.model.layers[0].mlp.w_down.data.dtype == dtype
    ids = torch.randint(5, 400, (40,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = ref.generate(input_ids=ids[None], max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0,
                                output_logits=True, return_dict_in_generate=True)
    cache = ours.new_cache(1, 64)
    logits = [ours.prefill(ids, cache, 0).view(-1)]  # [V] per token
    for length in range(len(ids), len(ids) + 11):
        logits.append(ours.decode(logits[-1].argmax(-1).view(1), [length], cache)[0])
    assert torch.stack(logits).argmax(-1).tolist() == expected.sequences[0, len(ids):].tolist()
    assert (torch.stack(logits) - torch.cat(expected.logits)).abs().max() <= TOL


def test_each_layer_is_prepared_before_the_next_is_loaded(tmp_path, monkeypatch):
    """So that a 16-bit checkpoint never has every layer in float32 at once (`from_checkpoint`)."""
    path = build_tiny_llava(tmp_path / "m", dtype=torch.bfloat16)
    loaded_when_prepared = []
    prepare = DecoderLayer.prepare

    def recording_prepare(layer):
        loaded_when_prepared.append(sum(not m.input_layernorm.weight.is_meta for m in model_layers))
        prepare(layer)

    model_layers = []
    original_init = LlamaForCausalLM.__init__

    def keep_layers(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        model_layers.extend(self.model.layers)

    monkeypatch.setattr(DecoderLayer, "prepare", recording_prepare)
    monkeypatch.setattr(LlamaForCausalLM, "__init__", keep_layers)
    LlamaForCausalLM.from_checkpoint(path)
    assert loaded_when_prepared == list(range(1, len(model_layers) + 1)) and len(model_layers) > 1


def test_tied_embeddings_match(tmp_path):
    path = build_tiny_llava(tmp_path / "tied", tie_word_embeddings=True)
    assert LlamaForCausalLM.from_checkpoint(path).lm_head is None
    assert text_logits_match(path) <= TOL


@pytest.mark.parametrize("rope", [LINEAR, LLAMA3], ids=["linear", "llama3"])
def test_inverse_frequencies_match_transformers(rope):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=256, rope_parameters=dict(rope))
    expected, _ = ROPE_INIT_FUNCTIONS[rope["rope_type"]](config, "cpu")
    ours = rope_inverse_frequencies(RopeConfig.from_config({"rope_parameters": rope}), 16)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=0)


def test_older_configs_with_rope_scaling_and_rope_theta():
    old = {"rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 500000.0}
    new = {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}}
    assert RopeConfig.from_config(old) == RopeConfig.from_config(new)
    assert RopeConfig.from_config({"rope_theta": 1e6}) == RopeConfig(theta=1e6)


def test_decode_rows_at_their_own_positions_match_prefill(untied):
    """Rows of different lengths decoded together give each row's own next-token logits."""
    _, ref, ours = untied
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(5, 400, (n,), generator=g) for n in (7, 3, 11)]
    cache = ours.new_cache(3, 32)
    for row, prompt in enumerate(prompts):
        ours.prefill(prompt[:-1], cache, row)
    got = ours.decode(torch.stack([p[-1] for p in prompts]), [len(p) - 1 for p in prompts], cache)
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            expected = ref(input_ids=prompt[None]).logits[0, -1]
        assert (got[row] - expected).abs().max() <= TOL


def test_prefill_continuing_a_cached_prefix_matches_one_prefill(untied):
    _, _, ours = untied
    ids = torch.randint(5, 400, (20,), generator=torch.Generator().manual_seed(6))
    cache = ours.new_cache(1, 32)
    whole = ours.prefill(ids, cache, 0, all_logits=True)
    ours.prefill(ids[:12], cache, 0)
    rest = ours.prefill(ids[12:], cache, 0, start=12, all_logits=True)
    assert (rest - whole[12:]).abs().max() <= TOL


def test_a_vocabulary_reaching_the_embedding_base_is_refused():
    config = llama_config({"text_config": {"vocab_size": BASE, "hidden_size": 8, "intermediate_size": 16,
                                           "num_hidden_layers": 1, "num_attention_heads": 2}})
    with torch.device("meta"), pytest.raises(CheckpointError, match=str(BASE)):
        LlamaForCausalLM(config)


@pytest.mark.parametrize("text_config, named", [
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, "yarn"),
    ({"hidden_act": "gelu"}, "gelu"),
    ({"num_attention_heads": 6, "num_key_value_heads": 4}, "num_kv_heads"),
])
def test_unsupported_configs_are_checkpoint_errors_naming_the_field(text_config, named):
    with pytest.raises(CheckpointError, match=named):
        llama_config({"text_config": text_config})


def test_llava_text_config_defaults_are_llamas():
    config = llama_config({"text_config": {"model_type": "llama"}})
    assert isinstance(config, DecoderConfig)
    assert (config.vocab_size, config.hidden_size, config.num_layers, config.num_kv_heads) == (32000, 4096, 32, 32)
