"""The one layer-by-layer runner that every method shares.

1. Capture: run the model once per calibration batch with every decoder layer replaced by a
   catcher that records the arguments the model passes it (hidden states for layer 0; for every
   layer its own positional and keyword arguments, which differ between layer types in models
   such as Gemma 3) and returns the hidden states unchanged.
2. For each layer: move it to the compute device; feed every batch with hooks on the first linear
   of each input group collecting statistics; prune each group; feed every batch again so the
   next layer sees the pruned outputs (written over the inputs, so one activation buffer of
   nsamples x seqlen x hidden lives at a time); move the layer back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import NumericalError
from .methods import NMPattern
from .models.adapters import DecoderAdapter


class _StopCapture(Exception):
    """Raised by the last catcher: nothing after the decoder layers is needed."""


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


def _to_device(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def _decoder_layer_output(output):
    """transformers 5 layers return a tensor; older ones a tuple whose first item is the state."""
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, adapter: DecoderAdapter, input_ids: torch.Tensor,
                         batch_size: int, device: torch.device) -> LayerInputs:
    """Run the embeddings once per batch of input_ids [nsamples, seqlen] and record layer inputs."""
    decoder = adapter.decoder(model)
    layers = adapter.layers(model)
    originals = list(layers)
    captured = LayerInputs(hidden=[], layer_args=[[] for _ in originals])

    def record(index, hidden_states, args, kwargs):
        if index == 0:
            captured.hidden.append(hidden_states)
        kwargs = dict(kwargs)
        kwargs["use_cache"] = False
        for key in ("past_key_values", "past_key_value", "cache"):  # no cache during calibration
            if key in kwargs:
                kwargs[key] = None
        captured.layer_args[index].append((args, kwargs))

    # Everything but the decoder layers runs on the compute device during capture.
    others = [m for name, m in decoder.named_children() if name != "layers"]
    home = {id(m): next(m.parameters(), torch.empty(0)).device for m in others}
    for m in others:
        m.to(device)
    for i, layer in enumerate(originals):
        layers[i] = _LayerCatcher(layer, i, record, last=i == len(originals) - 1)
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            try:
                decoder(input_ids=input_ids[start:start + batch_size].to(device), use_cache=False)
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


@torch.no_grad()
def prune_layerwise(model: nn.Module, adapter: DecoderAdapter, method, sparsity: float,
                    pattern: NMPattern | None, calibration_ids: torch.Tensor | None,
                    device: torch.device, batch_size: int = 1, progress: bool = True) -> PruneRecord:
    """Prune every linear projection of every decoder layer in place; see the module docstring."""
    record = PruneRecord()
    layers = adapter.layers(model)
    inputs = None
    if method.needs_calibration:
        if calibration_ids is None:
            raise ValueError(f"method {method.name} needs calibration token ids")
        inputs = capture_layer_inputs(model, adapter, calibration_ids, batch_size, device)

    for index, layer in enumerate(tqdm(layers, desc=f"{method.name}: layers", disable=not progress)):
        started = time.perf_counter()
        home = next(layer.parameters()).device
        layer.to(device)
        groups = adapter.linear_groups(layer)
        prefix = f"model.layers.{index}"

        statistics = [None] * len(groups)
        if method.needs_calibration:
            statistics = [method.new_statistics(group[0][1].in_features, device) for group in groups]
            hooks = [group[0][1].register_forward_hook(
                lambda module, args, output, stats=stats: stats.add_batch(args[0]))
                for group, stats in zip(groups, statistics)]
            try:
                for batch, (args, kwargs) in enumerate(inputs.layer_args[index]):
                    layer(inputs.hidden[batch], *args, **kwargs)
            finally:
                for hook in hooks:
                    hook.remove()

        for group, stats in zip(groups, statistics):
            names = [f"{prefix}.{name}" for name, _ in group]
            if stats is not None:
                for attribute in ("sum_of_squares", "sum_xtx"):
                    if hasattr(stats, attribute):
                        _check_finite(getattr(stats, attribute), f"calibration statistics of {names[0]}")
            weights = [linear.weight.detach().float() for _, linear in group]  # [out_i, in]
            pruned = method.prune_group(weights, stats, sparsity, pattern, name=", ".join(names))
            for (name, linear), new_weight, full_name in zip(group, pruned, names):
                _check_finite(new_weight, f"pruned weight of {full_name}")
                linear.weight.copy_(new_weight.to(linear.weight.dtype))
                zeros = int((linear.weight == 0).sum())
                record.modules[full_name] = {"layer": index, "shape": list(linear.weight.shape),
                                             "zeros": zeros, "numel": linear.weight.numel()}
        del statistics

        if inputs is not None and index + 1 < len(layers):  # the next layer sees pruned outputs
            for batch, (args, kwargs) in enumerate(inputs.layer_args[index]):
                output = _decoder_layer_output(layer(inputs.hidden[batch], *args, **kwargs))
                _check_finite(output, f"output of {prefix}")
                inputs.hidden[batch] = output
        layer.to(home)
        record.layer_seconds.append(time.perf_counter() - started)
    return record
