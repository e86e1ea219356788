"""`python -m llmprune sweep`: table, JSON and plot; what it reuses does not change the numbers."""

from __future__ import annotations

import json

import pytest
import torch

import llmprune
from llmprune.__main__ import main
from llmprune.sweep import parse_sparsities


def test_parse_sparsities_with_ellipsis():
    assert parse_sparsities("0.1,0.2,...,0.8") == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    assert parse_sparsities("0.5, 0.25") == [0.25, 0.5]
    for bad in ("0.1,...", "a,b", "0.5,1.5", "..., 0.3"):
        with pytest.raises(llmprune.UsageError):
            parse_sparsities(bad)


def test_sweep_writes_table_json_and_plot(tiny_folder, text_file, tmp_path, monkeypatch, capsys):
    import llmprune.data

    tokenised = []
    original = llmprune.data.calibration_ids
    monkeypatch.setattr(llmprune.data, "calibration_ids",
                        lambda *a, **k: tokenised.append(1) or original(*a, **k))
    out = tmp_path / "sweep"
    assert main(["sweep", "--model", str(tiny_folder), "--methods", "magnitude,wanda", "--sparsities", "0.3,0.6",
                 "--patterns", "2:4", "--schedules", "uniform,owl", "--calib-data", str(text_file),
                 "--eval-data", str(text_file), "--nsamples", "2", "--seqlen", "32", "--eval-seqlen", "64",
                 "--eval-tokens", "256", "--output", str(out), "--no-progress"]) == 0
    assert tokenised == [1]  # one tokenised calibration set for all 10 runs
    results = json.loads((out / "sweep.json").read_text())
    assert len(results["runs"]) == 2 * 2 * 2 + 2
    assert results["owl"] and len(results["owl"]["outlier_ratios"]) == 3
    table = (out / "sweep.md").read_text()
    assert "| sparsity | magnitude | wanda |" in table and "| 2:4 |" in table and "| 0.60 owl |" in table
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Reusing the dense weights, data and OWL ratios gives what a separate run gives.
    from transformers import AutoModelForCausalLM

    from llmprune import data
    from llmprune.evaluate import perplexity

    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(tiny_folder)
    calibration = data.calibration_ids(tokenizer, [str(text_file)], 2, 32, 0)
    evaluation = data.evaluation_ids(tokenizer, [str(text_file)], 256)
    for run in [r for r in results["runs"] if r["method"] == "wanda" and r["target_sparsity"] == 0.6]:
        model = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32)
        llmprune.prune(model, calibration, method="wanda", sparsity=0.6, schedule=run["schedule"], progress=False)
        measured = perplexity(model, evaluation, 64, progress=False).perplexity
        assert measured == pytest.approx(run["perplexity"], rel=1e-5)


def test_sweep_refuses_bad_input_before_loading(tmp_path, capsys):
    assert main(["sweep", "--model", str(tmp_path / "missing"), "--methods", "wanda,nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["sweep", "--model", "x", "--schedules", "owl,other"]) == 2
    assert main(["sweep", "--model", "x", "--patterns", "unstructured"]) == 2
