"""The multimodal embedding gather's dispatcher: the compiled gather where one is chosen, else the torch reference.

Signatures are kernel-friendly: flat tensors only, no Python lists or per-container
objects, so a kernel can take them as they are (one launch per forward).

Which path runs (`VLMQ_EMBED_GATHER`, read through `Settings`, or `set_embedding_gather` at run time):

- `auto` (default): the CUDA kernel for CUDA tensors of a supported dtype, the torch
  reference otherwise. A CUDA kernel that cannot be built (no nvcc, no ninja) falls
  back to the reference with one logged warning.
- `kernel`: always the compiled kernel — the CUDA one for CUDA tensors, the CPU
  extension (the same per-token code) for CPU tensors; raises ExtensionUnavailable if
  it cannot be built, and ValueError for a dtype it does not take.
- `reference`: always the torch reference.

On the CPU the reference stays the default although the CPU extension is 4–7× faster
on the op (`bench/inject.py`): the op is ~0.1 ms of a ~165 ms bench-small prefill, and
making it the default would put a C++ compiler and a first-request build on every CPU
host for 0.1% of a prefill.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from cuda_ext.gather.reference import (
    check_ranges,
    multimodal_embedding_reference,
    outside_vocabulary,
    unbound_embedding_id,
)
from shared.config.switch import Switch
from shared.store.token_ids import EMBEDDING_INDEX_BASE

if TYPE_CHECKING:
    from cuda_ext.build import ExtensionUnavailable, Gather

log = logging.getLogger(__name__)

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

GATHER = Switch("embed_gather")
_warned_fallback = False


def embedding_gather() -> str:
    """The gather path in force: "auto", "kernel" or "reference"."""
    return GATHER()


def set_embedding_gather(mode: str) -> str:
    """Choose the gather path for this process (overrides VLMQ_EMBED_GATHER); returns the previous one."""
    return GATHER.set(mode)


def multimodal_embedding(ids: Tensor, table: Tensor, ranges: Tensor, rows: Tensor) -> Tensor:
    """Embedding lookup for text IDs and container rows: see `multimodal_embedding_reference`.

    ids: Long[T], table: [V, D], ranges: Long[C, 2] (first, count) sorted, rows: [Σ count, D] → [T, D].
    """
    gather = _kernel_for(table)
    if gather is None:
        return multimodal_embedding_reference(ids, table, ranges, rows)
    return multimodal_embedding_kernel(gather, ids, table, ranges, rows)


def multimodal_embedding_kernel(gather: Gather, ids: Tensor, table: Tensor, ranges: Tensor, rows: Tensor) -> Tensor:
    """Run a compiled gather (`build.cpu_gather()` or `build.cuda_gather()`) with the reference's checks and errors."""
    check_ranges(ranges.cpu(), rows, table)  # one small copy to the host instead of a sync per check
    ids = ids.long()
    # The reference casts the rows too; the kernels only move bits, so they get the table's dtype.
    out, error_tokens = gather(ids, table, ranges, rows.to(table.dtype), EMBEDDING_INDEX_BASE)
    # The one synchronisation of the kernel path: an offending ID must raise before anyone
    # reads `out`, whose rows for such IDs were never written. Outside-vocabulary first,
    # as the reference checks text IDs before container IDs.
    outside_vocab, unbound = error_tokens.tolist()  # index of the first offending token, T for none
    if outside_vocab < ids.shape[0]:
        raise outside_vocabulary(int(ids[outside_vocab]), table.shape[0])
    if unbound < ids.shape[0]:
        raise unbound_embedding_id(int(ids[unbound]))
    return out


def _kernel_for(table: Tensor) -> Gather | None:
    """The compiled gather the mode picks for `table`'s device and dtype, None for the reference."""
    mode = GATHER()
    if mode == "reference":
        return None
    # Imported here, not with this module, so that `python -m cuda_ext.build` runs a module not yet imported.
    from cuda_ext import build

    if mode == "kernel":
        if table.dtype not in KERNEL_DTYPES:
            raise ValueError(f"the gather kernel takes float32, bfloat16 or float16 tables, not {table.dtype}")
        return build.cuda_gather() if table.is_cuda else build.cpu_gather()
    if not table.is_cuda or table.dtype not in KERNEL_DTYPES:
        return None
    try:
        return build.cuda_gather()
    except build.ExtensionUnavailable as error:
        _warn_fallback(error)
        return None


def _warn_fallback(error: ExtensionUnavailable) -> None:
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        log.warning("multimodal embedding: using the torch reference on CUDA, the kernel is unavailable: %s", error)
