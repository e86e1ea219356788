"""Per-layer sparsity schedules: how much of each decoder layer to remove for a given overall target.

- ``uniform``: every layer gets the target.
- ``owl``: outlier-weighted layerwise sparsity (Yin et al., 2023, "Outlier Weighed Layerwise
  Sparsity"). For every decoder layer of the *dense* model, the Wanda score |W_ij| * ||X_j||_2 of
  all its linear projections is computed from calibration activations (the dense model's own,
  propagated layer by layer through the shared runner); the layer's outlier ratio D_l is the
  fraction of those scores above M times their mean (M = 5). Ratios are rescaled linearly to
  [0, 2 * lambda] (lambda = 0.08), centred on zero, and subtracted from the target: layers with
  more outliers keep more weights, every layer's sparsity lies within target +- lambda, and the
  layer sparsities average to the target (so, with equal-sized layers, the overall sparsity is the
  target).
- an explicit list: one sparsity per decoder layer.

YAML: ``{method: wanda, sparsity: 0.7, schedule: owl}`` or ``schedule: [0.6, 0.7, 0.8]``.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import UsageError

if TYPE_CHECKING:  # annotations only: torch is imported where it is used
    import torch
    from torch import nn

OWL_M = 5.0  # outlier threshold: a score above M x the layer's mean score is an outlier
OWL_LAMBDA = 0.08  # layer sparsities range over target +- lambda


@dataclass
class Schedule:
    """What a schedule decided: one target sparsity per decoder layer, and why."""

    name: str  # "uniform", "owl" or "explicit"
    per_layer: list[float]
    details: dict = field(default_factory=dict)  # owl: outlier ratios, M, lambda

    def as_dict(self) -> dict:
        return {"name": self.name, "per_layer": list(self.per_layer), **self.details}


def parse_schedule(value) -> str | list[float]:
    """"uniform", "owl", a list of numbers, or a comma-separated text of numbers (CLI)."""
    if value is None:
        return "uniform"
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("uniform", "owl"):
            return text
        try:
            value = [float(item) for item in text.split(",") if item.strip()]
        except ValueError:
            raise UsageError(f"--schedule must be uniform, owl or a comma-separated list of per-layer "
                             f"sparsities, got {value!r}") from None
    if isinstance(value, (list, tuple)):
        if not value or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value):
            raise UsageError(f"--schedule list must hold one number per decoder layer, got {value!r}")
        for v in value:
            if not 0.0 <= float(v) < 1.0:  # also refuses NaN
                raise UsageError(f"--schedule: every per-layer sparsity must be in [0, 1), got {v!r}")
        return [float(v) for v in value]
    raise UsageError(f"--schedule must be uniform, owl or a list of per-layer sparsities, got {value!r}")


def check_owl_options(m, lam) -> None:
    if isinstance(m, bool) or not isinstance(m, numbers.Real) or not m > 0:
        raise UsageError(f"--owl-m must be a positive number, got {m!r}")
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not 0 <= lam < 1:
        raise UsageError(f"--owl-lambda must be a number in [0, 1), got {lam!r}")


def owl_outlier_ratios(model: nn.Module, calibration_ids: torch.Tensor, device: torch.device,
                       m: float = OWL_M, batch_size: int = 1, progress: bool = True) -> list[float]:
    """Per decoder layer of the (dense) model: the fraction of Wanda scores above m x their mean.

    One collect-only pass of the shared runner: hooks accumulate the input norms of every input
    group while the calibration batches propagate through the unchanged layers. Weights are not
    modified. Memory: one [out, in] score matrix at a time (the layer mean is a running sum).
    """
    import torch

    with torch.no_grad():
        return _owl_outlier_ratios(model, calibration_ids, device, m, batch_size, progress)


def _owl_outlier_ratios(model, calibration_ids, device, m, batch_size, progress) -> list[float]:
    from .calibrate import run_layerwise
    from .methods.wanda import InputNorms, wanda_scores
    from .models.adapters import adapter_for

    adapter = adapter_for(model)
    norms: list[list[InputNorms]] = []  # [layer][group], each sum_of_squares [in]

    def collect(index, layer):
        groups = adapter.linear_groups(layer)
        stats = [InputNorms(group[0][1].in_features, device) for group in groups]
        norms.append(stats)
        return [group[0][1].register_forward_pre_hook(lambda module, args, s=s: s.add_batch(args[0]))
                for group, s in zip(groups, stats)]

    run_layerwise(model, adapter, calibration_ids, device, collect=collect, batch_size=batch_size,
                  progress=progress, desc="owl: outlier ratios")
    ratios = []
    for layer, stats in zip(adapter.layers(model), norms):
        pairs = [(linear.weight, s.sum_of_squares) for group, s in zip(adapter.linear_groups(layer), stats)
                 for _, linear in group]
        total, count = 0.0, 0
        for weight, sum_sq in pairs:  # mean score over all projections of the layer
            total += wanda_scores(weight.detach().to(sum_sq.device).float(), sum_sq).double().sum().item()
            count += weight.numel()
        threshold = m * total / count
        outliers = sum(int((wanda_scores(weight.detach().to(sum_sq.device).float(), sum_sq) > threshold).sum())
                       for weight, sum_sq in pairs)
        ratios.append(outliers / count)
    return ratios


def owl_sparsities(outlier_ratios: list[float], target: float, lam: float = OWL_LAMBDA) -> list[float]:
    """Per-layer sparsities from outlier ratios: target - (rescaled ratio - its mean), where the
    ratios are rescaled linearly onto [0, 2 lambda]. They average to ``target``; the layer with the
    most outliers gets the lowest sparsity. All equal ratios give the uniform schedule."""
    import torch

    ratios = torch.tensor(outlier_ratios, dtype=torch.float64)
    spread = float(ratios.max() - ratios.min())
    if spread == 0.0:
        return [float(target)] * len(outlier_ratios)
    scaled = (ratios - ratios.min()) / spread * (2 * lam)  # [layers] in [0, 2 lambda]
    sparsities = target - (scaled - scaled.mean())
    if float(sparsities.min()) < 0 or float(sparsities.max()) >= 1:
        raise UsageError(f"--schedule owl with target {target:g} and lambda {lam:g} gives per-layer sparsities "
                         f"outside [0, 1) ({float(sparsities.min()):.3f}..{float(sparsities.max()):.3f}); "
                         f"lower --owl-lambda")
    return [float(s) for s in sparsities]


def resolve_schedule(model: nn.Module, schedule, target: float, calibration_ids: torch.Tensor | None,
                     device: torch.device, *, owl_m: float = OWL_M, owl_lambda: float = OWL_LAMBDA,
                     batch_size: int = 1, progress: bool = True,
                     outlier_ratios: list[float] | None = None) -> Schedule:
    """The per-layer sparsities of ``schedule`` for ``model`` at ``target``. outlier_ratios: OWL
    ratios already measured on this dense model with these calibration ids (a sweep reuses them)."""
    from .models.adapters import adapter_for

    schedule = parse_schedule(schedule)
    layers = len(adapter_for(model).layers(model))
    if schedule == "uniform":
        return Schedule("uniform", [float(target)] * layers)
    if isinstance(schedule, list):
        if len(schedule) != layers:
            raise UsageError(f"--schedule lists {len(schedule)} per-layer sparsities, but the model has "
                             f"{layers} decoder layers")
        return Schedule("explicit", schedule)
    check_owl_options(owl_m, owl_lambda)
    if outlier_ratios is None:
        if calibration_ids is None:
            raise UsageError("--schedule owl needs calibration data (it measures activation outliers)")
        outlier_ratios = owl_outlier_ratios(model, calibration_ids, device, owl_m, batch_size, progress)
    return Schedule("owl", owl_sparsities(outlier_ratios, target, owl_lambda),
                    {"owl_m": float(owl_m), "owl_lambda": float(owl_lambda),
                     "outlier_ratios": [float(r) for r in outlier_ratios]})
