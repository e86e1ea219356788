"""Benchmark: per-layer prune time and peak memory of Wanda, SparseGPT and ADMM (ALPS) on one
Llama decoder layer of a given shape (default 7B: hidden 4096, FFN 11008, 32 heads), random
weights, extrapolated to a calibration of nsamples x seqlen tokens and to a whole model.

Each method runs on a one-layer model through llmprune.prune (the real runner: capture,
statistics pass, solve), on ``--measure-tokens`` calibration tokens. The solve (prune_group) is
timed on its own; what depends on the tokens (statistics pass, plus one forward of the layer for
the propagation pass a real model runs) is scaled to nsamples x seqlen:

    per layer = (prune - solve + forward) x tokens / measured tokens + solve

Methods run interleaved (wanda, sparsegpt, admm, wanda, ...) so that a busy machine slows them
alike; ratios to SparseGPT are reported per repeat. ``--scale`` shrinks hidden, FFN and heads
(e.g. 0.25 for a quick run); the solve grows with width³ (factorisations) or rows x width² per
iteration (ADMM), so a scaled run does not predict the full size: say which was measured.

``--admm-points A,R``: ADMM's solve at a large shape takes far longer than the others (each
iteration multiplies the [rows, in] weights by [in, in] matrices), so it is measured three times
with few iterations, (A ADMM iterations, no refit), (2A, none) and (A, R refit steps), and the solve
(A a multiple of 3: the penalty, and with it the inverse, changes every third iteration)
at the defaults (30 ADMM iterations, 20 refit steps) is extrapolated linearly: solve = fixed
(scaling, eigendecomposition) + ADMM iterations x their cost + refit steps x theirs. ADMM stops
early once its support settles, so this is an upper bound.

Usage: python eval/bench_layer_cost.py [--scale 1] [--measure-tokens 4096] [--repeats 2] [--admm-points 3,3]
                                      [--methods wanda,sparsegpt,admm] [--update]
Writes eval/results/bench_layer_cost[-scaleS].{json,md}; with --update, replaces only the rows of the
methods and repeats measured. Each row records the commit it was measured at.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "eval" / "results"


def one_layer_model(hidden: int, ffn: int, heads: int, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=1,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).float().eval()


def measure(method: str, hidden: int, ffn: int, heads: int, tokens: int, seqlen: int, options: dict) -> dict:
    """One method on a fresh one-layer model: prune seconds, solve seconds, forward seconds, peak RSS growth."""
    import psutil
    import torch

    import llmprune
    from llmprune.memory import PeakRSS, release_free_heap
    from llmprune.methods import METHODS

    model = one_layer_model(hidden, ffn, heads)
    calibration = torch.randint(0, 1024, (max(1, tokens // seqlen), seqlen), generator=torch.Generator().manual_seed(1))
    layer = model.model.layers[0]
    hidden_states = torch.randn(1, seqlen, hidden)
    position = torch.arange(seqlen).unsqueeze(0)
    with torch.no_grad():
        embeddings = model.model.rotary_emb(hidden_states, position)
        started = time.perf_counter()
        for _ in range(calibration.shape[0]):
            layer(hidden_states, position_embeddings=embeddings, attention_mask=None)
        forward = time.perf_counter() - started

    solve = []
    original = METHODS[method].prune_group

    def timed(self, *args, **kwargs):
        begun = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            solve.append(time.perf_counter() - begun)

    release_free_heap()
    before = psutil.Process().memory_info().rss
    METHODS[method].prune_group = timed
    try:
        with PeakRSS() as memory:
            report = llmprune.prune(model, calibration, method=method, sparsity=0.5, progress=False, **options)
    finally:
        METHODS[method].prune_group = original
    return {"method": method, "prune_s": report.seconds, "solve_s": sum(solve), "forward_s": forward,
            "measured_tokens": int(calibration.numel()), "peak_rss_growth_bytes": memory.peak - before,
            "layer_float32_bytes": sum(p.numel() for p in layer.parameters()) * 4}


def admm_from_points(hidden: int, ffn: int, heads: int, tokens: int, seqlen: int, points: tuple[int, int],
                     defaults: tuple[int, int] = (30, 20)) -> dict:
    """ADMM measured at (A, 0), (2A, 0) and (A, R) iterations; its solve extrapolated to ``defaults``."""
    a, r = points
    measure("admm", 64, 128, 1, seqlen, seqlen, {"admm_iterations": 1, "refit_iterations": 1})  # first-call costs
    runs = [measure("admm", hidden, ffn, heads, tokens, seqlen, {"admm_iterations": i, "refit_iterations": j})
            for i, j in ((a, 0), (2 * a, 0), (a, r))]
    per_admm = (runs[1]["solve_s"] - runs[0]["solve_s"]) / a
    per_refit = (runs[2]["solve_s"] - runs[0]["solve_s"]) / r
    fixed = runs[0]["solve_s"] - a * per_admm
    row = dict(runs[2])
    row.update(solve_s=fixed + defaults[0] * per_admm + defaults[1] * per_refit,
               peak_rss_growth_bytes=max(run["peak_rss_growth_bytes"] for run in runs),
               admm_points={"measured_solve_s": [run["solve_s"] for run in runs],
                            "iterations": [(a, 0), (2 * a, 0), (a, r)], "fixed_s": fixed,
                            "per_admm_iteration_s": per_admm, "per_refit_step_s": per_refit})
    row["prune_s"] = runs[2]["prune_s"] - runs[2]["solve_s"] + row["solve_s"]
    return row


def extrapolate(row: dict, tokens: int, layers: int) -> dict:
    scale = tokens / row["measured_tokens"]
    per_layer = (row["prune_s"] - row["solve_s"] + row["forward_s"]) * scale + row["solve_s"]
    return {**row, "per_layer_s": per_layer, "model_s": per_layer * layers,
            "activations_bytes": tokens * row["hidden"] * 4}


def markdown(rows: list[dict], settings: dict) -> str:
    lines = [f"Setup: one Llama decoder layer, hidden {settings['hidden']}, FFN {settings['ffn']}, "
             f"{settings['heads']} heads, random float32 weights, 50% unstructured; CPU, {settings['threads']} "
             f"threads; measured on {rows[0]['measured_tokens']} calibration tokens, extrapolated to "
             f"{settings['nsamples']} x {settings['seqlen']} tokens and {settings['layers']} layers "
             f"(see eval/bench_layer_cost.py). Repeats interleaved; ratios are to SparseGPT of the same repeat.",
             "",
             "| method | repeat | solve (s) | statistics + propagation, measured (s) | per layer, extrapolated (s) | "
             "x SparseGPT | whole model (h) | peak RSS growth / layer fp32 | commit |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        reference = next(x for x in rows if x["method"] == "sparsegpt" and x["repeat"] == r["repeat"])
        lines.append(f"| {r['method']} | {r['repeat']} | {r['solve_s']:.1f} | "
                     f"{r['prune_s'] - r['solve_s'] + r['forward_s']:.1f} | {r['per_layer_s']:.0f} | "
                     f"{r['per_layer_s'] / reference['per_layer_s']:.2f}x | {r['model_s'] / 3600:.2f} | "
                     f"{r['peak_rss_growth_bytes'] / r['layer_float32_bytes']:.2f}x | "
                     f"{r.get('commit', 'not recorded')} |")
    for r in rows:
        if "admm_points" in r:
            p = r["admm_points"]
            lines.append("")
            lines.append(f"ADMM (repeat {r['repeat']}): solve measured at (ADMM iterations, refit steps) = "
                         f"{', '.join(str(tuple(i)) for i in p['iterations'])}: "
                         f"{', '.join(f'{x:.1f}' for x in p['measured_solve_s'])} s; extrapolated to (30, 20) as "
                         f"{p['fixed_s']:.1f} s + 30 x {p['per_admm_iteration_s']:.1f} s + 20 x "
                         f"{p['per_refit_step_s']:.1f} s (an upper bound: ADMM stops once its support settles).")
    return "\n".join(lines) + "\n"


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="shrink hidden, FFN and heads by this factor")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--measure-tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--methods", default="wanda,sparsegpt,admm")
    parser.add_argument("--admm-iterations", type=int, default=None)
    parser.add_argument("--admm-points", default=None, metavar="A,R",
                        help="extrapolate ADMM's solve from runs of (A, 0), (2A, 0), (A, R) iterations")
    parser.add_argument("--update", action="store_true",
                        help="replace only the measured methods' rows of the same repeats in the existing results file")
    args = parser.parse_args()
    hidden, ffn = int(4096 * args.scale) // 64 * 64, int(11008 * args.scale) // 64 * 64
    heads = max(1, hidden // 128)
    settings = {"hidden": hidden, "ffn": ffn, "heads": heads, "nsamples": args.nsamples, "seqlen": args.seqlen,
                "layers": args.layers, "threads": torch.get_num_threads(), "scale": args.scale}
    options = {"admm": {} if args.admm_iterations is None else {"admm_iterations": args.admm_iterations}}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=RESULTS.parent, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    rows = []
    for repeat in range(args.repeats):
        for method in args.methods.split(","):
            if method == "admm" and args.admm_points:
                points = tuple(int(x) for x in args.admm_points.split(","))
                row = admm_from_points(hidden, ffn, heads, args.measure_tokens, args.seqlen, points)
            else:
                row = measure(method, hidden, ffn, heads, args.measure_tokens, args.seqlen, options.get(method, {}))
            row = extrapolate({**row, "repeat": repeat, "hidden": hidden, "commit": commit},
                              args.nsamples * args.seqlen, args.layers)
            rows.append(row)
            print(json.dumps(row), flush=True)
    name = "bench_layer_cost" + ("" if args.scale == 1 else f"-scale{args.scale:g}")
    if args.update:
        previous = json.loads((RESULTS / f"{name}.json").read_text())
        if {k: v for k, v in previous["settings"].items() if k != "threads"} != \
                {k: v for k, v in settings.items() if k != "threads"}:
            raise SystemExit(f"--update: {name}.json was measured with {previous['settings']}")
        measured = {(r["method"], r["repeat"]): r for r in rows}
        rows = [measured.pop((r["method"], r["repeat"]), r) for r in previous["rows"]] + list(measured.values())
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown(rows, settings))
    print(markdown(rows, settings))


if __name__ == "__main__":
    main()
