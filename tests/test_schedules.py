"""Per-layer sparsity schedules: OWL's arithmetic, its outlier ratios against a direct computation,
explicit lists, and the refusals."""

from __future__ import annotations

import json

import pytest
import torch

import llmprune
from llmprune.__main__ import main
from llmprune.errors import UsageError
from llmprune.schedules import owl_outlier_ratios, owl_sparsities, parse_schedule

from conftest import tiny_model


def test_owl_sparsities_average_to_target_within_lambda():
    ratios = [0.010, 0.030, 0.020, 0.050, 0.015]
    sparsities = owl_sparsities(ratios, 0.7, 0.08)
    assert sum(sparsities) / len(sparsities) == pytest.approx(0.7)
    assert max(sparsities) - min(sparsities) == pytest.approx(0.16)  # 2 lambda
    # most outliers -> pruned least; fewest -> most; linear in between
    assert sparsities[3] == min(sparsities) and sparsities[0] == max(sparsities)
    assert sparsities[2] - sparsities[1] == pytest.approx(0.16 * 0.01 / 0.04)
    assert owl_sparsities([0.02] * 4, 0.5) == [0.5] * 4


def test_owl_sparsities_outside_range_are_refused():
    with pytest.raises(UsageError, match="owl-lambda"):
        owl_sparsities([0.0, 1.0], 0.95, 0.08)


def test_outlier_ratios_match_a_direct_computation():
    """The runner's collect-only pass sees exactly the dense model's own layer inputs."""
    model = tiny_model("llama")
    calibration = torch.randint(0, 512, (3, 24), generator=torch.Generator().manual_seed(1))
    ratios = owl_outlier_ratios(model, calibration, torch.device("cpu"), m=5.0, progress=False)
    # Direct: hooks on the full model's forward record every projection's input; Wanda scores.
    squares = {}
    hooks = [module.register_forward_pre_hook(
        lambda m, args, name=name: squares.__setitem__(
            name, squares.get(name, 0) + args[0].reshape(-1, args[0].shape[-1]).pow(2).sum(0)))
        for name, module in model.named_modules() if isinstance(module, torch.nn.Linear) and "layers" in name]
    with torch.no_grad():
        for row in calibration:
            model(row.unsqueeze(0))
    for hook in hooks:
        hook.remove()
    for index in range(3):
        scores = torch.cat([(module.weight.abs() * squares[name].sqrt()).flatten()
                            for name, module in model.named_modules()
                            if name in squares and name.startswith(f"model.layers.{index}.")])
        expected = float((scores > 5.0 * scores.mean()).float().mean())
        assert ratios[index] == pytest.approx(expected, abs=2 / scores.numel())


def test_explicit_schedule_is_realised_per_layer():
    model = tiny_model("llama")
    calibration = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    report = llmprune.prune(model, calibration, method="magnitude", schedule=[0.25, 0.5, 0.75], progress=False)
    assert report.per_layer_sparsity == pytest.approx([0.25, 0.5, 0.75], abs=1e-3)
    assert report.target_sparsity == pytest.approx(0.5) and report.schedule["name"] == "explicit"


@pytest.mark.parametrize("schedule, pattern, message", [
    ("owl", "2:4", "N:M"), ([0.5, 0.5], None, "decoder layers"), ("sometimes", None, "uniform, owl"),
    ([0.5, 1.2, 0.5], None, "[0, 1)")])
def test_bad_schedules_are_refused(schedule, pattern, message):
    with pytest.raises(UsageError) as error:
        llmprune.prune(tiny_model("llama"), None, method="magnitude", schedule=schedule, pattern=pattern)
    assert message in str(error.value) or (pattern and "pattern" in str(error.value))


def test_parse_schedule_from_the_command_line():
    assert parse_schedule("OWL") == "owl" and parse_schedule("0.1, 0.2,0.3") == [0.1, 0.2, 0.3]


def test_cli_schedule_list_and_report(tiny_folder, text_file, tmp_path):
    out = tmp_path / "out"
    assert main(["--model", str(tiny_folder), "--method", "wanda", "--schedule", "0.3,0.5,0.7", "--calib-data",
                 str(text_file), "--eval-data", "none", "--nsamples", "2", "--seqlen", "32", "--output", str(out),
                 "--no-progress"]) == 0
    prune = json.loads((out / "llmprune.json").read_text())["prune"]
    assert prune["schedule"] == {"name": "explicit", "per_layer": [0.3, 0.5, 0.7]}
    assert prune["per_layer_sparsity"] == pytest.approx([0.3, 0.5, 0.7], abs=0.02)
    assert prune["target_sparsity"] == pytest.approx(0.5)
