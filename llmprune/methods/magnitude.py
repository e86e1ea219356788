"""Magnitude pruning: remove the weights of smallest |W|. Needs no calibration data.

YAML: ``{method: magnitude, sparsity: 0.5}`` (per matrix) or ``{method: magnitude, pattern: "2:4"}``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .masks import NMPattern, smallest_in_matrix, smallest_n_of_m

if TYPE_CHECKING:  # annotations only: torch is imported where it is used
    import torch


class Magnitude:
    name = "magnitude"
    order = 10
    statistics = "none"
    options = ()
    needs_calibration = False

    def new_statistics(self, in_features: int, device) -> None:
        return None

    def prune_group(self, weights: list[torch.Tensor], statistics: None, sparsity: float,
                    pattern: NMPattern | None, name: str = "") -> list[torch.Tensor]:
        """weights: float32 [out_i, in] matrices; each is thresholded on its own."""
        pruned = []
        for weight in weights:
            scores = weight.abs()
            mask = smallest_n_of_m(scores, pattern) if pattern else smallest_in_matrix(scores, sparsity)
            pruned.append(weight.masked_fill(mask, 0))
        return pruned
