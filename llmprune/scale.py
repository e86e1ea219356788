"""The CLI's big-model options: device maps and offload, streaming, several processes, and the
memory estimate made before loading. Plain functions called by llmprune.cli.run."""

from __future__ import annotations

import platform
import shlex
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from . import __version__, data, distributed
from .errors import UsageError
from .memory import PeakRSS, allocate_large_blocks_with_mmap, estimate_peak, refuse_unless_fits, release_free_heap
from .models.loading import DTYPES, base_model_id, checked_source, resolve_model
from .placement import parse_device_map, parse_max_memory, size_in_bytes


def check_options(*, device_map, max_memory, offload_folder, stream, activations_on_disk, structured,
                  checkpoint_dir, group, schedule="uniform") -> dict:
    """Refuse combinations that cannot work, before any work; return the parsed device map and
    max_memory for from_pretrained."""
    if (max_memory or offload_folder) and device_map is None:
        raise UsageError("--max-memory and --offload-folder need --device-map (e.g. --device-map auto)")
    if stream and device_map is not None:
        raise UsageError("--stream and --device-map are two ways to fit a big model: choose one")
    if stream and structured:
        raise UsageError("--stream supports magnitude, wanda and sparsegpt; structured pruning needs the whole "
                         "model (use --device-map auto --offload-folder DIR instead)")
    if stream and schedule == "owl":
        raise UsageError("--stream cannot use --schedule owl: OWL measures every layer of the dense model before "
                         "pruning; give the per-layer sparsities as a list (--schedule 0.4,0.5,...) instead")
    if stream and checkpoint_dir:
        raise UsageError("--stream cannot resume (--checkpoint-dir); it already holds one layer at a time")
    if activations_on_disk and not stream:
        raise UsageError("--activations-on-disk goes with --stream")
    if group is not None and checkpoint_dir:
        raise UsageError("--checkpoint-dir is not supported with several processes (accelerate launch)")
    if group is not None and device_map is not None:
        raise UsageError("--device-map is not supported with several processes: each process would place "
                         "its own copy; use one process with the device map, or processes without one")
    return {"device_map": parse_device_map(device_map), "max_memory": parse_max_memory(max_memory)}


def mode_of(device_map, stream: bool) -> str:
    return "stream" if stream else "offload" if device_map is not None else "memory"


def check_memory(model: str, *, dtype: str, mode: str, nsamples: int, seqlen: int, batch_size: int, method: str,
                 needs_data: bool, max_memory: dict | None, activations_on_disk: bool, compute: torch.device,
                 force: bool, trust_remote_code: bool = False, group=None):
    """Estimate the run's peak memory from the model's config alone and refuse (unless ``force``)
    when it exceeds what is available. Returns the estimate, or None when the config cannot be
    read yet (loading then says why)."""
    from transformers import AutoConfig

    if dtype not in DTYPES:  # the same refusal load_model makes
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    source = checked_source(model)  # a damaged folder or impossible config values: refused here, in one line
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception:  # not found, offline, remote code: load_model reports it properly
        return None
    from .models.adapters import ADAPTERS

    if getattr(config, "model_type", None) not in ADAPTERS:  # refused after loading, with the list
        return None
    if mode == "offload" and max_memory is not None and "cpu" in max_memory:
        budget = size_in_bytes(max_memory["cpu"])
    elif mode == "offload":
        budget = None
    else:
        budget = None
    estimate = estimate_peak(config, dtype_bytes=DTYPES[dtype].itemsize, mode=mode,
                             nsamples=nsamples if needs_data else 0, seqlen=seqlen if needs_data else 0,
                             batch_size=batch_size, method=method, cpu_weight_budget=budget,
                             processes=group.world if group else 1, activations_on_disk=activations_on_disk,
                             compute=compute)
    refuse_unless_fits(estimate, mode, force)
    return estimate


def run_streaming(*, model: str, method: str, target: float, nm, calib_data, nsamples: int, seqlen: int, seed: int,
                  target_folder: Path, overwrite: bool, compute: torch.device, dtype: str, batch_size: int,
                  options: dict, progress: bool, activations_on_disk: str | None, trust_remote_code: bool,
                  argv: list[str], estimate, started: float, group, schedule="uniform") -> dict:
    """The whole --stream job: prune layer by layer from the checkpoint's shards into the output
    folder's shards (written atomically, by the main process only). No perplexity: the whole
    model is never in memory; evaluate the output folder on its own."""
    from transformers import AutoTokenizer

    from .methods import METHODS
    from .save import atomic_folder, model_card, write_companions
    from .stream import prune_streaming

    source = Path(resolve_model(model)).expanduser()
    if not source.is_dir():
        raise UsageError(f"--stream reads a local model folder (or a built-in alias), got {model!r}")
    allocate_large_blocks_with_mmap()  # freed tensors go back to the system at once
    timings = {}
    t = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    needs_data = METHODS[method].needs_calibration
    calibration = data.calibration_ids(tokenizer, calib_data, nsamples, seqlen, seed) if needs_data else None
    del tokenizer  # tens of MiB while pruning; read again to be saved
    release_free_heap()  # tokenising the whole text left freed blocks behind
    timings["data_s"] = time.perf_counter() - t
    main = group is None or group.main
    with (atomic_folder(target_folder, overwrite) if main else nullcontext(None)) as tmp:
        with PeakRSS() as memory:
            report, config = prune_streaming(source, tmp, calibration, method=method, sparsity=target, pattern=nm,
                                             device=compute, dtype=DTYPES[dtype], batch_size=batch_size,
                                             progress=progress, activations_on_disk=activations_on_disk,
                                             trust_remote_code=trust_remote_code, schedule=schedule, **options)
        timings["prune_s"] = report.seconds
        timings["total_before_save_s"] = time.perf_counter() - started
        run_report = {
            "llmprune_version": __version__,
            "command": "python -m llmprune " + shlex.join(argv),
            "model": model, "seed": seed, "device": str(compute), "dtype": dtype,
            "calib_data": list(calib_data) if needs_data else None, "eval_data": None,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": __import__("transformers").__version__},
            "prune": report.as_dict(), "perplexity": {}, "speed": {}, "timings": timings,
            "placement": {"mode": "stream", "processes": group.world if group else 1,
                          "activations_on_disk": bool(activations_on_disk)},
            "memory_estimate": estimate.as_dict() if estimate else None,
            "peak_memory": {"rss_before_prune_bytes": memory.start, "rss_peak_prune_bytes": memory.peak,
                            "rss_growth_prune_bytes": memory.growth},
            "storage": "dense safetensors with zeros (no sparse format), sharded with an index",
        }
        if main:
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
            write_companions(tmp, config, tokenizer, run_report, model_card(base_model_id(model), run_report))
    distributed.barrier()
    if main:
        print("\nllmprune summary", flush=True)
        print(f"  method       {method} ({report.pattern}, target {target:g}), streamed layer by layer\n"
              f"  sparsity     {report.overall_sparsity:.4f} of decoder linear weights\n"
              f"  perplexity   not evaluated (--stream); evaluate the output folder separately\n"
              f"  time         prune {report.seconds:.1f} s, total {time.perf_counter() - started:.1f} s\n"
              f"  peak memory  {memory.peak / 2**20:.0f} MiB RSS while pruning\n"
              f"  output       {target_folder}", flush=True)
    return run_report
