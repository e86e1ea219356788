"""Benchmark: dynamic inference on SmolLM2-135M with Jane Austen (not a test).

Calibrate on emma + mansfieldpark (--nsamples x --seqlen, seed 0): one fit (exit maps, probes,
MLP routers) is shared by all rows; each row only chooses its thresholds for its target on the
held-out calibration windows. Evaluate on the first --eval-tokens tokens of persuasion in
--eval-seqlen windows: teacher-forced perplexity, top-1 agreement with the full model, average
decoder layers run per token (teacher-forced). Decode: batch 1, --new-tokens greedy tokens after a
64-token persuasion prompt, through ``generate``, best of --repeats after a warm-up, relative to the
static full model measured alternately with it in the same process and thread count (--threads,
default 1); the dynamic model's average layers per decoding step are counted during that decode.

Rows: the full model; early exit with fitted maps for several --max-ppl-increase targets and one
--min-agreement target; early exit without maps (exit through the final norm and LM head directly);
MLP skipping; both; lossless self-speculative decoding as calibrated (drafting on only where
predicted faster) and with drafting forced on at the calibrated draft exit (acceptance and speed).
Also the curve behind it: every token exiting at one fixed exit layer (teacher-forced, holdout
windows), with and without the map.

Usage: flock /tmp/llmprune-bench.lock python eval/bench_dynamic.py. Writes eval/results/bench_dynamic.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's llmprune, whichever the environment installed
AUSTEN = ROOT.parent / "shared" / "data" / "austen"
RESULTS = ROOT / "eval" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--holdout", type=int, default=4, help="calibration windows thresholds are chosen on")
    parser.add_argument("--probe-windows", type=int, default=8)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--eval-seqlen", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--targets", default="0.05,0.2,1.0")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on this shared 2-core machine, 2 threads next to another "
                             "busy process made a SmolLM2 decode step 20x slower, 1 thread did not)")
    parser.add_argument("--output", default=str(RESULTS / "bench_dynamic"))
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    import transformers

    from llmprune import data
    from llmprune.dynamic import _fit as fitting
    from llmprune.dynamic import attach, calibrate, default_exit_layers, detach, fit_dynamic
    from llmprune.evaluate import tokenizer_adds_bos
    from llmprune.models.loading import load_model

    started = time.perf_counter()
    model, tokenizer = load_model("llama", dtype="float32")
    num_layers = model.config.num_hidden_layers
    calibration = data.calibration_ids(tokenizer, [str(AUSTEN / "emma.txt.gz"), str(AUSTEN / "mansfieldpark.txt.gz")],
                                       args.nsamples, args.seqlen, 0)
    evaluation = data.evaluation_ids(tokenizer, [str(AUSTEN / "persuasion.txt.gz")], args.eval_tokens)
    bos = tokenizer.bos_token_id if tokenizer_adds_bos(tokenizer) else None
    windows = evaluation[: evaluation.numel() // args.eval_seqlen * args.eval_seqlen].view(-1, args.eval_seqlen)
    if bos is not None:
        windows = torch.cat([torch.full((windows.shape[0], 1), bos), windows], 1)
    prompt = evaluation[None, :64]

    @torch.no_grad()
    def teacher_forced(reference_top=None):
        """Perplexity, agreement with reference_top, avg layers (from the dynamic state) on persuasion."""
        state = getattr(model, "llmprune_dynamic", None)
        if state is not None:
            state.reset_stats()
        nll, count, agree, tops = 0.0, 0, 0, []
        for i, window in enumerate(windows):
            logits = model(input_ids=window[None], use_cache=False).logits[0, :-1].float()
            nll += F.cross_entropy(logits, window[1:], reduction="sum").double().item()
            count += window.numel() - 1
            top = logits.argmax(-1)
            tops.append(top)
            if reference_top is not None:
                agree += int((top == reference_top[i]).sum())
        layers = state.summary()["avg_layers"] if state is not None else num_layers
        return {"ppl": math.exp(nll / count), "agreement": agree / count if reference_top is not None else 1.0,
                "avg_layers": layers, "mlp_skip_fraction": state.summary()["mlp_skip_fraction"] if state else 0.0}, tops

    @torch.no_grad()
    def one_decode(tokens: int) -> float:
        t = time.perf_counter()
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=tokens,
                       min_new_tokens=tokens, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t

    def paired_decode(state) -> tuple[float, float]:
        """Best seconds of the static full model and of the dynamic model, measured alternately
        (full, dynamic, full, dynamic, ...) after one short warm-up each, so that a slow phase of the
        shared machine hits both."""
        full_best = dynamic_best = math.inf
        detach(model)
        one_decode(8)
        attach(model, state)
        one_decode(8)
        state.reset_stats()
        for _ in range(args.repeats):
            detach(model)
            full_best = min(full_best, one_decode(args.new_tokens))
            attach(model, state)
            dynamic_best = min(dynamic_best, one_decode(args.new_tokens))
        return full_best, dynamic_best

    full_metrics, full_top = teacher_forced()
    one_decode(8)
    full_decode = min(one_decode(args.new_tokens) for _ in range(args.repeats))
    print(f"full: ppl {full_metrics['ppl']:.3f}, decode {args.new_tokens / full_decode:.2f} tokens/s", flush=True)

    t = time.perf_counter()
    stats = fitting.collect(model, calibration[:-args.holdout], default_exit_layers(num_layers),
                            device=torch.device("cpu"), progress=False)
    fitted = fit_dynamic(model, calibration, device=torch.device("cpu"), progress=False, stats=stats,
                 probe_windows=args.probe_windows, holdout_windows=args.holdout)
    fitted_plain = fit_dynamic(model, calibration, device=torch.device("cpu"), progress=False, stats=stats,
                               fit_maps=False, probe_windows=args.probe_windows, holdout_windows=args.holdout)
    fit_seconds = time.perf_counter() - t
    print(f"fitted in {fit_seconds:.0f} s", flush=True)

    # The curve: all tokens exit at one layer (teacher-forced, holdout rows of the exit table).
    curve = []
    for j, e in enumerate(fitted.exit_layers):
        row = {"exit_layer": e}
        for name, f in (("map", fitted), ("no_map", fitted_plain)):
            rows = f.holdout_rows
            row[f"{name}_ppl_ratio"] = float(torch.exp(f.table.nll[rows, j].mean() - f.table.full_nll[rows].mean()))
            row[f"{name}_agreement"] = float(f.table.agree[rows, j].float().mean())
        curve.append(row)

    configurations = [(f"exit, maps, ppl +{float(x):.0%}", fitted, dict(max_ppl_increase=float(x)))
                      for x in args.targets.split(",")]
    configurations += [("exit, no map, ppl +100%", fitted_plain, dict(max_ppl_increase=1.0, maps=False)),
                       ("MLP skip, ppl +5%", fitted, dict(early_exit=False, token_skip=True, max_ppl_increase=0.05)),
                       ("MLP skip, ppl +20%", fitted, dict(early_exit=False, token_skip=True, max_ppl_increase=0.2)),
                       ("exit + MLP skip, ppl +20%", fitted, dict(token_skip=True, max_ppl_increase=0.2)),
                       ("lossless (as calibrated)", fitted, dict(early_exit=False, lossless=True))]
    rows = [{"row": "full model", **full_metrics, "decode_tokens_per_s": args.new_tokens / full_decode,
             "decode_x": 1.0, "decode_avg_layers": num_layers}]
    for name, f, options in configurations:
        t = time.perf_counter()
        _, report = calibrate(model, f, device=torch.device("cpu"), **options)
        seconds = time.perf_counter() - t
        state = model.llmprune_dynamic
        metrics, _ = teacher_forced(full_top)
        variants = [(name, None)]
        if options.get("lossless"):
            variants.append((f"lossless, drafting forced on (exit {report.draft['draft_exit_layer']}, "
                             f"{report.draft['draft_tokens']} drafts)", True))
        for label, force in variants:
            if force is not None:
                state.settings["lossless"] = {**state.settings["lossless"], "drafting": True, "draft_cost": None}
            full_seconds, seconds_decode = paired_decode(state)
            summary = state.summary()
            row = {"row": label, **metrics, "decode_tokens_per_s": args.new_tokens / seconds_decode,
                   "full_decode_tokens_per_s": args.new_tokens / full_seconds,
                   "decode_x": full_seconds / seconds_decode,
                   "decode_avg_layers": summary["avg_layers_decode"] if not options.get("lossless") else None,
                   "calibration": report.calibration, "target_met_on_calibration": report.target_met,
                   "exit_threshold": report.exit_threshold, "skip_threshold": report.skip_threshold,
                   "calibrate_s": seconds, "searched_on_calibration": report.searched}
            if options.get("lossless"):
                drafted = state.stats["drafted"]
                row["acceptance"] = state.stats["accepted"] / drafted if drafted else None
                row["draft"] = dict(state.settings["lossless"])
                row["agreement"] = 1.0
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "calibration"}, default=str), flush=True)
        detach(model)

    result = {"setup": {"model": f"SmolLM2-135M (float32, CPU, {args.threads} thread{'s' if args.threads > 1 else ''})",
                        "nsamples": args.nsamples,
                        "seqlen": args.seqlen, "holdout_windows": args.holdout, "probe_windows": args.probe_windows,
                        "eval": f"first {windows.numel() - (windows.shape[0] if bos is not None else 0)} tokens of "
                                f"persuasion, {args.eval_seqlen}-token windows"
                                f"{', BOS prepended' if bos is not None else ''}",
                        "decode": f"batch 1, {args.new_tokens} greedy tokens after a 64-token prompt, best of "
                                  f"{args.repeats}, each row's full-model and dynamic runs alternating",
                        "exit_layers": fitted.exit_layers, "fit_seconds": fit_seconds,
                        "total_seconds": time.perf_counter() - started,
                        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                                     "transformers": transformers.__version__},
                        "machine": "shared machine (2 cores for 4 sessions); timings under flock, but other "
                                   "sessions' tests may have run"},
              "rows": rows, "curve": curve}
    out = Path(args.output)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    out.with_suffix(".md").write_text(markdown(result) + "\n")
    print(markdown(result))


def markdown(result: dict) -> str:
    s = result["setup"]
    lines = [f"Setup: {s['model']}; calibration {s['nsamples']} x {s['seqlen']} tokens from emma + mansfieldpark "
             f"(seed 0; thresholds chosen on the last {s['holdout_windows']} windows); evaluation: {s['eval']}; "
             f"decode: {s['decode']}, relative to the static full model in the same process. Exit layers "
             f"{s['exit_layers']}. Fit {s['fit_seconds']:.0f} s. {s['machine']}.", "",
             "| row | ppl | ppl x | top-1 agreement | layers/token (ppl) | layers/token (decode) | MLP skipped | "
             "decode tokens/s | decode x | calibration: ppl x / agreement |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    full = result["rows"][0]["ppl"]
    for r in result["rows"]:
        cal = r.get("calibration")
        extra = ""
        if r.get("acceptance") is not None or r.get("draft"):
            draft = r["draft"]
            extra = (f" acceptance {r['acceptance']:.2f}" if r.get("acceptance") is not None else "") + \
                    f" (drafting {'on' if draft.get('drafting') else 'off'}; " \
                    f"predicted x{draft.get('expected_speedup', float('nan')):.2f})"
        lines.append(
            f"| {r['row']} | {r['ppl']:.2f} | {r['ppl'] / full:.3f} | {r['agreement']:.3f} | {r['avg_layers']:.2f} | "
            f"{'-' if r['decode_avg_layers'] is None else format(r['decode_avg_layers'], '.2f')} | "
            f"{r['mlp_skip_fraction']:.1%} | {r['decode_tokens_per_s']:.2f} | {r['decode_x']:.2f} | "
            f"{'-' if not cal else format(cal['ppl_ratio'], '.3f') + ' / ' + format(cal['agreement'], '.3f')}{extra} |")
    lines += ["", "Every token exiting at one layer (teacher-forced, calibration holdout): perplexity ratio and "
              "top-1 agreement with the full model, with the fitted affine map and without (final norm + head "
              "on the raw state).", "", "| exit after layer | ppl x (map) | agreement (map) | ppl x (no map) | "
              "agreement (no map) |", "|---:|---:|---:|---:|---:|"]
    for c in result["curve"]:
        lines.append(f"| {c['exit_layer']} | {c['map_ppl_ratio']:.2f} | {c['map_agreement']:.3f} | "
                     f"{c['no_map_ppl_ratio']:.2f} | {c['no_map_agreement']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
