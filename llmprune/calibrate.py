"""The one layer-by-layer runner that every method shares.

1. Capture: run the model once per calibration batch with every decoder layer replaced by a
   catcher that records the arguments the model passes it (hidden states for layer 0; for every
   layer its own positional and keyword arguments, which differ between layer types in models
   such as Gemma 3) and returns the hidden states unchanged.
2. For each layer: onload it (to the compute device; or where an accelerate device map put it,
   its offloaded weights read once; or, streaming, from the checkpoint); feed every batch with
   hooks on the first linear of each input group collecting statistics; combine the statistics
   across processes (accelerate launch); prune each group; feed every batch again so the next
   layer sees the pruned outputs (written over the inputs, so one activation buffer of
   nsamples x seqlen x hidden lives at a time); offload it (back home, back to the offload
   store with its changes, or to the output shards).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .checkpoint import LayerCheckpoint
from .errors import NumericalError, UsageError
from .methods import NMPattern
from .models.adapters import DecoderAdapter
from .placement import execution_device, is_dispatched, onloaded

log = logging.getLogger(__name__)


class _StopCapture(Exception):
    """Raised by the last catcher: nothing after the decoder layers is needed."""


class StopLayer(Exception):
    """Raised by a statistics hook once everything it needs from this layer has been seen, to skip
    the rest of the layer's computation in a statistics pass (e.g. the down projection)."""


class _LayerCatcher(nn.Module):
    """Stands in for one decoder layer during capture: records arguments, returns hidden states."""

    def __init__(self, layer: nn.Module, index: int, record, last: bool):
        super().__init__()
        self.layer = layer
        self.index = index
        self.record = record
        self.last = last

    def __getattr__(self, name):  # the model may read attributes such as ``attention_type``
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("layer"), name)

    def forward(self, hidden_states, *args, **kwargs):
        self.record(self.index, hidden_states, args, kwargs)
        if self.last:
            raise _StopCapture
        return hidden_states


@dataclass
class LayerInputs:
    """Per calibration batch: hidden states [batch, seqlen, hidden], and per layer (args, kwargs)."""

    hidden: list[torch.Tensor]
    layer_args: list[list[tuple[tuple, dict]]]  # [layer][batch]


def _decoder_layer_output(output):
    """transformers 5 layers return a tensor; older ones a tuple whose first item is the state."""
    return output[0] if isinstance(output, (tuple, list)) else output


class DiskActivations:
    """The hidden states of the calibration batches in memory-mapped files, one per batch, in a
    temporary folder under ``folder``: the list the runner reads and overwrites layer by layer,
    for activations larger than memory (the operating system pages them in and out)."""

    def __init__(self, folder: str, device: torch.device):
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix="llmprune-activations-", dir=folder))
        self.device = device
        self.mapped: list[torch.Tensor] = []

    def _map(self, number: int, tensor: torch.Tensor) -> torch.Tensor:
        path = self.folder / f"batch-{number}-{tensor.numel()}.bin"
        mapped = torch.from_file(str(path), shared=True, size=tensor.numel(), dtype=tensor.dtype)
        return mapped.view(tensor.shape).copy_(tensor)

    def append(self, tensor: torch.Tensor) -> None:
        self.mapped.append(self._map(len(self.mapped), tensor))

    def __len__(self) -> int:
        return len(self.mapped)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __getitem__(self, number: int) -> torch.Tensor:
        return self.mapped[number].to(self.device)

    def __setitem__(self, number: int, tensor: torch.Tensor) -> None:
        if tensor.shape == self.mapped[number].shape and tensor.dtype == self.mapped[number].dtype:
            self.mapped[number].copy_(tensor)
        else:
            self.mapped[number] = self._map(number, tensor)

    def close(self) -> None:
        self.mapped.clear()
        shutil.rmtree(self.folder, ignore_errors=True)


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, adapter: DecoderAdapter, input_ids: torch.Tensor,
                         batch_size: int, device: torch.device, hidden=None) -> LayerInputs:
    """Run the embeddings once per batch of input_ids [nsamples, seqlen] and record layer inputs
    (the hidden states into ``hidden``, a list or a DiskActivations)."""
    decoder = adapter.decoder(model)
    layers = adapter.layers(model)
    originals = list(layers)
    captured = LayerInputs(hidden=[] if hidden is None else hidden, layer_args=[[] for _ in originals])

    def record(index, hidden_states, args, kwargs):
        if index == 0:
            captured.hidden.append(hidden_states)
        kwargs = dict(kwargs)
        kwargs["use_cache"] = False
        for key in ("past_key_values", "past_key_value", "cache"):  # no cache during calibration
            if key in kwargs:
                kwargs[key] = None
        captured.layer_args[index].append((args, kwargs))

    # Everything but the decoder layers runs on the compute device during capture; with a device
    # map accelerate's hooks place it, and what is still on the meta device (streaming: the final
    # norm) is not needed before the last catcher stops the pass.
    dispatched = is_dispatched(model)
    others = [m for name, m in decoder.named_children() if name != "layers" and not dispatched
              and not any(t.is_meta for t in [*m.parameters(), *m.buffers()])]
    home = {id(m): next(m.parameters(), torch.empty(0)).device for m in others}
    for m in others:
        m.to(device)
    for i, layer in enumerate(originals):
        layers[i] = _LayerCatcher(layer, i, record, last=i == len(originals) - 1)
    embedding_device = execution_device(decoder.get_input_embeddings(), device)
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            try:
                decoder(input_ids=input_ids[start:start + batch_size].to(embedding_device), use_cache=False)
            except _StopCapture:
                pass
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
        for m in others:
            if home[id(m)].type != "meta":
                m.to(home[id(m)])
    return captured


@dataclass
class PruneRecord:
    """What the runner did: per linear module, its shape and count of zeros after pruning."""

    modules: dict[str, dict] = field(default_factory=dict)  # name -> {shape, zeros, numel, layer}
    layer_seconds: list[float] = field(default_factory=list)


def _check_finite(tensor: torch.Tensor, where: str) -> None:
    if not torch.isfinite(tensor).all():
        raise NumericalError(f"non-finite values (NaN or inf) in {where}")


def _first_non_finite(layer: nn.Module, index: int, hidden: torch.Tensor, args: tuple, kwargs: dict) -> str:
    """Where a layer's output went non-finite: its input, else the first of its modules (in the
    order they finish) whose output has NaN/inf, found by running the batch again with hooks."""
    if not torch.isfinite(hidden).all():
        return f"the input of model.layers.{index}"
    found = []

    def check(name):
        def hook(module, module_args, output):
            tensor = output[0] if isinstance(output, (tuple, list)) and output else output
            if (not found and isinstance(tensor, torch.Tensor) and tensor.is_floating_point()
                    and not torch.isfinite(tensor).all()):
                found.append(name)
        return hook

    handles = [module.register_forward_hook(check(name)) for name, module in layer.named_modules() if name]
    try:
        layer(hidden, *args, **kwargs)
    except Exception:  # a statistics hook may stop the layer early: what was seen is enough
        pass
    finally:
        for handle in handles:
            handle.remove()
    return f"the output of model.layers.{index}.{found[0]}" if found else f"the output of model.layers.{index}"


class MoveToDevice:
    """Where a layer runs when nothing else says so: it visits the compute device and goes home."""

    def __init__(self, device: torch.device):
        self.device = device
        self.home = None

    def enter(self, index: int, layer: nn.Module) -> None:
        self.home = next(layer.parameters()).device
        layer.to(self.device)

    def writable(self, layer: nn.Module):
        return nullcontext(layer)

    def leave(self, index: int, layer: nn.Module) -> None:
        layer.to(self.home)


class WhereAcceleratePutIt:
    """A model dispatched by accelerate: every layer runs on its own execution device (its hooks
    move the activations there). An offloaded layer is read from its offload store once when
    the visit starts (not at every batch's forward pass) and written back to it when the visit
    ends, changes included (see llmprune.placement.onloaded)."""

    def __init__(self):
        self.visit = None

    def enter(self, index: int, layer: nn.Module) -> None:
        self.visit = onloaded(layer, hold=True)
        self.visit.__enter__()

    def writable(self, layer: nn.Module):
        return nullcontext(layer)

    def leave(self, index: int, layer: nn.Module) -> None:
        visit, self.visit = self.visit, None
        visit.__exit__(None, None, None)

    def abandon(self, index: int, layer: nn.Module) -> None:
        """The visit failed: nothing is written back, the hooks load from the store again."""
        visit, self.visit = self.visit, None
        if visit is not None:
            failure = RuntimeError(f"the visit of layer {index} failed")
            visit.__exit__(RuntimeError, failure, None)  # the context's error path: no write-back


def default_placement(model: nn.Module, device: torch.device):
    return WhereAcceleratePutIt() if is_dispatched(model) else MoveToDevice(device)


def _share_of_batches(calibration_ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """This process's contiguous share of the calibration batches (all of them for one process)."""
    batches = -(-calibration_ids.shape[0] // batch_size)
    share = distributed.batch_share(batches, distributed.current())
    return calibration_ids[share.start * batch_size:share.stop * batch_size]


@torch.no_grad()
def run_layerwise(model: nn.Module, adapter: DecoderAdapter, calibration_ids: torch.Tensor | None,
                  device: torch.device, *, batch_size: int = 1, progress: bool = True, desc: str = "layers",
                  checkpoint: LayerCheckpoint | None = None, placement=None, **work) -> list[float]:
    """Visit every decoder layer, one at a time, where ``placement`` runs it; return seconds per layer.
    work: the fields of ``LayerWork`` (collect, combine, apply, layer_state, restore_layer, steps).

    collect(index, layer) -> hook handles that gather statistics while calibration batches run.
    combine(index, layer), after the statistics pass, merges statistics across processes.
    apply(index, layer) changes the layer (pruning). With ``apply``: a statistics pass, the hooks
    removed, apply, then a propagation pass so the next layer sees the changed outputs. Without:
    one pass that both feeds the hooks and propagates. No calibration_ids: no passes at all.
    steps(layer) -> k: k rounds of statistics pass, combine and apply per layer before the one
    propagation pass, collect/combine/apply called with the round as a third argument (true-
    sequential pruning: each round sees the changes of the rounds before it).

    placement: ``enter(index, layer)`` before a layer's passes, ``writable(layer)`` a context in
    which its weights are real and changes persist, ``leave(index, layer)`` after. Default: move
    the layer to ``device`` and back; for a model dispatched by accelerate, run it where it is.
    A placement with an ``activation_folder`` keeps the hidden states between layers in
    memory-mapped files there (DiskActivations) instead of memory.
    Under ``accelerate launch`` (a torch.distributed group) each process calibrates on its own
    share of the batches.

    With a ``checkpoint``: after each layer, layer_state(index, layer) -> {name: tensor} is
    committed together with the next layer's inputs; layers an earlier run finished are not run
    again: restore_layer(index, layer, tensors) puts their state back and the stored inputs of
    the first unfinished layer replace the captured ones.
    """
    layers = adapter.layers(model)
    placement = placement if placement is not None else default_placement(model, device)
    inputs = None
    activation_folder = getattr(placement, "activation_folder", None)
    on_disk = DiskActivations(activation_folder, device) if activation_folder and calibration_ids is not None else None
    try:
        if calibration_ids is not None:
            inputs = capture_layer_inputs(model, adapter, _share_of_batches(calibration_ids, batch_size),
                                          batch_size, device, hidden=on_disk)
        return _visit_layers(layers, inputs, placement, LayerWork(**work), checkpoint, progress, desc)
    finally:
        if on_disk is not None:
            on_disk.close()


@dataclass
class LayerWork:
    """What run_layerwise does at each decoder layer; every callback is optional (see there)."""

    collect: Callable | None = None        # (index, layer) -> hook handles gathering statistics
    combine: Callable | None = None        # (index, layer): merge statistics across processes
    apply: Callable | None = None          # (index, layer): change the layer (prune it)
    layer_state: Callable | None = None    # (index, layer) -> {name: tensor} committed to a checkpoint
    restore_layer: Callable | None = None  # (index, layer, tensors): put a committed layer back
    steps: Callable | None = None          # (layer) -> rounds of statistics/combine/apply per layer


def _resume(layers, inputs, placement, work: LayerWork, checkpoint) -> int:
    """Restore the layers an earlier run committed; returns how many (0 without a checkpoint)."""
    resume_at = checkpoint.open() if checkpoint is not None else 0
    if resume_at:
        if resume_at > len(layers):
            raise UsageError(f"--checkpoint-dir {str(checkpoint.folder)!r}: {resume_at} finished layers, "
                             f"but the model has {len(layers)}")
        log.warning("resuming from the checkpoint in %s: layers 0-%d are done", checkpoint.folder, resume_at - 1)
        for index in range(resume_at):
            placement.enter(index, layers[index])
            with placement.writable(layers[index]):
                work.restore_layer(index, layers[index], checkpoint.load_layer(index))
            placement.leave(index, layers[index])
        if inputs is not None and resume_at < len(layers):
            inputs.hidden = checkpoint.load_inputs(resume_at, like=inputs.hidden)
    return resume_at


def _feed(inputs, index: int, layer: nn.Module, propagate: bool) -> None:
    """Run the calibration batches through ``layer``; with ``propagate`` its outputs become the
    next layer's inputs (checked finite), else only the statistics hooks see them."""
    for batch, (args, kwargs) in enumerate(inputs.layer_args[index]):
        try:
            output = layer(inputs.hidden[batch], *args, **kwargs)
        except StopLayer:
            if propagate:
                raise RuntimeError("a statistics hook stopped a propagation pass") from None
            continue
        if propagate:
            output = _decoder_layer_output(output)
            if not torch.isfinite(output).all():
                raise NumericalError("non-finite values (NaN or inf) in " + _first_non_finite(
                    layer, index, inputs.hidden[batch], args, kwargs))
            inputs.hidden[batch] = output


def _visit_layers(layers, inputs, placement, work: LayerWork, checkpoint, progress: bool, desc: str) -> list[float]:
    """The layer loop of run_layerwise (see there)."""
    resume_at = _resume(layers, inputs, placement, work, checkpoint)
    seconds = []
    for index, layer in enumerate(tqdm(layers, desc=desc, disable=not progress)):
        if index < resume_at:
            seconds.append(0.0)
            continue
        started = time.perf_counter()
        placement.enter(index, layer)
        try:
            _visit_layer(index, layer, len(layers), inputs, placement, work, checkpoint)
        except BaseException:
            getattr(placement, "abandon", lambda *args: None)(index, layer)
            raise
        placement.leave(index, layer)
        seconds.append(time.perf_counter() - started)
    return seconds


def _visit_layer(index: int, layer: nn.Module, count: int, inputs, placement, work: LayerWork, checkpoint) -> None:
    """One layer: statistics pass, combine, apply (once, or once per round of ``work.steps``),
    then one propagation pass, and the commit to the checkpoint."""
    rounds = [()] if work.steps is None else [(step,) for step in range(work.steps(layer))]
    for step in rounds:  # the round, when there are rounds, is the callbacks' third argument
        hooks = work.collect(index, layer, *step) if (work.collect is not None and inputs is not None) else []
        try:
            if inputs is not None and (hooks or work.apply is None):
                _feed(inputs, index, layer, propagate=work.apply is None)
        finally:
            for hook in hooks:
                hook.remove()
        if work.combine is not None and inputs is not None:
            work.combine(index, layer, *step)
        if work.apply is not None:
            with placement.writable(layer):
                work.apply(index, layer, *step)
    if work.apply is not None and inputs is not None and index + 1 < count:
        _feed(inputs, index, layer, propagate=True)
    if checkpoint is not None:
        last = index + 1 == count
        with placement.writable(layer):
            state = work.layer_state(index, layer)
            checkpoint.save_layer(index, state, None if inputs is None or last else inputs.hidden)


def prune_layerwise(model: nn.Module, adapter: DecoderAdapter, method, sparsity: float | list[float],
                    pattern: NMPattern | None, calibration_ids: torch.Tensor | None,
                    device: torch.device, batch_size: int = 1, progress: bool = True,
                    checkpoint: LayerCheckpoint | None = None, placement=None, sequential: bool = False) -> PruneRecord:
    """Prune every linear projection of every decoder layer in place; see the module docstring.
    With a checkpoint, each pruned layer's linear weights are committed after it is done.
    sparsity: one fraction for every layer, or a list with one per decoder layer (a schedule).
    sequential: the input groups of a layer (q/k/v, o, gate/up, down) are pruned one after the
    other, each from statistics of inputs that already went through the pruned groups before it;
    otherwise all groups' statistics come from one pass of the unpruned layer."""
    if method.needs_calibration and calibration_ids is None:
        raise ValueError(f"method {method.name} needs calibration token ids")
    record = PruneRecord()
    statistics: list = []  # per input group of the current layer

    group_of_processes = distributed.current()

    def chosen(layer, step):  # the input groups a round prunes: all, or the step-th
        groups = adapter.linear_groups(layer)
        return groups if step is None else [groups[step]]

    def collect(index, layer, step=None):
        groups = chosen(layer, step)
        where = execution_device(layer, device)  # statistics live where the layer computes
        statistics[:] = [distributed.accumulator(lambda n=group[0][1].in_features: method.new_statistics(n, where),
                                                 group_of_processes) for group in groups]

        def record(stats, last):
            def hook(module, args):
                stats.add_batch(args[0])
                if last:  # the last group's input is the last statistic: skip its matmul
                    raise StopLayer
            return hook

        return [group[0][1].register_forward_pre_hook(record(stats, last=i == len(groups) - 1))
                for i, (group, stats) in enumerate(zip(groups, statistics))]

    def combine(index, layer, step=None):  # sums over the processes' batches (a no-op for one process)
        statistics[:] = [distributed.combine(stats, group_of_processes) for stats in statistics]

    def apply(index, layer, step=None):
        layer_sparsity = sparsity[index] if isinstance(sparsity, (list, tuple)) else sparsity
        _prune_layer(chosen(layer, step), method, statistics, layer_sparsity, pattern, index, group_of_processes)
        statistics.clear()
        if step is None or step + 1 == len(adapter.linear_groups(layer)):
            note(index, layer)

    def note(index, layer):
        for group in adapter.linear_groups(layer):
            for name, linear in group:
                record.modules[f"model.layers.{index}.{name}"] = {
                    "layer": index, "shape": list(linear.weight.shape),
                    "zeros": int((linear.weight == 0).sum()), "numel": linear.weight.numel()}

    def layer_state(index, layer):  # [out, in] pruned weights, by module name within the layer
        return {name: linear.weight for group in adapter.linear_groups(layer) for name, linear in group}

    def restore_layer(index, layer, tensors):
        for group in adapter.linear_groups(layer):
            for name, linear in group:
                linear.weight.copy_(tensors[name])
        note(index, layer)

    record.layer_seconds = run_layerwise(
        model, adapter, calibration_ids if method.needs_calibration else None, device,
        collect=collect if method.needs_calibration else None, apply=apply, batch_size=batch_size,
        progress=progress, desc=f"{method.name}: layers", checkpoint=checkpoint, layer_state=layer_state,
        restore_layer=restore_layer, combine=combine if method.needs_calibration else None, placement=placement,
        steps=(lambda layer: len(adapter.linear_groups(layer))) if sequential and method.needs_calibration else None)
    return record


def _prune_layer(groups: list, method, statistics: list, sparsity: float, pattern, index: int,
                 group_of_processes) -> None:
    """Prune the given input groups of one layer with their statistics (float32 [out_i, in]
    matrices in, pruned matrices out), each group solved by one process and shared, written back
    in place."""
    group_statistics = statistics or [None] * len(groups)
    names = [[f"model.layers.{index}.{name}" for name, _ in group] for group in groups]

    def solve(g):
        stats = group_statistics[g]
        for attribute in ("sum_of_squares", "sum_xtx"):
            if hasattr(stats, attribute):
                _check_finite(getattr(stats, attribute), f"calibration statistics of {names[g][0]}")
        weights = [linear.weight.detach().float() for _, linear in groups[g]]
        return method.prune_group(weights, stats, sparsity, pattern, name=", ".join(names[g]))

    def shapes(g):
        return [(tuple(linear.weight.shape), torch.float32, linear.weight.device) for _, linear in groups[g]]

    for group, pruned, group_names in zip(groups, distributed.solve_spread(len(groups), solve, shapes,
                                                                          group_of_processes), names):
        for (_, linear), new_weight, full_name in zip(group, pruned, group_names):
            _check_finite(new_weight, f"pruned weight of {full_name}")
            linear.weight.copy_(new_weight.to(linear.weight.dtype))
