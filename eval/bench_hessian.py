"""Benchmark: accumulating XᵀX for SparseGPT and ADMM, the full float32 product against
``InputHessian``'s strips on and below the diagonal (not a test).

For each input width (SmolLM2: 576 and 1536; the 7B shape: 4096 and 11008), random float32 inputs
of ``--tokens`` tokens per batch are summed into a float64 [in, in] accumulator, ``--batches``
times, both ways; reported: milliseconds per batch, the ratio, and whether the two Hessians are
equal bit for bit (they are built from the same dot products over the same tokens).

Usage: python eval/bench_hessian.py [--widths 576,1536,4096,11008] [--tokens 512,512,2048,2048] [--batches 5]
Writes eval/results/bench_hessian.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "eval" / "results"


def full_product(accumulator, x) -> None:
    accumulator.add_(x.t() @ x)  # what InputHessian.add_batch did before the strips


def measure(width: int, tokens: int, batches: int) -> dict:
    import torch

    from llmprune.methods.sparsegpt import InputHessian

    generator = torch.Generator().manual_seed(width)
    inputs = [torch.randn(tokens, width, generator=generator) for _ in range(batches + 1)]
    stats = InputHessian(width, torch.device("cpu"))
    full = torch.zeros(width, width, dtype=torch.float64)
    stats.add_batch(inputs[0])  # first-call costs outside the timing
    full_product(full, inputs[0])
    seconds = {"full": 0.0, "strips": 0.0}
    for x in inputs[1:]:  # interleaved, so that a busy machine slows both alike
        started = time.perf_counter()
        full_product(full, x)
        seconds["full"] += time.perf_counter() - started
        started = time.perf_counter()
        stats.add_batch(x)
        seconds["strips"] += time.perf_counter() - started
    same = torch.equal(stats.hessian(), full * (2.0 / stats.tokens))
    return {"width": width, "tokens": tokens, "batches": batches, "threads": torch.get_num_threads(),
            "full_ms": 1000 * seconds["full"] / batches, "strips_ms": 1000 * seconds["strips"] / batches,
            "ratio": seconds["strips"] / seconds["full"], "bitwise_equal": same}


def markdown(rows: list[dict]) -> str:
    lines = [f"XᵀX accumulated into a float64 [in, in] sum, random float32 inputs, CPU, {rows[0]['threads']} threads; "
             "milliseconds per batch (mean over the batches, the two ways interleaved).", "",
             "| input width | tokens per batch | full product (ms) | strips (ms) | strips / full | same bits |",
             "|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['width']} | {r['tokens']} | {r['full_ms']:.1f} | {r['strips_ms']:.1f} | "
                     f"{r['ratio']:.2f}x | {'yes' if r['bitwise_equal'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="576,1536,4096,11008")
    parser.add_argument("--tokens", default="512,512,2048,2048", help="tokens per batch, one per width")
    parser.add_argument("--batches", type=int, default=5)
    args = parser.parse_args()
    widths, tokens = [int(w) for w in args.widths.split(",")], [int(t) for t in args.tokens.split(",")]
    if len(widths) != len(tokens):
        raise SystemExit("--widths and --tokens need one value each per width")
    rows = []
    for width, count in zip(widths, tokens):
        rows.append(measure(width, count, args.batches))
        print(json.dumps(rows[-1]), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_hessian.json").write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    (RESULTS / "bench_hessian.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
