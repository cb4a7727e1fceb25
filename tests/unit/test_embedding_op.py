"""The multimodal embedding op: text IDs read the table, container IDs their container's rows."""

from __future__ import annotations

import pytest
import torch

from cuda_ext.gather.ops import multimodal_embedding
from cuda_ext.gather.reference import multimodal_embedding_reference
from shared.config.errors import InvalidInput
from shared.store.token_ids import EMBEDDING_INDEX_BASE as BASE

V, D = 50, 8


def naive(ids: list[int], table: torch.Tensor, containers: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """Token by token, straight from the definition: the oracle."""
    out = []
    for token in ids:
        if token < BASE:
            out.append(table[token])
            continue
        (row,) = [rows[token - first] for first, rows in containers if first <= token < first + rows.shape[0]]
        out.append(row)
    return torch.stack(out) if out else torch.empty(0, table.shape[1])


def random_case(seed: int):
    """Several containers with gaps between their ranges, and a prompt mixing text and every range's edges."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(V, D, generator=g)
    containers, first = [], BASE + int(torch.randint(0, 5, (1,), generator=g))
    for _ in range(int(torch.randint(1, 5, (1,), generator=g))):
        count = int(torch.randint(1, 7, (1,), generator=g))
        containers.append((first, torch.randn(count, D, generator=g)))
        first += count + int(torch.randint(0, 4, (1,), generator=g))  # 0: adjacent ranges
    ids = torch.randint(0, V, (12,), generator=g).tolist()
    for first, rows in containers:
        ids += [first, first + rows.shape[0] - 1, first + int(torch.randint(0, rows.shape[0], (1,), generator=g))]
    ids = [ids[i] for i in torch.randperm(len(ids), generator=g).tolist()]
    return ids, table, containers


def as_op_args(containers):
    ranges = torch.tensor([[first, rows.shape[0]] for first, rows in containers], dtype=torch.long).reshape(-1, 2)
    rows = torch.cat([rows for _, rows in containers]) if containers else torch.empty(0, D)
    return ranges, rows


@pytest.mark.parametrize("seed", range(8))
def test_random_prompts_match_the_definition(seed):
    ids, table, containers = random_case(seed)
    ranges, rows = as_op_args(containers)
    out = multimodal_embedding_reference(torch.tensor(ids), table, ranges, rows)
    assert torch.equal(out, naive(ids, table, containers))
    assert torch.equal(multimodal_embedding(torch.tensor(ids), table, ranges, rows), out)


@pytest.mark.parametrize("seed", range(4))
def test_ids_just_outside_a_range_are_refused_by_name(seed):
    _, table, containers = random_case(seed)
    ranges, rows = as_op_args(containers)
    taken = {first + i for first, r in containers for i in range(r.shape[0])}
    edges = [first - 1 for first, _ in containers] + [first + r.shape[0] for first, r in containers]
    outside = [i for i in edges if i >= BASE and i not in taken]
    assert outside  # the last range's end + 1 is always free
    for forged in outside:
        with pytest.raises(InvalidInput, match=str(forged)):
            multimodal_embedding_reference(torch.tensor([3, forged, 4]), table, ranges, rows)


def test_empty_prompt_gives_no_rows():
    _, table, containers = random_case(0)
    ranges, rows = as_op_args(containers)
    out = multimodal_embedding_reference(torch.empty(0, dtype=torch.long), table, ranges, rows)
    assert out.shape == (0, D)


def test_all_image_prompt():
    _, table, containers = random_case(1)
    ranges, rows = as_op_args(containers)
    ids = [first + i for first, r in containers for i in range(r.shape[0])]
    out = multimodal_embedding_reference(torch.tensor(ids), table, ranges, rows)
    assert torch.equal(out, rows)


def test_text_only_prompt_without_containers():
    table = torch.randn(V, D)
    ranges, rows = as_op_args([])
    out = multimodal_embedding_reference(torch.tensor([0, 5, V - 1]), table, ranges, rows)
    assert torch.equal(out, table[[0, 5, V - 1]])


def test_image_id_without_any_container_is_refused():
    ranges, rows = as_op_args([])
    with pytest.raises(InvalidInput, match=str(BASE + 7)):
        multimodal_embedding_reference(torch.tensor([1, BASE + 7]), torch.randn(V, D), ranges, rows)


def test_text_id_outside_the_vocabulary_is_refused():
    ranges, rows = as_op_args([])
    with pytest.raises(InvalidInput, match=str(V + 3)):
        multimodal_embedding_reference(torch.tensor([1, V + 3]), torch.randn(V, D), ranges, rows)


def test_rows_are_cast_to_the_table_dtype():
    table = torch.randn(V, D).bfloat16()
    rows = torch.randn(3, D)
    out = multimodal_embedding_reference(torch.tensor([BASE + 2, 7]), table, torch.tensor([[BASE, 3]]), rows)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out[0], rows[2].bfloat16())
    assert torch.equal(out[1], table[7])


def test_malformed_ranges_are_a_caller_error():
    table = torch.randn(V, D)
    overlapping = torch.tensor([[BASE, 3], [BASE + 2, 2]])
    with pytest.raises(ValueError, match="overlap"):
        multimodal_embedding_reference(torch.tensor([1]), table, overlapping, torch.randn(5, D))
    with pytest.raises(ValueError, match="rows"):
        multimodal_embedding_reference(torch.tensor([1]), table, torch.tensor([[BASE, 3]]), torch.randn(4, D))
