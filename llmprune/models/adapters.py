"""Architecture adapters: where a family keeps its decoder layers, projections and norms, its head
geometry, and how its layers are cut.

Chosen by ``config.model_type``, never by the model's name. Nothing else in the package spells a
module name of a decoder layer: calibration, structured scoring and surgery, the dynamic wrapper
and the memory estimate ask the adapter.

``DecoderAdapter`` serves every family whose decoder layer has ``self_attn.{q,k,v,o}_proj`` and
``mlp.{gate,up,down}_proj`` (Llama and its relatives). A family with another layout subclasses it
in its own module under ``llmprune/models/families/`` and registers itself there with
``register_adapter``; every module of that package is imported with this one.

Head geometry (shapes used throughout): hidden size D, query heads Hq, KV heads G, head_dim hd,
group size r = Hq / G. Query head h owns output rows [h*hd, (h+1)*hd) of the query projection and
input columns [h*hd, (h+1)*hd) of the output projection; KV head g owns rows [g*hd, (g+1)*hd) of
the key and value projections and serves query heads [g*r, (g+1)*r) (the GQA mapping of gpt-fast).
FFN neuron j owns row j of gate and up and column j of down.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UsageError

#: Prefix of the model types of llmprune's uneven-layer configs (models/modeling_llmprune.py).
UNEVEN_PREFIX = "llmprune_"


@dataclass(frozen=True)
class HeadGeometry:
    """Attention shape of one layer: Hq query heads over G KV heads of head_dim channels."""

    query_heads: int
    kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        """r: query heads served by one KV head."""
        return self.query_heads // self.kv_heads

    def kv_head_of(self, query_head: int) -> int:
        return query_head // self.group_size

    def query_heads_of(self, kv_head: int) -> list[int]:
        return list(range(kv_head * self.group_size, (kv_head + 1) * self.group_size))


def _new_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                       device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


def keep_rows(linear: nn.Linear, rows: torch.Tensor) -> nn.Linear:
    """Output features ``rows`` of linear: weight [out, in] -> [len(rows), in], copied bit for bit."""
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


def _set_head_counts(attention: nn.Module, query_heads: int, kv_heads: int) -> None:
    """The attributes the family's attention forward reads for its head counts."""
    attention.num_key_value_groups = query_heads // kv_heads
    for name, value in (("num_heads", query_heads), ("num_attention_heads", query_heads),
                        ("num_key_value_heads", kv_heads)):
        if hasattr(attention, name):
            setattr(attention, name, value)


class DecoderAdapter:
    """Separate ``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj`` linears."""

    final_norm_name = "norm"  # of the decoder, before the LM head
    attention_name = "self_attn"
    mlp_name = "mlp"
    # Norms a decoder layer may have: before attention, after it, and Gemma's extra pair around the MLP.
    norm_names = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                  "post_feedforward_layernorm")
    query, key, value, output = "q_proj", "k_proj", "v_proj", "o_proj"
    gate, up, down = "gate_proj", "up_proj", "down_proj"

    # -- where things are ---------------------------------------------------------------------------
    def decoder(self, model: nn.Module) -> nn.Module:
        """The base model (embeddings, layers, final norm) under the LM head."""
        return model.get_decoder()

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return self.decoder(model).layers

    def final_norm(self, model: nn.Module) -> nn.Module:
        return self.decoder(model).get_submodule(self.final_norm_name)

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.get_submodule(self.attention_name)

    def mlp(self, layer: nn.Module) -> nn.Module:
        return layer.get_submodule(self.mlp_name)

    def input_norm(self, layer: nn.Module) -> nn.Module:
        """The norm applied to the layer's input before attention."""
        return layer.get_submodule(self.norm_names[0])

    def norms(self, layer: nn.Module) -> dict[str, nn.Module]:
        """The layer's norms that exist, by name."""
        return {name: getattr(layer, name) for name in self.norm_names if hasattr(layer, name)}

    @property
    def input_groups(self) -> tuple[tuple[str, ...], ...]:
        """Linear layers of one decoder layer, grouped by the tensor they read: matrices in one
        group share calibration statistics (one Wanda norm vector, one SparseGPT Hessian)."""
        a, m = self.attention_name, self.mlp_name
        return ((f"{a}.{self.query}", f"{a}.{self.key}", f"{a}.{self.value}"), (f"{a}.{self.output}",),
                (f"{m}.{self.gate}", f"{m}.{self.up}"), (f"{m}.{self.down}",))

    def linear_groups(self, layer: nn.Module) -> list[list[tuple[str, nn.Linear]]]:
        return [[(name, layer.get_submodule(name)) for name in group] for group in self.input_groups]

    def statistics_points(self, layer: nn.Module) -> dict[str, nn.Linear]:
        """Linears whose inputs structured pruning measures: the normed attention input
        ("attn_in"), the output projection's input ("attn_channels", [Hq*hd]), the normed MLP input
        ("mlp_in") and the down projection's input ("ffn_channels", [I])."""
        attention, mlp = self.attention(layer), self.mlp(layer)
        return {"attn_in": getattr(attention, self.query), "attn_channels": getattr(attention, self.output),
                "mlp_in": getattr(mlp, self.gate), "ffn_channels": getattr(mlp, self.down)}

    def output_projection(self, layer: nn.Module) -> nn.Linear:
        """o: [D, Hq*hd]."""
        return getattr(self.attention(layer), self.output)

    def down_projection(self, layer: nn.Module) -> nn.Linear:
        """down: [D, I]."""
        return getattr(self.mlp(layer), self.down)

    def bias_names(self) -> dict[str, tuple[str, ...]]:
        """Per block ("attention", "mlp"), the linears that get a bias when the config declares one."""
        return {"attention": (self.query, self.key, self.value, self.output),
                "mlp": (self.gate, self.up, self.down)}

    def query_rows(self, layer: nn.Module) -> tuple[str, int, int]:
        """(path of the linear computing queries within the attention module, first row, end row):
        rows [start, end) of its output are the queries."""
        linear = getattr(self.attention(layer), self.query)
        return self.query, 0, linear.out_features

    def dynamic_layout(self, model: nn.Module) -> dict:
        """What the dynamic wrapper (dynamic/modeling_llmprune_dynamic.py, which cannot import
        llmprune) needs to know, as JSON: module names, and per layer the query rows."""
        return {"attention": self.attention_name, "mlp": self.mlp_name, "input_norm": self.norm_names[0],
                "final_norm": self.final_norm_name,
                "queries": [list(self.query_rows(layer)) for layer in self.layers(model)]}

    # -- geometry -----------------------------------------------------------------------------------
    def head_geometry(self, config) -> HeadGeometry:
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return HeadGeometry(heads, kv, head_dim)

    def intermediate_size(self, config) -> int:
        return config.intermediate_size

    def group_input_widths(self, config) -> list[int]:
        """Input features of each of ``input_groups`` (for the memory estimate): hidden, Hq*hd,
        hidden, I."""
        geometry = self.head_geometry(config)
        return [config.hidden_size, geometry.query_heads * geometry.head_dim, config.hidden_size,
                self.intermediate_size(config)]

    def layer_sizes(self, layer: nn.Module, head_dim: int) -> dict:
        """The config entries that describe this (possibly cut) layer."""
        o, down = self.output_projection(layer), self.down_projection(layer)
        key = self.attention_weights(layer)[1]
        return {"num_attention_heads": o.in_features // head_dim, "num_key_value_heads": key.shape[0] // head_dim,
                "intermediate_size": down.in_features}

    def rewrite_config(self, config, sizes: dict, head_dim: int) -> None:
        """Uniform layers: write their sizes into the family's own config."""
        for key, value in {**sizes, "head_dim": head_dim}.items():
            setattr(config, key, value)

    # -- weights as units ----------------------------------------------------------------------------
    def attention_weights(self, layer: nn.Module) -> tuple[torch.Tensor, ...]:
        """(q [Hq*hd, D], k [G*hd, D], v [G*hd, D], o [D, Hq*hd]) weights (views, not copies)."""
        attention = self.attention(layer)
        return tuple(getattr(attention, name).weight for name in (self.query, self.key, self.value, self.output))

    def mlp_weights(self, layer: nn.Module) -> tuple[torch.Tensor, ...]:
        """(gate [I, D], up [I, D], down [D, I]) weights (views, not copies)."""
        mlp = self.mlp(layer)
        return tuple(getattr(mlp, name).weight for name in (self.gate, self.up, self.down))

    # -- surgery --------------------------------------------------------------------------------------
    def cut_heads(self, layer: nn.Module, keep_query: list[int], keep_kv: list[int], head_dim: int,
                  o_bias: torch.Tensor | None = None) -> None:
        """Keep query heads ``keep_query`` and KV heads ``keep_kv`` (each kept KV head keeps the same
        number of its own query heads): q/k/v lose rows, o loses columns; head_dim stays."""
        attention = self.attention(layer)
        device = getattr(attention, self.query).weight.device
        q = head_channels(keep_query, head_dim, device)
        kv = head_channels(keep_kv, head_dim, device)
        for name, rows in ((self.query, q), (self.key, kv), (self.value, kv)):
            setattr(attention, name, keep_rows(getattr(attention, name), rows))
        setattr(attention, self.output, keep_columns(getattr(attention, self.output), q, o_bias))
        _set_head_counts(attention, len(keep_query), len(keep_kv))

    def cut_neurons(self, layer: nn.Module, keep: torch.Tensor, down_bias: torch.Tensor | None = None) -> None:
        """Keep FFN neurons ``keep``: rows of gate and up, columns of down."""
        mlp = self.mlp(layer)
        setattr(mlp, self.gate, keep_rows(getattr(mlp, self.gate), keep))
        setattr(mlp, self.up, keep_rows(getattr(mlp, self.up), keep))
        setattr(mlp, self.down, keep_columns(getattr(mlp, self.down), keep, down_bias))
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = len(keep)


LLAMA_FAMILY = DecoderAdapter()
ADAPTERS: dict[str, DecoderAdapter] = {}


def register_adapter(model_types, adapter: DecoderAdapter) -> None:
    """Make ``adapter`` the one for these ``config.model_type`` values."""
    for model_type in model_types:
        ADAPTERS[model_type] = adapter


register_adapter(("llama", "mistral", "qwen2", "qwen3", "gemma3_text"), LLAMA_FAMILY)


def _import_families() -> None:
    """Import every module of llmprune.models.families: each registers its adapter."""
    from . import families

    for module in pkgutil.iter_modules(families.__path__):
        importlib.import_module(f"{families.__name__}.{module.name}")


_import_families()


def base_model_type(model_type):
    """The family's own model type (llmprune's uneven-layer configs prefix it)."""
    if isinstance(model_type, str) and model_type.startswith(UNEVEN_PREFIX):
        return model_type[len(UNEVEN_PREFIX):]
    return model_type


def adapter_for_config(config) -> DecoderAdapter:
    model_type = base_model_type(getattr(config, "model_type", None))
    if model_type not in ADAPTERS:
        raise UsageError(f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[model_type]


def adapter_for(model: nn.Module) -> DecoderAdapter:
    return adapter_for_config(model.config)
