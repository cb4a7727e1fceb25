"""Decoding through block tables: the paged cache read by the torch layer and by the CPU decode kernel.

The oracle is the unpaged cache (one row per sequence, the layout the decode kernel tests hold the
kernel to): the same keys scattered over shuffled blocks of 16 positions must give the same output
and write the new keys where the block tables say, in both paths.
"""

from __future__ import annotations

import pytest
import torch

from generator_service.models.decoder import ForwardBatch, KVCache
from shared.modeling.layers import rope_table
from tests.unit.test_decode_kernel import CONFIGS, layer_pair

BLOCK = 16


@pytest.mark.parametrize("name", ["llama", "mistral_window", "gemma3"])
@pytest.mark.parametrize("positions", [[5], [70, 33, 140]], ids=["batch1", "batch3_mixed"])
@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_paged_decode_equals_unpaged(ops, mode, name, positions, path):
    config = CONFIGS[name]
    kernel_layer, reference_layer = layer_pair(config, mode)
    layer = kernel_layer if path == "kernel" else reference_layer
    width = max(positions) // BLOCK + 1
    g = torch.Generator().manual_seed(7)
    unpaged = KVCache(config, len(positions), width * BLOCK, torch.float32, "cpu")
    unpaged.k.copy_(torch.randn(unpaged.k.shape, generator=g))
    unpaged.v.copy_(torch.randn(unpaged.v.shape, generator=g))
    # The same rows in shuffled blocks of a larger pool: row b's block j is tables[b][j].
    paged = KVCache(config, 3 * len(positions) * width, BLOCK, torch.float32, "cpu")
    order = torch.randperm(paged.num_blocks, generator=g).tolist()
    tables = [order[b * width : b * width + p // BLOCK + 1] for b, p in enumerate(positions)]  # each just long enough
    for b, table in enumerate(tables):
        for j, block in enumerate(table):
            paged.k[:, block] = unpaged.k[:, b, :, j * BLOCK : (j + 1) * BLOCK]
            paged.v[:, block] = unpaged.v[:, b, :, j * BLOCK : (j + 1) * BLOCK]
    rope = rope_table(config.rope, config.head_dim, config.max_position_embeddings, "cpu")
    x = torch.randn(len(positions), config.hidden_size, generator=g)
    outs = []
    for cache, table in ((unpaged, None), (paged, tables)):
        batch = ForwardBatch.for_decode(rope, positions, cache, config.num_kv_heads, torch.float32,
                                        sliding_window=config.sliding_window, tables=table)
        with torch.inference_mode():
            outs.append(layer.forward(x, cache.k[0], cache.v[0], batch))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    for b, (table, p) in enumerate(zip(tables, positions)):  # the new keys went into the right block and offset
        torch.testing.assert_close(paged.k[0, table[p // BLOCK], :, p % BLOCK], unpaged.k[0, b, :, p])
        torch.testing.assert_close(paged.v[0, table[p // BLOCK], :, p % BLOCK], unpaged.v[0, b, :, p])


def test_a_block_table_too_short_for_its_position_is_refused():
    config = CONFIGS["llama"]
    cache = KVCache(config, 4, BLOCK, torch.float32, "cpu")
    rope = rope_table(config.rope, config.head_dim, config.max_position_embeddings, "cpu")
    with pytest.raises(ValueError, match="do not fit"):
        ForwardBatch.for_decode(rope, [BLOCK], cache, config.num_kv_heads, torch.float32, tables=[[0]])


@pytest.mark.parametrize("decoding", [True, False], ids=["with-decode-rows", "chunks-only"])
# The kernel runs few chunk tokens as decode rows of its own; past FUSED_CHUNK_TOKENS the torch layers run the step.
@pytest.mark.parametrize("kernel,chunk_rows", [("auto", True), ("auto", False), ("reference", False)],
                         ids=["kernel-chunk-rows", "kernel-torch-layers", "reference"])
def test_decode_rows_and_chunks_in_one_forward_equal_each_alone(demo_model, mode, monkeypatch, kernel, chunk_rows, decoding):
    """The mixed step: 3 sequences' decode tokens, a chunk of a fourth (after its first chunk) and a fifth's whole
    prompt through one forward, against a decode and two prefills."""
    from generator_service.models import llama
    from generator_service.models.decoder import Chunk
    from generator_service.models.llama import LlamaForCausalLM

    mode(kernel)
    monkeypatch.setattr(llama, "FUSED_CHUNK_TOKENS", 64 if chunk_rows else 0)  # this step's chunks: 35 tokens
    model = LlamaForCausalLM.from_checkpoint(demo_model)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 200, (n,), generator=g) for n in (9, 20, 33, 30, 17)]
    tables = [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10], [11, 12]]
    results = []
    for together in (False, True):
        cache = model.new_cache(13, BLOCK)
        for prompt, table in zip(prompts[:3], tables):
            model.prefill(prompt, cache, table)
        model.prefill(prompts[3][:12], cache, tables[3])
        ids, positions = (torch.tensor([5, 6, 7]), [len(p) for p in prompts[:3]]) if decoding else (torch.tensor([], dtype=torch.long), [])
        if together:
            chunks = [Chunk(prompts[3][12:], tables[3], 12), Chunk(prompts[4], tables[4])]
            assert model._rows_of_one_decode(chunks) is chunk_rows
            logits, chunk_logits, _ = model.step(ids, positions, cache, None, tables[:len(positions)], chunks)
            results.append((*([logits] if decoding else []), chunk_logits[:1], chunk_logits[1:]))
        else:
            alone = [model.decode(ids, positions, cache, tables=tables[:3])] if decoding else []
            results.append((*alone, model.prefill(prompts[3][12:], cache, tables[3], 12), model.prefill(prompts[4], cache, tables[4])))
    for alone, together in zip(*results):
        torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)


def test_only_chunks_that_end_their_prompt_get_logits(demo_model):
    from generator_service.models.decoder import Chunk
    from generator_service.models.llama import LlamaForCausalLM

    model = LlamaForCausalLM.from_checkpoint(demo_model)
    g = torch.Generator().manual_seed(4)
    first, second = torch.randint(3, 200, (20,), generator=g), torch.randint(3, 200, (9,), generator=g)
    cache = model.new_cache(4, BLOCK)
    none = torch.tensor([], dtype=torch.long)
    _, chunk_logits, _ = model.step(none, [], cache, None, [], [Chunk(first[:12], [0, 1], final=False), Chunk(second, [2])])
    assert chunk_logits.shape[0] == 1  # the second chunk's: the first prompt goes on in a later step
    torch.testing.assert_close(chunk_logits, model.prefill(second, model.new_cache(1, BLOCK), [0]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("start", [0, 3], ids=["prompt-start", "after-a-first-chunk"])
def test_chunk_rows_see_the_whole_image_where_images_attend_both_ways(tmp_path, mode, monkeypatch, start):
    """Gemma 3: a chunk holding an image, run as decode rows of the kernel, gives the logits of the torch layers'
    prefill, whose image mask the oracle tests hold to transformers: each image token sees the image's later ones."""
    from generator_service.models import llama
    from generator_service.models.decoder import Chunk
    from generator_service.models.gemma3 import Gemma3ForCausalLM
    from shared.store.token_ids import EMBEDDING_INDEX_BASE
    from tests.support.tiny_models import build_tiny_gemma3

    mode("auto")
    model = Gemma3ForCausalLM.from_checkpoint(build_tiny_gemma3(tmp_path))
    g = torch.Generator().manual_seed(5)
    image = list(range(EMBEDDING_INDEX_BASE, EMBEDDING_INDEX_BASE + 6))
    ids = torch.tensor([5, 9, 11, 7] + image + [12, 13])  # an image of 6 tokens at positions 4 … 9
    ranges = torch.tensor([[EMBEDDING_INDEX_BASE, 6]])
    rows = torch.randn(6, model.config.hidden_size, generator=g)
    results = []
    for chunk_rows in (True, False):
        monkeypatch.setattr(llama, "FUSED_CHUNK_TOKENS", 64 if chunk_rows else 0)
        cache = model.new_cache(2, BLOCK)
        if start:
            model.prefill(ids[:start], cache, [0, 1])
        chunks = [Chunk(ids[start:], [0, 1], start, ranges, rows)]
        assert model._rows_of_one_decode(chunks) is chunk_rows
        results.append(model.step(torch.tensor([], dtype=torch.long), [], cache, None, [], chunks)[1])
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-4)
