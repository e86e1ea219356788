"""RIA: its scores, and that one file in llmprune/methods gives it a flag, a recipe key, sweep
support and a memory estimate."""

from __future__ import annotations

import json

import pytest
import torch

from llmprune.__main__ import main


def test_ria_scores_follow_the_paper_formula():
    from llmprune.methods.ria import ria_scores

    weight = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    sum_sq = torch.tensor([4.0, 16.0])  # ||X|| = 2, 4
    scores = ria_scores(weight, sum_sq, alpha=0.5)
    # |W|/row sum + |W|/column sum, times ||X_j|| ** 0.5
    expected = (torch.tensor([[1 / 3 + 1 / 4, 2 / 3 + 2 / 6], [3 / 7 + 3 / 4, 4 / 7 + 4 / 6]])
                * torch.tensor([2.0, 4.0]).sqrt())
    assert torch.allclose(scores, expected)
    assert torch.allclose(ria_scores(weight, sum_sq, alpha=0.0), expected / torch.tensor([2.0, 4.0]).sqrt())


def test_ria_prunes_per_row_and_n_of_m():
    from llmprune.methods import METHODS, make_method
    from llmprune.methods.masks import NMPattern, check_nm

    assert "ria" in METHODS and METHODS["ria"].needs_calibration
    method = make_method("ria", alpha=0.5)
    stats = method.new_statistics(8, torch.device("cpu"))
    stats.add_batch(torch.randn(5, 8, generator=torch.Generator().manual_seed(0)))
    weight = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    (half,) = method.prune_group([weight], stats, 0.5, None)
    assert ((half == 0).sum(dim=1) == 4).all()  # per row
    (nm,) = method.prune_group([weight], stats, 0.5, NMPattern(2, 4))
    assert check_nm(nm == 0, NMPattern(2, 4))


def test_ria_options_are_derived_everywhere():
    from llmprune.api import _check_method_options
    from llmprune.cli import build_parser
    from llmprune.commands import sweep_parser
    from llmprune.errors import UsageError
    from llmprune.memory import _statistics_kind

    assert "--alpha" in build_parser().format_help() and "--alpha" in sweep_parser().format_help()
    assert _statistics_kind("ria") == "norms"
    with pytest.raises(UsageError, match="--alpha"):
        _check_method_options("ria", {"alpha": -1.0})
    from llmprune.sweep import plan_runs

    assert [r.method for r in plan_runs(["ria"], [0.5], ["2:4"], ["uniform"])] == ["ria", "ria"]
    assert main(["--model", "x", "--method", "ria", "--alpha", "-1"]) == 2


def test_ria_from_the_cli_and_a_recipe(tiny_folder, text_file, tmp_path):
    common = ["--calib-data", str(text_file), "--eval-data", "none", "--nsamples", "2", "--seqlen", "16",
              "--device", "cpu", "--no-progress"]
    assert main(["--model", str(tiny_folder), "--method", "ria", "--alpha", "0.25", "--output",
                 str(tmp_path / "cli"), *common]) == 0
    report = json.loads((tmp_path / "cli" / "llmprune.json").read_text())
    assert report["prune"]["method"] == "ria" and abs(report["prune"]["overall_sparsity"] - 0.5) < 0.01
    recipe = tmp_path / "ria.yaml"
    recipe.write_text(f"model: {tiny_folder}\nstages:\n  - {{method: ria, sparsity: 0.5, alpha: 0.25}}\n")
    assert main(["--recipe", str(recipe), "--output", str(tmp_path / "recipe"), *common]) == 0
    a = (tmp_path / "cli" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "recipe" / "model.safetensors").read_bytes()
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"model: {tiny_folder}\nstages:\n  - {{method: wanda, alpha: 0.25}}\n")
    assert main(["--recipe", str(bad)]) == 2
