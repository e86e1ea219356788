"""The command line on a tiny local model folder: the output folder, the report, bad input."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from llmprune.__main__ import main

FAST = ["--nsamples", "4", "--seqlen", "32", "--eval-seqlen", "64", "--eval-tokens", "512", "--no-progress"]


def run_cli(folder, text_file, output, *extra):
    return main(["--model", str(folder), "--calib-data", str(text_file), "--eval-data", str(text_file),
                 "--output", str(output), *FAST, *extra])


def fresh_process_logits(folder: Path, ids: torch.Tensor, tmp_path: Path) -> torch.Tensor:
    """Load the folder with plain transformers in a new interpreter that never imports llmprune."""
    torch.save(ids, tmp_path / "ids.pt")
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(folder)!r})\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r})\n"
        "with torch.no_grad(): logits = model(ids).logits\n"
        "assert not any(name.startswith('llmprune') for name in sys.modules)\n"
        f"torch.save(logits, {str(tmp_path / 'logits.pt')!r})\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env)
    return torch.load(tmp_path / "logits.pt")


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("method, pattern", [("wanda", "unstructured"), ("sparsegpt", "2:4")])
def test_output_folder_reloads_with_identical_logits(tiny_folder, text_file, tmp_path, capsys, method, pattern):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import llmprune
    from llmprune import data

    out = tmp_path / "out"
    assert run_cli(tiny_folder, text_file, out, "--method", method, "--pattern", pattern) == 0
    printed = capsys.readouterr().out
    assert "realised sparsity  0.5000" in printed and str(out) in printed

    # The same pruning through the Python API, in memory.
    model = AutoModelForCausalLM.from_pretrained(tiny_folder)
    tokenizer = AutoTokenizer.from_pretrained(tiny_folder)
    calibration = data.calibration_ids(tokenizer, [str(text_file)], 4, 32, 0)
    llmprune.prune(model, calibration, method=method, pattern=pattern, progress=False)
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(ids).logits
    assert torch.equal(fresh_process_logits(out, ids, tmp_path), expected)  # bitwise, float32

    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "README.md", "llmprune.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temporary folders left

    report = json.loads((out / "llmprune.json").read_text())
    assert report["seed"] == 0 and report["command"].startswith("python -m llmprune --model")
    assert set(report["versions"]) >= {"python", "torch", "transformers"}
    assert report["prune"]["overall_sparsity"] == 0.5 and len(report["prune"]["per_layer_sparsity"]) == 3
    # The reported perplexity is the pruned model's, under the stated protocol: recompute it.
    from llmprune.evaluate import perplexity

    evaluation = data.evaluation_ids(tokenizer, [str(text_file)], 512)
    again = perplexity(model, evaluation, 64, progress=False)
    assert report["perplexity"]["pruned"]["perplexity"] == pytest.approx(again.perplexity, rel=1e-6)
    assert report["perplexity"]["pruned"]["protocol"] == report["perplexity"]["dense"]["protocol"] == again.protocol
    # Peak memory in bytes, of this process: above an interpreter with torch, below the kernel's high-water mark.
    peak = report["peak_memory"]
    high_water = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    assert 100 * 2**20 < peak["rss_before_prune_bytes"] <= peak["rss_peak_prune_bytes"] <= high_water
    assert peak["rss_growth_prune_bytes"] == peak["rss_peak_prune_bytes"] - peak["rss_before_prune_bytes"]
    # Timings are disjoint parts of the run.
    timings = report["timings"]
    assert min(timings["load_s"], timings["data_s"], timings["prune_s"]) > 0
    assert timings["load_s"] + timings["data_s"] + timings["prune_s"] < timings["total_before_save_s"]

    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == "tiny-llama"
    assert front["tags"] == ["llmprune", "pruned", method]
    assert front["llmprune"]["realised_sparsity"] == 0.5
    assert set(front["llmprune"]["perplexity"]) == {"dense", "pruned"}
    assert "non-overlapping windows" in card


def test_existing_output_is_refused_then_overwritten(tiny_folder, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert run_cli(tiny_folder, text_file, out, "--method", "magnitude") == 2
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert run_cli(tiny_folder, text_file, out, "--method", "magnitude", "--overwrite") == 2  # not llmprune's
    assert "not written by llmprune" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "llmprune.json").write_text("{}")  # as an earlier run leaves it
    assert run_cli(tiny_folder, text_file, out, "--method", "magnitude", "--overwrite") == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_default_output_name_never_replaces(tiny_folder, text_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["--model", str(tiny_folder), "--method", "magnitude", "--eval-data", "none", "--no-progress"]
    assert main(args) == 0 and main(args) == 0
    assert sorted(p.name for p in (tmp_path / "pruned").iterdir()) == [
        "tiny-llama-magnitude-50", "tiny-llama-magnitude-50-2"]


def test_pattern_sets_sparsity_when_omitted(tiny_folder, text_file, tmp_path):
    out = tmp_path / "out"
    assert run_cli(tiny_folder, text_file, out, "--pattern", "4:8", "--eval-data", "none") == 0
    report = json.loads((out / "llmprune.json").read_text())
    assert report["prune"]["pattern"] == "4:8" and report["prune"]["target_sparsity"] == 0.5
    assert report["perplexity"] == {}


BAD = [
    (["--sparsity", "1"], "[0, 1)"),
    (["--sparsity", "-0.1"], "[0, 1)"),
    (["--sparsity", "abc"], "number"),
    (["--sparsity", "nan"], "[0, 1)"),
    (["--pattern", "4:4"], "0 < N < M"),
    (["--pattern", "2:3"], "not a multiple of 3"),
    (["--pattern", "two:four"], "N:M"),
    (["--pattern", "2:4", "--sparsity", "0.3"], "disagrees"),
    (["--method", "obs"], "unknown method"),
    (["--calib-data", "missing.txt"], "not found: 'missing.txt'"),
    (["--calib-data", "wikitext103"], "unknown data source 'wikitext103'"),
    (["--eval-data", "nowhere/"], "not found: 'nowhere/'"),
    (["--seqlen", "100000"], "window"),
    (["--nsamples", "0"], "--nsamples"),
    (["--seqlen", "1"], "--seqlen"),
    (["--device", "tpu"], "--device"),
    (["--dtype", "float8"], "--dtype"),
    (["--eval-seqlen", "100000"], "fewer than one"),
    (["--frobnicate"], "unrecognized arguments"),
]


@pytest.mark.parametrize("extra, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tiny_folder, text_file, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    before = sorted(os.listdir(tmp_path))
    assert run_cli(tiny_folder, text_file, out, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err
    assert sorted(os.listdir(tmp_path)) == before  # no output, no temporary folder


def test_missing_model_folder_and_empty_calibration_file(tmp_path, capsys, tiny_folder):
    assert main(["--model", str(tmp_path / "no-such-model"), "--output", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["--model", str(tiny_folder), "--calib-data", str(empty), "--output", str(tmp_path / "o"),
                 "--no-progress"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert not (tmp_path / "o").exists()


def test_help_documents_the_nm_convention(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--method", "--sparsity", "--pattern", "--calib-data", "--nsamples", "--seqlen", "--seed",
                 "--eval-data", "--eval-seqlen", "--eval-tokens", "--output", "--overwrite", "--device", "--dtype"):
        assert flag in text
    assert "N are set to zero" in text and "2:4" in text


@pytest.mark.slow
def test_hub_id_offline_fails_fast_with_one_line(tmp_path, capsys, monkeypatch):
    import time

    monkeypatch.setattr("llmprune.models.loading.hub_reachable", lambda: False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    started = time.perf_counter()
    assert main(["--model", "some-org/some-model", "--output", str(tmp_path / "o"), "--no-progress"]) == 2
    assert time.perf_counter() - started < 30  # huggingface_hub's own retries take about a minute
    assert "unreachable and it is not in the local cache" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
@pytest.mark.subprocess
def test_structured_cli_shrinks_and_reloads(tiny_folder, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(tiny_folder, text_file, out, "--method", "structured", "--heads", "0.5", "--ffn", "0.25",
                   "--layers", "1", "--score", "flap") == 0
    printed = capsys.readouterr().out
    assert "prefill" in printed and "MiB on disk" in printed
    report = json.loads((out / "llmprune.json").read_text())
    assert report["structured"]["removed_layers"] and report["structured"]["uniform"]
    assert report["parameters"]["after"]["parameters"] < report["parameters"]["before"]["parameters"]
    assert report["weight_bytes"]["after"] < report["weight_bytes"]["before"]
    assert set(report["speed"]) == {"dense", "pruned"}
    config = json.loads((out / "config.json").read_text())
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["intermediate_size"]) == (2, 2, 96)
    front = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert front["tags"] == ["llmprune", "pruned", "structured"] and front["llmprune"]["score"] == "flap"
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    from transformers import AutoModelForCausalLM

    reloaded = fresh_process_logits(out, ids, tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded, AutoModelForCausalLM.from_pretrained(out)(ids).logits)


@pytest.mark.parametrize("extra, message", [
    (["--heads", "1.0"], "fraction in"),
    (["--layers", "3"], "--layers must be in"),
    (["--ffn", "0.1", "--round-to", "1000"], "multiple of 1000"),
    (["--heads", "0.9"], "would remove all"),
], ids=["heads1", "layers", "roundto", "allheads"])
def test_structured_refusals_exit_2_and_write_nothing(tiny_folder, text_file, tmp_path, capsys, extra, message):
    before = sorted(os.listdir(tmp_path))
    assert run_cli(tiny_folder, text_file, tmp_path / "out", "--method", "structured", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err, err
    assert sorted(os.listdir(tmp_path)) == before


def test_model_card_license_origin_and_structured_wording(tmp_path):
    from llmprune.save import model_card

    def front_and_text(card):
        return yaml.safe_load(card.split("---")[1]), card

    unstructured = {"prune": {"method": "wanda", "pattern": "unstructured", "target_sparsity": 0.5,
                              "overall_sparsity": 0.5}}
    front, card = front_and_text(model_card("HuggingFaceTB/SmolLM2-135M-Instruct", {**unstructured, "model": "llama"}))
    assert front["license"] == "apache-2.0"
    assert "4-bit GGUF" in card and "de-quantised" in card
    assert "pypi.org" not in card  # llmprune is not on PyPI: no dead link

    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# a base model\n")
    front, card = front_and_text(model_card("base", {**unstructured, "model": str(folder)}))
    assert front["license"] == "mit" and "GGUF" not in card
    front, card = front_and_text(model_card("org/unknown", {**unstructured, "model": "org/unknown"}))
    assert "license" not in front and "base model's license applies" in card

    def structured(heads, ffn, removed_layers):
        return {"model": "llama", "prune": {"method": "structured", "heads": heads, "ffn": ffn},
                "structured": {"score": "flap", "allocation": "uniform", "gqa": "groups",
                               "removed_layers": removed_layers, "parameters_before": 100, "parameters_after": 80}}

    card = model_card("b", structured(0.2, 0.2, []))
    assert "Attention heads and FFN neurons were removed" in card and "layers" not in card.split("---")[2]
    card = model_card("b", structured(0.0, 0.25, []))
    assert "FFN neurons were removed" in card and "ttention heads" not in card.split("---")[2]
    card = model_card("b", structured(0.0, 0.0, [3, 7]))
    assert "Decoder layers [3, 7] were removed" in card
