"""Sparsity patterns and exact mask selection: pure tensor functions, no state.

A mask is a bool tensor shaped like the weight, ``True`` where the weight is removed. Every
selector removes an exact count (chosen by index, so ties cannot change the count).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import UsageError

if TYPE_CHECKING:  # annotations only: torch is imported where it is used
    import torch


@dataclass(frozen=True)
class NMPattern:
    """N:M sparsity as in the SparseGPT and Wanda papers: in every group of ``m`` consecutive
    weights along the input dimension of a row, ``n`` are set to zero (2:4 removes 50%)."""

    n: int
    m: int

    @property
    def sparsity(self) -> float:
        return self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


@dataclass(frozen=True)
class BlockPattern:
    """Whole ``size`` x ``size`` blocks of a weight are removed (their scores summed), at any
    sparsity: the layout block-sparse kernels (BSR) need."""

    size: int
    sparsity = None  # not fixed by the pattern: --sparsity decides

    def __str__(self) -> str:
        return f"block:{self.size}"


def parse_pattern(text: str | None) -> NMPattern | BlockPattern | None:
    """``None``/"unstructured" -> None; "N:M" -> NMPattern, refusing N >= M or N < 1; "block:B" ->
    BlockPattern (B >= 2)."""
    if text is None or text == "unstructured":
        return None
    block = re.fullmatch(r"\s*block\s*:\s*(\d+)\s*", str(text))
    if block:
        if int(block.group(1)) < 2:
            raise UsageError(f"--pattern {text}: blocks must be at least 2 x 2")
        return BlockPattern(int(block.group(1)))
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
    if not match:
        raise UsageError("--pattern must be 'unstructured', N:M such as 2:4, or block:B such as block:32, "
                         f"got {text!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise UsageError(f"--pattern {n}:{m}: need 0 < N < M (N of every M weights are zeroed)")
    return NMPattern(n, m)


def check_sparsity(sparsity, pattern: NMPattern | BlockPattern | None, explicit: bool = True) -> float:
    """Validate the fraction removed; with an N:M pattern it must equal N/M when given."""
    if isinstance(pattern, BlockPattern):
        pattern = None  # any sparsity
    try:
        value = float(sparsity)
    except (TypeError, ValueError, OverflowError, RuntimeError):  # RuntimeError: a tensor of several values
        raise UsageError(f"--sparsity must be a number in [0, 1), got {sparsity!r}") from None
    if not 0.0 <= value < 1.0:  # also refuses NaN
        raise UsageError(f"--sparsity must be in [0, 1), got {sparsity!r}")
    if pattern is not None and explicit and abs(value - pattern.sparsity) > 1e-9:
        raise UsageError(f"--sparsity {value} disagrees with --pattern {pattern} "
                         f"(which removes {pattern.sparsity:g}); omit --sparsity or make them agree")
    return pattern.sparsity if pattern is not None else value


def smallest_per_row(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mask the ``floor(in * fraction)`` lowest scores of every row. scores: [out, in]."""
    import torch

    k = int(scores.shape[1] * fraction)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        mask.scatter_(1, torch.topk(scores, k, dim=1, largest=False).indices, True)
    return mask


def smallest_in_matrix(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mask the ``floor(numel * fraction)`` lowest scores of the whole matrix."""
    import torch

    k = int(scores.numel() * fraction)
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        mask[torch.topk(scores.flatten(), k, largest=False).indices] = True
    return mask.view_as(scores)


def smallest_n_of_m(scores: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """Mask the ``n`` lowest scores in every group of ``m`` consecutive input columns of each row."""
    import torch

    rows, cols = scores.shape
    if cols % pattern.m:
        raise UsageError(f"pattern {pattern}: input width {cols} is not a multiple of {pattern.m}")
    groups = scores.reshape(rows, cols // pattern.m, pattern.m)  # [out, in/m, m]
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, torch.topk(groups, pattern.n, dim=2, largest=False).indices, True)
    return mask.view(rows, cols)


def check_nm(mask: torch.Tensor, pattern: NMPattern) -> bool:
    """True when every group of m along the input dimension has exactly n removed weights."""
    rows, cols = mask.shape
    return bool((mask.reshape(rows, cols // pattern.m, pattern.m).sum(-1) == pattern.n).all())


def block_sums(scores: torch.Tensor, size: int) -> torch.Tensor:
    """[out, in] scores -> [out / size, in / size] sums over size x size blocks."""
    rows, cols = scores.shape
    if rows % size or cols % size:
        raise UsageError(f"pattern block:{size}: a {rows} x {cols} weight is not made of {size} x {size} blocks")
    return scores.reshape(rows // size, size, cols // size, size).sum(dim=(1, 3))


def expand_blocks(block_mask: torch.Tensor, size: int) -> torch.Tensor:
    """[out / size, in / size] -> [out, in]: every entry of a masked block is masked."""
    return block_mask.repeat_interleave(size, 0).repeat_interleave(size, 1)


def smallest_blocks(scores: torch.Tensor, fraction: float, size: int, per_row: bool) -> torch.Tensor:
    """Mask the size x size blocks of lowest summed score: floor(blocks * fraction) of the whole
    matrix, or of every row of blocks when ``per_row`` (as Wanda compares within an output row)."""
    sums = block_sums(scores.float(), size)
    chosen = smallest_per_row(sums, fraction) if per_row else smallest_in_matrix(sums, fraction)
    return expand_blocks(chosen, size)


def select_mask(scores: torch.Tensor, fraction: float, pattern, per_row: bool) -> torch.Tensor:
    """The mask of a method's scores [out, in] under a pattern: N:M, blocks, or unstructured
    (per row, or over the whole matrix)."""
    if isinstance(pattern, NMPattern):
        return smallest_n_of_m(scores, pattern)
    if isinstance(pattern, BlockPattern):
        return smallest_blocks(scores, fraction, pattern.size, per_row)
    return smallest_per_row(scores, fraction) if per_row else smallest_in_matrix(scores, fraction)


def check_blocks(mask: torch.Tensor, size: int) -> bool:
    """True when every size x size block of the mask is all removed or all kept."""
    sums = block_sums(mask.float(), size)
    return bool(((sums == 0) | (sums == size * size)).all())
