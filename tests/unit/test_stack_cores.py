"""How a local stack divides the machine's cores between its workers (`vlmq.stack.divide_cores`)."""

from __future__ import annotations

from vlmq.stack import divide_cores


def test_workers_get_disjoint_contiguous_shares_covering_every_core():
    assert divide_cores([0, 1], 2) == [[0], [1]]
    assert divide_cores([0, 1, 2, 3, 4], 2) == [[0, 1, 2], [3, 4]]
    assert divide_cores([2, 3, 6, 7], 3) == [[2, 3], [6], [7]]  # the CPUs the process may use, not 0 … n-1


def test_one_worker_or_fewer_cores_than_workers_is_not_divided():
    assert divide_cores([0, 1, 2, 3], 1) == [None]
    assert divide_cores([0], 2) == [None, None]
