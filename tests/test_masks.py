"""Tests for llmprune.methods.masks: pattern parsing and exact mask selection.

Every selector is compared with a naive, obviously correct reference (Python sorts over rows,
groups or the whole matrix); ties are exercised with all-equal and integer-valued scores, where
only the count and the "removed <= kept" order are defined.
"""

from __future__ import annotations

import math

import pytest
import torch

from llmprune.errors import UsageError
from llmprune.methods.masks import (
    NMPattern,
    check_nm,
    parse_pattern,
    smallest_in_matrix,
    smallest_n_of_m,
    smallest_per_row,
)

FRACTIONS = [0.0, 0.1, 0.25, 0.3, 0.5, 0.7, 0.9]


# ----------------------------------------------------------------------------- naive references


def naive_per_row(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mask of the floor(in * fraction) smallest scores of each row, by a Python sort (no ties)."""
    rows, cols = scores.shape
    k = math.floor(cols * fraction)
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for r in range(rows):
        values = scores[r].tolist()
        for c in sorted(range(cols), key=lambda j: values[j])[:k]:
            mask[r, c] = True
    return mask


def naive_in_matrix(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    rows, cols = scores.shape
    k = math.floor(rows * cols * fraction)
    values = scores.tolist()
    cells = sorted((values[r][c], r, c) for r in range(rows) for c in range(cols))
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for _, r, c in cells[:k]:
        mask[r, c] = True
    return mask


def naive_n_of_m(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    rows, cols = scores.shape
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    values = scores.tolist()
    for r in range(rows):
        for g in range(0, cols, m):
            for c in sorted(range(g, g + m), key=lambda j: values[r][j])[:n]:
                mask[r, c] = True
    return mask


def naive_check_nm(mask: torch.Tensor, n: int, m: int) -> bool:
    rows, cols = mask.shape
    return all(sum(bool(mask[r, c]) for c in range(g, g + m)) == n
               for r in range(rows) for g in range(0, cols, m))


def assert_removes_smallest(scores: torch.Tensor, mask: torch.Tensor, k: int) -> None:
    """With ties the chosen indices are arbitrary, but the count is exactly k and every removed
    score is <= every kept score (the removed multiset is the k smallest)."""
    values = scores.flatten().tolist()
    flags = mask.flatten().tolist()
    removed = sorted(v for v, f in zip(values, flags) if f)
    kept = [v for v, f in zip(values, flags) if not f]
    assert len(removed) == k
    assert removed == sorted(values)[:k]
    if removed and kept:
        assert max(removed) <= min(kept)


# ----------------------------------------------------------------------------- parse_pattern


@pytest.mark.parametrize("text, expected", [
    ("2:4", NMPattern(2, 4)),
    (" 4 : 8 ", NMPattern(4, 8)),
    ("1:2", NMPattern(1, 2)),
    ("3:4", NMPattern(3, 4)),
    ("unstructured", None),
    (None, None),
])
def test_parse_pattern_accepts(text, expected):
    assert parse_pattern(text) == expected


@pytest.mark.parametrize("text", ["4:4", "5:4", "0:4", "2-4", "a:b", "", "2:4:8", "-1:4", "2:", ":4",
                                  "2.0:4", "structured"])
def test_parse_pattern_refuses(text):
    with pytest.raises(UsageError):
        parse_pattern(text)


def test_pattern_sparsity_and_str():
    assert NMPattern(2, 4).sparsity == 0.5
    assert NMPattern(4, 8).sparsity == 0.5
    assert NMPattern(1, 4).sparsity == 0.25
    assert str(parse_pattern(" 4 : 8 ")) == "4:8"


# ----------------------------------------------------------------------------- smallest_per_row


@pytest.mark.parametrize("fraction", FRACTIONS)
def test_smallest_per_row_matches_naive_sort(fraction):
    torch.manual_seed(1)
    scores = torch.rand(7, 30)
    mask = smallest_per_row(scores, fraction)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    assert torch.equal(mask, naive_per_row(scores, fraction))
    assert (mask.sum(1) == math.floor(30 * fraction)).all()


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.7])
def test_smallest_per_row_exact_count_with_ties(fraction):
    k = math.floor(12 * fraction)
    equal = torch.ones(5, 12)
    assert (smallest_per_row(equal, fraction).sum(1) == k).all()
    torch.manual_seed(2)
    integers = torch.randint(0, 3, (6, 12)).float()  # many ties
    mask = smallest_per_row(integers, fraction)
    for r in range(6):
        assert_removes_smallest(integers[r], mask[r], k)


def test_smallest_per_row_fraction_zero_removes_nothing():
    scores = torch.zeros(4, 8)
    assert not smallest_per_row(scores, 0.0).any()
    assert not smallest_per_row(torch.rand(4, 8), 0.0).any()


def test_smallest_per_row_is_per_row_not_global():
    # Row 0 is all tiny, row 1 all huge: a global threshold would remove only from row 0.
    scores = torch.stack([torch.arange(8.0) * 1e-3, 100 + torch.arange(8.0)])
    mask = smallest_per_row(scores, 0.5)
    assert mask[0].tolist() == [True] * 4 + [False] * 4
    assert mask[1].tolist() == [True] * 4 + [False] * 4


# ----------------------------------------------------------------------------- smallest_in_matrix


@pytest.mark.parametrize("fraction", FRACTIONS)
def test_smallest_in_matrix_matches_naive_sort(fraction):
    torch.manual_seed(3)
    scores = torch.rand(6, 11)
    mask = smallest_in_matrix(scores, fraction)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    assert torch.equal(mask, naive_in_matrix(scores, fraction))
    assert int(mask.sum()) == math.floor(66 * fraction)


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_smallest_in_matrix_exact_count_with_ties(fraction):
    k = math.floor(60 * fraction)
    assert int(smallest_in_matrix(torch.full((6, 10), 0.5), fraction).sum()) == k
    torch.manual_seed(4)
    integers = torch.randint(-2, 2, (6, 10)).float().abs()
    assert_removes_smallest(integers, smallest_in_matrix(integers, fraction), k)


def test_smallest_in_matrix_is_global_not_per_row():
    scores = torch.stack([torch.arange(8.0) * 1e-3, 100 + torch.arange(8.0)])
    mask = smallest_in_matrix(scores, 0.5)
    assert mask[0].all() and not mask[1].any()


def test_smallest_in_matrix_fraction_zero_removes_nothing():
    assert not smallest_in_matrix(torch.rand(3, 5), 0.0).any()
    assert not smallest_in_matrix(torch.zeros(3, 5), 0.0).any()


# ----------------------------------------------------------------------------- smallest_n_of_m


@pytest.mark.parametrize("n, m", [(1, 2), (2, 4), (3, 4), (4, 8), (1, 4)])
def test_smallest_n_of_m_matches_naive_groups(n, m):
    torch.manual_seed(5)
    scores = torch.rand(5, 4 * m)
    mask = smallest_n_of_m(scores, NMPattern(n, m))
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    assert torch.equal(mask, naive_n_of_m(scores, n, m))
    assert naive_check_nm(mask, n, m)
    assert check_nm(mask, NMPattern(n, m))


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (3, 4)])
def test_smallest_n_of_m_exact_with_ties(n, m):
    pattern = NMPattern(n, m)
    equal = torch.ones(3, 2 * m)
    assert naive_check_nm(smallest_n_of_m(equal, pattern), n, m)
    torch.manual_seed(6)
    integers = torch.randint(0, 2, (4, 3 * m)).float()
    mask = smallest_n_of_m(integers, pattern)
    assert naive_check_nm(mask, n, m)
    for r in range(4):
        for g in range(0, 3 * m, m):
            assert_removes_smallest(integers[r, g:g + m], mask[r, g:g + m], n)


def test_smallest_n_of_m_groups_are_consecutive_inputs_of_a_row():
    # Each group of 4 is [big, tiny, big, tiny] -> 2:4 must remove positions 1 and 3 of every group.
    row = torch.tensor([9.0, 0.1, 8.0, 0.2] * 3)
    scores = torch.stack([row, row.flip(0)])
    mask = smallest_n_of_m(scores, NMPattern(2, 4))
    assert mask[0].tolist() == [False, True, False, True] * 3
    assert mask[1].tolist() == [True, False, True, False] * 3


@pytest.mark.parametrize("cols, pattern", [(10, NMPattern(2, 4)), (12, NMPattern(4, 8)), (3, NMPattern(1, 2))])
def test_smallest_n_of_m_refuses_indivisible_width(cols, pattern):
    with pytest.raises(UsageError):
        smallest_n_of_m(torch.rand(2, cols), pattern)


# ----------------------------------------------------------------------------- check_nm


def test_check_nm_detects_violations():
    pattern = NMPattern(2, 4)
    torch.manual_seed(7)
    mask = smallest_n_of_m(torch.rand(4, 16), pattern)
    assert check_nm(mask, pattern)
    too_many = mask.clone()
    too_many[2, 5] = True
    too_many[2, 4] = True
    too_many[2, 6] = True
    assert not check_nm(too_many, pattern)
    too_few = mask.clone()
    too_few[3, 12:16] = False
    assert not check_nm(too_few, pattern)
    # 2:4 removes 50% but not in groups: a half-dense / half-empty row is not 2:4.
    halves = torch.zeros(4, 16, dtype=torch.bool)
    halves[:, :8] = True
    assert int(halves.sum()) == int(mask.sum())
    assert not check_nm(halves, pattern)
    assert not check_nm(torch.ones(4, 16, dtype=torch.bool), pattern)
    assert not check_nm(torch.zeros(4, 16, dtype=torch.bool), pattern)
    # 4:8 masks are not all 2:4 masks
    mask48 = torch.tensor([[True] * 4 + [False] * 4])
    assert check_nm(mask48, NMPattern(4, 8)) and not check_nm(mask48, NMPattern(2, 4))
