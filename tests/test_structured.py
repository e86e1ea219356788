"""Structured pruning: heads (GQA-aware), FFN neurons, layers; shrunk matrices; round trips."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import llmprune
from llmprune.errors import UsageError
from llmprune.save import save_folder

from conftest import ARCHITECTURES, tiny_model

IDS = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(5))
PROBE = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(6))
RATIOS = {1: dict(num_attention_heads=4, num_key_value_heads=4),
          3: dict(num_attention_heads=6, num_key_value_heads=2, hidden_size=96),
          4: dict(num_attention_heads=8, num_key_value_heads=2)}


def logits(model, ids=PROBE):
    with torch.no_grad():
        return model(ids).logits


def load_in_fresh_process(folders: list, tmp_path, prelude: str = "", trust: bool = False) -> list:
    """Load each folder with plain transformers in one new interpreter; return logits or errors."""
    torch.save(PROBE, tmp_path / "probe.pt")
    code = (f"import sys, torch\n{prelude}\nfrom transformers import AutoModelForCausalLM\n"
            f"probe = torch.load({str(tmp_path / 'probe.pt')!r})\nresults = []\n"
            f"for folder in {[str(f) for f in folders]!r}:\n"
            f"    try:\n"
            f"        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code={trust})\n"
            f"        with torch.no_grad(): results.append(model(probe).logits)\n"
            f"    except Exception as error: results.append(type(error).__name__ + ': ' + str(error))\n"
            f"torch.save(results, {str(tmp_path / 'results.pt')!r})\n")
    # Plain loads must not see llmprune on the path; "import llmprune" runs may need it.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" or "llmprune" in prelude}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL)
    return torch.load(tmp_path / "results.pt")


@pytest.mark.slow
@pytest.mark.subprocess
def test_uniform_results_reload_bitwise_with_plain_transformers(tmp_path):
    """Every family, score and GQA mode; GQA ratios 1, 3 and 4 query heads per KV head."""
    cases = [(arch, score, gqa, 3) for arch in ARCHITECTURES for score in ("magnitude", "wanda", "flap")
             for gqa in ("groups", "queries")]
    cases += [("llama", "flap", "groups", 1), ("llama", "wanda", "queries", 4), ("qwen3", "flap", "queries", 3)]
    folders, expected = [], []
    for n, (arch, score, gqa, ratio) in enumerate(cases):
        model = tiny_model(arch, **RATIOS[ratio])
        heads = 0.34 if gqa == "queries" and ratio == 3 else 0.5
        report = llmprune.prune_structured(model, IDS, heads=heads, ffn=0.25, layers=1, score=score, gqa=gqa,
                                           progress=False)
        assert report.uniform and report.plain_config and report.parameters_after < report.parameters_before
        folders.append(tmp_path / f"case{n}")
        save_folder(model, None, folders[-1], {}, "card")
        expected.append(logits(model))
        config = json.loads((folders[-1] / "config.json").read_text())
        assert config["model_type"] == arch and "auto_map" not in config
        assert config["num_hidden_layers"] == 2 and config["intermediate_size"] == 96
    for case, got, want in zip(cases, load_in_fresh_process(folders, tmp_path), expected):
        assert isinstance(got, torch.Tensor), (case, got)
        assert torch.equal(got, want), case


@pytest.mark.parametrize("ratio", [1, 3, 4])
def test_removed_heads_equal_zeroed_output_columns(ratio):
    """Cutting KV groups (with their query heads) gives exactly the model whose o_proj columns
    for those heads are zero: the GQA head-to-row mapping is right."""
    original = tiny_model(**RATIOS[ratio])
    pruned = tiny_model(**RATIOS[ratio])
    report = llmprune.prune_structured(pruned, IDS, heads=0.5, score="wanda", progress=False)
    q_heads, kv = RATIOS[ratio]["num_attention_heads"], RATIOS[ratio]["num_key_value_heads"]
    for layer, shrunk in zip(original.model.layers, pruned.model.layers):
        kept_rows = [r for r in range(layer.self_attn.q_proj.out_features)
                     if any(torch.equal(layer.self_attn.q_proj.weight[r], row)
                            for row in shrunk.self_attn.q_proj.weight)]
        kept_heads = sorted({r // 16 for r in kept_rows})
        assert len(kept_heads) == q_heads // 2
        # whole groups: every kept query head's KV group is kept with all its query heads
        groups = {h // (q_heads // kv) for h in kept_heads}
        assert len(kept_heads) == len(groups) * (q_heads // kv)
        with torch.no_grad():
            for h in set(range(q_heads)) - set(kept_heads):
                layer.self_attn.o_proj.weight[:, h * 16:(h + 1) * 16] = 0
    assert report.layer_sizes[0] == {"num_attention_heads": q_heads // 2, "num_key_value_heads": kv // 2,
                                     "intermediate_size": 128}
    assert torch.allclose(logits(original), logits(pruned), atol=1e-5)


def test_queries_mode_keeps_every_kv_head_and_equal_heads_per_group():
    model = tiny_model(**RATIOS[4])
    report = llmprune.prune_structured(model, IDS, heads=0.5, gqa="queries", progress=False)
    for sizes, layer in zip(report.layer_sizes, model.model.layers):
        assert sizes["num_key_value_heads"] == 2 and sizes["num_attention_heads"] == 4
        assert layer.self_attn.k_proj.out_features == 32 and layer.self_attn.q_proj.out_features == 64
        assert layer.self_attn.num_key_value_groups == 2


def test_removed_neurons_equal_zeroed_down_columns_and_flap_adds_their_mean():
    original, pruned = tiny_model(), tiny_model()
    llmprune.prune_structured(pruned, IDS, ffn=0.5, score="wanda", progress=False)
    for layer, shrunk in zip(original.model.layers, pruned.model.layers):
        kept = [j for j in range(128) if any(torch.equal(layer.mlp.gate_proj.weight[j], row)
                                             for row in shrunk.mlp.gate_proj.weight)]
        assert len(kept) == 64 and shrunk.mlp.down_proj.weight.shape == (64, 64)
        with torch.no_grad():
            layer.mlp.down_proj.weight[:, sorted(set(range(128)) - set(kept))] = 0
    assert torch.allclose(logits(original), logits(pruned), atol=1e-5)

    # FLAP: the removed neurons' mean activation (over the calibration tokens) is folded into a
    # bias of down_proj; q/k/v/o and gate/up get zero biases, declared in the config.
    flap = tiny_model()
    llmprune.prune_structured(flap, IDS, ffn=0.5, score="flap", progress=False)
    assert flap.config.mlp_bias and flap.config.attention_bias
    first = flap.model.layers[0]
    assert torch.count_nonzero(first.mlp.gate_proj.bias) == 0 and torch.count_nonzero(first.mlp.down_proj.bias) > 0
    assert torch.count_nonzero(first.self_attn.q_proj.bias) == 0


def test_flap_compensation_replaces_removed_channels_by_their_mean():
    """Layer 0 only (its inputs are the same before and after): the shrunk MLP equals the
    original MLP with removed intermediate channels replaced by their calibration mean."""
    original, pruned = tiny_model(num_hidden_layers=1), tiny_model(num_hidden_layers=1)
    llmprune.prune_structured(pruned, IDS, ffn=0.5, score="flap", progress=False)
    mlp, shrunk = original.model.layers[0].mlp, pruned.model.layers[0].mlp
    kept = [j for j in range(128) if any(torch.equal(mlp.gate_proj.weight[j], row) for row in shrunk.gate_proj.weight)]
    removed = sorted(set(range(128)) - set(kept))
    channels = []
    handle = mlp.down_proj.register_forward_hook(lambda m, a, o: channels.append(a[0].reshape(-1, 128)))
    logits(original, IDS)
    handle.remove()
    mean = torch.cat(channels).double().mean(0).float()

    def replace(module, args):
        x = args[0].clone()
        x[..., removed] = mean[removed]
        return (x,)

    mlp.down_proj.register_forward_pre_hook(replace)
    assert torch.allclose(logits(original), logits(pruned), atol=1e-4)


def test_layer_removal_drops_the_least_changing_layers_and_updates_per_layer_lists():
    model = tiny_model("gemma3_text", num_hidden_layers=4,
                       layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])
    report = llmprune.prune_structured(model, IDS, layers=2, progress=False)
    order = sorted(range(4), key=lambda i: report.layer_change[i])
    assert report.removed_layers == sorted(order[:2])
    kept = [i for i in range(4) if i not in report.removed_layers]
    types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    assert model.config.num_hidden_layers == 2 and model.config.layer_types == [types[i] for i in kept]
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    out = model.generate(PROBE[:1, :8], max_new_tokens=4, do_sample=False, pad_token_id=0)  # KV cache slots fit
    assert out.shape == (1, 12)


@pytest.mark.slow
@pytest.mark.subprocess
def test_global_allocation_differs_per_layer_and_round_trips(tmp_path):
    model = tiny_model(num_hidden_layers=4)
    report = llmprune.prune_structured(model, IDS, ffn=0.4, heads=0.5, score="wanda", allocation="global",
                                       round_to=4, progress=False)
    widths = [s["intermediate_size"] for s in report.layer_sizes]
    assert not report.uniform and len(set(widths)) > 1 and all(w % 4 == 0 for w in widths)
    assert sum(128 - w for w in widths) == pytest.approx(0.4 * 4 * 128, abs=16)
    out = tmp_path / "global"
    save_folder(model, None, out, {}, "card")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llmprune_llama" and config["llmprune_layer_sizes"] == report.layer_sizes
    assert (out / "modeling_llmprune.py").exists()
    expected = logits(model)
    (tmp_path / "plain").mkdir()
    plain, = load_in_fresh_process([out], tmp_path / "plain")
    assert isinstance(plain, str) and "trust_remote_code" in plain  # refused, never re-initialised
    trusted, = load_in_fresh_process([out], tmp_path, trust=True)
    assert torch.equal(trusted, expected)
    registered, = load_in_fresh_process([out], tmp_path, prelude="import llmprune")
    assert torch.equal(registered, expected)


def test_head_counts_the_family_config_refuses_use_the_llmprune_class():
    """Llama's config requires hidden_size % heads == 0: 8 heads -> 6 cannot be a plain config."""
    model = tiny_model(**RATIOS[4])
    report = llmprune.prune_structured(model, IDS, heads=0.25, gqa="queries", progress=False)
    assert report.uniform and not report.plain_config
    assert model.config.model_type == "llmprune_llama"
    assert model.config.llmprune_layer_sizes[0]["num_attention_heads"] == 6


def test_round_to_keeps_widths_multiples():
    model = tiny_model()
    report = llmprune.prune_structured(model, IDS, ffn=0.3, round_to=32, progress=False)
    assert {s["intermediate_size"] for s in report.layer_sizes} == {96}
    model = tiny_model(**RATIOS[4])
    report = llmprune.prune_structured(model, IDS, heads=0.25, gqa="queries", round_heads_to=2, progress=False)
    assert {s["num_attention_heads"] for s in report.layer_sizes} == {6}


@pytest.mark.parametrize("options, message", [
    (dict(heads=1.0), "fraction in"),
    (dict(ffn=-0.1), "fraction in"),
    (dict(ffn="lots"), "fraction in"),
    (dict(layers=3), "--layers must be in"),
    (dict(heads=0.9), "would remove all"),
    (dict(heads=0.5, gqa="queries", ratio=1), "use --gqa groups"),
    (dict(ffn=0.1, round_to=256), "multiple of 256"),
    (dict(heads=0.25, gqa="queries", round_heads_to=5, ratio=4), "not a multiple of --round-heads-to 5"),
    (dict(score="taylor", ffn=0.1), "--score"),
    (dict(), "needs --heads, --ffn or --layers"),
])
def test_impossible_requests_are_refused_before_any_change(options, message):
    ratio = options.pop("ratio", 3)
    model = tiny_model(**RATIOS[ratio])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UsageError, match=message):
        llmprune.prune_structured(model, IDS, progress=False, **options)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_structured_then_unstructured_on_the_same_model():
    model = tiny_model()
    llmprune.prune_structured(model, IDS, heads=0.5, ffn=0.25, progress=False)
    report = llmprune.prune(model, IDS, method="wanda", sparsity=0.5, progress=False)
    assert report.overall_sparsity == 0.5
    assert model.model.layers[0].mlp.gate_proj.weight.shape == (96, 64)
