"""RIA, relative importance and activations (Zhang et al., ICLR 2024, "Plug-and-Play: An Efficient
Post-training Pruning Method for Large Language Models").

score_ij = (|W_ij| / sum_j |W_i.| + |W_ij| / sum_i |W_.j|) * ||X_j||_2 ** alpha

The first two terms are the weight's importance relative to its output row and to its input
column; the activation norm over all calibration tokens enters with the exponent alpha (0.5 in
the paper). The lowest scores of each output row are removed (as Wanda does), or the lowest n of
every m inputs. The paper's channel permutation for N:M is not done here. No weight update.

YAML: ``{method: ria, sparsity: 0.5, alpha: 0.5}`` or ``{method: ria, pattern: "2:4"}``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..options import Option
from .masks import NMPattern, smallest_n_of_m, smallest_per_row
from .wanda import InputNorms

if TYPE_CHECKING:  # annotations only: torch is imported where it is used
    import torch


def ria_scores(weight: torch.Tensor, sum_of_squares: torch.Tensor, alpha: float) -> torch.Tensor:
    """[out, in] RIA scores of a float32 weight [out, in] given the inputs' sum of squares [in]."""
    magnitude = weight.abs()
    row_sums = magnitude.sum(dim=1, keepdim=True)     # [out, 1]: over the inputs of each output
    column_sums = magnitude.sum(dim=0, keepdim=True)  # [1, in]: over the outputs of each input
    relative = magnitude / row_sums + magnitude / column_sums
    return relative * sum_of_squares.sqrt().pow(alpha).unsqueeze(0)


class RIA:
    name = "ria"
    order = 40
    needs_calibration = True
    statistics = "norms"
    options = (Option("alpha", float, 0.5, "ria: exponent of the input activation norm (default 0.5)",
                      minimum=0),)

    def __init__(self, alpha: float = 0.5):
        self.alpha = alpha

    def new_statistics(self, in_features: int, device) -> InputNorms:
        return InputNorms(in_features, device)

    def prune_group(self, weights: list[torch.Tensor], statistics: InputNorms, sparsity: float,
                    pattern: NMPattern | None, name: str = "") -> list[torch.Tensor]:
        pruned = []
        for weight in weights:
            scores = ria_scores(weight, statistics.sum_of_squares, self.alpha)
            mask = smallest_n_of_m(scores, pattern) if pattern else smallest_per_row(scores, sparsity)
            pruned.append(weight.masked_fill(mask, 0))
        return pruned
