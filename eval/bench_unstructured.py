"""Benchmark: unstructured and N:M pruning of SmolLM2-135M on Jane Austen (not a test).

Setup (issue 2): calibrate on emma + mansfieldpark (64 windows x 512 tokens, seed 0), evaluate on
the first 32768 tokens of persuasion in 1024-token windows. One row per method and pattern, each
in a fresh process so memory is measured cleanly:

- perplexity, realised sparsity;
- prune time, and prune time / the time of one plain forward pass of the whole model over the
  same calibration tokens (measured in the same process, just before pruning);
- peak RSS while pruning minus RSS right after the model is loaded (weights paged in), / float32
  model bytes.

Usage: python eval/bench_unstructured.py [--rows wanda:unstructured,...] [--nsamples 64] [--update]
A row is method:pattern, optionally followed by @option=value (sparsity, update, sequential, a
method's own options), e.g. admm:unstructured@sparsity=0.7 or wanda:unstructured@update=admm.
Writes eval/results/bench_unstructured.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AUSTEN = ROOT.parent / "shared" / "data" / "austen"
RESULTS = ROOT / "eval" / "results"
ROWS = ["dense", "magnitude:unstructured", "wanda:unstructured", "sparsegpt:unstructured",
        "magnitude:2:4", "wanda:2:4", "sparsegpt:2:4", "magnitude:4:8", "wanda:4:8", "sparsegpt:4:8",
        "admm:unstructured", "admm:2:4", "sparsegpt:unstructured@sparsity=0.7", "admm:unstructured@sparsity=0.7",
        "wanda:unstructured@update=admm", "wanda:2:4@update=admm", "wanda:unstructured@sequential=true",
        "sparsegpt:unstructured@sequential=true", "sparsegpt:2:4@sequential=true"]


def measure_row(row: str, nsamples: int, seqlen: int, eval_tokens: int, eval_seqlen: int) -> dict:
    """Runs inside a fresh process: load, time a forward pass, prune, evaluate."""
    import psutil
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import llmprune
    from llmprune import data
    from llmprune.evaluate import perplexity
    from llmprune.memory import PeakRSS
    from llmprune.models.loading import builtin_model_folder

    folder = builtin_model_folder("llama")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    calibration = data.calibration_ids(tokenizer, [str(AUSTEN / "emma.txt.gz"), str(AUSTEN / "mansfieldpark.txt.gz")],
                                       nsamples, seqlen, seed=0)
    evaluation = data.evaluation_ids(tokenizer, [str(AUSTEN / "persuasion.txt.gz")], eval_tokens)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    # safetensors weights are memory-mapped and paged in lazily: touch them all, so that "RSS after
    # loading" includes the whole model and the growth measured below is pruning's own memory.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.sum()
    rss_loaded = psutil.Process().memory_info().rss
    model_bytes = sum(p.numel() * 4 for p in {id(p): p for p in model.parameters()}.values())
    result = {"row": row, "threads": torch.get_num_threads(), "model_float32_bytes": model_bytes}

    if row != "dense":
        row_name, *extras = row.split("@")  # e.g. admm:unstructured@sparsity=0.7, wanda:2:4@update=admm
        method, pattern = row_name.split(":", 1)
        options = {k: _value(v) for k, v in (extra.split("=", 1) for extra in extras)}
        sparsity = options.pop("sparsity", 0.5 if pattern == "unstructured" else None)
        started = time.perf_counter()
        with torch.no_grad():
            for sample in calibration:
                model(sample.unsqueeze(0), use_cache=False)
        forward = time.perf_counter() - started
        with PeakRSS() as memory:
            report = llmprune.prune(model, calibration, method=method, pattern=pattern, sparsity=sparsity,
                                    progress=False, **options)
        result.update(method=method, pattern=pattern, options=options, realised_sparsity=report.overall_sparsity,
                      prune_s=report.seconds, forward_s=forward, prune_over_forward=report.seconds / forward,
                      rss_loaded=rss_loaded, rss_peak_prune=memory.peak,
                      rss_growth_over_model=(memory.peak - rss_loaded) / model_bytes)
    else:
        result.update(method="dense", pattern="-", realised_sparsity=0.0)
    ppl = perplexity(model, evaluation, eval_seqlen, progress=False)
    result.update(perplexity=ppl.perplexity, protocol=ppl.protocol)
    return result


def _value(text: str):
    """A row option's value: true/false, a number, or the text."""
    if text in ("true", "false"):
        return text == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def markdown(results: list[dict], settings: dict) -> str:
    lines = [f"Setup: SmolLM2-135M (float32, CPU, {results[0]['threads']} threads); calibration "
             f"{settings['nsamples']} x {settings['seqlen']} tokens from emma + mansfieldpark (seed 0); "
             f"perplexity on the first {settings['eval_tokens']} tokens of persuasion, "
             f"{settings['eval_seqlen']}-token windows ({results[0]['protocol']}).", "",
             "| method | pattern | perplexity | realised sparsity | prune time (s) | prune / forward | "
             "peak RSS growth / fp32 model |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        if r["method"] == "dense":
            lines.append(f"| dense | - | {r['perplexity']:.2f} | 0 | - | - | - |")
        else:
            extras = "".join(f", {k} {v}" for k, v in r.get("options", {}).items())
            if r["threads"] != results[0]["threads"]:  # timings of this row are not comparable
                extras += f" ({r['threads']} thread{'s' if r['threads'] > 1 else ''})"
            lines.append(f"| {r['method']}{extras} | {r['pattern']} | {r['perplexity']:.2f} | "
                         f"{r['realised_sparsity']:.4f} | {r['prune_s']:.1f} | {r['prune_over_forward']:.2f}x | "
                         f"{r['rss_growth_over_model']:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=32768)
    parser.add_argument("--eval-seqlen", type=int, default=1024)
    parser.add_argument("--update", action="store_true",
                        help="replace only the measured rows in an existing results file (same settings)")
    parser.add_argument("--one-row", help=argparse.SUPPRESS)  # internal: measure in this process
    parser.add_argument("--output", default=str(RESULTS / "bench_unstructured"))
    args = parser.parse_args()
    settings = {k: getattr(args, k) for k in ("nsamples", "seqlen", "eval_tokens", "eval_seqlen")}
    if args.one_row:
        print(json.dumps(measure_row(args.one_row, **settings)))
        return
    results = []
    for row in args.rows.split(","):
        done = subprocess.run([sys.executable, __file__, "--one-row", row, *sum(
            ([f"--{k.replace('_', '-')}", str(v)] for k, v in settings.items()), [])],
            capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        if done.returncode:
            sys.exit(f"row {row} failed:\n{done.stderr[-3000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    if args.update:
        previous = json.loads(Path(args.output + ".json").read_text())
        if previous["settings"] != settings:
            sys.exit(f"--update: {args.output}.json was measured with {previous['settings']}")
        measured = {r["row"]: r for r in results}
        results = [measured.pop(r["row"], r) for r in previous["rows"]] + list(measured.values())
    RESULTS.mkdir(parents=True, exist_ok=True)
    Path(args.output + ".json").write_text(json.dumps({"settings": settings, "rows": results}, indent=2) + "\n")
    Path(args.output + ".md").write_text(markdown(results, settings))
    print(markdown(results, settings))


if __name__ == "__main__":
    main()
