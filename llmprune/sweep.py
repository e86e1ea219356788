"""Sweeps: many prunings of one model, measured the same way, as a table, a JSON file and a plot.

    python -m llmprune sweep --model llama --methods magnitude,wanda,sparsegpt \\
        --sparsities 0.1,0.2,...,0.8 --patterns 2:4,4:8

What is done once and reused by every run: loading the model (each run starts from a copy of the
dense decoder weights kept in memory), tokenising the calibration and evaluation data, the dense
perplexity, and the OWL outlier ratios (measured on the dense model, they do not depend on the
target). What cannot be reused: each run's own layer-by-layer calibration pass, because every
layer's statistics are taken on the outputs of the layers already pruned in that run.
No model folder is written: a sweep measures; prune the chosen point with ``python -m llmprune``.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .errors import UsageError
from .guard import check_output_folder, claim_output
from .jsonreport import report_json
from .methods import METHODS, parse_pattern
from .methods.masks import check_sparsity
from .schedules import owl_outlier_ratios, parse_schedule


@dataclass(frozen=True)
class SweepRun:
    """One point of a sweep: a method at a sparsity (uniform or owl schedule) or at an N:M pattern."""

    method: str
    sparsity: float
    pattern: str = "unstructured"
    schedule: str = "uniform"

    @property
    def label(self) -> str:
        if self.pattern != "unstructured":
            return self.pattern
        return f"{self.sparsity:.2f}" + ("" if self.schedule == "uniform" else f" {self.schedule}")


def parse_sparsities(text: str) -> list[float]:
    """"0.1,0.2,0.3" or with an ellipsis continuing the step: "0.1,0.2,...,0.8"."""
    items = [item.strip() for item in str(text).split(",") if item.strip()]
    values: list[float] = []
    try:
        for i, item in enumerate(items):
            if item in ("...", "…"):
                if len(values) < 2 or i + 1 >= len(items) or items[i + 1] in ("...", "…"):
                    raise ValueError
                step, end = values[-1] - values[-2], float(items[i + 1])
                if step <= 0:
                    raise ValueError
                count = round((end - values[-1]) / step)
                values += [round(values[-1] + step * k, 10) for k in range(1, count)]
            else:
                values.append(float(item))
    except ValueError:
        raise UsageError(f"--sparsities must be numbers separated by commas (optionally a, b, ..., z), "
                         f"got {text!r}") from None
    if not values:
        raise UsageError("--sparsities is empty")
    for value in values:
        check_sparsity(value, None)
    return sorted(set(values))


def plan_runs(methods: list[str], sparsities: list[float], patterns: list[str],
              schedules: list[str]) -> list[SweepRun]:
    """The product methods x sparsities x schedules, then methods x patterns."""
    for method in methods:
        if method not in METHODS:
            raise UsageError(f"--methods: unknown method {method!r}; choose from: {', '.join(METHODS)}")
    for schedule in schedules:
        if parse_schedule(schedule) not in ("uniform", "owl"):
            raise UsageError(f"--schedules: each must be uniform or owl, got {schedule!r}")
    runs = [SweepRun(m, s, "unstructured", sch) for sch in schedules for m in methods for s in sparsities]
    for pattern in patterns:
        nm = parse_pattern(pattern)
        if nm is None:
            raise UsageError(f"--patterns: expected N:M patterns such as 2:4, got {pattern!r}")
        runs += [SweepRun(m, nm.sparsity, str(nm)) for m in methods]
    return runs


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


class DenseWeights:
    """A copy of the dense decoder weights ([out, in] per linear projection), restored before every run."""

    def __init__(self, model):
        from .models.adapters import adapter_for

        self.model, self.adapter = model, adapter_for(model)
        self.weights = {key: linear.weight.detach().clone() for key, linear in self._linears()}

    def _linears(self):
        for i, layer in enumerate(self.adapter.layers(self.model)):
            for group in self.adapter.linear_groups(layer):
                for name, linear in group:
                    yield f"{i}.{name}", linear

    def restore(self) -> None:
        with torch.no_grad():
            for key, linear in self._linears():
                linear.weight.copy_(self.weights[key])


def sweep_spec(model: str, runs: list[SweepRun], output, settings: dict, method_options: dict | None):
    """The sweep as one ``job.RunSpec``: the run options (data, device, ...) and one unstructured
    stage per SweepRun, each checked before anything is loaded. settings: RUN_OPTIONS values and
    owl_m / owl_lambda; method_options: method name -> its options (e.g. {"sparsegpt": {"blocksize": 64}})."""
    from .job import RUN_OPTIONS, RunSpec
    from .options import check_values
    from .stages import stage_for

    settings = dict(settings)
    if "progress" in settings:  # the Python API's spelling
        settings["no_progress"] = not settings.pop("progress")
    owl = {name: settings.pop(name) for name in ("owl_m", "owl_lambda") if name in settings}
    unknown = sorted(set(settings) - {o.name for o in RUN_OPTIONS})
    if unknown:
        raise UsageError(f"run_sweep takes no option {', '.join(map(repr, unknown))}")
    if not runs:
        raise UsageError("the sweep has no runs")
    values = check_values(RUN_OPTIONS, {**settings, "model": model, "output": str(output)})
    stages = []
    for run in runs:
        own = (method_options or {}).get(run.method) or {}
        given = {"pattern": run.pattern, "schedule": run.schedule, **owl, **own}
        if run.pattern == "unstructured":
            given["sparsity"] = run.sparsity
        stages.append(stage_for(run.method, given))
    spec = RunSpec(values, stages, command="sweep", sample_prompt=None)
    if spec.eval_sources is None:
        raise UsageError("a sweep measures perplexity: --eval-data none is not possible")
    return spec


def run_sweep(model: str, runs: list[SweepRun], *, output: str | os.PathLike, note: str = "",
              method_options: dict | None = None, **settings) -> dict:
    """Run every SweepRun on ``model``; write sweep.json (after every run), sweep.md and sweep.png
    into ``output``. Returns the results dictionary. settings: the run options of ``job.RUN_OPTIONS``
    (calib_data, eval_data, nsamples, seqlen, seed, eval_seqlen, eval_tokens, device, dtype,
    batch_size, overwrite, no_progress, no_cache, trust_remote_code, max_data_bytes) and owl_m,
    owl_lambda; method_options: method name -> its options, given to that method's runs."""
    spec = sweep_spec(model, runs, output, settings, method_options)
    from .data import max_data_bytes

    with max_data_bytes(spec.max_data_bytes):
        return _sweep(spec, runs, note)


def _sweep(spec, runs: list[SweepRun], note: str) -> dict:
    """Load once, measure the dense model once (or take it from the cache), then apply each stage
    to the restored dense weights and measure it."""
    from . import job

    started = time.perf_counter()
    folder = check_output_folder(spec.output, spec.overwrite, marker="sweep.json", model=spec.model)
    prepared = job.prepare(spec)
    if prepared["group"] is not None:
        raise UsageError("sweep runs in one process (not under accelerate launch)")
    claim_output(folder, spec.overwrite)  # every check passed: lock the output for the whole sweep
    loaded = job.load(spec, prepared)
    dense = DenseWeights(loaded.model)
    results = _header(spec, loaded, note)
    t = time.perf_counter()
    results["dense"] = job.measure(loaded, loaded.model, dense=True, speed=False)["perplexity"]
    results["timings"]["dense_eval_s"] = time.perf_counter() - t
    owl = [stage for stage in spec.stages if stage.schedule == "owl"]
    if owl:  # measured once on the dense model: they do not depend on the target
        t, values = time.perf_counter(), owl[0].values
        loaded.outlier_ratios = owl_outlier_ratios(loaded.model, loaded.calibration, loaded.compute, values["owl_m"],
                                                   spec.batch_size, spec.progress)
        results["owl"] = {"owl_m": values["owl_m"], "owl_lambda": values["owl_lambda"],
                          "outlier_ratios": loaded.outlier_ratios, "seconds": time.perf_counter() - t}
    _save_json(folder, results)
    for index, (run, stage) in enumerate(zip(runs, spec.stages)):
        if spec.progress:
            print(f"sweep {index + 1}/{len(runs)}: {run.method} {run.label}", flush=True)
        dense.restore()
        report = stage.apply(loaded).report
        t = time.perf_counter()
        ppl = job.measure(loaded, loaded.model, dense=False, speed=False)["perplexity"]
        results["runs"].append({
            "method": run.method, "pattern": run.pattern, "schedule": run.schedule, "label": run.label,
            "target_sparsity": run.sparsity, "realised_sparsity": report["overall_sparsity"],
            "per_layer_sparsity": report["per_layer_sparsity"], "schedule_per_layer": report["schedule"]["per_layer"],
            "perplexity": ppl["perplexity"], "prune_s": report["seconds"], "eval_s": time.perf_counter() - t})
        _save_json(folder, results)
    dense.restore()
    results["timings"]["total_s"] = time.perf_counter() - started
    _save_json(folder, results)
    _write_atomic(folder / "sweep.md", lambda p: p.write_text(markdown_table(results), encoding="utf-8"))
    _write_atomic(folder / "sweep.png", lambda p: plot(results, p))
    return results


def _header(spec, loaded, note: str) -> dict:
    """sweep.json before any run: the setup, what was reused, the load and data timings."""
    needs_calibration = spec.needs_data()
    return {
        "llmprune_version": __version__, "model": spec.model, "device": str(loaded.compute), "dtype": loaded.dtype,
        "threads": torch.get_num_threads(), "calib_data": list(spec.calib_data) if needs_calibration else None,
        "eval_data": list(spec.eval_data), "nsamples": spec.nsamples if needs_calibration else 0,
        "seqlen": spec.seqlen if needs_calibration else 0, "seed": spec.seed, "eval_seqlen": spec.eval_seqlen,
        "eval_tokens": spec.eval_tokens, "note": note,
        "reused": "model load, tokenised calibration and evaluation data, dense perplexity, OWL outlier ratios",
        "timings": {"load_s": loaded.timings["load_s"], "data_s": loaded.timings["data_s"]}, "dense": None,
        "owl": None, "runs": [],
    }


def _save_json(folder: Path, results: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)  # only once there is something to write
    _write_atomic(folder / "sweep.json",
                  lambda p: p.write_text(report_json(results, indent=2) + "\n", encoding="utf-8"))


def _setup_line(results: dict) -> str:
    ppl = results["dense"]
    calibration = (f"calibration {results['nsamples']} x {results['seqlen']} tokens from "
                   f"{', '.join(Path(s).name for s in results['calib_data'])} (seed {results['seed']})"
                   if results.get("calib_data") else "no calibration")
    return (f"Model {results['model']} ({results['dtype']}, {results['device']}, {results['threads']} threads); "
            f"{calibration}; perplexity on {', '.join(Path(s).name for s in results['eval_data'])}: "
            f"{ppl['protocol']}." + (f" {results['note']}" if results.get("note") else ""))


def markdown_table(results: dict) -> str:
    """Perplexity, rows = sparsity / pattern / schedule, columns = methods."""
    seen = list(dict.fromkeys(r["method"] for r in results["runs"]))
    methods = [m for m in METHODS if m in seen] + [m for m in seen if m not in METHODS]
    labels = list(dict.fromkeys(r["label"] for r in sorted(
        results["runs"], key=lambda r: (r["pattern"] != "unstructured", r["schedule"] != "uniform",
                                        r["target_sparsity"], r["pattern"]))))
    cell = {(r["label"], r["method"]): r for r in results["runs"]}
    lines = [_setup_line(results), "",
             "Perplexity (lower is better); realised sparsity of the decoder linear weights in brackets.", "",
             "| sparsity | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods),
             "| 0 (dense) | " + " | ".join(f"{results['dense']['perplexity']:.2f}" for _ in methods) + " |"]
    for label in labels:
        row = []
        for method in methods:
            r = cell.get((label, method))
            row.append(f"{r['perplexity']:.2f} ({r['realised_sparsity']:.3f})" if r else "-")
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Perplexity against sparsity, log scale: one line per method (uniform schedule), N:M patterns
    and OWL points as markers in the method's colour, the dense model as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=120)
    dense = results["dense"]["perplexity"]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = {"2:4": "s", "4:8": "D"}
    seen = list(dict.fromkeys(r["method"] for r in results["runs"]))
    for i, method in enumerate([m for m in METHODS if m in seen] + [m for m in seen if m not in METHODS]):
        colour = colours[i % len(colours)]
        line = sorted((r["target_sparsity"], r["perplexity"]) for r in results["runs"]
                      if r["method"] == method and r["pattern"] == "unstructured" and r["schedule"] == "uniform")
        if line:
            xs, ys = zip(*([(0.0, dense)] + line))
            ax.plot(xs, ys, marker="o", color=colour, label=method)
        owl = sorted((r["target_sparsity"], r["perplexity"]) for r in results["runs"]
                     if r["method"] == method and r["schedule"] != "uniform")
        if owl:  # the OWL schedule: a dashed line (or one star) in the method's colour
            xs, ys = zip(*owl)
            ax.plot(xs, ys, linestyle="--", marker="*", markersize=11, color=colour, label=f"{method} owl")
        for pattern in dict.fromkeys(r["pattern"] for r in results["runs"] if r["pattern"] != "unstructured"):
            points = [r for r in results["runs"] if r["method"] == method and r["pattern"] == pattern]
            if points:
                ax.scatter([r["target_sparsity"] for r in points], [r["perplexity"] for r in points], color=colour,
                           zorder=3, s=45, marker=markers.get(pattern, "^"), label=f"{method} {pattern}")
    ax.axhline(dense, color="grey", linestyle="--", linewidth=1, label=f"dense ({dense:.1f})")
    ax.set_yscale("log")
    ax.set_xlabel("sparsity of decoder linear weights")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(f"{Path(str(results['model'])).name}: perplexity against sparsity")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def default_output(model: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model.rstrip("/")).name or model).strip("-") or "model"
    base, n = Path("sweeps") / slug, 1
    candidate = base
    while candidate.exists() and any(candidate.iterdir()):
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def format_summary(results: dict) -> str:
    best = {}
    for r in results["runs"]:
        best.setdefault(r["method"], []).append(r)
    lines = [f"dense perplexity {results['dense']['perplexity']:.2f}"]
    for method, rows in best.items():
        lines.append(f"{method}: " + ", ".join(f"{r['label']} -> {r['perplexity']:.2f}"
                                               if math.isfinite(r["perplexity"]) else f"{r['label']} -> inf"
                                               for r in rows))
    return "\n".join(lines)
