"""Architecture adapters: where a family keeps its decoder layers and projections.

Chosen by ``config.model_type``, never by the model's name. One adapter serves every family
whose decoder layer has ``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import UsageError


@dataclass(frozen=True)
class DecoderAdapter:
    # Linear layers of one decoder layer, grouped by the tensor they read: matrices in one group
    # share calibration statistics (one Wanda norm vector, one SparseGPT Hessian).
    input_groups: tuple[tuple[str, ...], ...] = (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    )

    def decoder(self, model: nn.Module) -> nn.Module:
        """The base model (embeddings, layers, final norm) under the LM head."""
        return model.get_decoder()

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return self.decoder(model).layers

    def linear_groups(self, layer: nn.Module) -> list[list[tuple[str, nn.Linear]]]:
        return [[(name, layer.get_submodule(name)) for name in group] for group in self.input_groups]


LLAMA_FAMILY = DecoderAdapter()
ADAPTERS = {t: LLAMA_FAMILY for t in ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma2")}


def adapter_for(model: nn.Module) -> DecoderAdapter:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ADAPTERS:
        raise UsageError(f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[model_type]
