"""Dynamic inference, calibrated post-training: early exit, MLP skipping, self-speculative decoding.

    from llmprune.dynamic import make_dynamic, save_dynamic, load_dynamic
    dynamic, report = make_dynamic(model, calibration_ids, max_ppl_increase=0.05)
    dynamic.generate(...)                 # the same object as ``model``, now dynamic
    print(report.as_dict())

``make_dynamic`` fits exit maps, probes and routers by least squares (llmprune/dynamic/fit.py),
then chooses thresholds on held-out calibration windows so that the dynamic model, run for real
(teacher-forced, with its own key/value handling), meets the target: at most ``max_ppl_increase``
relative perplexity increase and/or at least ``min_agreement`` top-1 agreement with the full model.
The run-time wrapper is llmprune/dynamic/modeling_llmprune_dynamic.py; lossless mode is lossless.py.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from ..models.adapters import adapter_for
from . import fit as _fit
from .modeling_llmprune_dynamic import (
    LOADER_NAME,
    MODELING_NAME,
    DynamicState,
    LlmpruneDynamicForCausalLM,
    attach,
    detach,
)

__all__ = ["DynamicReport", "DynamicState", "Fitted", "attach", "calibrate", "default_exit_layers", "detach",
           "fit_dynamic", "load_dynamic", "make_dynamic", "measure", "parse_exit_layers", "save_dynamic"]


def default_exit_layers(num_layers: int) -> list[int]:
    """Every second layer count from a quarter of the depth to two below the top (an exit after
    the last layers would save little and cost a map)."""
    layers = list(range(max(1, num_layers // 4), num_layers - 1, 2))
    return layers or [max(1, num_layers - 1)]


def parse_exit_layers(value, num_layers: int) -> list[int]:
    """"8,12,16" or a list of ints -> sorted layer counts in [1, num_layers - 1]; None -> default."""
    if value is None:
        return default_exit_layers(num_layers)
    items = value.split(",") if isinstance(value, str) else value
    try:
        layers = sorted({int(str(item).strip()) for item in items if str(item).strip()})
    except (TypeError, ValueError):
        raise UsageError(f"--exit-layers must be a comma-separated list of layer counts, got {value!r}") from None
    if not layers or layers[0] < 1 or layers[-1] > num_layers - 1:
        raise UsageError(f"--exit-layers must name layer counts between 1 and {num_layers - 1} (the model has "
                         f"{num_layers} decoder layers), got {value!r}")
    return layers


def _check_targets(max_ppl_increase, min_agreement):
    if max_ppl_increase is None and min_agreement is None:
        max_ppl_increase = 0.05
    if max_ppl_increase is not None:
        if isinstance(max_ppl_increase, bool) or not isinstance(max_ppl_increase, (int, float)) \
                or not 0 <= max_ppl_increase < math.inf:
            raise UsageError(f"--max-ppl-increase must be a number >= 0 (0.05 = 5%), got {max_ppl_increase!r}")
    if min_agreement is not None:
        if isinstance(min_agreement, bool) or not isinstance(min_agreement, (int, float)) \
                or not 0 < min_agreement <= 1:
            raise UsageError(f"--min-agreement must be in (0, 1], got {min_agreement!r}")
    return max_ppl_increase, min_agreement


@dataclass
class Fitted:
    """Everything fitted from calibration data, reusable for several targets."""

    num_layers: int
    hidden_size: int
    exit_layers: list[int]
    maps: dict
    routers: dict
    probes: dict
    table: _fit.ExitTable
    holdout: torch.Tensor         # [n, seqlen] windows the thresholds are chosen on
    holdout_rows: torch.Tensor    # [N] bool: table rows from the holdout windows
    reference: dict               # the full model on the holdout: nll_sum, tokens, top1
    seconds: float
    layout: dict = field(default_factory=dict)  # the adapter's dynamic_layout: module names, query rows


@dataclass
class DynamicReport:
    """What ``make_dynamic`` chose and measured (on held-out calibration windows)."""

    early_exit: bool
    token_skip: bool
    lossless: bool
    exit_layers: list[int]
    exit_threshold: float | None
    skip_threshold: float | None
    max_ppl_increase: float | None
    min_agreement: float | None
    target_met: bool
    calibration: dict            # measured on the holdout: ppl_full, ppl_dynamic, ppl_ratio, agreement, avg_layers, ...
    simulated: dict | None       # the teacher-forced estimate the search started from
    draft: dict | None
    maps: bool
    nsamples: int
    seqlen: int
    holdout_windows: int
    seconds: float
    searched: list = field(default_factory=list)  # (threshold, measured metrics) tried

    def as_dict(self) -> dict:
        return json.loads(json.dumps(self.__dict__, default=str))


# -- fitting ----------------------------------------------------------------------------------------

def fit_dynamic(model: nn.Module, calibration_ids: torch.Tensor, exit_layers=None, *, device=None, batch_size: int = 1,
        progress: bool = True, fit_maps: bool = True, probe_windows: int = 8, holdout_windows: int | None = None,
        stats: _fit.Pass1 | None = None) -> Fitted:
    """Fit maps, routers and probes; keep the exit table and the holdout for threshold choice.

    Windows: the last ``holdout_windows`` (default a quarter, at most 4, at least 1) are where
    thresholds are chosen and verified; all others feed the maps and routers, and the first
    ``probe_windows`` of them the probes (with a single window, it serves for everything).
    ``stats``: pass-1 statistics of those other windows (``fit.collect``), to share between fits.
    """
    from ..api import check_batch_size, check_calibration, check_device

    check_calibration(model, calibration_ids, "--method dynamic")
    check_batch_size(batch_size)
    if calibration_ids.shape[1] < 2:
        raise UsageError("--method dynamic needs calibration windows of at least 2 tokens")
    started = time.perf_counter()
    num_layers = len(adapter_for(model).layers(model))
    exit_layers = parse_exit_layers(exit_layers, num_layers)
    device = next(model.parameters()).device if device is None else check_device(device)
    n = calibration_ids.shape[0]
    holdout_windows = holdout_windows or min(4, max(1, n // 4))
    holdout_windows = min(holdout_windows, n)
    fitting = calibration_ids[:max(1, n - holdout_windows)] if n > 1 else calibration_ids
    holdout = calibration_ids[n - holdout_windows:]
    probing = fitting[:probe_windows]
    model.eval()
    if stats is None:  # maps and routers never see the holdout: it must measure what they do on new text
        stats = _fit.collect(model, fitting, exit_layers, batch_size=batch_size, device=device, progress=progress)
    maps = _fit.solve_maps(stats) if fit_maps else {}
    routers = _fit.solve_routers(stats)
    table = _fit.exit_table(model, torch.cat([probing, holdout]), exit_layers, maps, routers, device=device,
                            progress=progress)
    probe_rows = table.window < probing.shape[0]
    holdout_rows = ~probe_rows if n > 1 else probe_rows
    probes = _fit.fit_probes(table, probe_rows)
    state = DynamicState(_settings(num_layers, model.config.hidden_size, exit_layers), {})
    reference = _reference(model, state, holdout, device)
    return Fitted(num_layers=num_layers, hidden_size=model.config.hidden_size, exit_layers=exit_layers, maps=maps,
                  routers=routers, probes=probes, table=table, holdout=holdout, holdout_rows=holdout_rows,
                  reference=reference, seconds=time.perf_counter() - started,
                  layout=adapter_for(model).dynamic_layout(model))


def _settings(num_layers, hidden_size, exit_layers, **more) -> dict:
    return {"format": "llmprune-dynamic/1", "num_layers": num_layers, "hidden_size": hidden_size,
            "exit_layers": list(exit_layers), "exit_threshold": None, "skip_threshold": None, "lossless": None,
            **more}


@torch.no_grad()
def _reference(model, state, windows, device) -> dict:
    """The full model on the holdout windows: NLL sum, predicted tokens, top-1 per position."""
    nll, tokens, top = 0.0, 0, []
    for window in windows:
        ids = window[None].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        nll += F.cross_entropy(logits, ids[0, 1:], reduction="sum").double().item()
        tokens += ids.shape[1] - 1
        top.append(logits.argmax(-1).cpu())
    return {"nll_sum": nll, "tokens": tokens, "top1": top}


@torch.no_grad()
def measure(model: nn.Module, windows: torch.Tensor, reference: dict | None = None, device=None) -> dict:
    """Run the (dynamic) model teacher-forced on windows [n, seqlen] without a cache: perplexity,
    top-1 agreement with ``reference`` (see ``_reference``), average layers per token, MLP skips."""
    state: DynamicState = model.llmprune_dynamic
    device = next(model.parameters()).device if device is None else device
    state.reset_stats()
    nll, tokens, agree = 0.0, 0, 0
    for index, window in enumerate(windows):
        ids = window[None].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        nll += F.cross_entropy(logits, ids[0, 1:], reduction="sum").double().item()
        tokens += ids.shape[1] - 1
        if reference is not None:
            agree += int((logits.argmax(-1).cpu() == reference["top1"][index]).sum())
    result = {"ppl": math.exp(nll / tokens), **state.summary()}
    if reference is not None:
        result["ppl_full"] = math.exp(reference["nll_sum"] / reference["tokens"])
        result["ppl_ratio"] = math.exp((nll - reference["nll_sum"]) / tokens)
        result["agreement"] = agree / tokens
    return result


def _meets(metrics: dict, max_ppl_increase, min_agreement, slack: float = 1e-12) -> bool:
    ok = True
    if max_ppl_increase is not None:
        ok &= metrics["ppl_ratio"] - 1 <= max_ppl_increase + slack
    if min_agreement is not None:
        ok &= metrics["agreement"] >= min_agreement - slack
    return bool(ok)


def _bisect(candidates: list, meets) -> tuple[int, list]:
    """Index of the first candidate for which ``meets`` holds, assuming it holds from some index on
    (candidates ordered from most to least aggressive); len(candidates) if none. ``meets`` is
    called O(log n) times. Returns (index, [(candidate, metrics)] tried)."""
    tried = []
    lo, hi = -1, len(candidates)  # candidates[lo] fails (or lo = -1), candidates[hi] holds (or hi = len)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ok, metrics = meets(candidates[mid])
        tried.append((candidates[mid], metrics))
        if ok:
            hi = mid
        else:
            lo = mid
    return hi, tried


# -- calibration to a target ----------------------------------------------------------------------

def calibrate(model: nn.Module, fitted: Fitted, *, early_exit: bool = True, token_skip: bool = False,
              max_ppl_increase=None, min_agreement=None, lossless: bool = False, device=None,
              maps: bool = True) -> tuple[nn.Module, DynamicReport]:
    """Choose thresholds for a target, attach the dynamic state to ``model`` (in place) and return it."""
    max_ppl_increase, min_agreement = _check_targets(max_ppl_increase, min_agreement)
    started = time.perf_counter()
    tensors = {**(fitted.maps if maps else {}), **fitted.probes, **(fitted.routers if token_skip else {})}
    state = DynamicState(_settings(fitted.num_layers, fitted.hidden_size, fitted.exit_layers,
                                   **({"layout": fitted.layout} if fitted.layout else {})), tensors)
    attach(model, state)
    device = next(model.parameters()).device if device is None else device
    holdout, reference = fitted.holdout, fitted.reference
    simulated, searched, draft = None, [], None

    if lossless:
        from .lossless import choose_draft

        draft = choose_draft(model, fitted, device=device)
        state.set(lossless=draft)
        attach(model, state)  # installs the lossless generate
        metrics = measure(model, holdout, reference, device)
        return model, _report(fitted, state, early_exit=False, token_skip=False, lossless=True,
                              max_ppl_increase=None, min_agreement=None, metrics=metrics, simulated=None,
                              searched=[], draft=draft, maps=maps, started=started, target_met=True)

    # Exits get half the budget when MLP skipping shares it.
    exit_ppl, exit_agreement = max_ppl_increase, min_agreement
    if early_exit and token_skip:
        exit_ppl = None if max_ppl_increase is None else math.sqrt(1 + max_ppl_increase) - 1
        exit_agreement = None if min_agreement is None else 1 - (1 - min_agreement) / 2

    def run(**settings):
        state.set(**settings)
        return measure(model, holdout, reference, device)

    if early_exit:
        scores = _fit.probe_scores(fitted.table, fitted.probes)
        rows = fitted.holdout_rows
        quantiles = torch.quantile(scores[rows].flatten().double(), torch.linspace(0, 1, 65, dtype=torch.float64))
        candidates = sorted({float(q) for q in quantiles})
        sims = [_fit.simulate_exits(fitted.table, scores, t, rows, fitted.num_layers) for t in candidates]
        start = next((i for i, s in enumerate(sims) if _meets(s, exit_ppl, exit_agreement)), len(candidates))
        simulated = {"threshold": candidates[start] if start < len(candidates) else None,
                     **(sims[start] if start < len(candidates) else {})}
        # The simulation ignores what exit states do to later tokens' keys/values: verify for real,
        # and search upwards (fewer exits) from its choice.
        window = candidates[start:]
        index, tried = _bisect(window, lambda t: (lambda m: (_meets(m, exit_ppl, exit_agreement), m))(
            run(exit_threshold=t, skip_threshold=None)))
        searched += [("exit", t, m) for t, m in tried]
        state.set(exit_threshold=window[index] if index < len(window) else None)

    if token_skip:
        values = fitted.table.router_values.double()
        fractions = [0.005, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8]
        # most aggressive first: skip thresholds by decreasing skipped fraction
        candidates = [float(torch.quantile(values, f)) for f in reversed(fractions)] if values.numel() else []
        exit_threshold = state.exit_threshold
        index, tried = _bisect(candidates, lambda t: (lambda m: (_meets(m, max_ppl_increase, min_agreement), m))(
            run(exit_threshold=exit_threshold, skip_threshold=t)))
        searched += [("skip", t, m) for t, m in tried]
        state.set(skip_threshold=candidates[index] if index < len(candidates) else None)

    metrics = run()
    met = _meets(metrics, max_ppl_increase, min_agreement)
    return model, _report(fitted, state, early_exit=early_exit, token_skip=token_skip, lossless=False,
                          max_ppl_increase=max_ppl_increase, min_agreement=min_agreement, metrics=metrics,
                          simulated=simulated, searched=searched, draft=None, maps=maps, started=started,
                          target_met=met)


def _report(fitted, state, *, metrics, searched, started, **fields) -> DynamicReport:
    """fields: the DynamicReport fields the caller decides (early_exit, token_skip, lossless,
    max_ppl_increase, min_agreement, target_met, simulated, draft, maps)."""
    return DynamicReport(
        **fields, exit_layers=fitted.exit_layers, exit_threshold=state.exit_threshold,
        skip_threshold=state.skip_threshold, calibration=metrics,
        nsamples=int(fitted.table.window.max()) + 1, seqlen=int(fitted.holdout.shape[1]),
        holdout_windows=int(fitted.holdout.shape[0]), seconds=fitted.seconds + time.perf_counter() - started,
        searched=[{"kind": kind, "threshold": t, **m} for kind, t, m in searched])


def _check_structure(model: nn.Module) -> None:
    """What the wrapper needs: a family llmprune has an adapter for (including structured outputs
    with uneven layers), with decoder layers."""
    try:
        adapter = adapter_for(model)
        ok = len(adapter.layers(model)) > 0
    except (AttributeError, TypeError, UsageError):
        ok = False
    if not ok:
        raise UsageError(f"--method dynamic does not support {type(model).__name__}: it needs a family llmprune "
                         "has an adapter for (llmprune.models.adapters)")


def make_dynamic(model: nn.Module, calibration_ids: torch.Tensor, *, early_exit: bool = True, token_skip: bool = False,
                 max_ppl_increase=None, min_agreement=None, exit_layers=None, lossless: bool = False, device=None,
                 batch_size: int = 1, progress: bool = True, maps: bool = True):
    """Make ``model`` dynamic in place, calibrated to a target; returns (model, DynamicReport).

    calibration_ids: [nsamples, seqlen] token ids. Targets (on held-out calibration windows): at
    most ``max_ppl_increase`` relative perplexity increase (default 0.05 when neither is given)
    and/or at least ``min_agreement`` top-1 agreement with the full model. exit_layers: layer
    counts after which tokens may exit (list or "8,12,16"; default every second from L/4).
    lossless: self-speculative decoding (exact greedy tokens) instead of approximate exits.
    maps=False exits through the final norm and LM head without the fitted affine maps.
    """
    if not (early_exit or token_skip or lossless):
        raise UsageError("--method dynamic needs --early-exit, --token-skip or --lossless")
    _check_targets(max_ppl_increase, min_agreement)
    if hasattr(model, "llmprune_dynamic"):
        detach(model)
    _check_structure(model)
    fitted = fit_dynamic(model, calibration_ids, exit_layers, device=device, batch_size=batch_size, progress=progress,
                 fit_maps=maps)
    return calibrate(model, fitted, early_exit=early_exit, token_skip=token_skip, max_ppl_increase=max_ppl_increase,
                     min_agreement=min_agreement, lossless=lossless, device=device, maps=maps)


# -- saving and loading ----------------------------------------------------------------------------

def save_dynamic(model: nn.Module, folder) -> None:
    """Write the dynamic state INTO an existing model folder (the base weights are already there):
    llmprune_dynamic.{json,safetensors}, the run-time modelling files, and ``auto_map`` in
    config.json naming the loader, for ``from_pretrained(folder, trust_remote_code=True)``."""
    state: DynamicState = getattr(model, "llmprune_dynamic", None)
    if state is None:
        raise UsageError("save_dynamic: the model is not dynamic (make_dynamic or load_dynamic first)")
    folder = Path(folder)
    state.save(folder)
    here = Path(__file__).parent
    shutil.copyfile(here / MODELING_NAME, folder / MODELING_NAME)
    shutil.copyfile(here / "lossless.py", folder / "lossless.py")
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    auto_map = dict(config.get("auto_map") or {})
    auto_map["AutoModelForCausalLM"] = f"{MODELING_NAME[:-3]}.{LOADER_NAME}"
    config["auto_map"] = auto_map
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def load_dynamic(folder, **kwargs) -> nn.Module:
    """The dynamic model saved in ``folder``, from the installed llmprune (no code from the folder runs)."""
    return LlmpruneDynamicForCausalLM.from_pretrained(folder, **kwargs)
