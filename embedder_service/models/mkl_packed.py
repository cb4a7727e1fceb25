"""float32 GEMMs against weights MKL has packed: the vision towers' CPU linears.

A plain sgemm (aten) or oneDNN matmul repacks the weight into its kernel's layout
on every call; MKL can pack it once (`cblas_sgemm_pack`) and compute from the pack.
For one image's ~200 rows through ViT-B's weights (11 layers of distinct weights,
as in the tower) that measured 0.97–0.99 of a 2048³ matmul's GFLOP/s here, against
0.78–0.87 for oneDNN's linear and 0.74 for aten's. The op is the one inductor
emits for frozen CPU linears (`torch.ops.mkl._mkl_linear`).

Two properties of it shape this module:
- it computes from the pack only for the row count the weight was packed for (any
  other count runs aten's unpacked GEMM). When a weight's GEMM has the row count of
  its last one (its tower's passes have settled on one image size and batch size), the
  weight is packed for exactly that count and all the rows are one GEMM: a Pixtral
  image's 768 rows went through the tower 7–10% faster that way than in blocks, and
  Gemma 3's batch of 8 (1568 rows) 17–21% faster than 8 passes of one. Any other count
  (dynamic resolution: nearly every pass another) runs in blocks of `BLOCK_ROWS` on a
  pack for that many, joined by `torch.cat`, a shorter last block unpacked inside the
  op, or through the caller's GEMM (`None`) when it is less than a block. So a weight
  is packed again only when its passes go from one regime to the other: 0.5–1.5 ms
  for a ViT-B weight, ~60 ms for the tower (a third of a one-image pass);
- a pack takes 2–5× the weight's memory, 7.6 MB at the least, so only weights of
  `MIN_PACKED_ELEMENTS` or more are packed, one pack per weight, kept while the weight
  lives (keyed weakly by it), and packed again if the weight was modified in place.
  Views are not packed: a view made per call would be packed per call.

MKL picks its kernels by CPU vendor: on AMD EPYC its GEMMs, packed or not, run an AVX2
code path at less than half of what oneDNN's AVX-512 JIT does on the same shapes
(docs/PERFORMANCE.md). So by default
(`VLMQ_PACKED_WEIGHTS=auto`) the packed GEMM is used only where it beat oneDNN's linear
on a ViT-B GEMM timed once per process; `on` uses it wherever it applies, `off` never
(every GEMM on the caller's path, oneDNN: for a CPU worker that cannot spare the memory).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from shared.config.switch import Switch
from shared.modeling.timing import fastest

BLOCK_ROWS = 256  # rows per GEMM of a count not settled on: past ~200 rows the packed GEMM runs within 5–15% of its rate on 1568
MIN_PACKED_ELEMENTS = 512 * 512  # smaller GEMMs gain little, and the pack would dwarf the weight


@dataclass
class _Packed:
    last_rows: int  # the row count of the weight's last GEMM
    version: int | None = None  # the weight's _version when packed
    rows: int | None = None  # the row count the pack is for
    pack: Tensor | None = None


_packs: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight → _Packed


packed_weights = Switch("packed_weights")  # VLMQ_PACKED_WEIGHTS: auto (default), on or off


@functools.cache
def available() -> bool:
    """Whether this torch build has MKL's packed GEMM and it computes what F.linear does."""
    if not torch._C.has_mkl:
        return False
    try:
        # Fixed values, not torch.randn: probing must not move the global RNG.
        x = torch.linspace(-1, 1, 24).view(3, 8)
        w = torch.linspace(-0.5, 0.5, 40).view(5, 8)
        b = torch.linspace(0, 1, 5)
        out = torch.ops.mkl._mkl_linear(x, torch.ops.mkl._mkl_reorder_linear_weight(w, 3), w, b, 3)
        return bool(torch.allclose(out, torch.nn.functional.linear(x, w, b), atol=1e-5))
    except (AttributeError, RuntimeError, NotImplementedError):  # op missing, or no kernel for this CPU
        return False


@functools.cache
def faster_than_onednn(rounds: int = 5) -> bool:
    """Whether the packed GEMM outran oneDNN's linear here on one of ViT-B's MLP GEMMs (256 rows,
    768 → 3072), the best of `rounds` alternated calls of each, timed once per process."""
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise") or not torch.backends.mkldnn.is_available():
        return True  # the caller's path would be aten's sgemm: MKL's own kernel, unpacked
    gen = torch.Generator().manual_seed(0)  # not the global RNG: timing must not move it
    x, w = torch.randn(BLOCK_ROWS, 768, generator=gen), torch.randn(3072, 768, generator=gen)
    pack = _reorder(w, BLOCK_ROWS)
    winner, _ = fastest({
        "packed": lambda: torch.ops.mkl._mkl_linear(x, pack, w, None, BLOCK_ROWS),
        "onednn": lambda: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""),
    }, rounds)
    return winner == "packed"


def in_use() -> bool:
    """Whether `linear` packs weights in this process (`VLMQ_PACKED_WEIGHTS`, and for auto the timing above)."""
    mode = packed_weights()
    return mode != "off" and available() and (mode == "on" or faster_than_onednn())


def _reorder(weight: Tensor, rows: int) -> Tensor:
    return torch.ops.mkl._mkl_reorder_linear_weight(weight, rows)


def _pack(weight: Tensor, rows: int) -> tuple[Tensor, int] | None:
    """(pack, its row count) for a GEMM of `rows` rows, packing as the module docstring says; None: not ours."""
    packed = _packs.get(weight)
    settled = packed is not None and rows in (packed.last_rows, packed.rows)
    if packed is None:
        packed = _packs[weight] = _Packed(last_rows=rows)
    packed.last_rows = rows
    want = rows if settled else BLOCK_ROWS
    if rows < want:
        return None
    if (packed.version, packed.rows) != (weight._version, want):  # not packed yet, another count, or changed in place
        packed.pack, packed.version, packed.rows = _reorder(weight, want), weight._version, want
    return packed.pack, want


def linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor | None:
    """x @ weightᵀ + bias from a packed weight, or None where this does not apply.  x: [..., K], weight: [M, K] → [..., M].

    Applies to float32 CPU tensors and a contiguous weight that is not a view and has at
    least `MIN_PACKED_ELEMENTS`, for a row count settled on or of at least `BLOCK_ROWS`.
    """
    if not (
        x.dtype == weight.dtype == torch.float32 and x.device.type == weight.device.type == "cpu"
        and weight.dim() == 2 and weight.is_contiguous() and weight._base is None
        and weight.numel() >= MIN_PACKED_ELEMENTS and in_use()
    ):
        return None
    flat = x.reshape(-1, x.shape[-1])  # [R, K]
    found = _pack(weight, flat.shape[0])
    if found is None:
        return None
    pack, rows = found
    # [R, M]: one GEMM on a pack for R rows, or blocks of `rows` (a shorter last one unpacked inside the op)
    blocks = [torch.ops.mkl._mkl_linear(block, pack, weight, bias, rows) for block in flat.split(rows)]
    out = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
    return out.view(*x.shape[:-1], weight.shape[0])
