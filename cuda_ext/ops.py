"""Dispatchers for vlmq's device ops: a CUDA kernel where one is built, else the torch reference.

Signatures are kernel-friendly: flat tensors only, no Python lists or per-container
objects, so a kernel can take them as they are (one launch per forward).
"""

from __future__ import annotations

from torch import Tensor

from cuda_ext.reference import multimodal_embedding_reference


def multimodal_embedding(ids: Tensor, table: Tensor, ranges: Tensor, rows: Tensor) -> Tensor:
    """Embedding lookup for text IDs and container rows: see `multimodal_embedding_reference`.

    ids: Long[T], table: [V, D], ranges: Long[C, 2] (first, count) sorted, rows: [Σ count, D] → [T, D].
    """
    # Only the reference path exists so far; a CUDA kernel will be chosen here for CUDA tensors.
    return multimodal_embedding_reference(ids, table, ranges, rows)
