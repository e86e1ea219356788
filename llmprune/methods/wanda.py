"""Wanda (Sun et al., 2023): score |W_ij| * ||X_j||_2 and remove the lowest scores of each output
row (or the lowest n of every m inputs). No weight update.

YAML: ``{method: wanda, sparsity: 0.5}``, ``{method: wanda, pattern: "2:4"}`` or ``{method: wanda,
sparsity: 0.7, pattern: "block:32"}`` (scores summed per block; the lowest blocks of each row of blocks).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .masks import NMPattern, select_mask

if TYPE_CHECKING:  # annotations only: torch is imported where it is used
    import torch


class InputNorms:
    """Running sum of squares of every input feature over all calibration tokens (float32)."""

    def __init__(self, in_features: int, device):
        import torch

        self.sum_of_squares = torch.zeros(in_features, dtype=torch.float32, device=device)  # [in]
        self.tokens = 0

    def add_batch(self, inputs: torch.Tensor) -> None:
        x = inputs.reshape(-1, inputs.shape[-1]).float()  # [tokens, in]
        self.sum_of_squares += x.pow(2).sum(0)
        self.tokens += x.shape[0]


def wanda_scores(weight: torch.Tensor, sum_of_squares: torch.Tensor) -> torch.Tensor:
    """[out, in] scores |W| * ||X_j||_2; the norm is over all calibration tokens."""
    return weight.abs() * sum_of_squares.sqrt().unsqueeze(0)


class Wanda:
    name = "wanda"
    order = 20
    statistics = "norms"
    options = ()
    needs_calibration = True

    def new_statistics(self, in_features: int, device) -> InputNorms:
        return InputNorms(in_features, device)

    def prune_group(self, weights: list[torch.Tensor], statistics: InputNorms, sparsity: float,
                    pattern: NMPattern | None, name: str = "") -> list[torch.Tensor]:
        pruned = []
        for weight in weights:
            scores = wanda_scores(weight, statistics.sum_of_squares)
            mask = select_mask(scores, sparsity, pattern, per_row=True)
            pruned.append(weight.masked_fill(mask, 0))
        return pruned
