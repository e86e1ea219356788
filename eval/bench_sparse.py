"""Benchmark: sparse checkpoints and sparse CPU execution of SmolLM2-135M (not a test).

Rows: the dense model, Wanda at 50 / 70 / 90% unstructured, 2:4, and block:32 at 70 / 90%
(calibrated on emma + mansfieldpark, 16 windows x 256 tokens, seed 0). For each row:

- bytes on disk of the dense folder and of the sparse folder (float32, and bfloat16), as a ratio;
- load time (``llmprune.models.loading.load_model``, at torch's default thread count) of the sparse
  folder / the dense folder: medians of 9 interleaved rounds; the same with one 64-token forward
  pass after loading (a dense folder is memory-mapped: its weights are read at first use); and that
  again from a cold page cache (both folders' files evicted before each load);
- perplexity on the first --eval-tokens tokens of persuasion (1024-token windows);
- sparse CPU execution (``llmprune.sparse_execute``): the kernel chosen per decoder linear layer at
  a 64-token batch, the summed linear-layer speedup, and a 64-token prefill with and without the
  LM head, sparse against dense (medians of interleaved rounds), and a decode ratio (16 greedy
  tokens after a 64-token prompt, KV cache, batch 1).

Usage: python eval/bench_sparse.py [--rows dense,wanda:0.5,...] [--eval-tokens 4096]
Writes eval/results/bench_sparse.{json,md}.
"""

from __future__ import annotations

import argparse
import copy as copy_module
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AUSTEN = ROOT.parent / "shared" / "data" / "austen"
RESULTS = ROOT / "eval" / "results"
ROWS = ["dense", "wanda:0.5", "wanda:0.7", "wanda:0.9", "wanda:2:4", "wanda:block:32:0.7", "wanda:block:32:0.9"]


def parse_row(row: str) -> dict:
    """"wanda:0.7" -> unstructured 0.7; "wanda:2:4"; "wanda:block:32:0.7"."""
    parts = row.split(":")
    if parts[0] == "dense":
        return {}
    if parts[1] == "block":
        return {"method": parts[0], "pattern": f"block:{parts[2]}", "sparsity": float(parts[3])}
    if len(parts) == 3:
        return {"method": parts[0], "pattern": f"{parts[1]}:{parts[2]}", "sparsity": None}
    return {"method": parts[0], "pattern": "unstructured", "sparsity": float(parts[1])}


def interleaved(calls: dict, rounds: int, before: dict | None = None) -> dict:
    """Median seconds of each call, one of each per round. What a call returns (a loaded model) is
    freed, and garbage collected, after its clock stops, so no call pays for the one before it;
    before[name] (if any) runs before the clock starts."""
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            (before or {}).get(name, lambda: None)()
            gc.collect()
            started = time.perf_counter()
            returned = call()
            times[name].append(time.perf_counter() - started)
            del returned
    gc.collect()
    return {name: statistics.median(values) for name, values in times.items()}


def decode_ratio(execution, prompt_tokens: int = 64, new_tokens: int = 16, rounds: int = 3) -> float:
    """Dense decode time / sparse decode time: (prompt + 1 + new) - (prompt + 1) tokens generated."""
    import torch

    model = execution.model
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))

    def run(switch, count):
        switch()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=count, min_new_tokens=count,
                       do_sample=False, pad_token_id=0)

    with torch.no_grad():
        calls = {f"{state}_{count}": (lambda s=switch, c=count: run(s, c))
                 for state, switch in (("dense", execution.disable), ("sparse", execution.enable))
                 for count in (1, 1 + new_tokens)}
        median = interleaved(calls, rounds)
    execution.enable()
    dense = median[f"dense_{1 + new_tokens}"] - median["dense_1"]
    sparse = median[f"sparse_{1 + new_tokens}"] - median["sparse_1"]
    return dense / max(sparse, 1e-9)


def evict(folder: Path) -> None:
    """Drop the folder's files from the page cache (posix_fadvise DONTNEED; no root needed), so the
    next load reads them from disk, as the first load after a download or a reboot does."""
    for path in folder.rglob("*"):
        if path.is_file():
            handle = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(handle, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(handle)


def first_forward(model):
    """One 64-token forward pass: a dense folder's weights are memory-mapped and read only now.
    Returns the model, to be freed after the clock stops."""
    import torch

    with torch.no_grad():
        model(torch.arange(64).unsqueeze(0), use_cache=False)
    return model


def measure_row(row: str, folder: Path, calibration, evaluation, tokenizer, work: Path, load_threads: int) -> dict:
    import torch

    from llmprune import api
    from llmprune.evaluate import perplexity
    from llmprune.models.loading import load_model
    from llmprune.save import save_folder
    from llmprune.sparse_execute import compare_prefill, execute_sparse
    from llmprune.sparse_format import folder_bytes

    settings = parse_row(row)
    model, _ = load_model(str(folder), dtype="float32")
    result = {"row": row, **settings}
    if settings:
        report = api.prune(model, calibration, method=settings["method"], sparsity=settings["sparsity"],
                           pattern=settings["pattern"], progress=False)
        result["realised_sparsity"] = report.overall_sparsity
        for dtype in ("float32", "bfloat16"):
            copy = model if dtype == "float32" else copy_module.deepcopy(model).to(torch.bfloat16)
            dense, sparse = work / f"{row}-{dtype}-dense", work / f"{row}-{dtype}-sparse"
            save_folder(copy, tokenizer, dense, {}, "bench")
            save_folder(copy, tokenizer, sparse, {}, "bench", save_format="sparse")
            result[f"{dtype}_dense_bytes"], result[f"{dtype}_sparse_bytes"] = folder_bytes(dense), folder_bytes(sparse)
            result[f"{dtype}_bytes_ratio"] = result[f"{dtype}_sparse_bytes"] / result[f"{dtype}_dense_bytes"]
            if dtype == "float32":
                threads = torch.get_num_threads()
                torch.set_num_threads(load_threads)
                used = {"dense": lambda dense=dense: first_forward(load_model(str(dense))[0]),
                        "sparse": lambda sparse=sparse: first_forward(load_model(str(sparse))[0])}
                loads = interleaved({"dense": lambda dense=dense: load_model(str(dense)),
                                     "sparse": lambda sparse=sparse: load_model(str(sparse)),
                                     "dense_used": used["dense"], "sparse_used": used["sparse"],
                                     "dense_cold": used["dense"], "sparse_cold": used["sparse"]},
                                    rounds=9, before={"dense_cold": lambda dense=dense: evict(dense),
                                                      "sparse_cold": lambda sparse=sparse: evict(sparse)})
                torch.set_num_threads(threads)
                result.update(load_dense_s=loads["dense"], load_sparse_s=loads["sparse"],
                              load_ratio=loads["sparse"] / loads["dense"],
                              load_and_forward_ratio=loads["sparse_used"] / loads["dense_used"],
                              cold_dense_s=loads["dense_cold"], cold_sparse_s=loads["sparse_cold"],
                              cold_load_and_forward_ratio=loads["sparse_cold"] / loads["dense_cold"])
    ppl = perplexity(model, evaluation, 1024, None, "cpu", progress=False)
    result["perplexity"] = ppl.perplexity
    execution = execute_sparse(model, tokens=64)
    result["execution"] = execution.report()
    result["switched"] = len(execution.switched)
    result["layers"] = len(execution.choices)
    result["decoder_linear_speedup"] = execution.linear_speedup()
    if execution.switched:
        result["prefill"] = compare_prefill(execution)
        result["decode_ratio"] = decode_ratio(execution)
    return result


def write_tables(results: list, header: dict) -> None:
    lines = ["# Sparse checkpoints and sparse CPU execution: SmolLM2-135M", "",
             f"{header['setup']}", "", f"Command: `{header['command']}`", "",
             "| row | sparsity | ppl | fp32 sparse/dense bytes | bf16 sparse/dense bytes | load sparse/dense | "
             "load + 1st forward | same, cold page cache | "
             "layers switched | linear layers speedup | prefill 64 with head | without head | decode |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        fmt = lambda key, spec=".2f", r=r: format(r[key], spec) if r.get(key) is not None else "-"  # noqa: E731
        prefill = r.get("prefill") or {}
        lines.append(f"| {r['row']} | {fmt('realised_sparsity', '.3f')} | {r['perplexity']:.2f} | "
                     f"{fmt('float32_bytes_ratio', '.3f')} | {fmt('bfloat16_bytes_ratio', '.3f')} | "
                     f"{fmt('load_ratio')} | {fmt('load_and_forward_ratio')} | {fmt('cold_load_and_forward_ratio')} | "
                     f"{r['switched']}/{r['layers']} | {r['decoder_linear_speedup']:.2f}x | "
                     f"{format(prefill['speedup_with_head'], '.2f') + 'x' if prefill else '-'} | "
                     f"{format(prefill['speedup_without_head'], '.2f') + 'x' if prefill else '-'} | "
                     f"{fmt('decode_ratio') + 'x' if r.get('decode_ratio') else '-'} |")
    lines += ["", "Ratios are sparse / dense (bytes, load time) or dense time / sparse time (speed), medians of "
              "interleaved rounds. Load: warm page cache (the files were just written) unless marked cold "
              "(evicted with posix_fadvise before each load, as after a download or a reboot); a dense "
              "folder is memory-mapped, so its weights are read at the first forward pass, which is why "
              "load + 1st forward is the like-for-like comparison. Kernels are chosen per layer at a "
              "64-token batch.", ""]
    (RESULTS / "bench_sparse.md").write_text("\n".join(lines), encoding="utf-8")
    (RESULTS / "bench_sparse.json").write_text(json.dumps({**header, "rows": results}, indent=2) + "\n",
                                               encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the kernels and perplexity "
                        "(default 1: the machine is shared)")
    parser.add_argument("--load-threads", type=int, default=None, help="torch threads while loading (default: "
                        "torch's own default, what a user's load gets; the sparse decoder uses as many)")
    args = parser.parse_args()
    import torch

    load_threads = args.load_threads or torch.get_num_threads()
    torch.set_num_threads(args.threads)

    sys.path.insert(0, str(ROOT))
    from llmprune import data
    from llmprune.models.loading import builtin_model_folder, load_model

    folder = builtin_model_folder("llama")
    _, tokenizer = load_model(str(folder))
    calibration = data.calibration_ids(tokenizer, [str(AUSTEN / "emma.txt.gz"), str(AUSTEN / "mansfieldpark.txt.gz")],
                                       16, 256, seed=0)
    evaluation = data.evaluation_ids(tokenizer, [str(AUSTEN / "persuasion.txt.gz")], args.eval_tokens)
    header = {"command": "python eval/bench_sparse.py " + " ".join(sys.argv[1:]), "threads": torch.get_num_threads(),
              "setup": f"Wanda, calibration emma + mansfieldpark 16 x 256 tokens, seed 0; perplexity on the first "
                       f"{args.eval_tokens} tokens of persuasion, 1024-token windows; {torch.get_num_threads()} "
                       f"threads ({load_threads} while loading); torch {torch.__version__}.",
              "load_threads": load_threads}
    results = []
    with tempfile.TemporaryDirectory() as work:
        for row in args.rows.split(","):
            started = time.perf_counter()
            results.append(measure_row(row, folder, calibration, evaluation, tokenizer, Path(work), load_threads))
            results[-1]["seconds"] = time.perf_counter() - started
            print(json.dumps({k: v for k, v in results[-1].items() if k != "execution"}), flush=True)
            write_tables(results, header)


if __name__ == "__main__":
    main()
