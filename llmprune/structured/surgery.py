"""Surgery on whole layers: drop decoder layers, give linears the biases a config declares.

Cutting heads and neurons out of a layer's matrices depends on the family's layout (separate or
fused projections) and lives in its adapter (llmprune.models.adapters: ``cut_heads``,
``cut_neurons``), which keeps chosen rows/columns bit for bit and updates the attributes the
model's own forward code reads (so no forward code is copied or patched).
"""

from __future__ import annotations

import torch
from torch import nn


def add_zero_biases(module: nn.Module, names: tuple[str, ...]) -> None:
    """Give the named linears a zero bias where they have none (the config will declare biases)."""
    for name in names:
        linear = module.get_submodule(name)
        if linear.bias is None:
            linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype,
                                                   device=linear.weight.device))


def remove_layers(model: nn.Module, layers: nn.ModuleList, drop: list[int]) -> None:
    """Delete decoder layers, renumber the rest (KV-cache slots), and cut every per-layer list of
    the config (``layer_types`` and the like) to the kept layers."""
    config = model.config
    count = len(layers)
    keep = [i for i in range(count) if i not in set(drop)]
    for index in sorted(set(drop), reverse=True):
        del layers[index]  # ModuleList re-indexes in place; the parent model keeps the same list
    for new_index, layer in enumerate(layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    for key in config.to_dict():
        current = getattr(config, key, None)
        if isinstance(current, (list, tuple)) and len(current) == count:
            setattr(config, key, [current[i] for i in keep])
    config.num_hidden_layers = len(keep)
