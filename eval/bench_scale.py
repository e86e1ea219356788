"""Benchmark: pruning SmolLM2-135M in memory, with CPU/disk offload, streamed, and in 1 vs 2
processes (not a test).

Every row is one real CLI command in a fresh process tree (the commands are in the results):
Wanda 50%, calibration 32 x 512 tokens from emma + mansfieldpark (seed 0), no evaluation. Per row:

- wall time of the whole command, and the prune (calibration) time from its llmprune.json;
- peak RSS of the process tree (sum over processes, sampled every 20 ms by psutil), minus the
  RSS of a bare interpreter with torch and transformers imported, / the float32 model size;
- whether the saved model equals the in-memory one (bitwise; SparseGPT rows: the largest
  relative difference ||W1 - W2|| / ||W1|| over matrices, and whether the masks are equal).

Usage: flock /tmp/llmprune-bench.lock python eval/bench_scale.py [--rows "memory;stream;..."] [--nsamples 32]
Writes eval/results/bench_scale.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
AUSTEN = ROOT.parent / "shared" / "data" / "austen"
RESULTS = ROOT / "eval" / "results"
LAUNCH_2 = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--main_process_port", "0", "-m", "llmprune"]
ONE = [sys.executable, "-m", "llmprune"]
# row -> (reference row for the equality check, launcher, extra flags; {work} is a scratch folder)
ROWS = {
    "memory": (None, ONE, ["--method", "wanda"]),
    # offload: accelerate keeps 40% of the float32 model in RAM (--max-memory cpu=...), the rest on disk
    "offload cpu+disk": ("memory", ONE, ["--method", "wanda", "--device-map", "auto",
                                         "--max-memory", "cpu={cpu_budget}", "--offload-folder", "{work}/offload"]),
    "stream": ("memory", ONE, ["--method", "wanda", "--stream"]),
    "stream, activations on disk": ("memory", ONE, ["--method", "wanda", "--stream", "--activations-on-disk",
                                                    "{work}/activations"]),
    "memory, 2 processes": ("memory", LAUNCH_2, ["--method", "wanda"]),
    "stream, 2 processes": ("memory", LAUNCH_2, ["--method", "wanda", "--stream"]),
    "sparsegpt": (None, ONE, ["--method", "sparsegpt"]),
    "sparsegpt, 2 processes": ("sparsegpt", LAUNCH_2, ["--method", "sparsegpt"]),
}


def run_sampled(command: list[str], env: dict) -> dict:
    """Run a command; sample the RSS of its whole process tree; return wall time and peaks."""
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root = psutil.Process(process.pid)
    peak_tree, peak_single = 0, 0
    while process.poll() is None:
        try:
            members = [root, *root.children(recursive=True)]
            sizes = []
            for member in members:
                try:
                    sizes.append(member.memory_info().rss)
                except psutil.Error:
                    pass
            # the launcher's own interpreters (accelerate, torchrun) are counted too: they are part of the run
            peak_tree, peak_single = max(peak_tree, sum(sizes)), max(peak_single, max(sizes, default=0))
        except psutil.Error:
            pass
        time.sleep(0.02)
    output = process.stdout.read()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{output[-3000:]}")
    return {"wall_s": time.perf_counter() - started, "peak_rss_tree_bytes": peak_tree,
            "peak_rss_largest_process_bytes": peak_single}


def baseline_rss(env: dict, modelling_code: bool) -> int:
    """RSS of an interpreter that has imported torch and transformers; with ``modelling_code``,
    also the model's modelling module (LlamaForCausalLM: ~130 MiB of code and its imports, which
    any run of this model needs)."""
    code = ("import psutil, torch, transformers\nfrom transformers import AutoModelForCausalLM\n"
            + ("from transformers import LlamaForCausalLM\nLlamaForCausalLM.__init__\n" if modelling_code else "")
            + "print(psutil.Process().memory_info().rss)")
    values = [int(subprocess.check_output([sys.executable, "-c", code], env=env, text=True)) for _ in range(3)]
    return min(values)


def tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    result = {}
    for path in sorted(folder.glob("*.safetensors")):
        result.update(load_file(path))
    return result


def compare(reference: Path, other: Path) -> dict:
    import torch

    a, b = tensors(reference), tensors(other)
    if set(a) != set(b):
        return {"same_tensors": False}
    relative = max(float((a[k].double() - b[k].double()).norm() / a[k].double().norm().clamp_min(1e-30)) for k in a)
    return {"same_tensors": True, "bitwise_equal": all(torch.equal(a[k], b[k]) for k in a),
            "masks_equal": all(torch.equal(a[k] == 0, b[k] == 0) for k in a), "max_relative_difference": relative}


def write_results(setup: dict, results: list[dict], note: str = "") -> None:
    """eval/results/bench_scale.{json,md} from the rows measured so far."""
    model_bytes, base = setup["model_float32_bytes"], setup["baseline_rss_bytes"]
    base_with_model_code = setup["baseline_with_model_code_rss_bytes"]
    args = argparse.Namespace(nsamples=setup["nsamples"], seqlen=setup["seqlen"])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_scale.json").write_text(
        json.dumps({"setup": setup, "note": note, "rows": results}, indent=2) + "\n")
    memory_row = next((r for r in results if r["row"] == "memory"), None)
    mib = 2**20
    lines = [f"Setup: SmolLM2-135M (float32 model: {model_bytes / mib:.0f} MiB), CPU, Wanda 50% unless named; "
             f"calibration {args.nsamples} x {args.seqlen} tokens from emma + mansfieldpark (seed 0); no evaluation. "
             f"{setup['machine']}; {setup['threads']}.", "",
             f"Baselines: an interpreter with torch + transformers imported: {base / mib:.0f} MiB (B); the same with "
             f"the Llama modelling code imported too: {base_with_model_code / mib:.0f} MiB (B+code).", "",
             "Peak RSS: whole run = the largest process of the run over its whole life (sampled every 20 ms; for two "
             "processes each holds its own copy; the tree total is in the JSON); prune phase = the peak inside the "
             "pruning step (llmprune.json, main process), i.e. after the calibration text is tokenised.", "",
             "| mode | wall (s) | prune (s) | wall / in-memory | peak RSS whole run (MiB) | (whole - B) / fp32 | "
             "peak RSS prune phase (MiB) | (prune - B) / fp32 | (prune - B+code) / fp32 | equal to | bitwise | masks | "
             "max rel. diff |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|---:|"]
    for r in results:
        ratio = f"{r['wall_s'] / memory_row['wall_s']:.2f}x" if memory_row else "-"
        diff = f"{r['max_relative_difference']:.1e}" if "max_relative_difference" in r else "-"
        lines.append(f"| {r['row']} | {r['wall_s']:.1f} | {r['prune_s']:.1f} | {ratio} | "
                     f"{r['peak_rss_largest_process_bytes'] / mib:.0f} | "
                     f"{r['peak_minus_baseline_over_fp32_model']:.2f}x | "
                     f"{r['peak_rss_prune_phase_bytes'] / mib:.0f} | "
                     f"{r['prune_phase_peak_minus_baseline_over_fp32_model']:.2f}x | "
                     f"{r['prune_phase_peak_minus_baseline_with_model_code_over_fp32_model']:.2f}x | "
                     f"{r.get('equal_to', '-')} | {r.get('bitwise_equal', '-')} | "
                     f"{r.get('masks_equal', '-')} | {diff} |")
    lines += ["", "Commands:", ""] + [f"- {r['row']}: `{r['command']}`" for r in results] + [""]
    if note:
        lines.insert(1, "")
        lines.insert(2, note)
    (RESULTS / "bench_scale.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=";".join(ROWS), help="row names separated by ;")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--model", default="llama", help="a local folder instead of SmolLM2 (to try the script)")
    args = parser.parse_args()
    rows = [r.strip() for r in args.rows.split(";")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    from llmprune.models.loading import builtin_model_folder

    folder = builtin_model_folder("llama") if args.model == "llama" else Path(args.model)  # converted once, first
    model_bytes = sum(v.numel() * 4 for v in tensors(folder).values())
    base = baseline_rss(env, modelling_code=False)
    base_with_model_code = baseline_rss(env, modelling_code=True)
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    outputs, results = {}, []
    try:
        for row in rows:
            reference, launcher, extra = ROWS[row]
            out = work / row.replace(" ", "_").replace(",", "").replace("+", "_")
            flags = ["--model", args.model,
                     "--calib-data", str(AUSTEN / "emma.txt.gz"), str(AUSTEN / "mansfieldpark.txt.gz"),
                     "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--eval-data", "none",
                     "--no-progress", "--output", str(out),
                     *[e.format(work=work, cpu_budget=int(model_bytes * 0.4)) for e in extra]]
            # two processes: one thread each (torchrun's default), so both settings use the 2 cores
            row_env = {**env, "OMP_NUM_THREADS": "1"} if launcher is LAUNCH_2 else env
            print(f"[{row}]", flush=True)
            measured = run_sampled(launcher + flags, row_env)
            report = json.loads((out / "llmprune.json").read_text())
            result = {"row": row, "command": " ".join((["accelerate launch --multi_gpu --num_processes 2 -m llmprune"]
                                                       if launcher is LAUNCH_2 else ["python -m llmprune"]) + flags),
                      **measured, "prune_s": report["timings"]["prune_s"],
                      "peak_rss_prune_phase_bytes": report["peak_memory"]["rss_peak_prune_bytes"],
                      "peak_minus_baseline_over_fp32_model":
                          (measured["peak_rss_largest_process_bytes"] - base) / model_bytes,
                      "prune_phase_peak_minus_baseline_over_fp32_model":
                          (report["peak_memory"]["rss_peak_prune_bytes"] - base) / model_bytes,
                      "prune_phase_peak_minus_baseline_with_model_code_over_fp32_model":
                          (report["peak_memory"]["rss_peak_prune_bytes"] - base_with_model_code) / model_bytes,
                      "sparsity": report["prune"]["overall_sparsity"]}
            if reference is not None and reference in outputs:
                result["equal_to"] = reference
                result.update(compare(outputs[reference], out))
            outputs[row] = out
            results.append(result)
            print(json.dumps(result), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    setup = {"model": "SmolLM2-135M (float32, CPU)", "model_float32_bytes": model_bytes,
             "baseline_rss_bytes": base, "baseline_with_model_code_rss_bytes": base_with_model_code,
             "nsamples": args.nsamples, "seqlen": args.seqlen,
             "threads": "2 for one process; 1 per process for two processes (2 cores in all)",
             "machine": f"{psutil.cpu_count()} CPU cores, shared with other sessions during the run"}
    if args.model != "llama":  # a trial run: print, keep the committed results
        print(json.dumps(results, indent=1))
        return
    write_results(setup, results)


if __name__ == "__main__":
    main()
