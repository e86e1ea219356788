"""Benchmark: the sweep on SmolLM2-135M with Jane Austen (not a test).

Calibrate on emma + mansfieldpark, evaluate on persuasion. magnitude / wanda / sparsegpt / admm at
sparsities 0.1 ... 0.8 (uniform schedule), the 2:4 and 4:8 patterns, and the OWL schedule against
the uniform one at 70% for wanda and sparsegpt. Modest settings because the machine is a shared
2-core CPU: 32 x 512 calibration tokens and the first 16384 evaluation tokens (1024-token windows)
by default; the OWL paper used 128 x 2048 tokens of C4 and evaluated on all of WikiText-2.

Usage: flock /tmp/llmprune-bench.lock python eval/bench_sweep.py [--nsamples 32] [--eval-tokens 16384]
       python eval/bench_sweep.py --from-json eval/results/bench_sweep.json   (redraw table and plot)
Writes eval/results/bench_sweep.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
AUSTEN = ROOT.parent / "shared" / "data" / "austen"
RESULTS = ROOT / "eval" / "results"
NOTE = ("Measured on a shared 2-core CPU (other sessions were running); perplexities do not depend on "
        "that. Modest settings: calibration {nsamples} x {seqlen} tokens, {eval_tokens} evaluation tokens. "
        "Command: `flock /tmp/llmprune-bench.lock python eval/bench_sweep.py`.")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default="magnitude,wanda,sparsegpt,admm",
                        help="comma-separated methods of the grid (default: magnitude,wanda,sparsegpt,admm)")
    parser.add_argument("--from-json", default=None, help="only redraw the table and the plot from this JSON")
    parser.add_argument("--resume", default=None, metavar="JSON",
                        help="a partial results file of the same settings: run only what it lacks, coarse grid first")
    args = parser.parse_args()

    from llmprune.sweep import SweepRun, markdown_table, plan_runs, plot, run_sweep

    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
    else:
        import torch

        torch.set_num_threads(args.threads)
        # The OWL comparison first (the point of the benchmark), then the rest of the grid.
        first = [SweepRun("wanda", 0.7), SweepRun("wanda", 0.7, schedule="owl"),
                 SweepRun("sparsegpt", 0.7), SweepRun("sparsegpt", 0.7, schedule="owl")]
        methods = args.methods.split(",")
        grid = plan_runs(methods, [round(0.1 * k, 1) for k in range(1, 9)],
                         ["2:4", "4:8"], ["uniform"])
        first = [r for r in first if r.method in methods]
        runs = first + [r for r in grid if r not in first]
        previous = json.loads(Path(args.resume).read_text()) if args.resume else None
        if previous:  # skip what was measured; then a coarse pass over every method and pattern first
            done = {(r["method"], r["pattern"], r["schedule"], round(r["target_sparsity"], 6))
                    for r in previous["runs"]}
            runs = [r for r in runs if (r.method, r.pattern, r.schedule, round(r.sparsity, 6)) not in done]
            priority = ["0.50", "2:4", "0.70", "4:8", "0.80", "0.60", "0.40", "0.20", "0.30", "0.10"]
            runs.sort(key=lambda r: (priority.index(r.label) if r.label in priority else 99,
                                     methods.index(r.method)))
        work = Path(tempfile.mkdtemp(prefix="bench_sweep-"))
        try:
            results = run_sweep(
                "llama", runs, output=work / "out",
                calib_data=[str(AUSTEN / "emma.txt.gz"), str(AUSTEN / "mansfieldpark.txt.gz")],
                eval_data=[str(AUSTEN / "persuasion.txt.gz")], nsamples=args.nsamples, seqlen=args.seqlen,
                eval_tokens=args.eval_tokens, eval_seqlen=1024, device="cpu", no_progress=True,
                note=NOTE.format(nsamples=args.nsamples, seqlen=args.seqlen, eval_tokens=args.eval_tokens))
        finally:
            partial = work / "out" / "sweep.json"
            if partial.exists():
                if previous:  # one results file: the earlier runs, then these
                    merged = json.loads(partial.read_text())
                    merged["runs"] = previous["runs"] + merged["runs"]
                    merged["owl"] = previous.get("owl") or merged.get("owl")
                    merged["timings"]["total_s"] = (previous["timings"].get("total_s") or 0) + \
                        merged["timings"].get("total_s", 0)
                    merged["timings"]["resumed"] = True
                    partial.write_text(json.dumps(merged, indent=2) + "\n")
                shutil.copyfile(partial, RESULTS / "bench_sweep.json")
                results = json.loads(partial.read_text())
            shutil.rmtree(work, ignore_errors=True)
    results["model"] = "SmolLM2-135M (built-in llama)" if results["model"] == "llama" else results["model"]
    (RESULTS / "bench_sweep.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown_table(results)
    owl = [r for r in results["runs"] if r["schedule"] == "owl"]
    lines = []
    for r in owl:
        uniform = next((u for u in results["runs"] if u["method"] == r["method"] and u["schedule"] == "uniform"
                        and u["pattern"] == "unstructured" and u["target_sparsity"] == r["target_sparsity"]), None)
        if uniform:
            verdict = "OWL better" if r["perplexity"] < uniform["perplexity"] else "uniform better"
            lines.append(f"| {r['method']} | {r['target_sparsity']:.2f} | {uniform['perplexity']:.2f} | "
                         f"{r['perplexity']:.2f} | {verdict} |")
    if lines:
        table += ("\nOWL against uniform (same target, same calibration):\n\n| method | sparsity | uniform | owl | |\n"
                  "|---|---:|---:|---:|---|\n" + "\n".join(lines) + "\n")
    if results.get("owl"):
        ratios = results["owl"]["outlier_ratios"]
        table += (f"\nOWL outlier ratios per layer (share of Wanda scores above {results['owl']['owl_m']:g} x the "
                  f"layer mean, layers 0..{len(ratios) - 1}): " + ", ".join(f"{100 * x:.2f}%" for x in ratios) + "\n")
        sched = next((r["schedule_per_layer"] for r in owl), None)
        if sched:
            table += "OWL per-layer sparsity at 0.70: " + ", ".join(f"{x:.3f}" for x in sched) + "\n"
    work_s = sum(r["prune_s"] + r["eval_s"] for r in results["runs"]) + (results["owl"] or {}).get("seconds", 0)
    table += (f"\n{len(results['runs'])} runs; pruning + evaluation time {work_s / 60:.0f} min on the shared CPU"
              + (" (several processes, each resuming the results of the one before)"
                 if results["timings"].get("resumed") else "") + ".\n")
    (RESULTS / "bench_sweep.md").write_text(table)
    plot(results, RESULTS / "bench_sweep.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
