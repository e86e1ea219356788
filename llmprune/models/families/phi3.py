"""Phi-3: fused projections. ``self_attn.qkv_proj`` holds the query, key and value rows one after
the other ([Hq*hd | G*hd | G*hd], D); ``mlp.gate_up_proj`` holds the gate rows, then the up rows
([I | I], D), and the MLP splits its output in halves.

Each fused linear reads one tensor, so it is one calibration group. A head or neuron is cut by
keeping its rows in every part of the fused matrix, so the parts stay contiguous and aligned.
Phi-3's attention reads the query width from its config, so a cut attention module gets its own
copy of the config with the new head counts.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..adapters import DecoderAdapter, _set_head_counts, head_channels, keep_columns, keep_rows, register_adapter


class FusedAdapter(DecoderAdapter):
    """A fused ``qkv_proj`` and a fused ``gate_up_proj``; ``o_proj`` and ``down_proj`` as usual."""

    query = key = value = "qkv_proj"
    gate = up = "gate_up_proj"

    @property
    def input_groups(self) -> tuple[tuple[str, ...], ...]:
        a, m = self.attention_name, self.mlp_name
        return ((f"{a}.{self.query}",), (f"{a}.{self.output}",), (f"{m}.{self.gate}",), (f"{m}.{self.down}",))

    def bias_names(self) -> dict[str, tuple[str, ...]]:
        return {"attention": (self.query, self.output), "mlp": (self.gate, self.down)}

    def _query_width(self, layer: nn.Module) -> int:
        """Hq*hd: the output projection's inputs."""
        return self.output_projection(layer).in_features

    def query_rows(self, layer: nn.Module) -> tuple[str, int, int]:
        return self.query, 0, self._query_width(layer)

    def attention_weights(self, layer: nn.Module) -> tuple[torch.Tensor, ...]:
        qkv = getattr(self.attention(layer), self.query).weight
        q_width = self._query_width(layer)
        kv_width = (qkv.shape[0] - q_width) // 2
        q, k, v = qkv.split([q_width, kv_width, kv_width])
        return q, k, v, self.output_projection(layer).weight

    def mlp_weights(self, layer: nn.Module) -> tuple[torch.Tensor, ...]:
        gate, up = getattr(self.mlp(layer), self.gate).weight.chunk(2)
        return gate, up, self.down_projection(layer).weight

    def cut_heads(self, layer, keep_query, keep_kv, head_dim, o_bias=None) -> None:
        attention = self.attention(layer)
        qkv = getattr(attention, self.query)
        q_width = self._query_width(layer)
        kv_width = (qkv.out_features - q_width) // 2
        q = head_channels(keep_query, head_dim, qkv.weight.device)
        kv = head_channels(keep_kv, head_dim, qkv.weight.device)
        setattr(attention, self.query, keep_rows(qkv, torch.cat([q, q_width + kv, q_width + kv_width + kv])))
        setattr(attention, self.output, keep_columns(getattr(attention, self.output), q, o_bias))
        _set_head_counts(attention, len(keep_query), len(keep_kv))
        attention.config = copy.copy(attention.config)  # shared with every layer: this one's head counts
        attention.config.num_attention_heads = len(keep_query)
        attention.config.num_key_value_heads = len(keep_kv)

    def cut_neurons(self, layer, keep, down_bias=None) -> None:
        mlp = self.mlp(layer)
        gate_up = getattr(mlp, self.gate)
        width = gate_up.out_features // 2
        setattr(mlp, self.gate, keep_rows(gate_up, torch.cat([keep, width + keep])))
        setattr(mlp, self.down, keep_columns(getattr(mlp, self.down), keep, down_bias))


register_adapter(("phi3",), FusedAdapter())
