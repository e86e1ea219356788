"""Dynamic inference: exactness when disabled, key/value handling against a slow reference,
calibration to a target, generation, lossless decoding, saving/loading, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from llmprune.dynamic import DynamicState, attach, detach, fit_dynamic, load_dynamic, make_dynamic, save_dynamic
from llmprune.dynamic import modeling_llmprune_dynamic as runtime
from llmprune.errors import UsageError

from conftest import ARCHITECTURES, tiny_model


def random_state(model, exit_layers=(1, 2), seed=1, exit_threshold=None, skip_threshold=None) -> DynamicState:
    """Random maps near identity, random probes and routers: exits and skips that vary per token."""
    layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for e in exit_layers:
        tensors[f"map.{e}.weight"] = torch.eye(hidden) + 0.05 * torch.randn(hidden, hidden, generator=g)
        tensors[f"map.{e}.bias"] = 0.01 * torch.randn(hidden, generator=g)
        tensors[f"probe.{e}.weight"] = torch.randn(hidden, generator=g)
        tensors[f"probe.{e}.bias"] = torch.tensor(0.0)
    for i in range(layers):
        tensors[f"router.{i}.weight"] = 0.1 * torch.randn(hidden, generator=g)
        tensors[f"router.{i}.bias"] = torch.tensor(0.0)
    return DynamicState({"num_layers": layers, "hidden_size": hidden, "exit_layers": list(exit_layers),
                         "exit_threshold": exit_threshold, "skip_threshold": skip_threshold, "lossless": None}, tensors)


@pytest.fixture(scope="module")
def text_ids():
    """Token ids a tiny random model finds predictable: its own samples (8 windows of 48 tokens)."""
    model = tiny_model("llama", num_hidden_layers=4)
    torch.manual_seed(0)
    ids = model.generate(torch.randint(0, 512, (8, 2)), do_sample=True, max_new_tokens=46, min_new_tokens=46,
                         pad_token_id=0)
    return model, ids


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_disabled_dynamic_model_is_bitwise_the_base_model(arch):
    model = tiny_model(arch)
    ids = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(0))
    base = model(ids).logits
    base_tokens = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    attach(model, random_state(model))  # fitted tensors present, thresholds off
    assert torch.equal(model(ids).logits, base)
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0), base_tokens)
    model.llmprune_dynamic.set(exit_threshold=0.0, skip_threshold=0.0)
    assert not torch.equal(model(ids).logits, base)  # the thresholds do change the computation...
    detach(model)
    assert torch.equal(model(ids).logits, base)      # ...and detaching restores the static model exactly


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_cached_decoding_matches_slow_reference(arch, monkeypatch):
    """Decoding token by token with the cache (exited tokens: keys/values filled from their exit
    state) gives the logits of the slow reference: the whole sequence recomputed without a cache
    at once, where every layer's own attention reads the exited tokens' frozen states."""
    model = tiny_model(arch)
    state = random_state(model, exit_threshold=0.0, skip_threshold=-0.5)
    attach(model, state)
    fills = []
    real_fill = runtime._fill_keys_values
    monkeypatch.setattr(runtime, "_fill_keys_values", lambda *a: (fills.append(1), real_fill(*a)))
    from transformers import DynamicCache

    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(3))
    reference = model(ids, use_cache=False).logits  # [1, 16, V]
    exits = state.summary()["avg_layers"]
    assert 1 < exits < model.config.num_hidden_layers  # some tokens exited, some did not
    cache = DynamicCache(config=model.config)
    steps = [model(ids[:, :4], cache=cache, use_cache=True).logits]
    for position in range(4, 16):
        steps.append(model(ids[:, position:position + 1], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, 1), reference, atol=2e-5, rtol=1e-4)
    assert fills, "no decoding step took the key/value-only path"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_key_value_fill_writes_what_the_layer_writes(arch):
    from transformers import DynamicCache

    model = tiny_model(arch)
    hooked = {}
    layer = model.get_decoder().layers[1]

    def capture(module, args, kwargs):
        hooked["kwargs"] = dict(kwargs)
        hooked["states"] = args[0] if args else kwargs["hidden_states"]

    handle = layer.register_forward_pre_hook(capture, with_kwargs=True)
    cache = DynamicCache(config=model.config)
    model(torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(1)), cache=cache, use_cache=True)
    handle.remove()
    fresh = DynamicCache(config=model.config)
    kwargs = {**hooked["kwargs"], "cache": fresh}
    runtime._fill_keys_values(layer, hooked["states"], kwargs)
    assert torch.equal(fresh.layers[1].keys, cache.layers[1].keys)
    assert torch.equal(fresh.layers[1].values, cache.layers[1].values)


@pytest.mark.slow
def test_exit_maps_fit_the_last_layer_better_than_no_map(text_ids):
    model, ids = text_ids
    fitted = fit_dynamic(model, ids, [1, 2], progress=False)
    from llmprune.dynamic.fit import _Recorder

    recorder = _Recorder(model, mlp=False)
    model.get_decoder()(input_ids=ids[:2], use_cache=False)
    recorder.remove()
    last = recorder.layer_out[3]
    for e in (1, 2):
        h = recorder.layer_out[e - 1]
        mapped = h @ fitted.maps[f"map.{e}.weight"].T + fitted.maps[f"map.{e}.bias"]
        assert (mapped - last).norm() < 0.8 * (h - last).norm()
    table = fitted.table  # maps also raise the exits' agreement with the full model
    plain = fit_dynamic(model, ids, [1, 2], progress=False, fit_maps=False).table
    assert table.agree[:, 0].float().mean() > plain.agree[:, 0].float().mean()


@pytest.mark.slow
@pytest.mark.parametrize("target", [dict(max_ppl_increase=0.05), dict(min_agreement=0.9)])
def test_calibration_meets_the_target_and_exits(text_ids, target):
    model, ids = text_ids
    dynamic, report = make_dynamic(model, ids, progress=False, **target)
    try:
        assert dynamic is model and report.target_met
        cal = report.calibration
        if "max_ppl_increase" in target:
            assert cal["ppl_ratio"] <= 1.05 + 1e-9
        else:
            assert cal["agreement"] >= 0.9
        assert report.exit_threshold is not None and cal["avg_layers"] < 4  # it did exit
        json.dumps(report.as_dict())
        # a stricter target never exits more
        _, strict = make_dynamic(model, ids, progress=False, max_ppl_increase=0.0)
        assert strict.calibration["avg_layers"] >= cal["avg_layers"] - 1e-9
        assert strict.calibration["ppl_ratio"] <= 1.0 + 1e-9
    finally:
        detach(model)


def test_token_skipping_is_calibrated_and_skips(text_ids):
    model, ids = text_ids
    try:
        _, report = make_dynamic(model, ids, early_exit=False, token_skip=True, max_ppl_increase=0.1, progress=False)
        assert report.target_met and report.skip_threshold is not None
        assert report.calibration["mlp_skip_fraction"] > 0 and report.calibration["ppl_ratio"] <= 1.1 + 1e-9
        assert report.calibration["avg_layers"] == 4
    finally:
        detach(model)


def test_batched_generation_equals_single_rows():
    model = tiny_model("llama")
    state = random_state(model, exit_threshold=0.0, skip_threshold=-0.5)
    attach(model, state)
    prompts = torch.randint(0, 512, (3, 6), generator=torch.Generator().manual_seed(5))
    batched = model.generate(prompts, max_new_tokens=12, do_sample=False, pad_token_id=0)
    exited_layers = state.summary()["avg_layers"]
    assert 1 < exited_layers < 3
    for row in range(3):
        single = model.generate(prompts[row:row + 1], max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert torch.equal(single, batched[row:row + 1])
    torch.manual_seed(0)
    sampled = model.generate(prompts, max_new_tokens=8, do_sample=True, top_k=20, pad_token_id=0)
    torch.manual_seed(0)
    again = model.generate(prompts, max_new_tokens=8, do_sample=True, top_k=20, pad_token_id=0)
    assert sampled.shape == (3, 14) and torch.equal(sampled, again) and int(sampled.max()) < 512


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3_text"])
@pytest.mark.parametrize("drafting", [True, False])
def test_lossless_generation_is_the_full_models_greedy_output(arch, drafting):
    model = tiny_model(arch)
    prompt = torch.randint(0, 512, (1, 5), generator=torch.Generator().manual_seed(2))
    reference = model.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0)
    state = random_state(model)
    state.set(lossless={"draft_exit_layer": 2, "draft_tokens": 3, "drafting": drafting,
                        "draft_cost": 0.5, "verify_cost": 1.2})
    attach(model, state)
    out = model.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(out, reference)
    assert (state.stats["drafted"] > 0) == drafting
    assert torch.equal(model(prompt).logits, detach(model)(prompt).logits)  # forward is the full model's


@pytest.mark.slow
def test_lossless_calibration_reports_acceptance(text_ids):
    model, ids = text_ids
    try:
        _, report = make_dynamic(model, ids, early_exit=False, lossless=True, progress=False)
        draft = report.draft
        assert 0 <= draft["acceptance_estimate"] <= 1 and draft["draft_exit_layer"] in report.exit_layers
        assert draft["drafting"] == (draft["expected_speedup"] > 1)
        prompt = ids[:1, :6]
        out = model.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)
        detach(model)
        assert torch.equal(out, model.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0))
    finally:
        detach(model)


def _saved_folder(tmp_path, model, tokenizer):
    from llmprune.save import save_folder

    return save_folder(model, tokenizer, tmp_path / "dynamic", {"prune": {"method": "dynamic"}}, "card",
                       extra_files=lambda tmp: save_dynamic(model, tmp))


@pytest.mark.slow
@pytest.mark.subprocess
def test_saved_folder_loads_static_plainly_and_dynamic_otherwise(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    model = tiny_model("qwen2")
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(4))
    base = model(ids).logits
    attach(model, random_state(model, exit_threshold=0.0, skip_threshold=-0.5))
    dynamic_logits = model(ids).logits
    folder = _saved_folder(tmp_path, model, tokenizer)
    assert {"llmprune_dynamic.json", "llmprune_dynamic.safetensors", "modeling_llmprune_dynamic.py",
            "lossless.py", "model.safetensors"} <= {p.name for p in folder.iterdir()}

    static = AutoModelForCausalLM.from_pretrained(folder)
    assert not hasattr(static, "llmprune_dynamic") and torch.equal(static(ids).logits, base)
    loaded = load_dynamic(folder)
    assert loaded.llmprune_dynamic.settings["exit_threshold"] == 0.0
    assert torch.equal(loaded(ids).logits, dynamic_logits)

    from llmprune.models.loading import load_model  # llmprune itself loads the static model, no refusal
    again, _ = load_model(str(folder))
    assert not hasattr(again, "llmprune_dynamic") and torch.equal(again(ids).logits, base)
    assert "auto_map" not in again.config.to_dict()

    # trust_remote_code: in a fresh process, so the module cache and Auto registries stay clean
    code = (f"import torch; from transformers import AutoModelForCausalLM as A\n"
            f"m = A.from_pretrained({str(folder)!r}, trust_remote_code=True)\n"
            f"assert type(m.llmprune_dynamic).__module__.startswith('transformers_modules'), type(m.llmprune_dynamic)\n"
            f"torch.save(m(torch.tensor({ids.tolist()})).logits, {str(tmp_path / 'remote.pt')!r})\n")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env)
    assert torch.equal(torch.load(tmp_path / "remote.pt"), dynamic_logits)


def test_a_pruned_model_can_be_made_dynamic(text_ids):
    import copy

    import llmprune

    model, ids = text_ids
    pruned = copy.deepcopy(model)
    detach(pruned)
    llmprune.prune(pruned, ids[:4], method="wanda", sparsity=0.5, progress=False)
    _, report = make_dynamic(pruned, ids, max_ppl_increase=0.05, progress=False)
    assert report.target_met


def test_bfloat16_model_is_calibrated_in_its_own_dtype(text_ids):
    model, ids = text_ids
    half = tiny_model("llama", num_hidden_layers=4).to(torch.bfloat16)
    _, report = make_dynamic(half, ids, max_ppl_increase=0.1, progress=False)
    assert report.target_met
    assert half(ids[:1, :8]).logits.dtype == torch.bfloat16


def test_refusals_are_usage_errors(text_ids):
    model, ids = text_ids
    with pytest.raises(UsageError, match="exit-layers"):
        make_dynamic(model, ids, exit_layers="2,9")
    with pytest.raises(UsageError, match="min-agreement"):
        make_dynamic(model, ids, min_agreement=1.5)
    with pytest.raises(UsageError, match="needs --early-exit"):
        make_dynamic(model, ids, early_exit=False)
    with pytest.raises(UsageError, match="calibration"):
        make_dynamic(model, ids.float())
    assert not hasattr(model, "llmprune_dynamic")


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--early-exit", "--token-skip", "--max-ppl-increase", "0.1"],
                                   ["--lossless"]])
def test_cli_dynamic_run_writes_a_loadable_folder(tiny_folder, text_file, tmp_path, capsys, flags):
    from llmprune.__main__ import main

    out = tmp_path / "out"
    code = main(["--model", str(tiny_folder), "--method", "dynamic", *flags, "--calib-data", str(text_file),
                 "--nsamples", "6", "--seqlen", "48", "--eval-data", str(text_file), "--eval-tokens", "256",
                 "--eval-seqlen", "64", "--output", str(out), "--no-progress"])
    assert code == 0
    report = json.loads((out / "llmprune.json").read_text())
    assert "dynamic" in report["perplexity"] and "llmprune summary" in capsys.readouterr().out
    loaded = load_dynamic(out)
    if "--lossless" in flags:  # exact: the same perplexity as the full model
        assert report["dynamic"]["lossless"]
        assert loaded.llmprune_dynamic.settings["lossless"] == report["dynamic"]["draft"]
        ppl = report["perplexity"]
        assert ppl["dynamic"]["perplexity"] == pytest.approx(ppl["dense"]["perplexity"])
    else:
        assert report["dynamic"]["token_skip"] and report["dynamic"]["early_exit"]
        assert loaded.llmprune_dynamic.settings["skip_threshold"] == report["dynamic"]["skip_threshold"]


@pytest.mark.parametrize("extra, message", [
    (["--method", "wanda", "--early-exit"], "belong to --method dynamic"),
    (["--method", "dynamic", "--min-agreement", "2"], "--min-agreement"),
    (["--method", "dynamic", "--exit-layers", "1,x"], "--exit-layers"),
    (["--method", "dynamic", "--exit-layers", "7"], "--exit-layers"),
    (["--method", "dynamic", "--lossless", "--token-skip"], "--lossless"),
])
def test_cli_dynamic_refusals(tiny_folder, text_file, tmp_path, capsys, extra, message):
    from llmprune.__main__ import main

    out = tmp_path / "out"
    code = main(["--model", str(tiny_folder), "--calib-data", str(text_file), "--nsamples", "2", "--seqlen", "16",
                 "--eval-data", "none", "--output", str(out), "--no-progress", *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.subprocess
def test_an_uneven_structured_model_can_be_made_dynamic_and_reloaded(text_ids, tmp_path, tokenizer):
    import llmprune
    from llmprune.save import save_folder

    _, ids = text_ids
    model = tiny_model("llama", num_hidden_layers=4)
    llmprune.prune_structured(model, ids[:4], ffn=0.4, heads=0.5, allocation="global", progress=False)
    assert model.config.model_type == "llmprune_llama"
    _, report = make_dynamic(model, ids, max_ppl_increase=0.1, progress=False)
    assert report.target_met
    probe = ids[:1, :12]
    expected = model(probe).logits
    folder = save_folder(model, tokenizer, tmp_path / "out", {"prune": {"method": "dynamic"}}, "card",
                         extra_files=lambda tmp: save_dynamic(model, tmp))
    loaded = load_dynamic(folder)  # llmprune is imported: its uneven classes are registered
    assert torch.equal(loaded(probe).logits, expected)
    code = (f"import torch; from transformers import AutoModelForCausalLM as A\n"
            f"m = A.from_pretrained({str(folder)!r}, trust_remote_code=True)\n"
            f"torch.save(m(torch.tensor({probe.tolist()})).logits, {str(tmp_path / 'remote.pt')!r})\n")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env)
    assert torch.equal(torch.load(tmp_path / "remote.pt"), expected)
