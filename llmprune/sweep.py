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

from . import __version__, data
from .api import check_device, check_pattern_fits, check_sparsity, prune
from .errors import UsageError
from .evaluate import perplexity, tokenizer_adds_bos
from .guard import check_output_folder, claim_output
from .methods import METHODS, parse_pattern
from .models.adapters import adapter_for
from .models.loading import load_model
from .jsonreport import report_json
from .schedules import check_owl_options, owl_outlier_ratios, parse_schedule


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


def run_sweep(model: str, runs: list[SweepRun], *, output: str | os.PathLike, calib_data=("default",),
              eval_data=("default",), nsamples: int = 32, seqlen: int = 512, seed: int = 0,
              eval_seqlen: int = 1024, eval_tokens: int = 16384, device: str = "auto", dtype: str = "auto",
              batch_size: int = 1, owl_m: float = 5.0, owl_lambda: float = 0.08, overwrite: bool = False,
              progress: bool = True, trust_remote_code: bool = False, note: str = "",
              method_options: dict | None = None) -> dict:
    """Run every SweepRun on ``model``; write sweep.json (after every run), sweep.md and sweep.png
    into ``output``. Returns the results dictionary. method_options: method name -> its options
    (e.g. {"sparsegpt": {"blocksize": 64}}), given to that method's runs."""
    started = time.perf_counter()
    if not runs:
        raise UsageError("the sweep has no runs")
    folder = check_output_folder(output, overwrite, marker="sweep.json", model=model)
    from .job import resolve_dtype

    compute = check_device(device)
    dtype = resolve_dtype(dtype, compute)
    if any(r.schedule == "owl" for r in runs):
        check_owl_options(owl_m, owl_lambda)
    data.check_sources(calib_data)
    data.check_sources(eval_data)

    claim_output(folder, overwrite)  # every check passed: lock the output for the whole sweep
    t = time.perf_counter()
    lm, tokenizer = load_model(model, dtype=dtype, trust_remote_code=trust_remote_code)
    adapter = adapter_for(lm)
    for pattern in {r.pattern for r in runs if r.pattern != "unstructured"}:
        check_pattern_fits(lm, parse_pattern(pattern))
    load_s = time.perf_counter() - t
    # The dense decoder weights, restored before every run: [out, in] per linear projection.
    dense = {f"{i}.{name}": linear.weight.detach().clone()
             for i, layer in enumerate(adapter.layers(lm))
             for group in adapter.linear_groups(layer) for name, linear in group}

    def restore() -> None:
        with torch.no_grad():
            for i, layer in enumerate(adapter.layers(lm)):
                for group in adapter.linear_groups(layer):
                    for name, linear in group:
                        linear.weight.copy_(dense[f"{i}.{name}"])

    t = time.perf_counter()
    needs_calibration = any(METHODS[r.method].needs_calibration or r.schedule == "owl" for r in runs)
    calibration = data.calibration_ids(tokenizer, calib_data, nsamples, seqlen, seed) if needs_calibration else None
    evaluation = data.evaluation_ids(tokenizer, eval_data, eval_tokens or None, eval_seqlen)
    data_s = time.perf_counter() - t
    bos = tokenizer.bos_token_id if tokenizer_adds_bos(tokenizer) else None

    def measure() -> dict:
        lm.to(compute)
        try:
            return perplexity(lm, evaluation, eval_seqlen, bos, compute, progress).as_dict()
        finally:
            lm.to("cpu")

    results = {
        "llmprune_version": __version__, "model": model, "device": str(compute), "dtype": dtype,
        "threads": torch.get_num_threads(), "calib_data": list(calib_data) if needs_calibration else None,
        "eval_data": list(eval_data), "nsamples": nsamples if needs_calibration else 0,
        "seqlen": seqlen if needs_calibration else 0, "seed": seed, "eval_seqlen": eval_seqlen,
        "eval_tokens": eval_tokens, "note": note,
        "reused": "model load, tokenised calibration and evaluation data, dense perplexity, OWL outlier ratios",
        "timings": {"load_s": load_s, "data_s": data_s}, "dense": None, "owl": None, "runs": [],
    }

    def save_json() -> None:
        folder.mkdir(parents=True, exist_ok=True)  # only once there is something to write
        _write_atomic(folder / "sweep.json",
                      lambda p: p.write_text(report_json(results, indent=2) + "\n", encoding="utf-8"))

    t = time.perf_counter()
    results["dense"] = measure()
    results["timings"]["dense_eval_s"] = time.perf_counter() - t
    ratios = None
    if any(r.schedule == "owl" for r in runs):
        t = time.perf_counter()
        ratios = owl_outlier_ratios(lm, calibration, compute, owl_m, batch_size, progress)
        results["owl"] = {"owl_m": owl_m, "owl_lambda": owl_lambda, "outlier_ratios": ratios,
                          "seconds": time.perf_counter() - t}
    save_json()
    for index, run in enumerate(runs):
        if progress:
            print(f"sweep {index + 1}/{len(runs)}: {run.method} {run.label}", flush=True)
        restore()
        options = dict((method_options or {}).get(run.method) or {})
        report = prune(lm, calibration if METHODS[run.method].needs_calibration or run.schedule == "owl" else None,
                       method=run.method, sparsity=None if run.pattern != "unstructured" else run.sparsity,
                       pattern=None if run.pattern == "unstructured" else run.pattern, device=compute,
                       batch_size=batch_size, progress=progress, schedule=run.schedule, owl_m=owl_m,
                       owl_lambda=owl_lambda, outlier_ratios=ratios, **options)
        t = time.perf_counter()
        ppl = measure()
        results["runs"].append({
            "method": run.method, "pattern": run.pattern, "schedule": run.schedule, "label": run.label,
            "target_sparsity": run.sparsity, "realised_sparsity": report.overall_sparsity,
            "per_layer_sparsity": report.per_layer_sparsity, "schedule_per_layer": report.schedule["per_layer"],
            "perplexity": ppl["perplexity"], "prune_s": report.seconds, "eval_s": time.perf_counter() - t})
        save_json()
    restore()
    results["timings"]["total_s"] = time.perf_counter() - started
    save_json()
    _write_atomic(folder / "sweep.md", lambda p: p.write_text(markdown_table(results), encoding="utf-8"))
    _write_atomic(folder / "sweep.png", lambda p: plot(results, p))
    return results


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
