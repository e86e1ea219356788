"""Structured pruning that really shrinks the model: attention heads (GQA-aware), FFN neurons and
whole decoder layers.

Statistics come from one pass of the dense model over the calibration data (the shared runner,
collect-only mode); then layers are dropped, units are allocated and matrices cut.

YAML: ``{method: structured, heads: 0.25, ffn: 0.25, layers: 0, score: flap, allocation: uniform,
gqa: groups, round_to: 1}``.
"""

from __future__ import annotations

import numbers
import os
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..api import check_batch_size, check_calibration, check_device
from .. import distributed
from ..calibrate import run_layerwise
from ..placement import execution_device, onloaded
from ..checkpoint import LayerCheckpoint, run_fingerprint
from ..errors import UsageError
from ..evaluate import count_parameters
from ..models.adapters import adapter_for
from . import surgery
from .scores import (ChannelStats, LayerChange, kv_head_scores, neuron_scores, query_head_scores,
                     standardise)

SCORES = ("magnitude", "wanda", "flap")
ALLOCATIONS = ("uniform", "global")
GQA_MODES = ("groups", "queries")


@dataclass
class StructuredReport:
    score: str
    allocation: str
    gqa: str
    removed_layers: list[int]
    layer_change: list[float]
    layer_sizes: list[dict]  # per kept layer: num_attention_heads, num_key_value_heads, intermediate_size
    parameters_before: int
    parameters_after: int
    bias_compensation: dict = field(default_factory=dict)
    seconds: float = 0.0
    plain_config: bool = True  # False: saved with llmprune's modelling file (auto_map)

    @property
    def uniform(self) -> bool:
        return all(sizes == self.layer_sizes[0] for sizes in self.layer_sizes)

    def as_dict(self) -> dict:
        return {**self.__dict__, "uniform": self.uniform}


def _kept_count(total: int, fraction: float, multiple: int, what: str) -> int:
    """Units kept of ``total`` when removing ``fraction``: the feasible count (a multiple of
    ``multiple``, at least one) closest to the request; refuse when none exists."""
    if fraction == 0:
        return total
    target = total - round(fraction * total)
    if target < 1:
        raise UsageError(f"removing {fraction:g} of {total} {what} per layer would remove all of them")
    feasible = [k for k in range(1, total + 1) if k % multiple == 0]
    if not feasible:
        raise UsageError(f"no count of {what} up to {total} is a multiple of {multiple}")
    return min(feasible, key=lambda k: (abs(k - target), -k))


def _shape(config) -> tuple[int, int, int, int]:
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv, head_dim, config.intermediate_size


def check_structured_options(heads: float = 0.0, ffn: float = 0.0, layers: int = 0, score: str = "wanda",
                             allocation: str = "uniform", gqa: str = "groups", round_to: int = 1,
                             round_heads_to: int = 1) -> None:
    """The checks that need no model: types, ranges and names."""
    for name, value in (("heads", heads), ("ffn", ffn)):
        try:
            ok = isinstance(value, numbers.Real) and 0.0 <= float(value) < 1.0
        except (TypeError, ValueError, OverflowError):
            ok = False
        if not ok:
            raise UsageError(f"--{name} must be a fraction in [0, 1), got {value!r}")
    if score not in SCORES:
        raise UsageError(f"--score must be one of {', '.join(SCORES)}, got {score!r}")
    if allocation not in ALLOCATIONS:
        raise UsageError(f"--allocation must be one of {', '.join(ALLOCATIONS)}, got {allocation!r}")
    if gqa not in GQA_MODES:
        raise UsageError(f"--gqa must be one of {', '.join(GQA_MODES)}, got {gqa!r}")
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 0:
        raise UsageError(f"--layers must be a whole number of layers >= 0, got {layers!r}")
    for name, value in (("round-to", round_to), ("round-heads-to", round_heads_to)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"--{name} must be a positive integer, got {value!r}")
    if heads == ffn == 0 and layers == 0:
        raise UsageError("structured pruning needs --heads, --ffn or --layers")


def check_structured(config, heads: float = 0.0, ffn: float = 0.0, layers: int = 0, score: str = "wanda",
                     allocation: str = "uniform", gqa: str = "groups", round_to: int = 1,
                     round_heads_to: int = 1) -> None:
    """Refuse impossible requests before any work (config only)."""
    check_structured_options(heads, ffn, layers, score, allocation, gqa, round_to, round_heads_to)
    if not layers < config.num_hidden_layers:
        raise UsageError(f"--layers must be in [0, {config.num_hidden_layers - 1}] for a model of "
                         f"{config.num_hidden_layers} layers, got {layers!r}")
    q_heads, kv_heads, _, width = _shape(config)
    ratio = q_heads // kv_heads
    if heads:
        if gqa == "queries" and ratio == 1:
            raise UsageError("--gqa queries keeps every KV head, but this model has one query head per KV "
                             "head: use --gqa groups")
        if gqa == "groups":
            kept = _kept_count(kv_heads, heads, 1, "KV head groups")
            if allocation == "uniform" and (kept * ratio) % round_heads_to:
                raise UsageError(f"keeping {kept} KV groups of {ratio} query heads gives {kept * ratio} heads, "
                                 f"not a multiple of --round-heads-to {round_heads_to}")
        else:
            per_group = _kept_count(ratio, heads, 1, "query heads of a KV group")
            if allocation == "uniform" and (per_group * kv_heads) % round_heads_to:
                raise UsageError(f"keeping {per_group} of {ratio} query heads per KV head gives "
                                 f"{per_group * kv_heads} heads, not a multiple of --round-heads-to {round_heads_to}")
    if ffn:
        _kept_count(width, ffn, round_to, "FFN neurons")


def _new_layer_statistics(layer: nn.Module, device: torch.device, group=None) -> dict:
    """Accumulators of one layer; in a process group, ones that combine exactly (llmprune.distributed)."""
    hidden = layer.self_attn.q_proj.in_features
    sizes = {"attn_in": hidden, "attn_channels": layer.self_attn.o_proj.in_features, "mlp_in": hidden,
             "ffn_channels": layer.mlp.down_proj.in_features}
    stats = {key: distributed.accumulator(lambda n=n: ChannelStats(n, device), group) for key, n in sizes.items()}
    stats["change"] = distributed.accumulator(LayerChange, group)
    return stats


def collect_statistics(model, calibration, device=None, batch_size: int = 1, progress: bool = True,
                       checkpoint: LayerCheckpoint | None = None) -> list[dict]:
    """Per layer: hidden-state norms at the attention and MLP inputs, channel statistics of the
    o_proj and down_proj inputs, and how much the layer changes its input. With a checkpoint,
    each layer's statistics are committed once its pass is done, and restored on resume."""
    adapter = adapter_for(model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    per_layer = []
    group = distributed.current()

    def collect(index, layer):
        stats = _new_layer_statistics(layer, execution_device(layer, device), group)
        per_layer.append(stats)

        def record(key):
            return lambda module, args, output: stats[key].add_batch(args[0])

        def change(module, args, kwargs, output):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            stats["change"].add_batch(hidden_in, output[0] if isinstance(output, tuple) else output)

        return [layer.self_attn.q_proj.register_forward_hook(record("attn_in")),
                layer.self_attn.o_proj.register_forward_hook(record("attn_channels")),
                layer.mlp.gate_proj.register_forward_hook(record("mlp_in")),
                layer.mlp.down_proj.register_forward_hook(record("ffn_channels")),
                layer.register_forward_hook(change, with_kwargs=True)]

    def layer_state(index, layer):  # {"<statistic>.<field>": tensor} of this layer
        return {f"{key}.{name}": value for key, stat in per_layer[index].items()
                for name, value in stat.state().items()}

    def restore_layer(index, layer, tensors):
        stats = _new_layer_statistics(layer, device)
        for key, stat in stats.items():
            stat.load_state({name.split(".", 1)[1]: value.to(device) for name, value in tensors.items()
                             if name.split(".", 1)[0] == key})
        per_layer.append(stats)

    def combine(index, layer):  # sums over the processes' batches (a no-op for one process)
        per_layer[index] = {key: distributed.combine(stat, group) for key, stat in per_layer[index].items()}

    run_layerwise(model, adapter, calibration, device, collect=collect, batch_size=batch_size,
                  progress=progress, desc="structured: statistics", checkpoint=checkpoint,
                  layer_state=layer_state, restore_layer=restore_layer, combine=combine)
    return per_layer


def _bias_support(layer: nn.Module, config) -> dict:
    """Whether this family's modelling code creates o_proj / down_proj biases from the config."""
    probe = config.__class__.from_dict({**config.to_dict(), "attention_bias": True, "mlp_bias": True})
    with torch.device("meta"):
        fresh = type(layer)(probe, 0)
    return {"attention": fresh.self_attn.o_proj.bias is not None, "mlp": fresh.mlp.down_proj.bias is not None}


def _allocate(scores: list[torch.Tensor], fraction: float, allocation: str, multiple: int, what: str,
              step: int = 1) -> list[int]:
    """Per layer, how many units to REMOVE. scores: per layer [units]; ``step`` units form one
    removal step (for query heads removed evenly across KV groups)."""
    totals = [s.numel() for s in scores]
    if fraction == 0:
        return [0] * len(scores)
    if allocation == "uniform":
        return [t - _kept_count(t, fraction, multiple, what) for t in totals]
    # Global: standardise within each layer, rank all units together, remove the lowest, always
    # keeping at least ``multiple`` units per layer; then round each layer's count to the multiple.
    pooled = []
    for layer_index, layer_scores in enumerate(scores):
        ranked = standardise(layer_scores).sort().values
        for position in range(max(0, ranked.numel() - multiple)):
            pooled.append((float(ranked[position]), layer_index))
    budget = round(fraction * sum(totals))
    removed = [0] * len(scores)
    for _, layer_index in sorted(pooled)[:budget]:
        removed[layer_index] += 1
    return [r - r % multiple for r in removed]


def structured_checkpoint(folder: str | os.PathLike, model: nn.Module, calibration: torch.Tensor | None,
                          options: dict, batch_size: int = 1, run_identity: dict | None = None) -> LayerCheckpoint:
    """The checkpoint of a ``prune_structured`` run (options: its heads, ffn, ... keywords), opened:
    a folder holding a different run is refused here, before any long work."""
    checkpoint = LayerCheckpoint(folder, {
        "kind": "structured", **options, **run_fingerprint(model, calibration, batch_size), **(run_identity or {})})
    checkpoint.open()
    return checkpoint


def prune_structured(model: nn.Module, calibration: torch.Tensor | None = None, *, heads: float = 0.0,
                     ffn: float = 0.0, layers: int = 0, score: str = "wanda", allocation: str = "uniform",
                     gqa: str = "groups", round_to: int = 1, round_heads_to: int = 1,
                     device: str | torch.device | None = None, batch_size: int = 1,
                     progress: bool = True, statistics: list[dict] | None = None,
                     checkpoint: str | os.PathLike | LayerCheckpoint | None = None,
                     run_identity: dict | None = None) -> StructuredReport:
    """Remove a fraction of attention heads and FFN neurons and K whole layers, in place.

    calibration [nsamples, seqlen] is needed unless score is magnitude and layers is 0.
    statistics: the output of ``collect_statistics`` on this (dense) model, to reuse one
    calibration pass for several prunings of copies of the same model. checkpoint: a folder (or
    ``structured_checkpoint(...)``) where the statistics are committed layer by layer and from which
    a rerun resumes (the cutting itself takes no time); run_identity: more JSON-able facts that a
    resumed run must share.
    """
    adapter = adapter_for(model)
    config = model.config
    options = dict(heads=heads, ffn=ffn, layers=layers, score=score, allocation=allocation, gqa=gqa,
                   round_to=round_to, round_heads_to=round_heads_to)
    check_structured(config, **options)
    needs_data = score != "magnitude" or layers > 0
    if (needs_data and statistics is None) or calibration is not None:
        check_calibration(model, calibration, "structured pruning with data-driven scores or --layers")
    device = check_device(device) if device is not None else next(model.parameters()).device
    check_batch_size(batch_size)
    model.eval()
    started = time.perf_counter()
    before = count_parameters(model)["parameters"]
    q_heads, kv_heads, head_dim, _ = _shape(config)
    ratio = q_heads // kv_heads

    decoder_layers = adapter.layers(model)
    stats = statistics
    if needs_data and stats is None:
        if isinstance(checkpoint, (str, os.PathLike)):
            checkpoint = structured_checkpoint(checkpoint, model, calibration, options, batch_size, run_identity)
        stats = collect_statistics(model, calibration, device, batch_size, progress, checkpoint)
    change = [s["change"].value for s in stats] if stats else []
    drop = sorted(sorted(range(len(decoder_layers)), key=lambda i: change[i])[:layers]) if layers else []
    support = _bias_support(decoder_layers[0], config) if score == "flap" else {"attention": False, "mlp": False}
    if drop:
        surgery.remove_layers(model, decoder_layers, drop)
        stats = [s for i, s in enumerate(stats) if i not in drop]

    # Scores per kept layer, on the device of the weights (float64).
    with torch.no_grad():
        head_scores, neuron_score_list = [], []
        for index, layer in enumerate(decoder_layers):
            with onloaded(layer):  # offloaded weights (accelerate device maps) are real inside
                attention, mlp = layer.self_attn, layer.mlp
                s = stats[index] if stats else None
                if heads:
                    per_query = query_head_scores(score, attention.q_proj.weight.float(), attention.o_proj.weight.float(),
                                                  head_dim, s and s["attn_in"], s and s["attn_channels"])
                    if gqa == "groups":
                        per_kv = kv_head_scores(score, attention.k_proj.weight.float(), attention.v_proj.weight.float(),
                                                head_dim, s and s["attn_in"])
                        head_scores.append(per_query.reshape(kv_heads, ratio).sum(1) + per_kv)  # [G]
                    else:
                        head_scores.append(per_query.reshape(kv_heads, ratio))  # [G, r]
                if ffn:
                    neuron_score_list.append(neuron_scores(score, mlp.gate_proj.weight.float(), mlp.up_proj.weight.float(),
                                                           mlp.down_proj.weight.float(), s and s["mlp_in"],
                                                           s and s["ffn_channels"]))

        if heads and gqa == "groups":
            remove_heads = _allocate(head_scores, heads, allocation, 1, "KV head groups")
        elif heads:
            # A removal step takes the k-th weakest query head of every group at once: score it by
            # the sum over groups, so steps of different layers can be ranked together.
            step_scores = [g.sort(dim=1).values.sum(0) for g in head_scores]  # [r] per layer
            remove_heads = _allocate(step_scores, heads, allocation, 1, "query heads of a KV group")
        remove_neurons = _allocate(neuron_score_list, ffn, allocation, round_to, "FFN neurons") if ffn else []

        sizes = []
        for index, layer in enumerate(decoder_layers):
            with onloaded(layer):  # offloaded weights (accelerate device maps) are real inside
                attention, mlp = layer.self_attn, layer.mlp
                s = stats[index] if stats else None
                layer_heads, layer_kv = q_heads, kv_heads
                if heads and remove_heads[index]:
                    if gqa == "groups":
                        order = head_scores[index].argsort()
                        keep_kv = sorted(order[remove_heads[index]:].tolist())
                        keep_query = [g * ratio + j for g in keep_kv for j in range(ratio)]
                    else:
                        keep_kv = list(range(kv_heads))
                        per_group = ratio - remove_heads[index]
                        keep_query = [g * ratio + j for g in keep_kv
                                      for j in sorted(head_scores[index][g].argsort()[-per_group:].tolist())]
                    o_bias = None
                    if score == "flap" and support["attention"]:
                        removed = sorted(set(range(q_heads)) - set(keep_query))
                        channels = surgery.head_channels(removed, head_dim, attention.o_proj.weight.device)
                        o_bias = attention.o_proj.weight.double()[:, channels] @ s["attn_channels"].mean.to(channels.device)[channels]
                    surgery.shrink_attention(attention, keep_query, keep_kv, head_dim, o_bias)
                    layer_heads, layer_kv = len(keep_query), len(keep_kv)
                width = mlp.down_proj.in_features
                if ffn and remove_neurons[index]:
                    order = neuron_score_list[index].argsort()
                    keep = order[remove_neurons[index]:].sort().values.to(mlp.down_proj.weight.device)
                    down_bias = None
                    if score == "flap" and support["mlp"]:
                        removed = order[:remove_neurons[index]].to(mlp.down_proj.weight.device)
                        down_bias = mlp.down_proj.weight.double()[:, removed] @ s["ffn_channels"].mean.to(removed.device)[removed]
                    surgery.shrink_mlp(mlp, keep, down_bias)
                    width = len(keep)
                if score == "flap":  # the config will declare biases: every declared bias must exist
                    if support["attention"]:
                        surgery.add_zero_biases(attention, ("q_proj", "k_proj", "v_proj", "o_proj"))
                    if support["mlp"]:
                        surgery.add_zero_biases(mlp, ("gate_proj", "up_proj", "down_proj"))
                sizes.append({"num_attention_heads": layer_heads, "num_key_value_heads": layer_kv,
                              "intermediate_size": width})

    if support["attention"]:
        config.attention_bias = True
    if support["mlp"]:
        config.mlp_bias = True
    report = StructuredReport(score=score, allocation=allocation, gqa=gqa, removed_layers=drop, layer_change=change,
                              layer_sizes=sizes, parameters_before=before,
                              parameters_after=count_parameters(model)["parameters"],
                              bias_compensation=support if score == "flap" else {},
                              seconds=time.perf_counter() - started)
    if report.uniform and _plain_config_accepts(config, {**sizes[0], "head_dim": head_dim}):
        for key, value in {**sizes[0], "head_dim": head_dim}.items():
            setattr(config, key, value)
    else:
        # Uneven layers, or sizes the family's config refuses (Llama and Gemma 3 require
        # hidden_size % num_attention_heads == 0 even with an explicit head_dim).
        _make_uneven_config(model, head_dim, sizes)
    report.plain_config = not hasattr(model.config, "llmprune_layer_sizes")
    return report


def _plain_config_accepts(config, values: dict) -> bool:
    """Whether the family's own config class validates with these sizes."""
    try:
        config.__class__.from_dict({**config.to_dict(), **values})
    except Exception:  # transformers raises its strict-dataclass validation error (not a ValueError)
        return False
    return True


def _make_uneven_config(model: nn.Module, head_dim: int, sizes: list[dict]) -> None:
    """Give the model the config of its llmprune class: per-layer sizes, a model type that plain
    transformers does not know, and auto_map entries for the modelling file saved beside it."""
    from ..models.modeling_llmprune import PREFIX, classes_for

    base_type = model.config.model_type
    if base_type.startswith(PREFIX):
        base_type = base_type[len(PREFIX):]
    config_class, model_class = classes_for(base_type)
    values = {k: v for k, v in model.config.to_dict().items() if k != "model_type"}
    config = config_class.from_dict({**values, "head_dim": head_dim, "llmprune_layer_sizes": sizes})
    config.architectures = [model_class.__name__]
    config.auto_map = {"AutoConfig": f"modeling_llmprune.{config_class.__name__}",
                       "AutoModelForCausalLM": f"modeling_llmprune.{model_class.__name__}"}
    model.config = config
