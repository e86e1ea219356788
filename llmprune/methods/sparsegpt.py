"""SparseGPT (Frantar & Alistarh, 2023): mask selection and optimal-brain-surgeon weight update
from the layer Hessian H = 2 XᵀX / n of the calibration inputs.

YAML: ``{method: sparsegpt, sparsity: 0.5, blocksize: 128, percdamp: 0.01}``.

Matrices that read the same input (q/k/v, gate/up) share one Hessian and one inverse: their
rows are stacked and solved in one pass (every row's update is independent of the other rows),
while masks are still chosen per matrix, so the result equals pruning each matrix alone.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..errors import NumericalError, UsageError
from ..memory import release_free_heap
from ..options import Option
from .masks import BlockPattern, NMPattern, block_sums, expand_blocks, smallest_in_matrix

if TYPE_CHECKING:  # annotations only: torch is imported where it is used
    import torch

log = logging.getLogger(__name__)


class InputHessian:
    """Running sum of XᵀX over all calibration tokens. H = 2 * sum / tokens, in float64.

    Each batch's XᵀX is a float32 matmul (the same bits whatever the thread count); the sum over
    batches is kept in float64, so that summing in another order (two processes each summing their
    share, then adding the two) moves the result by about 1e-16 relative, which vanishes when the
    solve rounds its float64 inverse factor to float32: the solve gets the same numbers whether
    calibration ran in one process or several. A float32 running sum differs in its last bits,
    which flips masks at the top-k boundary on real models and the difference then grows layer by layer.

    XᵀX is symmetric, so only the blocks on and below the diagonal are summed, one column strip of
    ``strip`` inputs at a time ([in - lo, strip] products): about half the multiply-adds of the
    full product. Each entry is a dot product over the same tokens as in the full product, so the
    Hessian that ``hessian`` rebuilds is the full one (bit for bit with the BLAS measured, see
    docs/methods.md).
    """

    strip = 256  # inputs per column strip: narrower strips save little more and run slower

    def __init__(self, in_features: int, device):
        import torch

        # [in, in]: the blocks right of each strip's diagonal block stay zero until ``hessian``
        self.sum_xtx = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.tokens = 0

    def add_batch(self, inputs: torch.Tensor) -> None:
        x = inputs.reshape(-1, inputs.shape[-1]).float()  # [tokens, in]
        for lo in range(0, x.shape[1], self.strip):
            hi = lo + self.strip
            # float32 product [in - lo, hi - lo], accumulated in float64
            self.sum_xtx[lo:, lo:hi].add_(x[:, lo:].t() @ x[:, lo:hi])
        self.tokens += x.shape[0]

    def hessian(self, consume: bool = False) -> torch.Tensor:
        """The full symmetric H, float64 [in, in]: a new tensor, or with ``consume`` the running
        sum itself turned into H (one float64 [in, in] less while the solve runs; the statistics
        are spent then)."""
        if self.sum_xtx is None:
            raise RuntimeError("this InputHessian was consumed by an earlier hessian(consume=True)")
        scale = 2.0 / max(self.tokens, 1)
        full = self.sum_xtx.mul_(scale) if consume else self.sum_xtx * scale
        if consume:
            self.sum_xtx = None
        for lo in range(0, full.shape[0], self.strip):
            hi = lo + self.strip
            full[lo:hi, hi:] = full[hi:, lo:hi].t()  # mirror the strip below the diagonal block
        return full


def upper_cholesky_of_inverse(hessian: torch.Tensor, percdamp: float, name: str = "",
                              max_retries: int = 4) -> torch.Tensor:
    """Dampen H by ``percdamp`` x mean(diag H), invert it, return the upper Cholesky factor of H⁻¹
    as float32. ``hessian`` (float64) is dampened in place.

    The factorisations run in float64 on the process's threads. LAPACK's blocked Cholesky splits
    its sums by thread count, and real layers' Hessians are ill-conditioned enough (~1e7-1e8) that
    the 1e-12 relative differences can change float32 entries of the factor: the result is the
    same for the same Hessian and the same thread count (every process of a run, every rerun),
    not across thread counts. Besides ``hessian`` it needs one float64 [in, in] buffer (the
    factorisations overwrite it in turn; the same bits as separate outputs), and freed heap goes
    back to the system afterwards.
    A failed factorisation is retried with ten times more dampening each time, then refused.
    """
    import torch

    if hessian.dtype != torch.float64:
        hessian = hessian.double()
    diagonal = torch.diagonal(hessian)
    diagonal_mean = float(diagonal.mean())
    damp, added = percdamp, 0.0
    try:
        for attempt in range(max_retries + 1):
            diagonal.add_(damp * diagonal_mean - added)
            added = damp * diagonal_mean
            # One float64 buffer beside ``hessian`` (kept intact for a retry): lower factor L of H,
            # then H⁻¹ = (L Lᵀ)⁻¹, then the upper factor of H⁻¹, each written over the last.
            factor, info = torch.linalg.cholesky_ex(hessian)
            if info == 0:
                torch.cholesky_inverse(factor, out=factor)
                torch.linalg.cholesky_ex(factor, upper=True, out=(factor, info))
                if info == 0 and torch.isfinite(factor).all():
                    return factor.float()
            del factor
            if attempt < max_retries:
                log.warning("%s: Hessian not positive definite with dampening %.3g; retrying with %.3g",
                            name, damp, damp * 10)
                damp *= 10
        raise NumericalError(f"{name}: Hessian is not positive definite even with dampening {damp:.3g}")
    finally:
        release_free_heap()


def sparsegpt_prune(weights: list[torch.Tensor], hessian: torch.Tensor, sparsity: float,
                    pattern: NMPattern | None, blocksize: int = 128, percdamp: float = 0.01,
                    name: str = "", removed: list[torch.Tensor] | None = None,
                    overwrite_hessian: bool = False) -> list[torch.Tensor]:
    """Prune float32 matrices [out_i, in] that share the input Hessian [in, in] (float64 or
    float32); return new float32 ones.

    Unstructured: in each block of ``blocksize`` columns, the floor(rows_i * block * sparsity)
    weights of each matrix with the lowest w² / [H⁻¹]_jj² are removed. N:M: every m columns,
    the n lowest of each row's group. block:B: the block width is a multiple of B, and in each
    block the floor(blocks_i * sparsity) B x B blocks of each matrix with the lowest summed
    saliency. After each column the error is spread over the columns not yet visited (the OBS
    update), then over later blocks in one matmul. ``removed``: bool masks [out_i, in] chosen
    elsewhere (True where a weight goes), used instead of choosing. ``overwrite_hessian``: a
    float64 ``hessian`` the caller will not use again is dampened in place instead of copied.
    """
    import torch

    if not torch.isfinite(hessian).all():
        raise NumericalError(f"{name}: non-finite values (NaN or inf) in the Hessian")
    hessian = hessian.to(torch.float64, copy=not overwrite_hessian)
    W = torch.cat(weights, 0).float()  # [rows, in]: the stacked matrices
    rows, columns = W.shape
    blocks = pattern.size if isinstance(pattern, BlockPattern) else None
    if blocks is not None:
        if columns % blocks or any(w.shape[0] % blocks for w in weights):
            raise UsageError(f"pattern {pattern}: {name} is not made of {blocks} x {blocks} blocks")
        blocksize = max(blocks, blocksize - blocksize % blocks)  # blocks of B columns must not straddle
        pattern = None
    if pattern is not None:
        if columns % pattern.m:
            raise UsageError(f"pattern {pattern}: input width {columns} is not a multiple of {pattern.m}")
        # Groups of m must not straddle blocks: round the block width down to a multiple of m.
        blocksize = max(pattern.m, blocksize - blocksize % pattern.m)
    bounds = torch.tensor([0] + [w.shape[0] for w in weights]).cumsum(0).tolist()  # row ranges

    dead = torch.diag(hessian) == 0  # inputs that were always zero: the weight is irrelevant
    hessian[dead, dead] = 1
    W[:, dead] = 0
    hinv = upper_cholesky_of_inverse(hessian, percdamp, name)  # [in, in], upper triangular

    fixed = None if removed is None else torch.cat(removed, 0)  # [rows, in]
    mask = torch.zeros_like(W, dtype=torch.bool)
    for start in range(0, columns, blocksize):
        end = min(start + blocksize, columns)
        count = end - start
        block = W[:, start:end].clone()  # [rows, count]
        block_hinv = hinv[start:end, start:end]
        block_diag = torch.diag(block_hinv)  # [count]
        block_mask = torch.zeros_like(block, dtype=torch.bool)
        errors = torch.zeros_like(block)

        if fixed is not None:
            block_mask = fixed[:, start:end].clone()
        elif pattern is None:
            _choose_in_block(block, block_diag, block_mask, bounds, sparsity, blocks)

        for i in range(count):
            if fixed is None and pattern is not None and i % pattern.m == 0:
                saliency = block[:, i:i + pattern.m].pow(2) / block_diag[i:i + pattern.m].pow(2)
                picked = torch.topk(saliency, pattern.n, dim=1, largest=False).indices
                block_mask[:, i:i + pattern.m].scatter_(1, picked, True)
            column = block[:, i]
            kept = column.masked_fill(block_mask[:, i], 0)
            error = (column - kept) / block_hinv[i, i]  # [rows]
            block[:, i:].addr_(error, block_hinv[i, i:], alpha=-1)  # in place: no [rows, count] temporary
            block[:, i] = kept
            errors[:, i] = error

        W[:, start:end] = block
        mask[:, start:end] = block_mask
        W[:, end:].addmm_(errors, hinv[start:end, end:], alpha=-1)

    W.masked_fill_(mask, 0)  # exact zeros where removed
    return [W[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]


def _choose_in_block(block: torch.Tensor, block_diag: torch.Tensor, block_mask: torch.Tensor, bounds: list[int],
                     sparsity: float, blocks: int | None) -> None:
    """Mark in ``block_mask`` [rows, count] the weights of one column block to remove: per matrix
    (rows bounds[i]:bounds[i+1]), the floor(rows_i * count * sparsity) lowest w² / [H⁻¹]_jj², or
    with ``blocks`` the lowest-summed B x B blocks."""
    import torch

    count = block.shape[1]
    saliency = block.pow(2) / block_diag.pow(2).unsqueeze(0)  # [rows, count]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if blocks is not None:  # whole B x B blocks of this matrix and column block
            chosen = smallest_in_matrix(block_sums(saliency[lo:hi], blocks), sparsity)
            block_mask[lo:hi] = expand_blocks(chosen, blocks)
            continue
        k = int((hi - lo) * count * sparsity)
        if k:
            flat = torch.topk(saliency[lo:hi].flatten(), k, largest=False).indices
            block_mask[lo:hi].view(-1)[flat] = True


class SparseGPT:
    name = "sparsegpt"
    order = 30
    needs_calibration = True
    statistics = "hessian"
    options = (
        Option("blocksize", int, 128, "sparsegpt: columns per block (default 128)", minimum=1),
        Option("percdamp", float, 0.01, "sparsegpt: dampening, fraction of mean diag(H) (default 0.01)",
               minimum=0, maximum=10, exclusive=True),
    )

    def __init__(self, blocksize: int = 128, percdamp: float = 0.01):
        self.blocksize = blocksize
        self.percdamp = percdamp

    def new_statistics(self, in_features: int, device) -> InputHessian:
        return InputHessian(in_features, device)

    def prune_group(self, weights: list[torch.Tensor], statistics: InputHessian, sparsity: float,
                    pattern: NMPattern | None, name: str = "") -> list[torch.Tensor]:
        return sparsegpt_prune(weights, statistics.hessian(consume=True), sparsity, pattern,
                               self.blocksize, self.percdamp, name, overwrite_hessian=True)
