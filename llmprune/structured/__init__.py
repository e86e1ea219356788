"""Structured pruning that really shrinks the model: attention heads (GQA-aware), FFN neurons and
whole decoder layers.

Statistics come from one pass of the dense model over the calibration data (the shared runner,
collect-only mode); then layers are dropped, units are allocated and matrices cut.

YAML: ``{method: structured, heads: 0.25, ffn: 0.25, layers: 0, score: flap, allocation: uniform,
gqa: groups, round_to: 1}``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import distributed
from ..api import check_batch_size, check_calibration, check_device
from ..calibrate import run_layerwise
from ..checkpoint import LayerCheckpoint, run_fingerprint
from ..errors import UsageError
from ..evaluate import count_parameters
from ..models.adapters import HeadGeometry, adapter_for, adapter_for_config, base_model_type, head_channels
from ..options import check_values
from ..placement import execution_device, onloaded
from ..stages.structured import Structured, check_something_removed
from . import surgery
from .scores import ChannelStats, LayerChange, kv_head_scores, neuron_scores, query_head_scores, standardise

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


def check_structured_options(options: dict) -> dict:
    """The checks that need no model: types, ranges and names, as the structured stage declares
    them (``Structured.options``: one declaration for flags, recipe keys and this Python API);
    returns every option, defaults filled in."""
    declared = Structured.options
    unknown = sorted(set(options) - {o.name for o in declared})
    if unknown:
        raise UsageError(f"structured pruning takes no option {', '.join(map(repr, unknown))}; its options: "
                         f"{', '.join(o.name for o in declared)}")
    values = check_values(declared, options)
    check_something_removed(values)
    return values


def check_structured(config, **options) -> dict:
    """Refuse impossible requests before any work (config only); returns every option."""
    values = check_structured_options(options)
    heads, ffn, layers, gqa, allocation = (values[k] for k in ("heads", "ffn", "layers", "gqa", "allocation"))
    round_to, round_heads_to = values["round_to"], values["round_heads_to"]
    if not layers < config.num_hidden_layers:
        raise UsageError(f"--layers must be in [0, {config.num_hidden_layers - 1}] for a model of "
                         f"{config.num_hidden_layers} layers, got {layers!r}")
    adapter = adapter_for_config(config)
    geometry = adapter.head_geometry(config)
    kv_heads, ratio, width = geometry.kv_heads, geometry.group_size, adapter.intermediate_size(config)
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
    return values


def _new_layer_statistics(adapter, layer: nn.Module, device: torch.device, group=None) -> dict:
    """Accumulators of one layer; in a process group, ones that combine exactly (llmprune.distributed)."""
    sizes = {key: linear.in_features for key, linear in adapter.statistics_points(layer).items()}
    stats = {key: distributed.accumulator(lambda n=n: ChannelStats(n, device), group) for key, n in sizes.items()}
    stats["change"] = distributed.accumulator(LayerChange, group)
    return stats


def collect_statistics(model, calibration, device=None, batch_size: int = 1, progress: bool = True,
                       checkpoint: LayerCheckpoint | None = None) -> list[dict]:
    """Per layer: hidden-state norms at the attention and MLP inputs, channel statistics of the
    attention output projection's and the down projection's inputs, and how much the layer changes
    its input. With a checkpoint, each layer's statistics are committed once its pass is done, and
    restored on resume."""
    adapter = adapter_for(model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    per_layer = []
    group = distributed.current()

    def collect(index, layer):
        stats = _new_layer_statistics(adapter, layer, execution_device(layer, device), group)
        per_layer.append(stats)

        def record(key):
            return lambda module, args, output: stats[key].add_batch(args[0])

        def change(module, args, kwargs, output):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            stats["change"].add_batch(hidden_in, output[0] if isinstance(output, tuple) else output)

        points = adapter.statistics_points(layer)
        return [*(linear.register_forward_hook(record(key)) for key, linear in points.items()),
                layer.register_forward_hook(change, with_kwargs=True)]

    def layer_state(index, layer):  # {"<statistic>.<field>": tensor} of this layer
        return {f"{key}.{name}": value for key, stat in per_layer[index].items()
                for name, value in stat.state().items()}

    def restore_layer(index, layer, tensors):
        stats = _new_layer_statistics(adapter, layer, device)
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


def _bias_support(adapter, layer: nn.Module, config) -> dict:
    """Whether this family's modelling code creates biases of the attention output and down
    projections when the config asks for them."""
    probe = config.__class__.from_dict({**config.to_dict(), "attention_bias": True, "mlp_bias": True})
    with torch.device("meta"):
        fresh = type(layer)(probe, 0)
    return {"attention": adapter.output_projection(fresh).bias is not None,
            "mlp": adapter.down_projection(fresh).bias is not None}


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


def prune_structured(model: nn.Module, calibration: torch.Tensor | None = None, *,
                     device: str | torch.device | None = None, batch_size: int = 1, progress: bool = True,
                     statistics: list[dict] | None = None,
                     checkpoint: str | os.PathLike | LayerCheckpoint | None = None,
                     run_identity: dict | None = None, **options) -> StructuredReport:
    """Remove a fraction of attention heads and FFN neurons and K whole layers, in place.

    options (declared by the structured stage, the same as the command line's): heads, ffn (fractions
    removed), layers (count), score (default flap), allocation, gqa, round_to, round_heads_to.
    calibration [nsamples, seqlen] is needed unless score is magnitude and layers is 0.
    statistics: the output of ``collect_statistics`` on this (dense) model, to reuse one
    calibration pass for several prunings of copies of the same model. checkpoint: a folder (or
    ``structured_checkpoint(...)``) where the statistics are committed layer by layer and from which
    a rerun resumes (the cutting itself takes no time); run_identity: more JSON-able facts that a
    resumed run must share.

    The steps: statistics -> drop the layers that change their input least -> score every head
    and neuron (``score_units``) -> decide how many to remove per layer (``allocate_removals``)
    -> cut each layer (``cut_layer``) -> rewrite the config.
    """
    adapter = adapter_for(model)
    config = model.config
    options = check_structured(config, **options)
    score = options["score"]
    needs_data = score != "magnitude" or options["layers"] > 0
    if (needs_data and statistics is None) or calibration is not None:
        check_calibration(model, calibration, "structured pruning with data-driven scores or --layers")
    device = check_device(device) if device is not None else next(model.parameters()).device
    check_batch_size(batch_size)
    model.eval()
    started = time.perf_counter()
    before = count_parameters(model)["parameters"]
    geometry = adapter.head_geometry(config)
    decoder_layers = adapter.layers(model)

    stats = statistics
    if needs_data and stats is None:
        if isinstance(checkpoint, (str, os.PathLike)):
            checkpoint = structured_checkpoint(checkpoint, model, calibration, options, batch_size, run_identity)
        stats = collect_statistics(model, calibration, device, batch_size, progress, checkpoint)
    change = [s["change"].value for s in stats] if stats else []
    drop = layers_to_drop(change, options["layers"])
    support = (_bias_support(adapter, decoder_layers[0], config) if score == "flap"
               else {"attention": False, "mlp": False})
    if drop:
        surgery.remove_layers(model, decoder_layers, drop)
        stats = [s for i, s in enumerate(stats) if i not in drop]
    sizes = _score_allocate_cut(adapter, decoder_layers, stats, options, geometry, support)

    if support["attention"]:
        config.attention_bias = True
    if support["mlp"]:
        config.mlp_bias = True
    report = StructuredReport(score=score, allocation=options["allocation"], gqa=options["gqa"], removed_layers=drop,
                              layer_change=change, layer_sizes=sizes, parameters_before=before,
                              parameters_after=count_parameters(model)["parameters"],
                              bias_compensation=support if score == "flap" else {},
                              seconds=time.perf_counter() - started)
    _rewrite_config(adapter, model, sizes, geometry.head_dim, report.uniform)
    report.plain_config = not hasattr(model.config, "llmprune_layer_sizes")
    return report


def _score_allocate_cut(adapter, decoder_layers, stats, options: dict, geometry: HeadGeometry,
                        support: dict) -> list[dict]:
    """Score every head and neuron, decide how many each kept layer loses, cut them; returns the
    new sizes of every layer."""
    heads, ffn, score, gqa = options["heads"], options["ffn"], options["score"], options["gqa"]
    with torch.no_grad():
        head_scores, neuron_score_list = score_units(adapter, decoder_layers, stats, score, geometry, gqa,
                                                     heads=bool(heads), ffn=bool(ffn))
        remove_heads, remove_neurons = allocate_removals(len(decoder_layers), head_scores, neuron_score_list, heads,
                                                         ffn, options["allocation"], gqa, options["round_to"])
        sizes = []
        for index, layer in enumerate(decoder_layers):
            kept = kept_heads(head_scores[index], remove_heads[index], gqa, geometry) if remove_heads[index] else None
            order = neuron_score_list[index].argsort() if remove_neurons[index] else None
            cut_layer(adapter, layer, geometry, stats[index] if stats else None, score, support, kept, order,
                      remove_neurons[index])
            sizes.append(adapter.layer_sizes(layer, geometry.head_dim))
    return sizes


def layers_to_drop(change: list[float], count: int) -> list[int]:
    """Indices (ascending) of the ``count`` layers that change their input least."""
    return sorted(sorted(range(len(change)), key=lambda i: change[i])[:count]) if count else []


def score_units(adapter, layers, stats: list[dict] | None, score: str, geometry: HeadGeometry, gqa: str, *,
                heads: bool, ffn: bool) -> tuple[list, list]:
    """Per layer: head scores ([G] per KV group with gqa "groups", [G, r] per query head with
    "queries") and FFN neuron scores [I], float64 on the weights' device; [] where not asked."""
    head_scores, neuron_score_list = [], []
    for index, layer in enumerate(layers):
        with onloaded(layer):  # offloaded weights (accelerate device maps) are real inside
            s = stats[index] if stats else None
            if heads:
                q, k, v, o = adapter.attention_weights(layer)
                per_query = query_head_scores(score, q.float(), o.float(), geometry.head_dim,
                                              s and s["attn_in"], s and s["attn_channels"])
                per_query = per_query.reshape(geometry.kv_heads, geometry.group_size)  # [G, r]
                if gqa == "groups":
                    per_kv = kv_head_scores(score, k.float(), v.float(), geometry.head_dim, s and s["attn_in"])
                    head_scores.append(per_query.sum(1) + per_kv)  # [G]
                else:
                    head_scores.append(per_query)
            if ffn:
                gate, up, down = adapter.mlp_weights(layer)
                neuron_score_list.append(neuron_scores(score, gate.float(), up.float(), down.float(),
                                                       s and s["mlp_in"], s and s["ffn_channels"]))
    return head_scores, neuron_score_list


def allocate_removals(count: int, head_scores: list, neuron_score_list: list, heads: float, ffn: float,
                      allocation: str, gqa: str, round_to: int) -> tuple[list[int], list[int]]:
    """Per layer (of ``count``), how many head units (KV groups, or query heads per group) and FFN
    neurons to remove."""
    remove_heads = [0] * count
    if heads and gqa == "groups":
        remove_heads = _allocate(head_scores, heads, allocation, 1, "KV head groups")
    elif heads:
        # A removal step takes the k-th weakest query head of every group at once: score it by
        # the sum over groups, so steps of different layers can be ranked together.
        step_scores = [g.sort(dim=1).values.sum(0) for g in head_scores]  # [r] per layer
        remove_heads = _allocate(step_scores, heads, allocation, 1, "query heads of a KV group")
    remove_neurons = _allocate(neuron_score_list, ffn, allocation, round_to, "FFN neurons") if ffn else [0] * count
    return remove_heads, remove_neurons


def kept_heads(scores: torch.Tensor, removed: int, gqa: str, geometry: HeadGeometry) -> tuple[list[int], list[int]]:
    """(query heads, KV heads) a layer keeps, ascending, when ``removed`` units go: the weakest KV
    groups with all their query heads ("groups", scores [G]), or the ``removed`` weakest query
    heads of every group ("queries", scores [G, r])."""
    if gqa == "groups":
        keep_kv = sorted(scores.argsort()[removed:].tolist())
        return [h for g in keep_kv for h in geometry.query_heads_of(g)], keep_kv
    keep_kv = list(range(geometry.kv_heads))
    per_group = geometry.group_size - removed
    keep_query = [g * geometry.group_size + j for g in keep_kv
                  for j in sorted(scores[g].argsort()[-per_group:].tolist())]
    return keep_query, keep_kv


def cut_layer(adapter, layer: nn.Module, geometry: HeadGeometry, stats: dict | None, score: str, support: dict,
              heads: tuple[list[int], list[int]] | None, neuron_order: torch.Tensor | None,
              remove_neurons: int) -> None:
    """Cut one layer in place: keep ``heads`` = (query heads, KV heads) when given, and all FFN
    neurons but the first ``remove_neurons`` of ``neuron_order`` (ascending score). FLAP moves the
    mean contribution of removed channels into the output biases where the family has them."""
    with onloaded(layer):  # offloaded weights (accelerate device maps) are real inside
        flap = score == "flap"
        if heads is not None:
            keep_query, keep_kv = heads
            o_bias = None
            if flap and support["attention"]:
                o = adapter.output_projection(layer).weight
                removed = sorted(set(range(geometry.query_heads)) - set(keep_query))
                channels = head_channels(removed, geometry.head_dim, o.device)
                o_bias = o.double()[:, channels] @ stats["attn_channels"].mean.to(channels.device)[channels]
            adapter.cut_heads(layer, keep_query, keep_kv, geometry.head_dim, o_bias)
        if remove_neurons:
            down = adapter.down_projection(layer).weight
            keep = neuron_order[remove_neurons:].sort().values.to(down.device)
            down_bias = None
            if flap and support["mlp"]:
                removed = neuron_order[:remove_neurons].to(down.device)
                down_bias = down.double()[:, removed] @ stats["ffn_channels"].mean.to(removed.device)[removed]
            adapter.cut_neurons(layer, keep, down_bias)
        if flap:  # the config will declare biases: every declared bias must exist
            blocks = {"attention": adapter.attention(layer), "mlp": adapter.mlp(layer)}
            for block, names in adapter.bias_names().items():
                if support[block]:
                    surgery.add_zero_biases(blocks[block], names)


def _rewrite_config(adapter, model: nn.Module, sizes: list[dict], head_dim: int, uniform: bool) -> None:
    """Uniform sizes the family's config accepts go into that config; anything else gives the model
    llmprune's uneven-layer config."""
    if uniform and _plain_config_accepts(model.config, {**sizes[0], "head_dim": head_dim}):
        adapter.rewrite_config(model.config, sizes[0], head_dim)
    else:
        # Uneven layers, or sizes the family's config refuses (Llama and Gemma 3 require
        # hidden_size % num_attention_heads == 0 even with an explicit head_dim).
        _make_uneven_config(model, head_dim, sizes)


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
    from ..models.modeling_llmprune import classes_for

    base_type = base_model_type(model.config.model_type)
    config_class, model_class = classes_for(base_type)
    values = {k: v for k, v in model.config.to_dict().items() if k != "model_type"}
    config = config_class.from_dict({**values, "head_dim": head_dim, "llmprune_layer_sizes": sizes})
    config.architectures = [model_class.__name__]
    config.auto_map = {"AutoConfig": f"modeling_llmprune.{config_class.__name__}",
                       "AutoModelForCausalLM": f"modeling_llmprune.{model_class.__name__}"}
    model.config = config
