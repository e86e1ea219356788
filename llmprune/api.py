"""Python entry points: ``prune`` an already loaded model, ``evaluate`` it, ``save`` it.

    import llmprune
    report = llmprune.prune(model, calibration_ids, method="wanda", sparsity=0.5)
    print(report.overall_sparsity)

The CLI is a thin layer over these functions.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .calibrate import prune_layerwise
from .checkpoint import LayerCheckpoint, run_fingerprint
from .errors import UsageError
from .methods import METHODS, NMPattern, make_method, method_options, parse_pattern
from .methods.admm import UPDATES, with_update
from .methods.masks import BlockPattern, check_sparsity
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
    schedule: dict = field(default_factory=dict)  # name, per_layer targets (and OWL outlier ratios)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def check_device(device) -> torch.device:
    """"auto", "cpu", "cuda", "cuda:N" or a torch.device of those, usable here; else a UsageError."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
            raise TypeError
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(f"--device must be cpu, cuda, cuda:N or auto, got {device!r}") from None
    if resolved.type not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu, cuda, cuda:N or auto, got {device!r}")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but no CUDA device is available")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise UsageError(f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return resolved


def check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"--batch-size must be a positive integer, got {batch_size!r}")
    return batch_size


def check_calibration(model: nn.Module, calibration, what: str) -> None:
    """Refuse anything but integer token ids [nsamples >= 1, seqlen >= 1] of the model's vocabulary."""
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or 0 in calibration.shape:
        got = (f"a tensor of shape {list(calibration.shape)}" if isinstance(calibration, torch.Tensor)
               else type(calibration).__name__)
        raise UsageError(f"{what} needs calibration token ids: an integer tensor [nsamples, seqlen], got {got}")
    if calibration.dtype not in (torch.int64, torch.int32) or calibration.is_meta:
        raise UsageError(f"calibration token ids must be an int64 (or int32) tensor with data, got "
                         f"{calibration.dtype} on {calibration.device}")
    vocabulary = model.get_input_embeddings().num_embeddings
    low, high = int(calibration.min()), int(calibration.max())
    if low < 0 or high >= vocabulary:
        raise UsageError(f"calibration token ids must lie in [0, {vocabulary}) for this model, got {low}..{high}")


def _check_method_options(method: str, options: dict) -> None:
    """Only the options the method declares, each checked by its declaration."""
    declared = {option.name: option for option in method_options(method)}
    unknown = sorted(set(options) - set(declared))
    if unknown:
        raise UsageError(f"method {method} takes no option {', '.join(map(repr, unknown))}"
                         + (f"; its options: {', '.join(declared)}" if declared else ""))
    for name, value in options.items():
        declared[name].check(value)


def check_pattern_fits(model: nn.Module, pattern: NMPattern | BlockPattern | None) -> None:
    """Refuse an N:M pattern whose M does not divide the input width of every pruned matrix, and a
    block:B pattern whose B does not divide both sides of every one."""
    if pattern is None:
        return
    if isinstance(pattern, BlockPattern):
        _check_blocks_fit(model, pattern)
        return
    adapter = adapter_for(model)
    for index, layer in enumerate(adapter.layers(model)):
        for group in adapter.linear_groups(layer):
            for name, linear in group:
                if linear.in_features % pattern.m:
                    raise UsageError(f"--pattern {pattern}: model.layers.{index}.{name} has input width "
                                     f"{linear.in_features}, not a multiple of {pattern.m}")


def _check_blocks_fit(model: nn.Module, pattern: BlockPattern) -> None:
    adapter = adapter_for(model)
    for index, layer in enumerate(adapter.layers(model)):
        for group in adapter.linear_groups(layer):
            for name, linear in group:
                if linear.in_features % pattern.size or linear.out_features % pattern.size:
                    raise UsageError(f"--pattern {pattern}: model.layers.{index}.{name} is {linear.out_features} x "
                                     f"{linear.in_features}, not made of {pattern.size} x {pattern.size} blocks")


def prune_checkpoint(folder: str | os.PathLike, model: nn.Module, calibration: torch.Tensor | None, method: str,
                     sparsity: float, pattern: NMPattern | None, batch_size: int = 1,
                     run_identity: dict | None = None, **method_options) -> LayerCheckpoint:
    """The checkpoint of a ``prune`` run, opened: a folder holding a different run is refused here,
    so the CLI can check it before any long work."""
    checkpoint = LayerCheckpoint(folder, {
        "kind": "unstructured", "method": method, "sparsity": sparsity, "pattern": str(pattern) if pattern else None,
        "method_options": method_options, **run_fingerprint(model, calibration, batch_size), **(run_identity or {})})
    checkpoint.open()
    return checkpoint


# Keywords of ``prune`` that belong to the per-layer schedule (llmprune.schedules), not to the method.
SCHEDULE_KEYWORDS = ("owl_m", "owl_lambda", "outlier_ratios")


def refit_identity(update: str, sequential: bool) -> dict:
    """What a resumed run must share about --update and --sequential (nothing at their defaults)."""
    return {**({"update": update} if update != "none" else {}), **({"sequential": True} if sequential else {})}


def prune(model: nn.Module, calibration: torch.Tensor | None = None, method: str = "wanda",
          sparsity: float | None = None, pattern: str | NMPattern | None = None, *,
          device: str | torch.device | None = None, batch_size: int = 1, progress: bool = True,
          checkpoint: str | os.PathLike | LayerCheckpoint | None = None, schedule: str | list[float] | None = None,
          placement=None, **options) -> PruneReport:
    """Prune every linear projection of every decoder layer of ``model`` in place.

    calibration: [nsamples, seqlen] token ids (not needed for magnitude). sparsity: fraction
    removed; with ``pattern="N:M"`` it may be omitted (it is N/M) and must agree if given.
    The embeddings and the LM head are never pruned. checkpoint: a folder (or
    ``prune_checkpoint(...)``) where every finished layer is committed and from which a rerun
    resumes (see llmprune.checkpoint). placement: where each decoder layer runs (see
    llmprune.calibrate.run_layerwise; default: the compute device, or where an accelerate device
    map put it; llmprune.stream passes its own).

    schedule: per-layer sparsities (llmprune.schedules): "uniform" (default), "owl" (outlier-
    weighted) or one sparsity per decoder layer; not with N:M patterns. The report's
    per_layer_sparsity is what was realised, schedule["per_layer"] what was asked.

    options: the method's own options (sparsegpt: blocksize, percdamp; see its declaration);
    the schedule's owl_m (default 5) and owl_lambda (default 0.08), and outlier_ratios already
    measured on this dense model (skip that pass); run_identity: more JSON-able facts that a run
    resumed from a checkpoint folder must share.

    update ("none", "obs" or "admm"): after the method chose its masks, refit the weights on them
    from the layer's XᵀX (llmprune.methods.admm.RefitOnMask), for any method, magnitude included;
    its refit_iterations and percdamp are taken from the method's options of those names.
    sequential (bool): prune q/k/v, then o, then gate/up, then down, each from the inputs that
    went through the groups already pruned (llmprune.calibrate.prune_layerwise).
    """
    if not isinstance(method, str) or method not in METHODS:
        raise UsageError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    schedule_options = {key: options.pop(key) for key in SCHEDULE_KEYWORDS if key in options}
    run_identity = options.pop("run_identity", None)
    update, sequential = _refit_options(options)
    # An NMPattern built by hand is checked like the text it stands for.
    nm = parse_pattern(str(pattern) if isinstance(pattern, (NMPattern, BlockPattern)) else pattern)
    schedule, target = _schedule_and_target(schedule, sparsity, nm)
    adapter = adapter_for(model)
    check_pattern_fits(model, nm)
    _check_method_options(method, options)
    pruner = with_update(make_method(method, **options), update,
                         **{k: v for k, v in options.items() if k in ("refit_iterations", "percdamp")})
    if pruner.needs_calibration or calibration is not None:  # unused by magnitude, but reported
        check_calibration(model, calibration, f"method {method}")
    device = next(model.parameters()).device if device is None else check_device(device)
    check_batch_size(batch_size)
    model.eval()
    started = time.perf_counter()
    from .schedules import resolve_schedule

    plan = resolve_schedule(model, schedule, target, calibration, torch.device(device), batch_size=batch_size,
                            progress=progress, **schedule_options)
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = prune_checkpoint(checkpoint, model, calibration, method, target, nm, batch_size,
                                      {**(run_identity or {}), **({} if plan.name == "uniform" else
                                                                   {"schedule": plan.as_dict()}),
                                       **refit_identity(update, sequential)}, **options)
    per_layer_target = plan.per_layer if plan.name != "uniform" else target
    record = prune_layerwise(model, adapter, pruner, per_layer_target, nm, calibration, torch.device(device),
                             batch_size=batch_size, progress=progress, checkpoint=checkpoint, placement=placement,
                             sequential=sequential)
    return _prune_report(method, nm, target, record, len(adapter.layers(model)), time.perf_counter() - started,
                         calibration, plan)


def _refit_options(options: dict) -> tuple[str, bool]:
    """Pop and check prune's update (default "none") and sequential (default False) from options."""
    update, sequential = options.pop("update", "none"), options.pop("sequential", False)
    if update not in UPDATES:
        raise UsageError(f"--update must be one of {', '.join(UPDATES)}, got {update!r}")
    if not isinstance(sequential, bool):
        raise UsageError(f"--sequential must be true or false, got {sequential!r}")
    return update, sequential


def _schedule_and_target(schedule, sparsity, nm: NMPattern | None) -> tuple:
    """The parsed schedule and the overall target sparsity (a list schedule's mean; N/M for a pattern)."""
    from .schedules import parse_schedule

    schedule = parse_schedule(schedule)
    if isinstance(schedule, list):  # the target is the mean of the listed layer sparsities
        mean = sum(schedule) / len(schedule)
        if sparsity is not None and abs(float(check_sparsity(sparsity, None)) - mean) > 1e-6:
            raise UsageError(f"--sparsity {sparsity} disagrees with the mean {mean:g} of the --schedule list; omit it")
        sparsity = mean
    if sparsity is None:
        sparsity = nm.sparsity if isinstance(nm, NMPattern) else 0.5
    target = check_sparsity(sparsity, nm)
    if isinstance(nm, NMPattern) and schedule != "uniform":
        raise UsageError(f"--schedule applies to unstructured sparsity; --pattern {nm} fixes every layer at "
                         f"{nm.sparsity:g}")
    return schedule, target


def _prune_report(method: str, nm, target: float, record, layers: int, seconds: float, calibration,
                  plan) -> PruneReport:
    """Sparsities counted from the exact zeros of every pruned module, per layer and overall."""
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
                       seqlen=0 if calibration is None else int(calibration.shape[1]),
                       schedule=plan.as_dict())
