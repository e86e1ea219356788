"""Dynamic inference at run time: early exit and MLP skipping on an ordinary Hugging Face model.

This file is copied into dynamic output folders and named by ``auto_map`` in config.json, so
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` returns the dynamic model;
it imports nothing but torch, safetensors and transformers (and its sibling ``lossless.py``).
``llmprune.dynamic.load_dynamic(folder)`` gives the same model from the installed package, running
no code from the folder. Plain ``from_pretrained(folder)`` ignores ``auto_map`` (the model type is
the family's own, e.g. "llama", which transformers has local code for) and returns the static model.

No forward code is copied: the model's own ``forward`` runs (embeddings, mask, rotary embedding,
decoder loop, final norm, LM head, ``generate``); every decoder layer's and MLP's ``forward`` is
wrapped in place, as accelerate's ``add_hook_to_module`` does, so parameter names and the state
dict are unchanged and the wrapper can be removed again.

Per forward call, the run state holds, for every token [batch, seq]: whether it has exited, the
layer count it exited after, and its exit state (the hidden state after that layer).

* Early exit: after exit layer e (e decoder layers run), a linear probe on norm(h_e) scores how
  likely the exit prediction agrees with the full model; tokens with score >= the threshold exit.
  Their state is frozen at h_e; at the end it is replaced by the fitted affine map A_e h_e + b_e
  (an estimate of the last layer's output), which the model's own final norm and LM head turn into
  logits: the head runs once per token, at the end, as in the full model.
* Keys and values of exited tokens (CALM's choice): every later layer still gets keys and values
  for them, computed by that layer's own attention module from the frozen exit state h_e. When
  every token of the call has exited (batch-1 decoding), only the keys/values are computed: the
  layer's input norm and attention module run with a zero query projection and a cache proxy that
  stops the attention right after the cache update, so the cost is the k/v projections. When only
  some tokens have exited (prefill, batches), the whole layer runs on all tokens, fed the frozen
  states, and its output for exited tokens is discarded: the same keys/values, the same tokens.
* MLP skipping: per token and layer, a linear router on the MLP input predicts log(|mlp(x)| / |h|),
  the MLP's relative update of the residual stream; tokens below the threshold skip the MLP (their
  MLP output is zero). Attention always runs, so keys and values are always there.
"""

from __future__ import annotations

import contextvars
import functools
import json
import os
import sys
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

CONFIG_NAME = "llmprune_dynamic.json"
WEIGHTS_NAME = "llmprune_dynamic.safetensors"
MODELING_NAME = "modeling_llmprune_dynamic.py"
LOADER_NAME = "LlmpruneDynamicForCausalLM"


class _KeysValuesWritten(Exception):
    """Raised by the cache proxy once the attention module has written this layer's keys/values."""


class _StopAfterUpdate:
    """Stands in for the cache inside one attention call: updates the real cache, then stops the call."""

    def __init__(self, cache):
        self._cache = cache

    def __getattr__(self, name):
        return getattr(self._cache, name)

    def update(self, *args, **kwargs):
        self._cache.update(*args, **kwargs)
        raise _KeysValuesWritten


class _ZeroRows(nn.Module):
    """Stands in for the linear computing queries while only keys/values are computed: rows
    [start, end) of its output (the queries, never used) are zeros and are not computed; the other
    rows (keys and values of a fused projection) are the linear's own."""

    def __init__(self, linear: nn.Linear, start: int, end: int):
        super().__init__()
        self.linear, self.start, self.end = linear, start, end
        self.out_features = linear.out_features

    def forward(self, x):
        if self.start == 0 and self.end == self.out_features:
            return x.new_zeros(*x.shape[:-1], self.out_features)
        weight, bias = self.linear.weight, self.linear.bias
        parts = []
        for start, end in ((0, self.start), (self.end, self.out_features)):
            if end > start:
                parts.append(F.linear(x, weight[start:end], None if bias is None else bias[start:end]))
            if start == 0:
                parts.append(x.new_zeros(*x.shape[:-1], self.end - self.start))
        return torch.cat(parts, dim=-1)


#: Where a decoder layer keeps what the wrapper touches, for folders saved without a "layout"
#: (Llama's layout); llmprune writes the layout its adapter gives into llmprune_dynamic.json.
DEFAULT_LAYOUT = {"attention": "self_attn", "mlp": "mlp", "input_norm": "input_layernorm", "final_norm": "norm",
                  "queries": None}
DEFAULT_QUERIES = "q_proj"  # every output row of this linear of the attention module


class _Run:
    """One forward call: which tokens [batch, seq] have exited, after how many layers, and their
    states, and the schemes deciding exits and skips in this call. Lives only during the call."""

    def __init__(self, num_layers: int, schemes: list):
        self.exited: torch.Tensor | None = None      # [B, T] bool
        self.frozen: torch.Tensor | None = None      # [B, T, H] exit states
        self.exit_at: torch.Tensor | None = None     # [B, T] layers run before the exit
        self.num_layers = num_layers
        self.schemes = schemes
        self.shape = None                            # (B, T), set by the first layer


_RUN = contextvars.ContextVar("llmprune_dynamic_run", default=None)


class DynamicState:
    """Everything the dynamic model adds: settings (JSON) and fitted tensors (safetensors).

    settings: num_layers, hidden_size, exit_layers (layer counts after which a token may exit),
    exit_threshold (None: no early exit), skip_threshold (None: no MLP skipping), lossless
    (None or {draft_exit_layer, draft_tokens, drafting}).
    tensors: map.{e}.weight [H, H] and map.{e}.bias [H] (absent: identity), probe.{e}.weight [H]
    and probe.{e}.bias [], router.{i}.weight [H] and router.{i}.bias [] for layer index i.
    """

    def __init__(self, settings: dict, tensors: dict):
        self.settings = dict(settings)
        self.tensors = dict(tensors)
        self.mode = "dynamic"  # "full": exits and skips off; "draft": every token exits at the draft layer
        self.stats = Counter()
        self._cast = {}

    # -- settings -----------------------------------------------------------------------------
    @property
    def exit_layers(self) -> list[int]:
        return list(self.settings.get("exit_layers") or [])

    @property
    def layout(self) -> dict:
        """Names of the attention, MLP and norms in a decoder layer, and per layer the linear
        computing queries with their output rows: [name within the attention, start, end]."""
        return self.settings.get("layout") or DEFAULT_LAYOUT

    @property
    def exit_threshold(self):
        return self.settings.get("exit_threshold")

    @property
    def skip_threshold(self):
        return self.settings.get("skip_threshold")

    def tensor(self, name: str, like: torch.Tensor) -> torch.Tensor | None:
        """The fitted tensor ``name`` on ``like``'s device and dtype (cached), or None."""
        if name not in self.tensors:
            return None
        key = (name, like.device, like.dtype)
        cached = self._cast.get(key)
        if cached is None:
            cached = self._cast[key] = self.tensors[name].to(like.device, like.dtype)
        return cached

    def set(self, **settings) -> None:
        self.settings.update(settings)

    def reset_stats(self) -> None:
        self.stats = Counter()

    def summary(self) -> dict:
        """Average layers run per token (all tokens; decoding steps only) and fraction of MLPs
        skipped since the last reset."""
        tokens = max(1, self.stats["tokens"])
        steps = self.stats["decode_tokens"]
        return {"tokens": self.stats["tokens"], "avg_layers": self.stats["layers"] / tokens,
                "avg_layers_decode": self.stats["decode_layers"] / steps if steps else None,
                "mlp_skip_fraction": self.stats["mlp_skipped"] / max(1, self.stats["mlp_total"])}

    def save(self, folder) -> None:
        from safetensors.torch import save_file

        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.tensors.items()}
        save_file(tensors, os.path.join(folder, WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(folder, CONFIG_NAME), "w", encoding="utf-8") as handle:
            json.dump(self.settings, handle, indent=2)
            handle.write("\n")

    @classmethod
    def load(cls, folder, **hub) -> DynamicState | None:
        """The state saved in ``folder`` (local or Hub), or None if it has none."""
        paths = [_file(folder, name, **hub) for name in (CONFIG_NAME, WEIGHTS_NAME)]
        if None in paths:
            return None
        from safetensors.torch import load_file

        with open(paths[0], encoding="utf-8") as handle:
            settings = json.load(handle)
        return cls(settings, load_file(paths[1]))


def _file(folder, name, **hub):
    path = os.path.join(str(folder), name)
    if os.path.isdir(str(folder)):
        return path if os.path.isfile(path) else None
    from transformers.utils import cached_file

    keep = {k: hub[k] for k in ("cache_dir", "revision", "token", "local_files_only") if k in hub}
    return cached_file(str(folder), name, _raise_exceptions_for_missing_entries=False, **keep)


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _like(output, tensor):
    """The layer's output structure with its hidden states replaced."""
    if isinstance(output, tuple):
        return (tensor, *output[1:])
    if isinstance(output, list):
        return [tensor, *output[1:]]
    return tensor


def _fill_keys_values(layer: nn.Module, states: torch.Tensor, kwargs: dict, layout: dict | None = None,
                      index: int = 0) -> None:
    """Write this layer's keys/values for ``states`` [B, T, H] into the cache, through the layer's own
    input norm and attention module (rotary embedding, k-norm where the family has one), without
    computing queries or attention. layout: ``DynamicState.layout``; index: the layer's index."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None:  # no cache (teacher-forced call): nobody reads these keys/values later
        return
    layout = layout or DEFAULT_LAYOUT
    attn = layer.get_submodule(layout["attention"])
    queries = layout["queries"] or DEFAULT_QUERIES
    name, start, end = (queries, 0, None) if isinstance(queries, str) else queries[index]
    call = dict(kwargs)
    call.pop("past_key_values", None)
    call["cache"] = _StopAfterUpdate(cache)
    saved = attn._modules.get(name)
    if saved is not None:
        attn._modules[name] = _ZeroRows(saved, start, saved.out_features if end is None else end)
    try:
        attn(hidden_states=layer.get_submodule(layout["input_norm"])(states), **call)
    except _KeysValuesWritten:
        pass
    finally:
        if saved is not None:
            attn._modules[name] = saved


def _probe_scores(state: DynamicState, norm: nn.Module, exit_layer: int, hidden: torch.Tensor) -> torch.Tensor:
    """[B, T] probe scores (estimated probability that the exit prediction is the full model's)."""
    weight = state.tensor(f"probe.{exit_layer}.weight", hidden)
    bias = state.tensor(f"probe.{exit_layer}.bias", hidden)
    return norm(hidden) @ weight + bias


def exit_states(state: DynamicState, exit_layer: int, hidden: torch.Tensor) -> torch.Tensor:
    """The fitted estimate A_e h_e + b_e of the last layer's output (h_e itself when no map)."""
    weight = state.tensor(f"map.{exit_layer}.weight", hidden)
    if weight is None:
        return hidden
    return torch.addmm(state.tensor(f"map.{exit_layer}.bias", hidden), hidden.reshape(-1, hidden.shape[-1]),
                       weight.t()).reshape(hidden.shape)


# -- dynamic schemes: what decides, within one call, which tokens exit and which skip an MLP ----------

class Scheme:
    """One dynamic behaviour. ``exits``: [B, T] bool of tokens leaving after ``count`` layers (None:
    no decision here); ``skips``: [B, T] bool of tokens skipping MLP ``index`` (None: none).
    ``fills_keys_values``: whether layers above an exit still write keys/values for exited tokens."""

    fills_keys_values = True

    def exits(self, state: DynamicState, norm: nn.Module, count: int, hidden: torch.Tensor):
        return None

    def skips(self, state: DynamicState, index: int, x: torch.Tensor):
        return None


class EarlyExit(Scheme):
    """Tokens whose probe score after an exit layer reaches the threshold stop there."""

    def __init__(self, exit_layers, threshold: float):
        self.exit_layers, self.threshold = set(exit_layers), threshold

    def exits(self, state, norm, count, hidden):
        if count not in self.exit_layers:
            return None
        return _probe_scores(state, norm, count, hidden) >= self.threshold


class DraftExit(Scheme):
    """Lossless drafting: every token stops at the draft exit layer; upper layers' keys/values are
    left to the verification pass."""

    fills_keys_values = False

    def __init__(self, exit_layer: int):
        self.exit_layer = exit_layer

    def exits(self, state, norm, count, hidden):
        if count != self.exit_layer:
            return None
        return torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)


class MlpSkip(Scheme):
    """Tokens whose router predicts a small relative MLP update skip that MLP."""

    def __init__(self, threshold: float):
        self.threshold = threshold

    def skips(self, state, index, x):
        weight = state.tensor(f"router.{index}.weight", x)
        if weight is None:
            return None
        return x @ weight + state.tensor(f"router.{index}.bias", x) < self.threshold


def schemes_for(state: DynamicState) -> list[Scheme]:
    """The schemes of a call in the state's current mode and settings."""
    if state.mode == "full":
        return []
    if state.mode == "draft":
        return [DraftExit(state.settings["lossless"]["draft_exit_layer"])]
    schemes = []
    if state.exit_threshold is not None:
        schemes.append(EarlyExit(state.exit_layers, state.exit_threshold))
    if state.skip_threshold is not None:
        schemes.append(MlpSkip(state.skip_threshold))
    return schemes


# -- the wrapped forwards ------------------------------------------------------------------------

def _decoder_forward(state: DynamicState, original, *args, **kwargs):
    """The decoder's forward with a fresh run state for this call only."""
    token = _RUN.set(_Run(state.settings["num_layers"], schemes_for(state)))
    try:
        return original(*args, **kwargs)
    finally:
        _RUN.reset(token)


def _count_tokens(state: DynamicState, run: _Run, layers: int | None) -> None:
    """Statistics of one finished call: tokens, layers run (None: all), decoding steps."""
    tokens = run.shape[0] * run.shape[1]
    layers = run.num_layers * tokens if layers is None else layers
    state.stats["tokens"] += tokens
    state.stats["layers"] += layers
    if state.mode != "full" and run.shape[1] == 1:  # one new token per row: a decoding step
        state.stats["decode_tokens"] += tokens
        state.stats["decode_layers"] += layers


def _exits_after(run: _Run, state: DynamicState, norm: nn.Module, count: int, tensor: torch.Tensor) -> None:
    """Let the schemes decide which live tokens leave after ``count`` layers; freeze their states."""
    leaving = None
    for scheme in run.schemes:
        mask = scheme.exits(state, norm, count, tensor)
        if mask is not None:
            leaving = mask if leaving is None else leaving | mask
    if leaving is None:
        return
    if run.exited is not None:
        leaving &= ~run.exited
    if bool(leaving.any()):
        if run.exited is None:
            run.exited = leaving
            run.frozen = tensor
            run.exit_at = torch.where(leaving, count, run.num_layers)
        else:
            run.exited = run.exited | leaving
            run.frozen = torch.where(leaving[..., None], tensor, run.frozen)
            run.exit_at = torch.where(leaving, count, run.exit_at)


def _mapped_exits(state: DynamicState, run: _Run, tensor: torch.Tensor) -> torch.Tensor:
    """The last layer's output with every exited token's state replaced by its exit map's estimate."""
    for exit_layer in torch.unique(run.exit_at[run.exited]).tolist():
        chosen = run.exited & (run.exit_at == exit_layer)
        mapped = exit_states(state, exit_layer, run.frozen)
        tensor = torch.where(chosen[..., None], mapped, tensor)
    return tensor


def _layer_forward(state: DynamicState, norm: nn.Module, layer: nn.Module, index: int, original,
                   hidden_states, *args, **kwargs):
    run = _RUN.get()
    if run is None:  # called outside a model call: the plain layer
        return original(hidden_states, *args, **kwargs)
    if run.shape is None:
        run.shape = hidden_states.shape[:2]
    count = index + 1  # decoder layers run so far
    if not run.schemes:
        if count == run.num_layers:
            _count_tokens(state, run, None)
        return original(hidden_states, *args, **kwargs)

    if run.exited is not None and bool(run.exited.all()):
        if all(scheme.fills_keys_values for scheme in run.schemes):
            _fill_keys_values(layer, run.frozen, kwargs, state.layout, index)
        output, tensor = run.frozen, run.frozen
    else:
        output = original(hidden_states, *args, **kwargs)
        tensor = _first(output)
        if run.exited is not None:
            tensor = torch.where(run.exited[..., None], run.frozen, tensor)
    _exits_after(run, state, norm, count, tensor)

    if count == run.num_layers:
        _count_tokens(state, run, None if run.exited is None else int(run.exit_at.sum()))
        if run.exited is not None:
            tensor = _mapped_exits(state, run, tensor)
    if tensor is output:
        return output
    return _like(output, tensor) if not isinstance(output, torch.Tensor) else tensor


def _mlp_forward(state: DynamicState, index: int, original, x):
    run = _RUN.get()
    schemes = run.schemes if run is not None else schemes_for(state)
    skip = None
    for scheme in schemes:
        mask = scheme.skips(state, index, x)
        if mask is not None:
            skip = mask if skip is None else skip | mask
    if skip is None:
        return original(x)
    exited = run.exited if run is not None else None
    live = skip if exited is None else skip & ~exited
    state.stats["mlp_skipped"] += int(live.sum())
    state.stats["mlp_total"] += x.shape[0] * x.shape[1] - (0 if exited is None else int(exited.sum()))
    if exited is not None:
        skip = skip | exited  # their output is discarded anyway
    if not bool(skip.any()):
        return original(x)
    if bool(skip.all()):
        return torch.zeros_like(x)
    keep = ~skip
    out = torch.zeros_like(x)
    out[keep] = original(x[keep]).to(out.dtype)  # [kept tokens, H]: the MLP acts per token
    return out


def _wrap(module: nn.Module, new_forward) -> None:
    """Replace ``module.forward`` by ``new_forward(..., original=<the forward it had>)``."""
    _unwrap(module)
    module.__dict__["_llmprune_saved_forward"] = module.__dict__.get("forward")
    module.forward = functools.partial(new_forward, original=module.forward)


def _unwrap(module: nn.Module) -> None:
    if "_llmprune_saved_forward" in module.__dict__:
        saved = module.__dict__.pop("_llmprune_saved_forward")
        if saved is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = saved


def attach(model: nn.Module, state: DynamicState) -> nn.Module:
    """Make ``model`` dynamic in place (wrap its decoder's, decoder layers' and MLPs' forwards); returns it."""
    decoder = model.get_decoder()
    layers = decoder.layers
    if len(layers) != state.settings["num_layers"]:
        raise ValueError(f"the dynamic settings are for {state.settings['num_layers']} layers, "
                         f"the model has {len(layers)}")
    detach(model)
    layout = state.layout
    norm = decoder.get_submodule(layout["final_norm"])
    _wrap(decoder, lambda *args, original, **kwargs: _decoder_forward(state, original, *args, **kwargs))
    for index, layer in enumerate(layers):
        def layer_forward(hidden_states, *args, original, _layer=layer, _index=index, **kwargs):
            return _layer_forward(state, norm, _layer, _index, original, hidden_states, *args, **kwargs)

        def mlp_forward(x, original, _index=index):
            return _mlp_forward(state, _index, original, x)

        _wrap(layer, layer_forward)
        _wrap(layer.get_submodule(layout["mlp"]), mlp_forward)
    model.llmprune_dynamic = state
    if state.settings.get("lossless"):
        from .lossless import install_lossless_generate

        install_lossless_generate(model)
    return model


def detach(model: nn.Module) -> nn.Module:
    """Undo ``attach``: the model is static again."""
    state = model.__dict__.get("llmprune_dynamic")
    mlp_name = (state.layout if state is not None else DEFAULT_LAYOUT)["mlp"]
    decoder = model.get_decoder()
    _unwrap(decoder)
    for layer in decoder.layers:
        _unwrap(layer)
        _unwrap(layer.get_submodule(mlp_name))
    model.__dict__.pop("generate", None)
    model.__dict__.pop("llmprune_dynamic", None)
    return model


def static_class(config):
    """The family's own causal-LM class for ``config`` (never a remote-code class)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    if name is not None:
        return getattr(transformers, name)
    candidate = MODEL_FOR_CAUSAL_LM_MAPPING._extra_content.get(type(config))  # e.g. llmprune's uneven layers
    if getattr(candidate, "__name__", None) == LOADER_NAME:  # transformers registers the remote loader itself
        candidate = None
    if candidate is None:  # a config class from the folder's own modeling_llmprune.py (trust_remote_code)
        module = sys.modules.get(type(config).__module__)
        if hasattr(module, "classes_for") and config.model_type.startswith("llmprune_"):
            candidate = module.classes_for(config.model_type[len("llmprune_"):])[1]
    if candidate is None:
        raise ValueError(f"no causal-LM class for model type {config.model_type!r}")
    return candidate


class LlmpruneDynamicForCausalLM:
    """What ``auto_map`` names: ``from_pretrained`` loads the family's static model and attaches the
    dynamic state saved beside it (a folder without one gives the static model)."""

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModelForCausalLM"):
        return None

    @classmethod
    def from_pretrained(cls, folder, *args, config=None, **kwargs):
        from transformers import AutoConfig

        kwargs.pop("trust_remote_code", None)
        kwargs.pop("adapter_kwargs", None)
        if config is None:
            hub = ("cache_dir", "revision", "token", "local_files_only")
            config = AutoConfig.from_pretrained(folder, **{k: v for k, v in kwargs.items() if k in hub})
        model = static_class(config).from_pretrained(folder, *args, config=config, **kwargs)
        state = DynamicState.load(folder, **kwargs)
        if state is not None:
            attach(model, state)
        return model

