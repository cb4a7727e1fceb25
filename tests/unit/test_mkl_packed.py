"""GEMMs on MKL-packed weights (embedder_service.models.mkl_packed) against float64 products."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from embedder_service.models import mkl_packed
from shared.config.settings import Settings
from shared.config.switch import Switch

pytestmark = pytest.mark.skipif(not mkl_packed.available(), reason="optional path: this torch build has no MKL packed GEMM")

K, M = 48, 40


def switch(mode: str) -> Switch:
    """VLMQ_PACKED_WEIGHTS as if the process had started with `mode`."""
    return Switch("packed_weights", Settings(packed_weights=mode))


def weights(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, K, generator=g), torch.randn(M, generator=g)


def exact(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.double(), w.double(), None if b is None else b.double())


@pytest.fixture(autouse=True)
def small_weights_packed(monkeypatch):
    monkeypatch.setattr(mkl_packed, "packed_weights", switch("on"))  # whichever GEMM is faster on this CPU
    monkeypatch.setattr(mkl_packed, "MIN_PACKED_ELEMENTS", M * K)
    monkeypatch.setattr(mkl_packed, "BLOCK_ROWS", 16)


@pytest.fixture
def reorders(monkeypatch) -> list[int]:
    """The row count of every pack made."""
    packs = []
    reorder = torch.ops.mkl._mkl_reorder_linear_weight
    monkeypatch.setattr(mkl_packed, "_reorder", lambda weight, rows: packs.append(rows) or reorder(weight, rows))
    return packs


@pytest.mark.parametrize("shape", [(3, 7, K), (16, K), (37, K)], ids=["images", "one-block", "blocks-and-a-remainder"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_blocks_and_then_one_settled_gemm_compute_the_product(shape, with_bias, reorders):
    w, b = weights()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    b = b if with_bias else None
    for _ in range(3):  # a first count in blocks of 16; the same count again is settled: one GEMM for all rows
        got = mkl_packed.linear(x, w, b)
        assert got.shape == (*shape[:-1], M)
        torch.testing.assert_close(got.double(), exact(x, w, b), atol=1e-5, rtol=1e-5)
    rows = x.numel() // K
    assert reorders == ([16] if rows == 16 else [16, rows])


def test_a_weight_changed_in_place_is_packed_again():
    w, b = weights()
    x = torch.randn(16, K)
    mkl_packed.linear(x, w, b)
    w.mul_(2)
    torch.testing.assert_close(mkl_packed.linear(x, w, b).double(), exact(x, w, b), atol=1e-5, rtol=1e-5)


def test_a_weight_is_packed_again_only_between_blocks_and_a_settled_count(reorders):
    w, b = weights()
    counts = [20, 20, 20, 40, 16, 40, 40, 17, 10, 10]
    results = [mkl_packed.linear(torch.randn(n, K), w, b) for n in counts]
    # 20 in blocks, then settled on; 40 once: blocks again; 16 is the blocks' own count; 40 twice: settled;
    # 17 once: blocks; 10 once is less than a block (the caller's GEMM), twice settled.
    assert reorders == [16, 20, 16, 40, 16, 10]
    assert [r is None for r in results] == [n == 10 for n in counts[:-1]] + [False]


@pytest.mark.parametrize(
    "case",
    ["fewer rows than a block", "small weight", "view of a weight", "bfloat16", "switched off", "auto where oneDNN is faster"],
)
def test_what_it_does_not_take_is_left_to_the_caller(case, monkeypatch):
    w, b = weights()
    x = torch.randn(16, K)
    if case == "fewer rows than a block":
        x = x[:15]
    elif case == "small weight":
        monkeypatch.setattr(mkl_packed, "MIN_PACKED_ELEMENTS", M * K + 1)
    elif case == "switched off":
        monkeypatch.setattr(mkl_packed, "packed_weights", switch("off"))
    elif case == "auto where oneDNN is faster":
        monkeypatch.setattr(mkl_packed, "packed_weights", switch("auto"))
        monkeypatch.setattr(mkl_packed, "faster_than_onednn", lambda: False)
    elif case == "view of a weight":
        w = torch.randn(M * K).view(M, K)  # contiguous, but a view: made per call, it would be packed per call
    else:
        x, w, b = x.bfloat16(), w.bfloat16(), b.bfloat16()
    assert mkl_packed.linear(x, w, b) is None


def test_the_switch_comes_from_the_environment_and_bad_values_are_refused(monkeypatch):
    monkeypatch.delenv("VLMQ_PACKED_WEIGHTS", raising=False)
    assert Switch("packed_weights", Settings())() == "auto"
    monkeypatch.setenv("VLMQ_PACKED_WEIGHTS", " OFF ")
    assert Switch("packed_weights", Settings())() == "off"
    monkeypatch.setenv("VLMQ_PACKED_WEIGHTS", "no")
    with pytest.raises(ValueError, match="VLMQ_PACKED_WEIGHTS='no': expected one of auto, on, off"):
        Settings()


@pytest.mark.parametrize("faster", [True, False])
def test_auto_packs_only_where_the_packed_gemm_was_timed_faster(faster, monkeypatch):
    monkeypatch.setattr(mkl_packed, "packed_weights", switch("auto"))
    monkeypatch.setattr(mkl_packed, "faster_than_onednn", lambda: faster)
    w, b = weights()
    x = torch.randn(mkl_packed.BLOCK_ROWS, K)
    out = mkl_packed.linear(x, w, b)
    assert (out is not None) == faster
    if faster:
        torch.testing.assert_close(out.double(), exact(x, w, b), atol=1e-5, rtol=1e-5)


def test_the_timing_compares_the_two_gemms_and_is_done_once(monkeypatch):
    mkl_packed.faster_than_onednn.cache_clear()
    calls = {"packed": 0, "onednn": 0}
    packed_op, onednn_op = torch.ops.mkl._mkl_linear, torch.ops.mkldnn._linear_pointwise

    def counting(kind, op):
        def run(*args):
            calls[kind] += 1
            return op(*args)
        return run

    monkeypatch.setattr(torch.ops.mkl, "_mkl_linear", counting("packed", packed_op))
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", counting("onednn", onednn_op))
    first = mkl_packed.faster_than_onednn(rounds=3)
    assert isinstance(first, bool) and calls == {"packed": 3, "onednn": 3}
    assert mkl_packed.faster_than_onednn(rounds=3) is first and calls == {"packed": 3, "onednn": 3}
    mkl_packed.faster_than_onednn.cache_clear()
