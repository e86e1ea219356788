"""Models whose decoder layers differ in size (heads, KV heads, FFN width), as left by llmprune's
structured pruning with global allocation.

This file is copied into such output folders and referenced by ``auto_map`` in config.json, so
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` loads them; it imports
nothing but transformers. ``import llmprune`` registers the same classes, after which no remote
code is needed. Each class subclasses the family's own transformers classes and only rebuilds
every decoder layer from a copy of the config with that layer's sizes: no forward code is copied.

config.json carries ``llmprune_layer_sizes``: one {num_attention_heads, num_key_value_heads,
intermediate_size} per layer, and ``model_type`` = "llmprune_" + the family's model type, so that
plain loading without this code fails loudly instead of re-initialising mismatched weights.
"""

from __future__ import annotations

import copy

import transformers
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma3_text": "Gemma3Text"}
PREFIX = "llmprune_"


def _make_classes(base_type: str, name: str):
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

    model_class = type(f"Llmprune{name}ForCausalLM", (base_model,), {"config_class": config_class, "__init__": __init__})
    config_class.__module__ = model_class.__module__ = __name__
    return config_class, model_class


for _base, _name in FAMILIES.items():
    _config, _model = _make_classes(_base, _name)
    globals()[_config.__name__] = _config
    globals()[_model.__name__] = _model


def classes_for(base_type: str):
    """(config class, model class) for a family's model type."""
    name = FAMILIES[base_type]
    return globals()[f"Llmprune{name}Config"], globals()[f"Llmprune{name}ForCausalLM"]


def register() -> None:
    """Let the Auto classes load these folders without remote code."""
    from transformers import AutoConfig, AutoModelForCausalLM

    for base_type in FAMILIES:
        config_class, model_class = classes_for(base_type)
        try:
            AutoConfig.register(config_class.model_type, config_class)
            AutoModelForCausalLM.register(config_class, model_class)
        except ValueError:  # already registered
            pass
