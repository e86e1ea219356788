"""Magnitude pruning: remove the weights of smallest |W|. Needs no calibration data.

YAML: ``{method: magnitude, sparsity: 0.5}`` (per matrix), ``{method: magnitude, pattern: "2:4"}`` or
``{method: magnitude, sparsity: 0.7, pattern: "block:32"}`` (whole 32 x 32 blocks, |W| summed per block).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .masks import NMPattern, select_mask

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
            mask = select_mask(scores, sparsity, pattern, per_row=False)
            pruned.append(weight.masked_fill(mask, 0))
        return pruned
