"""The big-model options: device maps and offload, streaming, several processes, and the memory
estimate made before loading. Plain functions called by llmprune.job."""

from __future__ import annotations

from .errors import UsageError
from .memory import estimate_peak, refuse_unless_fits
from .models.loading import DTYPES, checked_source
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


def check_memory(model: str, *, dtype: str, needs_data: bool, max_memory: dict | None, force: bool,
                 trust_remote_code: bool = False, group=None, **run):
    """Estimate the run's peak memory from the model's config alone and refuse (unless ``force``)
    when it exceeds what is available. Returns the estimate, or None when the config cannot be
    read yet (loading then says why). run: what ``memory.estimate_peak`` takes about the run (mode,
    nsamples, seqlen, batch_size, method, activations_on_disk, compute)."""
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
    mode = run["mode"]
    budget = size_in_bytes(max_memory["cpu"]) if mode == "offload" and max_memory and "cpu" in max_memory else None
    if not needs_data:
        run = {**run, "nsamples": 0, "seqlen": 0}
    estimate = estimate_peak(config, dtype_bytes=DTYPES[dtype].itemsize, cpu_weight_budget=budget,
                             processes=group.world if group else 1, **run)
    refuse_unless_fits(estimate, mode, force)
    return estimate
