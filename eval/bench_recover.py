"""Benchmark: recovery by distillation of pruned SmolLM2-135M on Jane Austen (not a test).

Each row prunes the built-in SmolLM2 (llmprune's loader, float32, CPU) calibrated on emma +
mansfieldpark (--nsamples x 512 tokens, seed 0), measures it, distils it from the dense model with
the code of the recover stage (llmprune.recover: masked LoRA or masked full fine-tuning, KL at
temperature 1) on the Austen novels other than persuasion, and measures it again. Perplexity: the
first --eval-tokens tokens of persuasion in 1024-token windows (the curve: its first
--curve-tokens). Columns: perplexity dense / before / after, the share of the gap to dense closed
((before - after) / (before - dense)), realised sparsity of the decoder linear weights before and
after (and whether every zero is at the same position), training tokens, wall time, tokens/s.

Rows run one after another in one process (--rows picks some); each row's result is written to
eval/results/bench_recover_rows/<row>@<tokens>.json as soon as it is done, so several processes can
share the rows, and one row at several token counts keeps each. ``--collect`` writes
eval/results/bench_recover.{json,md} and the FLAP 20% curves (bench_recover.png) from the rows present.

Usage: python eval/bench_recover.py --rows flap20-lora,wanda50-lora [--tokens 100000] [--threads 2]
       python eval/bench_recover.py --collect
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AUSTEN = ROOT.parent / "shared" / "data" / "austen"
RESULTS = ROOT / "eval" / "results"
ROWS_DIR = RESULTS / "bench_recover_rows"
CALIBRATION = ["emma", "mansfieldpark"]
EVALUATION = "persuasion"

# row -> (label, pruning, recovery mode)
ROWS = {
    "flap20-lora": ("FLAP heads+FFN 20%", dict(structured=dict(heads=0.34, ffn=0.156, score="flap")), "lora"),
    "flap20-full": ("FLAP heads+FFN 20%", dict(structured=dict(heads=0.34, ffn=0.156, score="flap")), "full"),
    "wanda50-lora": ("Wanda 50%", dict(method="wanda", sparsity=0.5), "lora"),
    "wanda50-full": ("Wanda 50%", dict(method="wanda", sparsity=0.5), "full"),
    "sparsegpt24-lora": ("SparseGPT 2:4", dict(method="sparsegpt", pattern="2:4"), "lora"),
    "flap40-lora": ("FLAP heads+FFN 40%", dict(structured=dict(heads=0.34, ffn=0.422, score="flap")), "lora"),
    "layers6-lora": ("6 layers removed", dict(structured=dict(layers=6)), "lora"),
}


def prune(model, calibration, how: dict) -> None:
    from llmprune.api import prune as prune_unstructured
    from llmprune.methods import parse_pattern
    from llmprune.structured import prune_structured

    if "structured" in how:
        prune_structured(model, calibration, **how["structured"], progress=False)
    else:
        nm = parse_pattern(how.get("pattern", "unstructured"))
        prune_unstructured(model, calibration, method=how["method"], sparsity=how.get("sparsity", nm and nm.sparsity),
                           pattern=nm, progress=False)


def run_row(key: str, args, shared: dict) -> dict:
    import torch

    from llmprune.evaluate import perplexity
    from llmprune.recover import Settings, Work, decoder_zeros, train, training_windows

    label, how, mode = ROWS[key]
    dense, tokenizer = shared["dense"], shared["tokenizer"]
    student = copy.deepcopy(dense)
    started = time.perf_counter()
    prune(student, shared["calibration"], how)
    prune_s = time.perf_counter() - started
    evaluation = shared["evaluation"]
    before = perplexity(student, evaluation, 1024, progress=False).perplexity
    zeros_before = decoder_zeros(student)
    positions = [(p == 0) for p in student.model.layers.parameters() if p.dim() == 2]
    settings = Settings(mode=mode, tokens=args.tokens, seqlen=args.seqlen, batch=args.batch, seed=0,
                        lr=args.lr_lora if mode == "lora" else args.lr_full, warmup=0.1, rank=args.rank,
                        alpha=2.0 * args.rank, curve_every=args.curve_every)
    windows = training_windows(tokenizer, shared["train_sources"], settings.tokens, settings.seqlen, settings.seed,
                               settings.batch)
    work = Work(student, dense, windows, evaluation[:args.curve_tokens], 1024, None, torch.device("cpu"),
                progress=True)
    t = time.perf_counter()
    merged, report = train(work, settings)
    wall = time.perf_counter() - t
    after = perplexity(merged, evaluation, 1024, progress=False).perplexity
    zeros_after = decoder_zeros(merged)
    same = all(torch.equal(a, p == 0) for a, p in zip(positions, [p for p in merged.model.layers.parameters()
                                                                  if p.dim() == 2]))
    dense_ppl = shared["dense_perplexity"]
    return {"row": key, "label": label, "pruning": how, "mode": mode, "dense": dense_ppl, "before": before,
            "after": after, "gap_closed": (before - after) / (before - dense_ppl),
            "sparsity_before": zeros_before["sparsity"], "sparsity_after": zeros_after["sparsity"],
            "zeros_before": zeros_before["zeros"], "zeros_after": zeros_after["zeros"], "zeros_same_positions": same,
            "tokens": report["tokens"], "steps": report["steps"], "train_wall_s": wall,
            "train_tokens_per_s": report["tokens_per_s"], "prune_s": prune_s,
            "trainable_parameters": report["trainable_parameters"], "settings": settings.as_dict(),
            "curve": report["curve"], "teacher_curve_perplexity": report["teacher_perplexity"],
            "threads": torch.get_num_threads(), "eval_tokens": int(evaluation.numel()),
            "curve_tokens": args.curve_tokens}


def collect() -> None:
    rows = [json.loads(p.read_text()) for p in sorted(ROWS_DIR.glob("*.json"))]
    order = list(ROWS)
    rows.sort(key=lambda r: (order.index(r["row"]), r["tokens"]))
    (RESULTS / "bench_recover.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["# Recovery by distillation: SmolLM2-135M on Jane Austen (CPU)", "",
             "Written by `eval/bench_recover.py`. Teacher: the dense model. Training text: the Austen novels other "
             "than persuasion; perplexity: the first tokens of persuasion in 1024-token windows (see `eval_tokens`).",
             "", "| row | recovery | tokens | ppl dense | ppl before | ppl after | gap closed | sparsity before | "
             "sparsity after | zeros at same positions | wall s | tokens/s | threads |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['mode']} (lr {r['settings']['lr']:g}) | {r['tokens']:,} | "
                     f"{r['dense']:.2f} | "
                     f"{r['before']:.2f} | {r['after']:.2f} | {r['gap_closed']:.1%} | {r['sparsity_before']:.6f} | "
                     f"{r['sparsity_after']:.6f} | {r['zeros_same_positions']} | {r['train_wall_s']:.0f} | "
                     f"{r['train_tokens_per_s']:.1f} | {r['threads']} |")
    if rows:
        r = rows[0]
        lines += ["", f"Perplexity on {r['eval_tokens']:,} tokens of persuasion; the curve on its first "
                  f"{r['curve_tokens']:,}. Settings of each row are in bench_recover.json. "
                  "Realised sparsity: exact zeros "
                  "among the decoder linear weights (a structured student keeps the de-quantised model's own "
                  "zeros). Measured with the threads of the last column per process, two processes side by side "
                  "on a shared 2-core machine: tokens/s are what that machine gave, not what SmolLM2 needs."]
    (RESULTS / "bench_recover.md").write_text("\n".join(lines) + "\n")
    flap = [r for r in rows if r["row"].startswith("flap20")]
    if flap:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(figsize=(6, 4))
        for r in flap:
            axes.plot([p["tokens"] for p in r["curve"]], [p["perplexity"] for p in r["curve"]], marker="o",
                      label=f"FLAP 20%, {r['mode']}, {r['tokens']:,} tokens")
        axes.axhline(flap[0]["teacher_curve_perplexity"], color="grey", linestyle="--", label="dense")
        axes.set_xlabel("training tokens")
        axes.set_ylabel(f"perplexity (persuasion, first {flap[0]['curve_tokens']:,} tokens)")
        axes.set_title("SmolLM2-135M, FLAP heads+FFN 20%: recovery by distillation", fontsize=9)
        axes.grid(alpha=0.3)
        axes.legend()
        figure.tight_layout()
        figure.savefig(RESULTS / "bench_recover.png", dpi=120)
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="flap20-lora,wanda50-lora")
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr-lora", type=float, default=5e-4)
    parser.add_argument("--lr-full", type=float, default=5e-5)
    parser.add_argument("--curve-every", type=int, default=0)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--eval-tokens", type=int, default=32768)
    parser.add_argument("--curve-tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--collect", action="store_true")
    args = parser.parse_args()
    if args.collect:
        return collect()

    import torch

    torch.set_num_threads(args.threads)
    from llmprune import data
    from llmprune.evaluate import perplexity
    from llmprune.models.loading import load_model

    dense, tokenizer = load_model("llama", dtype="float32")
    novels = sorted(p for p in AUSTEN.glob("*.txt.gz") if not p.name.startswith(EVALUATION))
    shared = {"dense": dense, "tokenizer": tokenizer, "train_sources": [str(p) for p in novels],
              "calibration": data.calibration_ids(tokenizer, [str(AUSTEN / f"{n}.txt.gz") for n in CALIBRATION],
                                                  args.nsamples, 512, seed=0),
              "evaluation": data.evaluation_ids(tokenizer, [str(AUSTEN / f"{EVALUATION}.txt.gz")], args.eval_tokens)}
    shared["dense_perplexity"] = perplexity(dense, shared["evaluation"], 1024, progress=False).perplexity
    print(f"dense perplexity {shared['dense_perplexity']:.3f}; training text {[p.name for p in novels]}", flush=True)
    ROWS_DIR.mkdir(parents=True, exist_ok=True)
    for key in args.rows.split(","):
        row = run_row(key, args, shared)
        (ROWS_DIR / f"{key}@{args.tokens}.json").write_text(json.dumps(row, indent=2) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k not in ("curve", "settings")}), flush=True)


if __name__ == "__main__":
    main()
