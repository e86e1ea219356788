"""Benchmark: structured pruning of SmolLM2-135M on Jane Austen (not a test).

Calibrate on emma + mansfieldpark (--nsamples x --seqlen, seed 0); evaluate on the first 32768
tokens of persuasion in 1024-token windows. Rows: heads only, FFN only, both, and whole layers, at
about 20% and 40% of decoder-layer parameters removed, for each score (layer removal has one score:
1 - cos between a layer's input and output). One calibration pass per score is shared by its rows
(the statistics of the dense model are the same for every row). Columns: perplexity, parameters,
safetensors file MB, prefill tokens/s (one 512-token prompt) and decode tokens/s (64 greedy tokens)
relative to the dense model measured in the same process and thread count, and pruning time.

SmolLM2 has 3 KV groups of 3 query heads: heads alone can remove at most 2 groups (16.7% of the
decoder parameters), so the heads rows remove 1 and 2 groups and say what that is.

Usage: python eval/bench_structured.py [--nsamples 32]. Writes eval/results/bench_structured.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AUSTEN = ROOT.parent / "shared" / "data" / "austen"
RESULTS = ROOT / "eval" / "results"

# name -> options; fractions chosen so that each row removes about 20% or 40% of the
# decoder-layer parameters of SmolLM2 (attention 0.88M, MLP 2.65M per layer).
ROWS = {
    "heads 1/3 groups": dict(heads=0.34),
    "heads 2/3 groups": dict(heads=0.67),
    "ffn 20%": dict(ffn=0.267),
    "ffn 40%": dict(ffn=0.533),
    "both 20%": dict(heads=0.34, ffn=0.156),
    "both 40%": dict(heads=0.34, ffn=0.422),
}
LAYER_ROWS = {"layers 6 (20%)": dict(layers=6), "layers 12 (40%)": dict(layers=12)}
GLOBAL_ROWS = {"both 20% global": dict(heads=0.34, ffn=0.156, allocation="global"),
               "both 40% global": dict(heads=0.34, ffn=0.422, allocation="global")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=32768)
    parser.add_argument("--eval-seqlen", type=int, default=1024)
    parser.add_argument("--scores", default="magnitude,wanda,flap")
    parser.add_argument("--output", default=str(RESULTS / "bench_structured"))
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmprune import data
    from llmprune.evaluate import measure_speed, perplexity
    from llmprune.models.loading import builtin_model_folder
    from llmprune.structured import collect_statistics, prune_structured

    folder = builtin_model_folder("llama")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    calibration = data.calibration_ids(tokenizer, [str(AUSTEN / "emma.txt.gz"), str(AUSTEN / "mansfieldpark.txt.gz")],
                                       args.nsamples, args.seqlen, seed=0)
    evaluation = data.evaluation_ids(tokenizer, [str(AUSTEN / "persuasion.txt.gz")], args.eval_tokens)
    dense = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    decoder_params = sum(p.numel() for p in dense.model.layers.parameters())

    def measure(model, name, options, score, seconds):
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            file_bytes = sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors"))
        row = {"row": name, "score": score, **options, "prune_s": seconds,
               "parameters": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
               "decoder_removed": 1 - sum(p.numel() for p in model.model.layers.parameters()) / decoder_params,
               "file_bytes": file_bytes,
               "perplexity": perplexity(model, evaluation, args.eval_seqlen, progress=False).perplexity,
               **measure_speed(model)}
        print(json.dumps(row), flush=True)
        return row

    results = [measure(dense, "dense", {}, "-", 0.0)]
    base = results[0]
    for score in args.scores.split(","):
        started = time.perf_counter()
        statistics = collect_statistics(dense, calibration, progress=False) if score != "magnitude" else None
        shared = time.perf_counter() - started
        for name, options in {**ROWS, **(GLOBAL_ROWS if score != "magnitude" else {})}.items():
            model = copy.deepcopy(dense)
            started = time.perf_counter()
            prune_structured(model, calibration, score=score, statistics=statistics, progress=False, **options)
            results.append(measure(model, name, options, score, shared + time.perf_counter() - started))
    statistics = collect_statistics(dense, calibration, progress=False)
    for name, options in LAYER_ROWS.items():
        model = copy.deepcopy(dense)
        started = time.perf_counter()
        prune_structured(model, calibration, statistics=statistics, progress=False, **options)
        results.append(measure(model, name, options, "1-cos", time.perf_counter() - started))

    lines = [f"Setup: SmolLM2-135M, float32, CPU, {base['threads']} threads; calibration {args.nsamples} x "
             f"{args.seqlen} tokens from emma + mansfieldpark (seed 0); perplexity on the first {args.eval_tokens} "
             f"tokens of persuasion, {args.eval_seqlen}-token windows; prefill: one 512-token prompt, decode: "
             f"64 greedy tokens, best of 3, relative to dense in the same process. GQA groups; uniform allocation "
             f"unless the row says global.",
             "", "| row | score | decoder params removed | perplexity | parameters | file MB | prefill x | "
             "decode x | prune s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['row']} | {r['score']} | {r['decoder_removed']:.1%} | {r['perplexity']:.2f} | "
                     f"{r['parameters'] / 1e6:.1f}M | {r['file_bytes'] / 1e6:.0f} | "
                     f"{r['prefill_tokens_per_s'] / base['prefill_tokens_per_s']:.2f} | "
                     f"{r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f} | {r['prune_s']:.1f} |")
    lines += ["", f"Dense: prefill {base['prefill_tokens_per_s']:.0f} tokens/s, decode "
                  f"{base['decode_tokens_per_s']:.1f} tokens/s."]
    RESULTS.mkdir(parents=True, exist_ok=True)
    Path(args.output + ".json").write_text(json.dumps({"settings": vars(args), "rows": results}, indent=2) + "\n")
    Path(args.output + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
