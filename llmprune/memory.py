"""Memory: the peak resident memory of this process, sampled by a background thread (psutil), and
the estimate of a run's peak made before loading anything (``estimate_peak``)."""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

import psutil


class PeakRSS:
    """Context manager: ``.start`` and ``.peak`` RSS in bytes over the ``with`` block."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.process = psutil.Process()
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def growth(self) -> int:
        return self.peak - self.start


# --- the estimate made before loading -------------------------------------------------------------

@dataclass
class MemoryEstimate:
    """Peak bytes a run needs, by part, on the host (RAM) and on the compute device (when CUDA)."""

    parts: dict[str, int]          # name -> bytes, all on the host for CPU compute
    device_parts: dict[str, int]   # name -> bytes on a CUDA compute device (empty on CPU)
    host_available: int
    device_available: int | None

    @property
    def host(self) -> int:
        return sum(self.parts.values())

    @property
    def device(self) -> int:
        return sum(self.device_parts.values())

    @property
    def fits(self) -> bool:
        return self.host <= self.host_available and (self.device_available is None
                                                     or self.device <= self.device_available)

    def as_dict(self) -> dict:
        return {"host_bytes": self.host, "host_parts": self.parts, "host_available_bytes": self.host_available,
                "device_bytes": self.device, "device_parts": self.device_parts,
                "device_available_bytes": self.device_available}


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def model_sizes(config) -> dict[str, int]:
    """Parameter counts from a config alone (a skeleton on the meta device, no weights read):
    total (tied weights once), embeddings, one decoder layer (the largest), layers."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    unique = {id(p): p for p in skeleton.parameters()}
    layers = skeleton.get_decoder().layers
    return {"total": sum(p.numel() for p in unique.values()),
            "embeddings": skeleton.get_input_embeddings().weight.numel(),
            "layer": max(sum(p.numel() for p in layer.parameters()) for layer in layers),
            "layers": len(layers)}


def estimate_peak(config, *, dtype_bytes: int, mode: str = "memory", nsamples: int = 0, seqlen: int = 0,
                  batch_size: int = 1, method: str = "wanda", processes: int = 1, cpu_weight_budget: int | None = None,
                  activations_on_disk: bool = False, compute=None,
                  sizes: dict | None = None) -> MemoryEstimate:
    """Peak memory of a pruning run, before anything is loaded.

    weights: the whole model (memory), what the device map keeps in RAM (offload: at most the
    ``cpu`` budget of --max-memory), or the calibration's embedding rows plus one layer read and
    one written (stream).
    activations: nsamples / processes x seqlen x hidden x bytes (the hidden states of this
    process's share, overwritten layer by layer), plus one batch's intermediate tensors inside a
    layer. statistics: per input group, a float32 vector (Wanda), a float64 [in, in] Hessian
    (SparseGPT, all four groups of a layer at once, plus the solve's inverse and float32 weights),
    or float64 channel sums of every layer (structured). ``method`` is a method name (its class
    says which statistics it keeps), "structured", or one of those statistics kinds.
    """
    import torch

    compute = torch.device("cpu") if compute is None else compute
    statistics_kind = _statistics_kind(method)
    sizes = sizes or model_sizes(config)
    from .models.adapters import adapter_for_config

    adapter = adapter_for_config(config)  # the family's own layout: head geometry, MLP width, group inputs
    geometry = adapter.head_geometry(config)
    hidden, inter = config.hidden_size, adapter.intermediate_size(config)
    heads, kv, head_dim = geometry.query_heads, geometry.kv_heads, geometry.head_dim
    layer_bytes = sizes["layer"] * dtype_bytes

    if mode == "memory":
        weights = sizes["total"] * dtype_bytes
    elif mode == "offload":
        weights = min(sizes["total"] * dtype_bytes, cpu_weight_budget if cpu_weight_budget is not None
                      else sizes["total"] * dtype_bytes) + layer_bytes  # + one offloaded layer loaded
    elif mode == "stream":  # the embedding rows the calibration uses, one layer read and one written
        weights = min(sizes["embeddings"], nsamples * seqlen * hidden) * dtype_bytes + 2 * layer_bytes
    else:
        raise ValueError(mode)
    share = -(-nsamples // max(processes, 1))
    activations = 0 if activations_on_disk else share * seqlen * hidden * dtype_bytes
    # One batch inside a layer: q/k/v/o outputs and gate/up/act products, in float32 at worst.
    # Attention scores [heads, seqlen, seqlen] are not counted: SDPA (transformers' default) does
    # not materialise them.
    working = batch_size * seqlen * (4 * heads * head_dim + 3 * inter) * max(dtype_bytes, 4) if nsamples else 0
    groups_in = adapter.group_input_widths(config)  # input features of each group's Hessian / norms
    if statistics_kind == "hessian":
        # The most output rows one solve updates: q, k and v together (fused in some families),
        # o_proj or down_proj (hidden), gate and up together (fused in some families).
        largest_rows = max((heads + 2 * kv) * head_dim, hidden, 2 * inter)
        # float64 Hessians of the four groups; the largest solve's float64 factor, inverse and its
        # factor, the float32 copy of that; float32 weights, their update and the mask.
        statistics = sum(n * n * 8 for n in groups_in) + 3 * inter * inter * 8 + inter * inter * 4 + \
            3 * largest_rows * inter * 4
    elif statistics_kind == "structured":
        statistics = sizes["layers"] * (2 * hidden + heads * head_dim + inter) * 8 * 2
    elif statistics_kind == "none":
        statistics = 2 * sizes["layer"] * 4 // 4  # one float32 matrix and its scores
    else:
        statistics = sum(groups_in) * 4 * max(1, share if processes > 1 else 1) + 2 * inter * hidden * 4
    token_ids = nsamples * seqlen * 8

    import psutil

    host_available = psutil.virtual_memory().available
    if compute.type == "cuda":
        free, _ = torch.cuda.mem_get_info(compute)
        device_parts = {"one layer": layer_bytes, "activations": activations, "layer working memory": working,
                        "statistics": statistics}
        parts = {"weights": weights, "calibration token ids": token_ids}
        return MemoryEstimate(parts, device_parts, host_available, free)
    parts = {"weights": weights, "activations": activations, "layer working memory": working,
             "statistics": statistics, "calibration token ids": token_ids}
    return MemoryEstimate(parts, {}, host_available, None)


def _statistics_kind(method: str) -> str:
    """"hessian", "norms", "none" or "structured": what a run's statistics hold."""
    if method in ("hessian", "norms", "none", "structured"):
        return method
    from .methods import METHODS

    return getattr(METHODS.get(method), "statistics", "norms")


def refuse_unless_fits(estimate: MemoryEstimate, mode: str, force: bool) -> None:
    """A UsageError that names the parts and what to change, unless the estimate fits or ``force``."""
    if estimate.fits or force:
        return
    from .errors import UsageError

    where, need, have, parts = ("the host", estimate.host, estimate.host_available, estimate.parts)
    if estimate.device_available is not None and estimate.device > estimate.device_available:
        where, need, have, parts = ("the CUDA device", estimate.device, estimate.device_available,
                                    estimate.device_parts)
    detail = ", ".join(f"{name} {_gib(size)}" for name, size in parts.items() if size)
    hints = []
    activations_dominate = parts.get("activations", 0) >= max(parts.values())
    if mode != "stream":
        hints.append("--stream (one layer in memory at a time)")
    if mode == "memory" and not activations_dominate:
        hints.append("--device-map auto with --offload-folder DIR (weights offloaded to disk)")
    hints.append("fewer --nsamples or a shorter --seqlen (activations scale with both)")
    if activations_dominate:
        hints.append("--stream --activations-on-disk DIR (activations in memory-mapped files)")
    raise UsageError(f"estimated peak memory {_gib(need)} ({detail}) exceeds the {_gib(have)} available on {where}; "
                     f"try {'; or '.join(hints)}; or pass --force to run anyway")


def allocate_large_blocks_with_mmap(threshold: int = 128 * 1024) -> None:
    """Make glibc serve every allocation of ``threshold`` bytes or more with its own mmap, which
    goes back to the operating system the moment it is freed (glibc's M_MMAP_THRESHOLD; elsewhere
    a no-op). By default glibc raises that threshold each time such a block is freed, so later
    tensors of a few MB land on the heap, where freed space between live blocks cannot be
    returned: a streamed run's RSS then drifts 20-80 MB above what it holds, more with several
    threads, and differently from run to run. Costs a page fault per page of each large tensor."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(-3, threshold)  # -3: M_MMAP_THRESHOLD (malloc.h)


def release_free_heap() -> None:
    """Give freed heap memory back to the operating system (glibc's malloc_trim; elsewhere a
    no-op). Tokenising a whole novel or a layer's temporaries leave large freed blocks that glibc
    otherwise keeps in the process: for a run that must stay small, RSS is what counts."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.lru_cache(maxsize=1)
def _glibc():
    """glibc through ctypes (loaded once: release_free_heap runs after every SparseGPT solve), or
    None off Linux or on another C library."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        # Attribute access raises AttributeError unless both exist (glibc has them, musl does not).
        _ = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return None
    return libc
