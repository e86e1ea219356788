"""Surgery that really shrinks matrices: keep chosen rows/columns of linear layers, drop layers.

Every function takes the indices to KEEP (sorted), builds new nn.Linear modules of the smaller
shape with the kept weights copied bit for bit, and updates the module attributes that the
model's own forward code reads (so no forward code is copied or patched).
"""

from __future__ import annotations

import torch
from torch import nn


def _new_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                       device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


def keep_rows(linear: nn.Linear, rows: torch.Tensor) -> nn.Linear:
    """Output features ``rows`` of linear: weight [out, in] -> [len(rows), in]."""
    bias = linear.bias[rows] if linear.bias is not None else None
    return _new_linear(linear.weight[rows], bias)


def keep_columns(linear: nn.Linear, columns: torch.Tensor, extra_bias: torch.Tensor | None = None) -> nn.Linear:
    """Input features ``columns``: weight [out, in] -> [out, len(columns)]. ``extra_bias`` [out]
    is added to the bias (created if missing): the mean contribution of removed inputs."""
    bias = linear.bias
    if extra_bias is not None:
        bias = extra_bias.to(linear.weight.dtype) + (bias if bias is not None else 0)
    return _new_linear(linear.weight[:, columns], bias)


def head_channels(heads: list[int], head_dim: int, device=None) -> torch.Tensor:
    """Channel indices [len(heads) * hd] of the given heads, in order."""
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim, device=device) for h in heads])


def shrink_attention(attention: nn.Module, keep_query: list[int], keep_kv: list[int], head_dim: int,
                     o_bias: torch.Tensor | None = None) -> None:
    """Keep query heads ``keep_query`` and KV heads ``keep_kv`` (each kept KV head keeps the same
    number of its own query heads). q/k/v lose rows, o_proj loses columns; head_dim stays."""
    device = attention.q_proj.weight.device
    q = head_channels(keep_query, head_dim, device)
    kv = head_channels(keep_kv, head_dim, device)
    attention.q_proj = keep_rows(attention.q_proj, q)
    attention.k_proj = keep_rows(attention.k_proj, kv)
    attention.v_proj = keep_rows(attention.v_proj, kv)
    attention.o_proj = keep_columns(attention.o_proj, q, o_bias)
    attention.num_key_value_groups = len(keep_query) // len(keep_kv)
    for name, value in (("num_heads", len(keep_query)), ("num_attention_heads", len(keep_query)),
                        ("num_key_value_heads", len(keep_kv))):
        if hasattr(attention, name):
            setattr(attention, name, value)


def shrink_mlp(mlp: nn.Module, keep: torch.Tensor, down_bias: torch.Tensor | None = None) -> None:
    """Keep FFN neurons ``keep``: rows of gate/up, columns of down."""
    mlp.gate_proj = keep_rows(mlp.gate_proj, keep)
    mlp.up_proj = keep_rows(mlp.up_proj, keep)
    mlp.down_proj = keep_columns(mlp.down_proj, keep, down_bias)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(keep)


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
