"""The plain-torch multimodal embedding gather: the CPU path of `cuda_ext.gather.ops` and the kernels' test oracle."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from shared.config.errors import InvalidInput
from shared.store.token_ids import EMBEDDING_INDEX_BASE


def multimodal_embedding_reference(ids: Tensor, table: Tensor, ranges: Tensor, rows: Tensor) -> Tensor:
    """Embed a prompt whose IDs are text tokens or rows of embedding containers.

    ids:    Long[T]      token IDs; < EMBEDDING_INDEX_BASE reads `table`, ≥ it reads `rows`
    table:  [V, D]       the text embedding table
    ranges: Long[C, 2]   (first_token_id, num_tokens) of each bound container, sorted by
                         first ID, non-overlapping, every first ≥ EMBEDDING_INDEX_BASE
    rows:   [R, D]       the containers' rows concatenated in `ranges` order, R = Σ num_tokens
    →       [T, D]       in `table`'s dtype

    ID `first + i` of container c reads row `Σ_{c' < c} num_tokens(c') + i`. A text ID
    outside the vocabulary, or an ID ≥ the base in no range (forged or unbound), raises
    InvalidInput naming it: never garbage embeddings.
    """
    check_ranges(ranges, rows, table)
    ids = ids.long()
    is_image = ids >= EMBEDDING_INDEX_BASE  # [T]
    text_ids = torch.where(is_image, 0, ids)
    outside = (text_ids < 0) | (text_ids >= table.shape[0])
    if bool(outside.any()):
        raise outside_vocabulary(int(ids[outside][0]), table.shape[0])
    out = F.embedding(text_ids, table)  # [T, D]
    if not bool(is_image.any()):
        return out

    image_ids = ids[is_image]  # [I]
    if ranges.shape[0] == 0:
        raise unbound_embedding_id(int(image_ids[0]))
    firsts, counts = ranges[:, 0].contiguous(), ranges[:, 1]  # [C]
    container = torch.searchsorted(firsts, image_ids, right=True) - 1  # [I], -1: below every range
    clamped = container.clamp(min=0)
    offset = image_ids - firsts[clamped]  # [I] row within its container
    valid = (container >= 0) & (offset < counts[clamped])
    if not bool(valid.all()):
        raise unbound_embedding_id(int(image_ids[~valid][0]))
    starts = torch.cumsum(counts, 0) - counts  # [C] each container's first row in `rows`
    out[is_image] = rows[starts[clamped] + offset].to(out.dtype)
    return out


def outside_vocabulary(token_id: int, vocab: int) -> InvalidInput:
    """The error for a text ID that is negative or ≥ the vocabulary (every gather path raises this one)."""
    return InvalidInput(f"token id {token_id} is outside the vocabulary [0, {vocab}) and is no embedding id")


def unbound_embedding_id(token_id: int) -> InvalidInput:
    """The error for an ID ≥ EMBEDDING_INDEX_BASE in no bound container's range (every gather path raises this one)."""
    return InvalidInput(f"token id {token_id} belongs to no bound embedding container")


def check_ranges(ranges: Tensor, rows: Tensor, table: Tensor) -> None:
    """Malformed ranges are a caller bug, not bad user input: ValueError."""
    if ranges.dim() != 2 or ranges.shape[1] != 2 or ranges.dtype != torch.long:
        raise ValueError(f"ranges must be Long[C, 2], got {ranges.dtype} {tuple(ranges.shape)}")
    if rows.dim() != 2 or rows.shape[1] != table.shape[1]:
        raise ValueError(f"rows must be [R, {table.shape[1]}], got {tuple(rows.shape)}")
    if ranges.shape[0] == 0:
        return
    firsts, counts = ranges[:, 0], ranges[:, 1]
    if int(counts.sum()) != rows.shape[0]:
        raise ValueError(f"ranges count {int(counts.sum())} rows but rows has {rows.shape[0]}")
    if bool((counts < 0).any()) or bool((firsts < EMBEDDING_INDEX_BASE).any()):
        raise ValueError("ranges must start at or above EMBEDDING_INDEX_BASE with non-negative counts")
    if bool((firsts[1:] < firsts[:-1] + counts[:-1]).any()):
        raise ValueError("ranges must be sorted by first ID and must not overlap")
