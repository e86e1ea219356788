"""Recipes: every file in recipes/ runs on a tiny model; the schema is checked before any work;
flags override recipe fields; the recipe used is stored in the output folder and its model card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from llmprune.__main__ import main

from conftest import tiny_model

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.fixture(scope="module")
def six_layer_folder(tmp_path_factory, tokenizer):
    """A tiny Llama with 6 layers (so that layer removal and early exit have room)."""
    folder = tmp_path_factory.mktemp("six") / "tiny6"
    tiny_model("llama", num_hidden_layers=6).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _small(folder, text_file, output) -> list[str]:
    return ["--model", str(folder), "--calib-data", str(text_file), "--eval-data", str(text_file),
            "--nsamples", "2", "--seqlen", "32", "--eval-seqlen", "64", "--eval-tokens", "256",
            "--output", str(output), "--no-progress"]


def test_recipes_folder_has_the_promised_recipes():
    names = {p.stem for p in RECIPES}
    assert {"magnitude-50", "wanda-50", "sparsegpt-50", "sparsegpt-2of4", "wanda-4of8", "owl-wanda-70",
            "structured-20", "layer-removal", "early-exit", "combined"} <= names
    kinds = [[s["method"] for s in yaml.safe_load(p.read_text())["stages"]] for p in RECIPES if p.stem == "combined"]
    assert kinds == [["structured", "wanda", "dynamic"]]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_runs_on_a_tiny_model(recipe, six_layer_folder, text_file, tmp_path, monkeypatch):
    document = yaml.safe_load(recipe.read_text())
    import llmprune.evaluate

    # Speed is measured by generating tokens (tens of seconds on a shared CPU): tested in
    # test_structured/test_evaluate; here a stand-in records that the recipe asked for it.
    timed = []
    monkeypatch.setattr(llmprune.evaluate, "measure_speed", lambda model, device, **_: timed.append(1) or {
        "prefill_tokens_per_s": 1.0, "decode_tokens_per_s": 1.0, "prompt_tokens": 1, "new_tokens": 1, "threads": 1})
    out = tmp_path / "out"
    assert main(["--recipe", str(recipe), *_small(six_layer_folder, text_file, out)]) == 0
    used = yaml.safe_load((out / "recipe.yaml").read_text())
    assert used["stages"] == document["stages"]  # no stage option was overridden here
    assert used["model"] == str(six_layer_folder) and used["nsamples"] == 2  # the flags were
    report = json.loads((out / "llmprune.json").read_text())
    assert [s["method"] for s in report["stages"]] == [s["method"] for s in document["stages"]]
    card = (out / "README.md").read_text()
    assert "## Recipe" in card and "stages:" in card
    assert report["perplexity"]["pruned"]["perplexity"] > 0
    assert bool(timed) == (document.get("speed", False) or any(s["method"] == "structured" for s in document["stages"]))
    for stage, asked in zip(report["stages"], document["stages"]):
        if stage["kind"] == "unstructured" and "sparsity" in asked:
            per_layer = stage["report"]["per_layer_sparsity"]
            assert abs(sum(per_layer) / len(per_layer) - asked["sparsity"]) < 0.05
        if stage["kind"] == "unstructured" and "pattern" in asked:
            assert stage["report"]["pattern"] == asked["pattern"]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)  # an ordinary HF folder


def test_flags_override_recipe_fields(six_layer_folder, text_file, tmp_path):
    out = tmp_path / "out"
    recipe = next(p for p in RECIPES if p.stem == "wanda-50")
    assert main(["--recipe", str(recipe), "--sparsity", "0.3", "--method", "sparsegpt",
                 *_small(six_layer_folder, text_file, out)]) == 0
    used = yaml.safe_load((out / "recipe.yaml").read_text())
    assert used["stages"] == [{"method": "sparsegpt", "sparsity": 0.3}]
    assert "overridden on the command line" in (out / "recipe.yaml").read_text()
    report = json.loads((out / "llmprune.json").read_text())
    assert report["prune"]["target_sparsity"] == pytest.approx(0.3)
    assert report["stages"][0]["method"] == "sparsegpt"


def test_owl_recipe_reports_realised_per_layer_ratios(six_layer_folder, text_file, tmp_path):
    out = tmp_path / "out"
    recipe = next(p for p in RECIPES if p.stem == "owl-wanda-70")
    assert main(["--recipe", str(recipe), *_small(six_layer_folder, text_file, out)]) == 0
    prune = json.loads((out / "llmprune.json").read_text())["prune"]
    asked = prune["schedule"]["per_layer"]
    assert prune["schedule"]["name"] == "owl" and len(asked) == 6 and len(prune["schedule"]["outlier_ratios"]) == 6
    assert sum(asked) / 6 == pytest.approx(0.7) and max(asked) - min(asked) == pytest.approx(0.16)
    # the layer with the most outliers is pruned least
    ratios = prune["schedule"]["outlier_ratios"]
    assert asked.index(min(asked)) == ratios.index(max(ratios))
    realised = prune["per_layer_sparsity"]
    assert all(abs(r - a) < 0.02 for r, a in zip(realised, asked))
    assert "realised_per_layer_sparsity" in (out / "README.md").read_text()


BAD = [
    ("colour: red\n", "colour"),
    ("nsamples: many\n", "nsamples"),
    ("nsamples: 0\n", "nsamples"),
    ("stages:\n  - {method: wanda, sparsity: 1.5}\n", "stages[0].sparsity"),
    ("stages:\n  - {method: wanda, spars: 0.5}\n", "stages[0].spars"),
    ("stages:\n  - {method: pruneit}\n", "stages[0].method"),
    ("stages:\n  - {method: wanda, schedule: owl, pattern: '2:4'}\n", "stages[0].schedule"),
    ("stages:\n  - {method: wanda}\n  - {method: structured, ffn: 0.2}\n", "stages[1]"),
    ("stages:\n  - {method: structured, ffn: 2}\n", "stages[0]"),
    ("stages:\n  - {method: magnitude, blocksize: 64}\n", "stages[0]"),
    ("stages: []\n", "stages"),
    ("sparsity: 0.5\n", "sparsity"),
    ("device: tpu\n", "device"),
]


@pytest.mark.parametrize("text, key", BAD, ids=[k for _, k in BAD])
def test_bad_recipe_is_one_error_naming_key_and_file(text, key, tmp_path, capsys):
    if not text.startswith("stages"):
        text += "stages:\n  - {method: wanda, sparsity: 0.5}\n"
    recipe = tmp_path / "bad-recipe.yaml"
    recipe.write_text("model: " + str(tmp_path / "no-such-model") + "\n" + text)
    out = tmp_path / "out"
    assert main(["--recipe", str(recipe), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert str(recipe) in err and key in err, err
    assert "no-such-model" not in err  # refused before the model was looked at
    assert not out.exists()


def test_not_yaml_and_missing_file(tmp_path, capsys):
    bad = tmp_path / "r.yaml"
    bad.write_text("stages: [\n")
    assert main(["--recipe", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert main(["--recipe", str(tmp_path / "none.yaml")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_flag_without_matching_stage_is_refused(tmp_path, capsys):
    recipe = next(p for p in RECIPES if p.stem == "wanda-50")
    assert main(["--recipe", str(recipe), "--heads", "0.2"]) == 2
    err = capsys.readouterr().err
    assert "--heads" in err and "no structured stage" in err
