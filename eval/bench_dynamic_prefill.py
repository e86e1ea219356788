"""Benchmark: does the dynamic wrapper slow prefill? SmolLM2-135M, one 512-token prompt, no cache.

A dynamic model (early exit and MLP skipping, calibrated on emma: --nsamples x --seqlen, target
--max-ppl-increase) is saved and loaded back with ``load_dynamic``; the static model is the same
folder loaded with plain ``from_pretrained``. Timings are paired and interleaved (static, dynamic,
static, dynamic, ...) in one process with --threads torch threads, so that load from other
processes on a shared machine hits both alike; the result is the median over --reps pairs of
static seconds / dynamic seconds (1.0 = no slowdown), with the fraction of tokens that exited and
of MLPs skipped during the dynamic prefill.

Usage: python eval/bench_dynamic_prefill.py. Writes eval/results/bench_dynamic_prefill.{json,md}.
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's llmprune, whichever the environment installed
AUSTEN = ROOT.parent / "shared" / "data" / "austen"
RESULTS = ROOT / "eval" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--max-ppl-increase", type=float, default=0.2)
    parser.add_argument("--output", default=str(RESULTS / "bench_dynamic_prefill"))
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmprune.dynamic import load_dynamic, make_dynamic, save_dynamic
    from llmprune.models.loading import builtin_model_folder

    torch.set_num_threads(args.threads)
    folder = builtin_model_folder("llama")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with gzip.open(AUSTEN / "emma.txt.gz", "rt", encoding="utf-8") as handle:
        ids = tokenizer(handle.read(400_000), return_tensors="pt").input_ids[0]
    with gzip.open(AUSTEN / "persuasion.txt.gz", "rt", encoding="utf-8") as handle:
        prompt = tokenizer(handle.read(20_000), return_tensors="pt").input_ids[:, :args.tokens]
    calibration = ids[:args.nsamples * args.seqlen].reshape(args.nsamples, args.seqlen)

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    _, report = make_dynamic(model, calibration, early_exit=True, token_skip=True,
                             max_ppl_increase=args.max_ppl_increase, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        save_dynamic(model, tmp)
        del model
        static = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        dynamic = load_dynamic(tmp, dtype=torch.float32).eval()

    def prefill(which) -> float:
        started = time.perf_counter()
        with torch.no_grad():
            which(input_ids=prompt, use_cache=False)
        return time.perf_counter() - started

    prefill(static), prefill(dynamic)  # warm-up
    dynamic.llmprune_dynamic.reset_stats()
    pairs = [(prefill(static), prefill(dynamic)) for _ in range(args.reps)]
    ratios = [s / d for s, d in pairs]
    summary = dynamic.llmprune_dynamic.summary()
    result = {
        "tokens": args.tokens, "threads": args.threads, "reps": args.reps,
        "static_seconds": [s for s, _ in pairs], "dynamic_seconds": [d for _, d in pairs],
        "speed_ratio_median": statistics.median(ratios), "speed_ratios": ratios,
        "avg_layers": summary["avg_layers"], "mlp_skip_fraction": summary["mlp_skip_fraction"],
        "exit_threshold": report.exit_threshold, "skip_threshold": report.skip_threshold,
        "calibration": {"nsamples": args.nsamples, "seqlen": args.seqlen, "max_ppl_increase": args.max_ppl_increase},
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor()},
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output + ".json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    lines = ["# Dynamic wrapper: prefill speed", "",
             f"SmolLM2-135M, one {args.tokens}-token prompt, no cache, {args.threads} threads; "
             f"{args.reps} interleaved pairs.", "",
             "| static s (median) | dynamic s (median) | static/dynamic speed (median of pairs) | avg layers "
             "| MLP skips |",
             "|---|---|---|---|---|",
             f"| {statistics.median(s for s, _ in pairs):.3f} | {statistics.median(d for _, d in pairs):.3f} | "
             f"{result['speed_ratio_median']:.3f} | {summary['avg_layers']:.2f} | "
             f"{summary['mlp_skip_fraction']:.3f} |", ""]
    Path(args.output + ".md").write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
