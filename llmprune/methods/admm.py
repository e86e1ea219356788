"""ALPS (Meng, Behdin, Wang and Mazumder, "ALPS: Improved Optimization for Highly Sparse One-Shot
Pruning for Large Language Models", NeurIPS 2024): each group of linear layers is pruned by
solving its layer-wise reconstruction problem

    min_W' ||X W'ᵀ - X Wᵀ||²   subject to W' having the wanted sparsity (or N:M pattern)

with ADMM and a growing penalty rho, then refitting the weights on the final support by
conjugate gradients. It needs only XᵀX, the statistics SparseGPT keeps (``InputHessian``).

YAML: ``{method: admm, sparsity: 0.7, admm_iterations: 30, refit_iterations: 20}``.

The math, per group (rows of the stacked matrices are independent problems sharing H = XᵀX):

- H is dampened (``percdamp`` x mean diag, as SparseGPT) and scaled to a unit diagonal,
  Hn = S⁻¹ H S⁻¹ with S = sqrt(diag H); the weights become Wn = W S. In these coordinates a
  weight's magnitude is its Wanda score, and the diagonal preconditioner of the refit is 1.
- ADMM on  min ½ tr((W - Wn) Hn (W - Wn)ᵀ) + [D sparse]  s.t. W = D:
  W = (Wn Hn - V + rho D)(Hn + rho I)⁻¹, D = the largest entries of W + V / rho (per matrix, or
  the n largest of every m inputs of a row), V += rho (W - D). (Hn + rho I)⁻¹ comes from one
  (float32) eigendecomposition of Hn, so a new rho costs a matrix product, not a factorisation.
- rho grows every 3 iterations by 1.3, 1.2 or 1.1 as the support still changes by more than
  10%, 0.5% or at least one weight, which drives W and D together; the loop ends when the
  support has settled or after ``admm_iterations``.
- the final support is that of W's largest entries; on it the weights are the least-squares
  solution, found by ``refit_iterations`` steps of conjugate gradients (all rows at once).

``refit_on_support`` is that last step alone, for a mask another method chose (``--update admm``);
``RefitOnMask`` wraps any method with it, or with SparseGPT's column-by-column update
(``--update obs``), adding an ``InputHessian`` to the method's own statistics.

Everything is float32 after the float64 Hessian is scaled, and every step is a fixed sequence of
tensor operations: the same Hessian gives the same weights in every process with the same thread
count. ``--pattern block:B`` projects onto the B x B blocks of largest sum of squares.
"""

from __future__ import annotations

from itertools import pairwise
from typing import TYPE_CHECKING

from ..errors import NumericalError
from ..memory import release_free_heap
from ..options import Option, find
from .masks import BlockPattern, NMPattern, smallest_blocks, smallest_n_of_m
from .sparsegpt import InputHessian, SparseGPT, sparsegpt_prune

if TYPE_CHECKING:  # annotations only: torch is imported where it is used
    import torch

UPDATES = ("none", "obs", "admm")


def scaled_problem(hessian: torch.Tensor, percdamp: float, name: str = ""):
    """(Hn float32 [in, in] with unit diagonal, scale float32 [in], dead bool [in]) from a float64
    Hessian: inputs that were always zero get diagonal 1 (their weights are set to zero), then
    ``percdamp`` x mean(diag) is added to the diagonal and H is scaled by sqrt(diag) on both sides."""
    import torch

    if not torch.isfinite(hessian).all():
        raise NumericalError(f"{name}: non-finite values (NaN or inf) in the Hessian")
    hessian = hessian.double().clone()
    diagonal = torch.diagonal(hessian)
    dead = diagonal == 0
    diagonal[dead] = 1
    diagonal += percdamp * diagonal.mean()
    scale = diagonal.sqrt()  # [in]
    scaled = hessian / scale.unsqueeze(1) / scale.unsqueeze(0)
    return scaled.float(), scale.float(), dead


def smallest_count(magnitude: torch.Tensor, count: int) -> torch.Tensor:
    """Mask of exactly ``count`` smallest entries (ties at the threshold taken in index order), by
    a selection (kthvalue) instead of a partial sort: several times faster than topk at k = numel/2."""
    import torch

    flat = magnitude.flatten()
    if count <= 0:
        return torch.zeros_like(magnitude, dtype=torch.bool)
    threshold = flat.kthvalue(count).values
    removed = flat < threshold
    short = count - int(removed.sum())
    if short > 0:
        removed[(flat == threshold).nonzero().squeeze(1)[:short]] = True
    return removed.view_as(magnitude)


def removal_mask(values: torch.Tensor, bounds: list[int], sparsity: float,
                 pattern: NMPattern | BlockPattern | None) -> torch.Tensor:
    """True where a weight goes: the smallest |values| of each stacked matrix (rows bounds[i] to
    bounds[i+1]), or the n smallest of every m inputs of each row, or (block:B) the B x B blocks
    of each stacked matrix with the smallest sum of squares (the nearest block-sparse matrix).
    values: [rows, in]."""
    import torch

    magnitude = values.abs()
    if isinstance(pattern, BlockPattern):
        return torch.cat([smallest_blocks(values[lo:hi].pow(2), sparsity, pattern.size, per_row=False)
                          for lo, hi in pairwise(bounds)])
    if pattern is not None:
        return smallest_n_of_m(magnitude, pattern)
    return torch.cat([smallest_count(magnitude[lo:hi], int(magnitude[lo:hi].numel() * sparsity))
                      for lo, hi in pairwise(bounds)])


def conjugate_gradient_refit(start: torch.Tensor, target: torch.Tensor, scaled_hessian: torch.Tensor,
                             removed: torch.Tensor, iterations: int) -> torch.Tensor:
    """Per row r, minimise ½ w Hn wᵀ - w target_rᵀ over w with w_j = 0 where removed[r, j], from
    ``start``; conjugate gradients on all rows at once (each row its own step sizes). [rows, in]
    float32 in and out. Hn has a unit diagonal, so this is the Jacobi-preconditioned method."""
    import torch

    keep = (~removed).float()
    x = start * keep
    residual = (target - x @ scaled_hessian) * keep  # minus the gradient, on the support
    direction = residual.clone()
    squared = residual.pow(2).sum(1)  # [rows]
    tiny = torch.finfo(torch.float32).tiny
    for _ in range(iterations):
        curved = (direction @ scaled_hessian) * keep
        curvature = (direction * curved).sum(1)
        step = torch.where(curvature > tiny, squared / curvature.clamp_min(tiny), torch.zeros_like(squared))
        x.addcmul_(step.unsqueeze(1), direction)
        residual.addcmul_(step.unsqueeze(1), curved, value=-1)
        new_squared = residual.pow(2).sum(1)
        ratio = torch.where(squared > tiny, new_squared / squared.clamp_min(tiny), torch.zeros_like(squared))
        direction = residual + ratio.unsqueeze(1) * direction
        squared = new_squared
        if not bool((squared > tiny).any()):
            break
    return x


def _penalty_step(changed: int, kept: int) -> float | None:
    """ALPS's schedule: rho's growth factor from how many support entries changed since the last
    check, or None once nothing changes (the support has settled)."""
    if changed >= 0.1 * kept:
        return 1.3
    if changed >= 0.005 * kept:
        return 1.2
    if changed >= 1:
        return 1.1
    return None


def admm_support(scaled_weight: torch.Tensor, target: torch.Tensor, scaled_hessian: torch.Tensor,
                 bounds: list[int], sparsity: float, pattern: NMPattern | None, iterations: int,
                 rho: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """ADMM with a growing penalty (see the module docstring): (W [rows, in], removed mask) in the
    scaled coordinates, from scaled weights [rows, in] and target = scaled weights @ Hn."""
    import torch

    eigenvalues, eigenvectors = torch.linalg.eigh(scaled_hessian)  # float32: ADMM needs no exact solves
    eigenvalues = eigenvalues.clamp_min(0)
    rows, columns = scaled_weight.shape

    def inverse(penalty):  # R -> R (Hn + rho I)⁻¹: one product with the inverse, or two with the basis
        if rows >= columns:  # forming the [in, in] inverse costs less than a second product
            formed = (eigenvectors / (eigenvalues + penalty)) @ eigenvectors.t()
            return lambda right: right @ formed
        return lambda right: ((right @ eigenvectors) / (eigenvalues + penalty)) @ eigenvectors.t()

    shifted = inverse(rho)
    removed = removal_mask(scaled_weight, bounds, sparsity, pattern)
    checked = removed
    split = scaled_weight.masked_fill(removed, 0)  # D: the sparse copy
    dual = torch.zeros_like(scaled_weight)  # V
    weight = scaled_weight
    kept = max(1, int((~removed).sum()))
    for iteration in range(iterations):
        weight = shifted((target - dual).add_(split, alpha=rho))
        split = torch.add(weight, dual, alpha=1 / rho)
        removed = removal_mask(split, bounds, sparsity, pattern)
        split.masked_fill_(removed, 0)
        dual.add_(weight - split, alpha=rho)
        if (iteration + 1) % 3 == 0:
            factor = _penalty_step(int((removed != checked).sum()), kept)
            checked = removed
            if factor is None:
                break
            rho = min(rho * factor, 1e6)
            shifted = inverse(rho)
    return weight, removal_mask(weight, bounds, sparsity, pattern)


def admm_prune(weights: list[torch.Tensor], hessian: torch.Tensor, sparsity: float, pattern: NMPattern | None,
               iterations: int = 30, refit_iterations: int = 20, percdamp: float = 0.01,
               name: str = "") -> list[torch.Tensor]:
    """Prune float32 matrices [out_i, in] that share the float64 Hessian [in, in] by ALPS; return
    new float32 ones with exact zeros where removed."""
    import torch

    stacked = torch.cat(weights, 0).float()  # [rows, in]
    bounds = torch.tensor([0] + [w.shape[0] for w in weights]).cumsum(0).tolist()
    scaled_hessian, scale, dead = scaled_problem(hessian, percdamp, name)
    stacked[:, dead] = 0
    scaled_weight = stacked * scale
    target = scaled_weight @ scaled_hessian  # [rows, in]
    weight, removed = admm_support(scaled_weight, target, scaled_hessian, bounds, sparsity, pattern, iterations)
    refit = conjugate_gradient_refit(weight, target, scaled_hessian, removed, refit_iterations)
    result = (refit / scale).masked_fill_(removed, 0)
    release_free_heap()
    return [result[lo:hi] for lo, hi in pairwise(bounds)]


def refit_on_support(weights: list[torch.Tensor], pruned: list[torch.Tensor], hessian: torch.Tensor,
                     iterations: int = 20, percdamp: float = 0.01, name: str = "") -> list[torch.Tensor]:
    """The least-squares weights on the support of ``pruned`` (its nonzero entries), starting from
    ``pruned``; the reconstruction target is ``weights``, the dense originals. The zeros stay."""
    import torch

    stacked = torch.cat(weights, 0).float()
    start = torch.cat(pruned, 0).float()
    bounds = torch.tensor([0] + [w.shape[0] for w in weights]).cumsum(0).tolist()
    removed = start == 0
    scaled_hessian, scale, dead = scaled_problem(hessian, percdamp, name)
    stacked[:, dead] = 0
    target = (stacked * scale) @ scaled_hessian
    refit = conjugate_gradient_refit(start * scale, target, scaled_hessian, removed, iterations)
    result = (refit / scale).masked_fill_(removed, 0)
    return [result[lo:hi] for lo, hi in pairwise(bounds)]


class ADMM:
    name = "admm"
    order = 40
    needs_calibration = True
    statistics = "hessian"
    options = (
        Option("admm_iterations", int, 30, "admm: most ADMM iterations per group of layers (default 30)", minimum=0),
        Option("refit_iterations", int, 20, "admm: conjugate-gradient steps of the refit on the final support "
               "(default 20, also what --update admm does for other methods)", minimum=0),
        find(SparseGPT.options, "percdamp"),
    )

    def __init__(self, admm_iterations: int = 30, refit_iterations: int = 20, percdamp: float = 0.01):
        self.admm_iterations = admm_iterations
        self.refit_iterations = refit_iterations
        self.percdamp = percdamp

    def new_statistics(self, in_features: int, device) -> InputHessian:
        return InputHessian(in_features, device)

    def prune_group(self, weights: list[torch.Tensor], statistics: InputHessian, sparsity: float,
                    pattern: NMPattern | None, name: str = "") -> list[torch.Tensor]:
        return admm_prune(weights, statistics.hessian(), sparsity, pattern, self.admm_iterations,
                          self.refit_iterations, self.percdamp, name)


class RefitOnMask:
    """A method's masks with new weights on them: ``update`` "obs" (SparseGPT's column-by-column
    update with the mask fixed) or "admm" (least squares on the support, ``refit_on_support``).
    Its statistics are the method's own plus an ``InputHessian`` of the same inputs."""

    needs_calibration = True
    statistics = "hessian"

    def __init__(self, method, update: str, refit_iterations: int = 20, percdamp: float = 0.01):
        self.method = method
        self.update = update
        self.refit_iterations = refit_iterations
        self.percdamp = percdamp

    @property
    def name(self) -> str:  # a property, so that the method registry does not take this class
        return self.method.name

    def new_statistics(self, in_features: int, device):
        from ..distributed import Joint

        own = self.method.new_statistics(in_features, device) if self.method.needs_calibration else None
        if isinstance(own, InputHessian):  # SparseGPT, ADMM: their own Hessian serves the refit too
            return Joint([own])
        return Joint([own, InputHessian(in_features, device)])

    def prune_group(self, weights: list[torch.Tensor], statistics, sparsity: float, pattern: NMPattern | None,
                    name: str = "") -> list[torch.Tensor]:
        own, hessian = statistics.parts[0], statistics.parts[-1]
        refit_hessian = hessian.hessian()  # before the method, which may consume ``own`` (the same for SparseGPT)
        pruned = self.method.prune_group(weights, own, sparsity, pattern, name=name)
        if self.update == "obs":
            return sparsegpt_prune(weights, refit_hessian, sparsity, pattern, percdamp=self.percdamp, name=name,
                                   removed=[p == 0 for p in pruned], overwrite_hessian=True)
        return refit_on_support(weights, pruned, refit_hessian, self.refit_iterations, self.percdamp, name)


def with_update(method, update: str, refit_iterations: int = 20, percdamp: float = 0.01):
    """``method`` itself for update "none", else wrapped in RefitOnMask."""
    return method if update == "none" else RefitOnMask(method, update, refit_iterations, percdamp)
