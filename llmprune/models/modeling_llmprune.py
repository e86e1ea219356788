"""Models whose decoder layers differ in size (heads, KV heads, FFN width), as left by llmprune's
structured pruning with global allocation.

This file is copied into such output folders and referenced by ``auto_map`` in config.json, so
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` loads them; it imports
nothing but transformers. ``register`` (which ``import llmprune`` arranges) lets the Auto classes
load them without remote code. Each class subclasses the family's own transformers classes and
only rebuilds every decoder layer from a copy of the config with that layer's sizes: no forward
code is copied. Classes are made on first use, for any family transformers has a causal LM for,
so that no family's modelling code is imported before it is needed.

config.json carries ``llmprune_layer_sizes``: one {num_attention_heads, num_key_value_heads,
intermediate_size} per layer, and ``model_type`` = "llmprune_" + the family's model type, so that
plain loading without this code fails loudly instead of re-initialising mismatched weights.
"""

from __future__ import annotations

import copy

PREFIX = "llmprune_"
_CLASSES: dict = {}


def _family_name(base_type: str) -> str:
    """"llama" -> "Llama": the family's causal-LM class name without "ForCausalLM"."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[base_type][:-len("ForCausalLM")]


def _make_classes(base_type: str):
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = _family_name(base_type)
    base_config = CONFIG_MAPPING[base_type]
    base_model = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[base_type])

    config_class = type(f"Llmprune{name}Config", (base_config,), {"model_type": PREFIX + base_type})

    def __init__(self, config):
        base_model.__init__(self, config)
        layers = self.model.layers
        layer_class = type(layers[0])
        for index, sizes in enumerate(config.llmprune_layer_sizes):
            layer_config = copy.deepcopy(config)
            for key, value in sizes.items():
                setattr(layer_config, key, value)
            layers[index] = layer_class(layer_config, index)
        self.post_init()

    model_class = type(f"Llmprune{name}ForCausalLM", (base_model,),
                       {"config_class": config_class, "__init__": __init__})
    config_class.__module__ = model_class.__module__ = __name__
    return config_class, model_class


def classes_for(base_type: str):
    """(config class, model class) for a family's model type, made once."""
    if base_type not in _CLASSES:
        _CLASSES[base_type] = _make_classes(base_type)
        for cls in _CLASSES[base_type]:
            globals()[cls.__name__] = cls
    return _CLASSES[base_type]


def __getattr__(name: str):
    """``auto_map`` names a class ("LlmpruneLlamaForCausalLM"): make its family's classes."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    for base_type, model_name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        family = model_name[:-len("ForCausalLM")]
        if name in (f"Llmprune{family}Config", f"Llmprune{family}ForCausalLM"):
            classes_for(base_type)
            return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register(base_types) -> None:
    """Let the Auto classes load these folders for the given families without remote code."""
    from transformers import AutoConfig, AutoModelForCausalLM

    for base_type in base_types:
        config_class, model_class = classes_for(base_type)
        try:
            AutoConfig.register(config_class.model_type, config_class)
            AutoModelForCausalLM.register(config_class, model_class)
        except ValueError:  # already registered
            pass
