"""Calibration split over processes (``accelerate launch --num_processes N -m llmprune ...``).

Every process holds the whole model (or its own device map) and runs the same layer loop on its
own contiguous share of the calibration batches. Per layer:

- statistics are combined across processes. Vector statistics (Wanda norms, structured channel
  sums, layer change) are kept per batch and summed in global batch order, which is exactly the
  order of a single-process run, so the result is bitwise the same. Matrix statistics (SparseGPT
  Hessians, [in, in]) are too large to keep per batch: their running sums are all-reduced in
  float64, in which they are kept, so the sum differs from the single-process one by about
  1e-16 relative, which vanishes when the solve rounds its float64 inverse factor to float32;
- each input group (q/k/v, o, gate/up, down) is solved by one process, the solves spread
  round-robin, and the new weights are broadcast to all;
- only the main process (rank 0) writes the output.

gloo on CPU, NCCL on CUDA. accelerate's launcher sets RANK / WORLD_SIZE / MASTER_ADDR /
MASTER_PORT / LOCAL_RANK; nothing here needs accelerate itself.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Group:
    rank: int
    world: int

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def init_from_environment(device: torch.device | None = None) -> Group | None:
    """Join the process group the launcher describes (no-op for one process)."""
    if launched_world_size() <= 1:
        return current()
    if not dist.is_initialized():
        if device is not None and device.type == "cuda":  # one GPU per process: LOCAL_RANK's
            torch.cuda.set_device(local_device())
            dist.init_process_group(backend="nccl", device_id=local_device())
        else:
            dist.init_process_group(backend="gloo")
    return current()


def current() -> Group | None:
    """The process group in use, or None for a single process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return Group(dist.get_rank(), dist.get_world_size())
    return None


def local_device() -> torch.device:
    """The CUDA device of this process under a launcher (LOCAL_RANK), else cuda."""
    return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")


def batch_share(batches: int, group: Group | None) -> range:
    """The contiguous range of global batch indices this process calibrates on."""
    if group is None:
        return range(batches)
    return range(batches * group.rank // group.world, batches * (group.rank + 1) // group.world)


def barrier() -> None:
    if current() is not None:
        dist.barrier()


def _is_small(accumulator) -> bool:
    """Vector statistics are kept per batch (exact merge); matrices are summed (all-reduce)."""
    return all(value.dim() <= 1 for value in vars(accumulator).values() if isinstance(value, torch.Tensor))


class PerBatch:
    """Stands in for one accumulator: keeps one fresh accumulator per ``add_batch`` call, so that
    the batches of all processes can later be summed in global order."""

    def __init__(self, factory):
        self.factory = factory
        self.parts = []

    def add_batch(self, *args, **kwargs) -> None:
        part = self.factory()
        part.add_batch(*args, **kwargs)
        self.parts.append(part)


class Joint:
    """Several accumulators fed the same inputs (a method's own and a Hessian for a weight refit);
    each part is combined across processes in its own way. ``None`` parts are skipped."""

    def __init__(self, parts: list):
        self.parts = list(parts)

    def add_batch(self, inputs) -> None:
        for part in self.parts:
            if part is not None:
                part.add_batch(inputs)


def accumulator(factory, group: Group | None):
    """A new accumulator from ``factory()``; in a process group, one that can be combined exactly."""
    first = factory()
    if group is not None and isinstance(first, Joint):  # each part from a copy of its fresh self
        return Joint([None if part is None else accumulator(lambda part=part: copy.deepcopy(part), group)
                      for part in first.parts])
    if group is None or not _is_small(first):
        return first
    return PerBatch(factory)


def _add_into(total, part) -> None:
    """total += part, field by field (tensors and numbers), in the accumulator's own dtype."""
    for name, value in vars(part).items():
        if isinstance(value, torch.Tensor):
            getattr(total, name).add_(value.to(getattr(total, name).device))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            setattr(total, name, getattr(total, name) + value)


def combine(statistic, group: Group | None):
    """The statistic over all processes' batches (every process gets the same result)."""
    if group is None:
        return statistic
    if isinstance(statistic, Joint):
        statistic.parts = [None if part is None else combine(part, group) for part in statistic.parts]
        return statistic
    if isinstance(statistic, PerBatch):
        local = [{k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in vars(p).items()}
                 for p in statistic.parts]
        gathered = [None] * group.world
        dist.all_gather_object(gathered, local)
        total = statistic.factory()
        for parts in gathered:  # rank order = global batch order (contiguous shares)
            for fields in parts:
                part = statistic.factory()
                vars(part).update(fields)
                _add_into(total, part)
        return total
    for name, value in vars(statistic).items():
        if isinstance(value, torch.Tensor):
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            dtype = torch.int64 if isinstance(value, int) else torch.float64
            carrier = torch.tensor([value], dtype=dtype, device=_collective_device())
            dist.all_reduce(carrier, op=dist.ReduceOp.SUM)
            setattr(statistic, name, type(value)(carrier.item()))
    return statistic


def _collective_device() -> torch.device:
    return local_device() if dist.get_backend() == "nccl" else torch.device("cpu")


def solve_spread(count: int, solve, shapes, group: Group | None) -> list[list[torch.Tensor]]:
    """Results of ``solve(i) -> [tensor, ...]`` for i in range(count), each computed by one
    process (round-robin) and broadcast to all. ``shapes(i)`` -> [(shape, dtype, device), ...]
    tells the other processes what they will receive."""
    if group is None:
        return [solve(i) for i in range(count)]
    results = []
    for i in range(count):
        owner = i % group.world
        expected = shapes(i)
        tensors = solve(i) if group.rank == owner else [torch.empty(s, dtype=d) for s, d, _ in expected]
        moved = [t.to(_collective_device()).contiguous() for t in tensors]
        for tensor in moved:
            dist.broadcast(tensor, src=owner)
        results.append([m.to(device) for m, (_, _, device) in zip(moved, expected)])
    return results
