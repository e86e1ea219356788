"""Python entry points: ``prune`` an already loaded model, ``evaluate`` it, ``save`` it.

    import llmprune
    report = llmprune.prune(model, calibration_ids, method="wanda", sparsity=0.5)
    print(report.overall_sparsity)

The CLI is a thin layer over these functions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .calibrate import prune_layerwise
from .errors import UsageError
from .methods import METHODS, NMPattern, make_method, parse_pattern
from .models.adapters import adapter_for


@dataclass
class PruneReport:
    """What ``prune`` did. Sparsities count exact zeros in the pruned linear projections."""

    method: str
    pattern: str
    target_sparsity: float
    overall_sparsity: float
    per_layer_sparsity: list[float]
    modules: dict[str, dict]
    seconds: float
    layer_seconds: list[float] = field(default_factory=list)
    nsamples: int = 0
    seqlen: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def check_sparsity(sparsity, pattern: NMPattern | None, explicit: bool = True) -> float:
    """Validate the fraction removed; with an N:M pattern it must equal N/M when given."""
    try:
        value = float(sparsity)
    except (TypeError, ValueError):
        raise UsageError(f"--sparsity must be a number in [0, 1), got {sparsity!r}") from None
    if not 0.0 <= value < 1.0:  # also refuses NaN
        raise UsageError(f"--sparsity must be in [0, 1), got {sparsity!r}")
    if pattern is not None and explicit and abs(value - pattern.sparsity) > 1e-9:
        raise UsageError(f"--sparsity {value} disagrees with --pattern {pattern} "
                         f"(which removes {pattern.sparsity:g}); omit --sparsity or make them agree")
    return pattern.sparsity if pattern is not None else value


def check_pattern_fits(model: nn.Module, pattern: NMPattern | None) -> None:
    """Refuse an N:M pattern whose M does not divide the input width of every pruned matrix."""
    if pattern is None:
        return
    adapter = adapter_for(model)
    for index, layer in enumerate(adapter.layers(model)):
        for group in adapter.linear_groups(layer):
            for name, linear in group:
                if linear.in_features % pattern.m:
                    raise UsageError(f"--pattern {pattern}: model.layers.{index}.{name} has input width "
                                     f"{linear.in_features}, not a multiple of {pattern.m}")


def prune(model: nn.Module, calibration: torch.Tensor | None = None, method: str = "wanda",
          sparsity: float | None = None, pattern: str | NMPattern | None = None, *,
          device: str | torch.device | None = None, batch_size: int = 1, progress: bool = True,
          **method_options) -> PruneReport:
    """Prune every linear projection of every decoder layer of ``model`` in place.

    calibration: [nsamples, seqlen] token ids (not needed for magnitude). sparsity: fraction
    removed; with ``pattern="N:M"`` it may be omitted (it is N/M) and must agree if given.
    method_options go to the method (sparsegpt: blocksize, percdamp). The embeddings and the LM
    head are never pruned.
    """
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    nm = pattern if isinstance(pattern, NMPattern) else parse_pattern(pattern)
    if sparsity is None:
        sparsity = nm.sparsity if nm else 0.5
    target = check_sparsity(sparsity, nm)
    adapter = adapter_for(model)
    check_pattern_fits(model, nm)
    pruner = make_method(method, **method_options)
    if pruner.needs_calibration:
        if calibration is None or calibration.dim() != 2 or calibration.shape[0] < 1:
            raise UsageError(f"method {method} needs calibration token ids shaped [nsamples, seqlen]")
    if device is None:
        device = next(model.parameters()).device
    model.eval()
    started = time.perf_counter()
    record = prune_layerwise(model, adapter, pruner, target, nm, calibration, torch.device(device),
                             batch_size=batch_size, progress=progress)
    seconds = time.perf_counter() - started

    layers = len(adapter.layers(model))
    per_layer = []
    for index in range(layers):
        entries = [m for m in record.modules.values() if m["layer"] == index]
        per_layer.append(sum(m["zeros"] for m in entries) / max(1, sum(m["numel"] for m in entries)))
    zeros = sum(m["zeros"] for m in record.modules.values())
    numel = sum(m["numel"] for m in record.modules.values())
    return PruneReport(method=method, pattern=str(nm) if nm else "unstructured", target_sparsity=target,
                       overall_sparsity=zeros / max(1, numel), per_layer_sparsity=per_layer,
                       modules=record.modules, seconds=seconds, layer_seconds=record.layer_seconds,
                       nsamples=0 if calibration is None else int(calibration.shape[0]),
                       seqlen=0 if calibration is None else int(calibration.shape[1]))
