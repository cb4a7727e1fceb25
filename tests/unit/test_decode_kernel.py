"""The CPU decode kernels (`cuda_ext.decode`) against the torch decode path they replace.

The reference is `generator_service.models.decoder.DecoderLayer`'s own torch code, prepared in "reference"
mode (oneDNN-blocked weights, eager ops) from the same weights; the kernel's layer must
match its output and the KV-cache entries it writes, for one token and for batches whose
rows sit at different positions (a mask), with QKV biases (Qwen2), a sliding window
(Mistral) and Gemma 3's layer (QK-norm, output norms, GeGLU), at sizes with and without a vector tail, on every instruction set the CPU has
(the AVX2 kernels run on an AVX-512 CPU too). Without a compiler the tests skip saying so.
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
import torch.nn.functional as F

from cuda_ext import build
from cuda_ext.decode import ops as decode
from generator_service.models.decoder import (
    GATE_ACTIVATIONS,
    DecoderConfig,
    DecoderLayer,
    ForwardBatch,
    KVCache,
)
from shared.config.settings import Settings
from shared.config.switch import Switch
from shared.modeling.layers import rope_table

LLAMA = DecoderConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_layers=1, num_heads=4, num_kv_heads=2,
                      head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-5)
CONFIGS = {
    "llama": LLAMA,
    "qwen2_biases": dataclasses.replace(LLAMA, attention_bias=True),
    "mistral_window": dataclasses.replace(LLAMA, sliding_window=5),
    # Widths that leave a tail in every vector loop (hidden 40, head 10, intermediate 36), one query head per KV head.
    "odd_sizes": dataclasses.replace(LLAMA, hidden_size=40, intermediate_size=36, num_heads=3, num_kv_heads=3, head_dim=10),
    # Gemma 3: QK-norm, norms after attention and MLP, (1 + w) norms, GeGLU, its query scale, a window;
    # an intermediate size with a vector tail.
    "gemma3": dataclasses.replace(LLAMA, intermediate_size=36, post_norms=True, qk_norm=True, norm_offset=1.0,
                                  hidden_act="gelu_pytorch_tanh", query_scale=24**-0.5, sliding_window=5),
}


def _isas(ops) -> list[str]:
    return ["best"] + (["avx2"] if ops.isa() == "avx512" else [])


@pytest.fixture(params=[("best", True), ("best", False), ("avx2", True), ("avx2", False)],
                ids=["best", "best-no-prefetch", "avx2", "avx2-no-prefetch"])
def isa(request, ops):
    """Each instruction set this CPU can run, with and without the products' prefetching (chosen by
    timing, so either may be the one in use), restored afterwards."""
    name, prefetch = request.param
    if name not in _isas(ops):
        pytest.skip(f"the CPU's best kernels are {ops.isa()}: no second instruction set to test")
    chosen = decode.choose_prefetch(ops)
    used = ops.use_isa(name)
    assert name == "best" or used == "avx2"
    assert ops.use_prefetch(prefetch) is prefetch
    yield used
    ops.use_isa("best")
    ops.use_prefetch(chosen)


def layer_pair(config: DecoderConfig, mode, seed: int = 0, saved_in: torch.dtype = torch.float32) -> tuple[DecoderLayer, DecoderLayer]:
    """(kernel layer, reference layer): one random layer's weights (values of `saved_in`, as a checkpoint saved in
    that type gives them), prepared in both modes."""
    torch.manual_seed(seed)
    source = DecoderLayer(config)
    for p in source.parameters():
        torch.nn.init.normal_(p, std=0.3)
        p.data.copy_(p.data.to(saved_in))
    state = source.state_dict()
    layers = []
    for name in ("auto", "reference"):
        mode(name)
        layer = DecoderLayer(config)
        layer.load_state_dict(state)
        layer.requires_grad_(False).prepare()
        layers.append(layer)
    return layers[0], layers[1]


def assert_layers_agree(config: DecoderConfig, fused: DecoderLayer, reference: DecoderLayer, positions: list[int],
                        num_blocks: int, block_size: int, tables: list[list[int]] | None = None) -> None:
    """Both layers (of `config`) decode one token per row at `positions` over the same random cache; their outputs
    and the cache entries they write must match."""
    g = torch.Generator().manual_seed(1)
    caches = [KVCache(config, num_blocks, block_size, torch.float32, "cpu") for _ in range(2)]
    for cache in caches:  # the same earlier keys and values in both
        cache.k.copy_(torch.randn(cache.k.shape, generator=g.manual_seed(2)))
        cache.v.copy_(torch.randn(cache.v.shape, generator=g.manual_seed(3)))
    before = caches[0].k.clone()
    x = torch.randn(len(positions), config.hidden_size, generator=g)
    rope = rope_table(config.rope, config.head_dim, config.max_position_embeddings, "cpu")
    outs = []
    for layer, cache in zip((fused, reference), caches):
        batch = ForwardBatch.for_decode(rope, positions, cache, config.num_kv_heads, torch.float32,
                                        sliding_window=config.sliding_window, tables=tables)
        with torch.inference_mode():
            outs.append(layer.forward(x, cache.k[0], cache.v[0], batch))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(caches[0].k, caches[1].k, rtol=1e-5, atol=1e-5)  # the new entries, the rest untouched
    torch.testing.assert_close(caches[0].v, caches[1].v, rtol=1e-5, atol=1e-5)
    assert not torch.equal(caches[0].k, before)  # it did write


@pytest.mark.parametrize("name", list(CONFIGS))
# Past 128 positions a head's keys are attended in chunks and merged; a row shorter than the
# longest (or a sliding window) leaves whole chunks masked. 12 rows: a whole AVX-512 pass of the products.
@pytest.mark.parametrize("positions", [[11], [7, 7, 7], [3, 12, 0, 9, 15, 1, 6, 12], [300], [5, 300, 170],
                                       [3, 12, 0, 9, 15, 1, 6, 12, 200, 5, 17, 299]],
                         ids=["batch1", "batch3_same", "batch8_mixed", "batch1_long", "batch3_long_mixed", "batch12_gemm"])
def test_decode_layer_matches_the_torch_layer(ops, isa, mode, name, positions):
    fused, reference = layer_pair(CONFIGS[name], mode)
    assert fused.fused_decode is not None and reference.fused_decode is None
    assert_layers_agree(CONFIGS[name], fused, reference, positions, max(8, len(positions)), 320)  # unpaged: row b is block b


def shuffled_tables(positions: list[int], block_size: int) -> tuple[int, list[list[int]]]:
    """(blocks in the cache, each row's block table) for rows at `positions`: the blocks in shuffled order, three
    never used."""
    num_blocks = sum(p // block_size + 1 for p in positions) + 3
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(6)).tolist()
    tables = []
    for p in positions:
        tables.append(order[:p // block_size + 1])
        order = order[p // block_size + 1:]
    return num_blocks, tables


# Five query heads per KV head (a pass of the kernel's four heads and one more on AVX-512, of two, two and one on
# AVX2) and heads of 80 (a pass of four vectors and one of one on AVX-512).
WIDE_GROUPS = dataclasses.replace(LLAMA, hidden_size=96, num_heads=10, num_kv_heads=2, head_dim=80)


# A paged cache: the kernel walks each row's block table, in shuffled order. Blocks of 16: a chunk of 128
# keys spans eight; of 48: chunks start and end inside blocks; of 7: a short run in every chunk.
@pytest.mark.parametrize("block_size", [16, 48, 7])
@pytest.mark.parametrize("name", ["llama", "wide_groups", "mistral_window"])
def test_decode_layer_reads_keys_through_block_tables(ops, isa, mode, name, block_size):
    config = WIDE_GROUPS if name == "wide_groups" else CONFIGS[name]
    fused, reference = layer_pair(config, mode)
    positions = [300, 5, 170, 300]
    num_blocks, tables = shuffled_tables(positions, block_size)
    assert_layers_agree(config, fused, reference, positions, num_blocks, block_size, tables)


# The decode rows of a step that also prefills: attention alone, through the block tables, against the
# torch path's gathered keys. Rows at different positions (a mask), chunks of 128 keys merged, a window.
@pytest.mark.parametrize("block_size", [16, 7])
@pytest.mark.parametrize("name", ["llama", "wide_groups", "mistral_window", "odd_sizes"])
def test_paged_attention_matches_the_torch_attention(ops, isa, mode, name, block_size):
    config = WIDE_GROUPS if name == "wide_groups" else CONFIGS[name]
    fused, reference = layer_pair(config, mode)
    assert fused.self_attn.paged_attention is not None and reference.self_attn.paged_attention is None
    positions = [300, 5, 170, 299]
    num_blocks, tables = shuffled_tables(positions, block_size)
    g = torch.Generator().manual_seed(1)
    cache = KVCache(config, num_blocks, block_size, torch.float32, "cpu")
    cache.k.copy_(torch.randn(cache.k.shape, generator=g))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g))
    rope = rope_table(config.rope, config.head_dim, config.max_position_embeddings, "cpu")
    batch = ForwardBatch.for_decode(rope, positions, cache, config.num_kv_heads, torch.float32,
                                    sliding_window=config.sliding_window, tables=tables)
    q = torch.randn(len(positions), config.num_heads, config.head_dim, generator=g)
    k, v = (torch.empty(len(positions), config.num_kv_heads, config.head_dim) for _ in range(2))  # already in the cache
    outs = [layer.self_attn.attend(q, k, v, cache.k[0], cache.v[0], batch) for layer in (fused, reference)]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows,k,m", [(1, 576, 1000), (3, 37, 13), (8, 1536, 67), (5, 8, 3)])
def test_linear_matches_torch(ops, isa, rows, k, m):
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(rows, k, generator=g), torch.randn(m, k, generator=g)
    torch.testing.assert_close(ops.linear(x, w), x @ w.t(), rtol=1e-5, atol=1e-4)


def test_pack_panels_puts_each_weight_where_the_kernels_read_it():
    w = torch.arange(37 * 5, dtype=torch.float32).view(37, 5)
    packed = decode.pack_panels(w)
    assert packed.rows == 37 and packed.data.shape == (3, 5, 16)  # 37 outputs: three panels of 16, the last padded
    for m in range(37):
        for k in range(5):
            assert packed.data[m // 16, k, m % 16] == w[m, k]
    assert not packed.data[2, :, 5:].any()  # outputs 37 … 47 do not exist: zeros


@pytest.fixture
def decode_weights():
    """Sets VLMQ_DECODE_WEIGHTS's switch for the test, restored afterwards."""
    previous = decode.DECODE_WEIGHTS()
    yield decode.DECODE_WEIGHTS.set
    decode.DECODE_WEIGHTS.set(previous)


def test_pack_panels_keeps_16_bits_only_where_every_value_fits(decode_weights):
    g = torch.Generator().manual_seed(6)
    w = torch.randn(40, 300, generator=g)
    fp16_only = (w / 64).half().float()  # 10-bit mantissas: exactly float16, not bfloat16
    late_misfit = w.bfloat16().float()
    late_misfit[-1, -1] = 1 + 2**-20  # past the first 4096 values checked alone
    packed = {name: decode.pack_panels(weight) for name, weight in
              {"float32": w, "bfloat16": w.bfloat16().float(), "float16": fp16_only, "late": late_misfit}.items()}
    assert {name: p.data.dtype for name, p in packed.items()} == {
        "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "late": torch.float32}
    decode_weights("float32")
    wide = decode.pack_panels(w.bfloat16().float())
    assert wide.data.dtype == torch.float32
    assert torch.equal(packed["bfloat16"].data.float(), wide.data)  # the same values where the float32 panels hold them


# Outputs: one panel, a vector tail, 3 and 5 panels (an AVX-512 pass covers four, AVX2's one); tokens: none, one,
# two passes of 6 and a remainder, and blocks of tokens (at K = 1536 at most 96 a block on an L2 of up to 2.25 MB).
@pytest.mark.parametrize("rows,k,m", [(1, 576, 1000), (3, 37, 13), (13, 1536, 67), (5, 8, 3), (200, 1536, 48), (1, 20, 17),
                                      (0, 64, 48)])
@pytest.mark.parametrize("extras", ["none", "bias", "residual", "both"])
def test_panel_linear_matches_torch(ops, isa, rows, k, m, extras):
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(rows, k, generator=g), torch.randn(m, k, generator=g)
    bias = torch.randn(m, generator=g) if extras in ("bias", "both") else None
    residual = torch.randn(rows, m, generator=g) if extras in ("residual", "both") else None
    expected = x @ w.t() + (0 if bias is None else bias) + (0 if residual is None else residual)
    torch.testing.assert_close(decode.pack_panels(w).linear(x, bias, residual), expected, rtol=1e-5, atol=1e-4)


# Tokens: a decode step's few (the 16-bit weights read as they are) and a prompt's many (each group widened once).
@pytest.mark.parametrize("rows,k,m", [(1, 576, 1000), (3, 37, 13), (8, 1536, 67), (25, 20, 17), (200, 1536, 48)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_16_bit_panels_give_the_float32_products_bit_for_bit(ops, isa, dtype, rows, k, m):
    g = torch.Generator().manual_seed(7)
    x, w = torch.randn(rows, k, generator=g), torch.randn(m, k, generator=g).to(dtype).float()
    bias, residual = torch.randn(m, generator=g), torch.randn(rows, m, generator=g)
    narrow = decode.pack_panels(w)
    wide = decode.PanelWeight(narrow.data.float(), m)
    assert narrow.data.dtype == dtype
    assert torch.equal(narrow.linear(x, bias, residual), wide.linear(x, bias, residual))


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_a_layer_with_16_bit_weights_decodes_as_with_float32_ones(ops, isa, mode, decode_weights, name):
    config, outs = CONFIGS[name], []
    for kept in ("auto", "float32"):
        decode_weights(kept)
        fused, _ = layer_pair(config, mode, saved_in=torch.bfloat16)
        panels = [fused.self_attn.wqkv, fused.self_attn.wo, fused.mlp.w_gate_up, fused.mlp.w_down]
        assert {p.data.dtype for p in panels} == {torch.bfloat16 if kept == "auto" else torch.float32}
        cache = KVCache(config, 8, 16, torch.float32, "cpu")
        rope = rope_table(config.rope, config.head_dim, config.max_position_embeddings, "cpu")
        batch = ForwardBatch.for_decode(rope, [3, 9], cache, config.num_kv_heads, torch.float32,
                                        sliding_window=config.sliding_window)
        with torch.inference_mode():
            x = torch.randn(2, config.hidden_size, generator=torch.Generator().manual_seed(8))
            outs.append(fused.forward(x, cache.k[0], cache.v[0], batch))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("count", [5, 2 * 4096 + 7], ids=["under-a-vector", "units-and-a-tail"])
@pytest.mark.parametrize("gated", [False, True], ids=["act", "act-times-up"])
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_activation_in_place_matches_torch(ops, isa, act, gated, count):
    g = torch.Generator().manual_seed(5)
    x, up = torch.randn(count, generator=g) * 4, torch.randn(count, generator=g)
    expected = (F.silu(x) if act == "silu" else F.gelu(x, approximate="tanh")) * (up if gated else 1)
    out = ops.activation_(x, up if gated else None, act)
    assert out.data_ptr() == x.data_ptr()  # in place
    torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["llava", "gemma3"])
def test_a_model_decodes_the_same_tokens_with_and_without_the_kernels(ops, mode, demo_model, tmp_path, family):
    from generator_service.models.gemma3 import Gemma3ForCausalLM
    from generator_service.models.llama import LlamaForCausalLM
    from tests.support.tiny_models import build_tiny_gemma3

    model_class, path = {"llava": (LlamaForCausalLM, demo_model), "gemma3": (Gemma3ForCausalLM, None)}[family]
    path = path or build_tiny_gemma3(tmp_path)
    models = []
    for name in ("auto", "reference"):
        mode(name)
        models.append(model_class.from_checkpoint(path))
    assert models[0].model.layers[0].fused_decode is not None and isinstance(models[0].head, decode.PanelWeight)
    assert models[1].model.layers[0].fused_decode is None and isinstance(models[1].head, torch.Tensor)
    logits, tokens = [], []
    for model in models:
        cache = model.new_cache(2, 64)
        lengths = [9, 4]  # two rows at different positions: the masked batch
        last = [int(model.prefill(torch.arange(3, 3 + n), cache, row).argmax()) for row, n in enumerate(lengths)]
        steps = []
        for _ in range(6):
            out = model.decode(torch.tensor(last), lengths, cache)  # [2, V]
            steps.append(out)
            last = out.argmax(-1).tolist()
            lengths = [n + 1 for n in lengths]
        logits.append(torch.stack(steps))
        tokens.append(torch.stack(steps).argmax(-1))
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)
    assert torch.equal(tokens[0], tokens[1])


def test_every_gated_mlp_activation_has_its_kernel_activation():
    # A new entry in GATE_ACTIVATIONS without one would fail model preparation, not decode silently with silu.
    assert set(GATE_ACTIVATIONS) <= set(decode.KERNEL_ACTIVATIONS)


def test_cuda_tensors_and_other_dtypes_keep_the_torch_path(mode):
    mode("auto")
    assert decode.cpu_decode_ops("cuda", torch.float32) is None
    assert decode.cpu_decode_ops("cpu", torch.bfloat16) is None
    mode("reference")
    assert decode.cpu_decode_ops("cpu", torch.float32) is None


def test_without_a_toolchain_the_torch_path_runs_with_one_warning(mode, monkeypatch, caplog):
    def unavailable():
        raise build.ToolchainMissing("cannot build the CPU decode extension: ninja not found (pip install ninja)")

    monkeypatch.setattr(build, "decode_cpu_ops", unavailable)
    monkeypatch.setattr(decode, "_warned_fallback", False)
    mode("auto")
    with caplog.at_level(logging.WARNING, logger="cuda_ext.decode.ops"):
        layers = [DecoderLayer(LLAMA) for _ in range(2)]
        for layer in layers:
            layer.requires_grad_(False).prepare()
    assert all(layer.fused_decode is None and layer.mlp.w_down.is_mkldnn for layer in layers)
    assert [r.getMessage() for r in caplog.records] == [
        "CPU decode: using the torch path, the decode kernels are unavailable: "
        "cannot build the CPU decode extension: ninja not found (pip install ninja)"]


def test_modes_come_from_the_environment_and_bad_ones_are_refused(monkeypatch, mode):
    assert decode.decode_kernel() == Settings().decode_kernel  # VLMQ_DECODE_KERNEL as the process started with it
    monkeypatch.setenv("VLMQ_DECODE_KERNEL", "Reference")
    assert Switch("decode_kernel", Settings())() == "reference"
    monkeypatch.setenv("VLMQ_DECODE_KERNEL", "fast")
    with pytest.raises(ValueError, match="VLMQ_DECODE_KERNEL='fast'"):
        Switch("decode_kernel", Settings())
    with pytest.raises(ValueError, match="unknown VLMQ_DECODE_KERNEL mode 'fast'"):
        mode("fast")


def test_the_kernel_refuses_inputs_it_would_misread(ops):
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="contiguous float32"):
        ops.linear(x.double(), w)
    with pytest.raises(RuntimeError, match=r"w must be \[4, 8\]"):
        ops.linear(x, torch.randn(4, 9))
    with pytest.raises(RuntimeError, match="contiguous float32"):
        ops.linear(x, w.t().contiguous().t())
    with pytest.raises(RuntimeError, match=r"w must be \[4, 9\] in panels, \[1, 9, 16\], got \[1, 8, 16\]"):
        ops.panel_linear(torch.randn(2, 9), decode.pack_panels(w).data, 4)
    with pytest.raises(RuntimeError, match="w must be contiguous float32, bfloat16 or float16 CPU panels"):
        ops.panel_linear(x, decode.pack_panels(w).data.double(), 4)
    with pytest.raises(RuntimeError, match=r"residual must be \[2, 4\]"):
        decode.pack_panels(w).linear(x, residual=torch.randn(2, 5))
    cache, table = torch.zeros(4, 2, 16, 8), torch.zeros(2, 1, dtype=torch.long)
    with pytest.raises(RuntimeError, match="q's head size 4 is not the cache's 8"):
        ops.paged_attention(torch.randn(2, 4, 4), cache, cache, table, 16, None)
    with pytest.raises(RuntimeError, match="block_table names block 4 of a cache of 4"):
        ops.paged_attention(torch.randn(2, 4, 8), cache, cache, table + 4, 16, None)
    with pytest.raises(RuntimeError, match=r"kv_len 17 outside the block tables' 1 … 16"):
        ops.paged_attention(torch.randn(2, 4, 8), cache, cache, table, 17, None)
    with pytest.raises(RuntimeError, match='unknown activation "gelu"'):
        ops.activation_(x, None, "gelu")
    with pytest.raises(RuntimeError, match="up must be contiguous float32 of x's shape"):
        ops.activation_(x, torch.randn(2, 7), "silu")
