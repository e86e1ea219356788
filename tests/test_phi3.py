"""Phi-3 (fused qkv_proj and gate_up_proj) through its one adapter: unstructured, structured
(GQA heads, FFN neurons, layers; uniform and global) and dynamic, on a tiny random model."""

from __future__ import annotations

import pytest
import torch

import llmprune
from llmprune.dynamic import calibrate, fit_dynamic
from llmprune.dynamic import modeling_llmprune_dynamic as runtime
from llmprune.models.adapters import adapter_for
from llmprune.save import save_folder

from conftest import COMMON

IDS = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(5))
PROBE = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(6))


def tiny_phi3(seed: int = 0, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("phi3", **{**COMMON, "num_attention_heads": 8, "num_key_value_heads": 2,
                                             "hidden_size": 64, "head_dim": 8, "pad_token_id": 0,
                                             "bos_token_id": 1, "eos_token_id": 2, **overrides})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def logits(model, ids=PROBE):
    with torch.no_grad():
        return model(ids).logits


def test_fused_projections_are_one_calibration_group_each():
    model = tiny_phi3()
    layer = adapter_for(model).layers(model)[0]
    assert [[name for name, _ in group] for group in adapter_for(model).linear_groups(layer)] == [
        ["self_attn.qkv_proj"], ["self_attn.o_proj"], ["mlp.gate_up_proj"], ["mlp.down_proj"]]
    llmprune.prune(model, IDS, method="wanda", sparsity=0.5, progress=False)
    for linear in (layer.self_attn.qkv_proj, layer.mlp.gate_up_proj):
        assert (linear.weight == 0).sum(1).tolist() == [linear.in_features // 2] * linear.out_features


def _masked_reference(original, pruned):
    """The original model with the removed heads' o_proj columns and the removed neurons' down_proj
    columns zeroed: it must compute what the cut model computes."""
    for old, new in zip(original.model.layers, pruned.model.layers):
        o_old, o_new = old.self_attn.o_proj.weight, new.self_attn.o_proj.weight
        kept = {tuple(o_new[:, j].tolist()) for j in range(o_new.shape[1])}
        with torch.no_grad():
            for j in range(o_old.shape[1]):
                if tuple(o_old[:, j].tolist()) not in kept:
                    o_old[:, j] = 0
            d_old, d_new = old.mlp.down_proj.weight, new.mlp.down_proj.weight
            kept = {tuple(d_new[:, j].tolist()) for j in range(d_new.shape[1])}
            for j in range(d_old.shape[1]):
                if tuple(d_old[:, j].tolist()) not in kept:
                    d_old[:, j] = 0
    return original


@pytest.mark.parametrize("gqa", ["groups", "queries"])
def test_cut_heads_and_neurons_compute_what_the_masked_model_computes(gqa):
    model = tiny_phi3()
    report = llmprune.prune_structured(model, IDS, heads=0.5, ffn=0.25, score="wanda", gqa=gqa, progress=False)
    size = report.layer_sizes[0]
    assert size == {"num_attention_heads": 4, "num_key_value_heads": 1 if gqa == "groups" else 2,
                    "intermediate_size": 96}
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert qkv.out_features == (size["num_attention_heads"] + 2 * size["num_key_value_heads"]) * 8
    assert model.model.layers[0].mlp.gate_up_proj.out_features == 2 * 96
    reference = _masked_reference(tiny_phi3(), model)
    torch.testing.assert_close(logits(model), logits(reference), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_structured_folder_reloads_with_the_same_logits(tmp_path, allocation):
    from transformers import AutoModelForCausalLM

    model = tiny_phi3(num_hidden_layers=4)
    report = llmprune.prune_structured(model, IDS, heads=0.5, ffn=0.25, layers=1, score="flap",
                                       allocation=allocation, progress=False)
    assert report.removed_layers and model.config.num_hidden_layers == 3
    expected = logits(model)
    save_folder(model, None, tmp_path / "out", {}, "card")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # llmprune is imported: no remote code
    assert loaded.config.model_type == ("phi3" if report.plain_config else "llmprune_phi3")
    torch.testing.assert_close(logits(loaded), expected)


def test_dynamic_early_exit_and_key_value_fill():
    from transformers import DynamicCache

    model = tiny_phi3()
    fitted = fit_dynamic(model, IDS, [1, 2], progress=False)
    assert fitted.layout["queries"] == [["qkv_proj", 0, 64]] * 3
    model, report = calibrate(model, fitted, max_ppl_increase=1.0)
    assert report.calibration["ppl_ratio"] - 1 <= 1.0 + 1e-9
    out = model.generate(PROBE[:1, :8], max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 14)

    # the keys/values-only path writes exactly what the layer itself writes
    runtime.detach(model)
    layer, hooked = model.model.layers[1], {}
    handle = layer.register_forward_pre_hook(
        lambda m, args, kwargs: hooked.update(kwargs=dict(kwargs), states=args[0] if args else kwargs["hidden_states"]),
        with_kwargs=True)
    cache = DynamicCache(config=model.config)
    model(PROBE, cache=cache, use_cache=True)
    handle.remove()
    fresh = DynamicCache(config=model.config)
    runtime._fill_keys_values(layer, hooked["states"], {**hooked["kwargs"], "cache": fresh}, fitted.layout, 1)
    torch.testing.assert_close(fresh.layers[1].keys, cache.layers[1].keys)
    torch.testing.assert_close(fresh.layers[1].values, cache.layers[1].values)
