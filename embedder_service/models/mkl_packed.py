"""float32 GEMMs against weights MKL has packed: the vision towers' CPU linears.

A plain sgemm (aten) or oneDNN matmul repacks the weight into its kernel's layout
on every call; MKL can pack it once (`cblas_sgemm_pack`) and compute from the pack.
For one image's ~200 rows through ViT-B's weights (11 layers of distinct weights,
as in the tower) that measured 0.97–0.99 of a 2048³ matmul's GFLOP/s here, against
0.78–0.87 for oneDNN's linear and 0.74 for aten's. The op is the one inductor
emits for frozen CPU linears (`torch.ops.mkl._mkl_linear`).

Two properties of it shape this module:
- it computes from the pack only for the row count the weight was packed for (any
  other count runs aten's unpacked GEMM). A weight is packed for the row count of its
  first GEMM, and packed again for another count once that count comes twice in a row
  (its tower's passes have settled on it: images of one resolution). A count seen once
  (dynamic resolution: nearly every pass another) runs on the pack it has, in blocks of
  the pack's rows joined by `torch.cat` with a shorter last block unpacked, or through
  the caller's GEMM (`None`) when it is fewer rows than a block. Packing costs 0.5–1.5
  ms for a ViT-B weight (~60 ms for the tower, a third of a one-image pass); blocks
  made a Pixtral image's 768 rows 7–10% slower through the tower than one GEMM on a
  pack for 768. GEMMs of fewer than `MIN_PACKED_ROWS` rows are never ours: there,
  packing would cost as much as it saves;
- a pack takes 2–5× the weight's memory, 7.6 MB at the least, so only weights of
  `MIN_PACKED_ELEMENTS` or more are packed, one pack per weight, kept while the weight
  lives (keyed weakly by it), and packed again if the weight was modified in place.
  Views are not packed: a view made per call would be packed per call.

`VLMQ_PACKED_WEIGHTS=off` keeps every GEMM on the caller's path (oneDNN), for a CPU
worker that cannot spare the memory.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

MIN_PACKED_ROWS = 128  # fewer rows: the GEMM takes about as long as packing its weight again would
MIN_PACKED_ELEMENTS = 512 * 512  # smaller GEMMs gain little, and the pack would dwarf the weight


@dataclass
class _Packed:
    version: int  # the weight's _version when packed
    rows: int  # the row count the pack is for
    pack: Tensor
    last_rows: int  # the row count of the weight's last GEMM


_packs: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight → _Packed


def enabled_from_env() -> bool:
    """`VLMQ_PACKED_WEIGHTS`: on (default) or off; ValueError for anything else."""
    value = os.environ.get("VLMQ_PACKED_WEIGHTS", "on").strip().lower()
    if value not in ("on", "off"):
        raise ValueError(f"VLMQ_PACKED_WEIGHTS={value!r}: expected on or off")
    return value == "on"


ENABLED = enabled_from_env()


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


def _reorder(weight: Tensor, rows: int) -> Tensor:
    return torch.ops.mkl._mkl_reorder_linear_weight(weight, rows)


def _packed_for(weight: Tensor, rows: int) -> _Packed:
    """The weight's pack, made on first use, again after an in-place change, and again for
    `rows` when the weight's last GEMM had `rows` too (see the module docstring)."""
    packed = _packs.get(weight)
    if packed is None or packed.version != weight._version or (packed.rows != rows and packed.last_rows == rows):
        packed = _Packed(weight._version, rows, _reorder(weight, rows), rows)
        _packs[weight] = packed
    packed.last_rows = rows
    return packed


def linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor | None:
    """x @ weightᵀ + bias from a packed weight, or None where this does not apply.  x: [..., K], weight: [M, K] → [..., M].

    Applies to float32 CPU tensors, a contiguous weight that is not a view and has at least
    `MIN_PACKED_ELEMENTS`, and at least `MIN_PACKED_ROWS` rows of x, as many as the pack's
    or more.
    """
    if not (
        x.dtype == weight.dtype == torch.float32 and x.device.type == weight.device.type == "cpu"
        and weight.dim() == 2 and weight.is_contiguous() and weight._base is None
        and weight.numel() >= MIN_PACKED_ELEMENTS and ENABLED and available()
    ):
        return None
    flat = x.reshape(-1, x.shape[-1])  # [R, K]
    rows = flat.shape[0]
    if rows < MIN_PACKED_ROWS:
        return None
    packed = _packed_for(weight, rows)
    if rows < packed.rows:
        return None
    # [R, M]: one GEMM on a pack for R rows, or blocks of the pack's rows (a shorter last one unpacked inside the op)
    blocks = [torch.ops.mkl._mkl_linear(block, packed.pack, weight, bias, packed.rows) for block in flat.split(packed.rows)]
    out = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
    return out.view(*x.shape[:-1], weight.shape[0])
