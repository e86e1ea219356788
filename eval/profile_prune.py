"""Where a layer-wise pruning run spends its time and memory (not a test, not a benchmark table).

Loads SmolLM2-135M (optionally only its first --layers decoder layers), times one plain forward
pass over the calibration tokens, then prunes with the real runner while recording: the seconds
inside the method's solve (``prune_group``), the seconds inside the statistics' ``add_batch``
(e.g. SparseGPT's XᵀX), the rest (statistics and propagation passes), and the peak RSS growth
over RSS after the forward pass, split by phase (solve / everything else).

Usage: python eval/profile_prune.py [--method sparsegpt] [--pattern unstructured] [--layers 30]
Prints one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

AUSTEN = Path(__file__).resolve().parents[2] / "shared" / "data" / "austen"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="sparsegpt")
    parser.add_argument("--pattern", default="unstructured")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    args = parser.parse_args()

    import psutil
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import llmprune
    from llmprune import data
    from llmprune.methods import METHODS
    from llmprune.models.loading import builtin_model_folder

    folder = builtin_model_folder("llama")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    calibration = data.calibration_ids(tokenizer, [str(AUSTEN / "emma.txt.gz"), str(AUSTEN / "mansfieldpark.txt.gz")],
                                       args.nsamples, args.seqlen, seed=0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model.model.layers = model.model.layers[:args.layers]
    model.config.num_hidden_layers = args.layers
    with torch.no_grad():
        for parameter in model.parameters():  # page the memory-mapped weights in
            parameter.sum()
        started = time.perf_counter()
        for sample in calibration:
            model(sample.unsqueeze(0), use_cache=False)
        forward_s = time.perf_counter() - started

    process, phase, peaks = psutil.Process(), ["passes"], {}
    base = process.memory_info().rss
    sampling = threading.Event()

    def sample_rss():
        while not sampling.is_set():
            peaks[phase[0]] = max(peaks.get(phase[0], 0), process.memory_info().rss - base)
            time.sleep(0.005)

    seconds = {"solve": 0.0, "add_batch": 0.0}
    method = METHODS[args.method]
    prune_group = method.prune_group

    def timed_prune_group(self, *a, **k):
        begun, phase[0] = time.perf_counter(), "solve"
        try:
            return prune_group(self, *a, **k)
        finally:
            seconds["solve"] += time.perf_counter() - begun
            phase[0] = "passes"

    def timed_statistics(self, *a, **k):  # wraps the statistics object's add_batch
        statistics = new_statistics(self, *a, **k)
        add_batch = statistics.add_batch

        def timed_add(inputs):
            begun = time.perf_counter()
            add_batch(inputs)
            seconds["add_batch"] += time.perf_counter() - begun

        statistics.add_batch = timed_add
        return statistics

    new_statistics = getattr(method, "new_statistics", None)
    method.prune_group = timed_prune_group
    if new_statistics is not None:
        method.new_statistics = timed_statistics
    thread = threading.Thread(target=sample_rss, daemon=True)
    thread.start()
    report = llmprune.prune(model, calibration, method=args.method, pattern=args.pattern, progress=False,
                            sparsity=0.5 if args.pattern == "unstructured" else None)
    sampling.set()
    thread.join()
    model_bytes = sum(p.numel() * 4 for p in model.parameters())
    print(json.dumps({"method": args.method, "pattern": args.pattern, "layers": args.layers,
                      "threads": torch.get_num_threads(), "forward_s": round(forward_s, 1),
                      "prune_s": round(report.seconds, 1), "prune_over_forward": round(report.seconds / forward_s, 2),
                      "solve_s": round(seconds["solve"], 1), "add_batch_s": round(seconds["add_batch"], 1),
                      "passes_s": round(report.seconds - seconds["solve"] - seconds["add_batch"], 1),
                      "peak_rss_growth_over_model": {k: round(v / model_bytes, 3) for k, v in peaks.items()}}))


if __name__ == "__main__":
    main()
