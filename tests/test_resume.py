"""--checkpoint-dir: a run interrupted after any layer resumes there and ends bitwise equal to an
uninterrupted run; a torn write is ignored; a different command is refused before any work."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import FAST

import llmprune
from llmprune.__main__ import main
from llmprune.checkpoint import LayerCheckpoint
from llmprune.errors import UsageError

from conftest import tiny_model

CALIBRATION = torch.randint(0, 512, (4, 24), generator=torch.Generator().manual_seed(1))

RUNS = {
    "wanda": lambda model, **kw: llmprune.prune(model, CALIBRATION, method="wanda", sparsity=0.5, progress=False, **kw),
    "sparsegpt-2:4": lambda model, **kw: llmprune.prune(model, CALIBRATION, method="sparsegpt", pattern="2:4",
                                                        progress=False, **kw),
    "magnitude": lambda model, **kw: llmprune.prune(model, None, method="magnitude", sparsity=0.3,
                                                    progress=False, **kw),
    "structured-flap": lambda model, **kw: llmprune.prune_structured(
        model, CALIBRATION, heads=0.5, ffn=0.25, layers=1, score="flap", allocation="global", progress=False, **kw),
}


class Killed(BaseException):
    """Stands for the process dying right after a layer's checkpoint was committed."""


def interrupt_after(monkeypatch, layer_index: int):
    original = LayerCheckpoint.save_layer

    def save_layer(self, index, tensors, next_inputs):
        original(self, index, tensors, next_inputs)
        if index == layer_index:
            raise Killed

    monkeypatch.setattr(LayerCheckpoint, "save_layer", save_layer)


def state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", list(RUNS))
@pytest.mark.parametrize("killed_after", [0, 1])
def test_resumed_run_equals_uninterrupted_bitwise(name, killed_after, tmp_path, monkeypatch):
    run = RUNS[name]
    reference = tiny_model("llama", num_hidden_layers=4)
    expected_report = run(reference)

    folder = tmp_path / "ckpt"
    with monkeypatch.context() as patch:
        interrupt_after(patch, killed_after)
        with pytest.raises(Killed):
            run(tiny_model("llama", num_hidden_layers=4), checkpoint=folder)
    meta = json.loads((folder / "checkpoint.json").read_text())
    assert meta["finished"] == killed_after + 1
    # A later layer's files torn by the kill must be ignored, not read.
    (folder / f"layer-{killed_after + 1:05d}.safetensors").write_bytes(b"torn")
    (folder / f"inputs-{killed_after + 2:05d}.safetensors.tmp").write_bytes(b"torn")

    ran = []
    resumed = tiny_model("llama", num_hidden_layers=4)
    for index, layer in enumerate(resumed.model.layers):
        layer.register_forward_pre_hook(lambda module, args, index=index: ran.append(index))
    report = run(resumed, checkpoint=folder)

    assert state(resumed).keys() == state(reference).keys()
    for key, value in state(reference).items():
        assert torch.equal(state(resumed)[key], value), key
    if name != "magnitude":  # finished layers are not run again (beyond the capture of layer 0's input)
        assert killed_after not in ran and killed_after + 1 in ran
    if hasattr(report, "per_layer_sparsity"):
        assert report.per_layer_sparsity == expected_report.per_layer_sparsity
        assert report.modules == expected_report.modules
    else:
        assert report.layer_sizes == expected_report.layer_sizes
        assert report.removed_layers == expected_report.removed_layers


def test_a_different_run_is_refused_and_names_what_changed(tmp_path, monkeypatch):
    folder = tmp_path / "ckpt"
    with monkeypatch.context() as patch:
        interrupt_after(patch, 0)
        with pytest.raises(Killed):
            RUNS["wanda"](tiny_model("llama"), checkpoint=folder)
    with pytest.raises(UsageError, match="differs in: sparsity"):
        llmprune.prune(tiny_model("llama"), CALIBRATION, method="wanda", sparsity=0.6, checkpoint=folder,
                       progress=False)
    with pytest.raises(UsageError, match="calibration_sha256"):
        llmprune.prune(tiny_model("llama"), CALIBRATION[:, :20], method="wanda", sparsity=0.5, checkpoint=folder,
                       progress=False)
    with pytest.raises(UsageError, match="embedding_sha256"):
        llmprune.prune(tiny_model("llama", seed=5), CALIBRATION, method="wanda", sparsity=0.5, checkpoint=folder,
                       progress=False)
    with pytest.raises(UsageError, match="differs in: .*kind"):
        llmprune.prune_structured(tiny_model("llama"), CALIBRATION, ffn=0.25, checkpoint=folder, progress=False)
    other = tmp_path / "not-a-checkpoint"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not an llmprune checkpoint"):
        RUNS["wanda"](tiny_model("llama"), checkpoint=other)
    assert (other / "notes.txt").read_text() == "mine"


def test_cli_resumes_after_an_interrupt_and_removes_the_checkpoint(tiny_folder, text_file, tmp_path, monkeypatch,
                                                                   capsys):
    def cli(output, *extra):
        return main(["--model", str(tiny_folder), "--calib-data", str(text_file), "--eval-data", "none",
                     "--output", str(output), *FAST, "--method", "sparsegpt", *extra])

    assert cli(tmp_path / "plain") == 0
    checkpoint = tmp_path / "ckpt"
    with monkeypatch.context() as patch:
        original = LayerCheckpoint.save_layer

        def interrupted(self, index, tensors, next_inputs):
            original(self, index, tensors, next_inputs)
            if index == 1:
                raise KeyboardInterrupt

        patch.setattr(LayerCheckpoint, "save_layer", interrupted)
        assert cli(tmp_path / "resumed", "--checkpoint-dir", str(checkpoint)) == 130
    assert not (tmp_path / "resumed").exists()
    assert json.loads((checkpoint / "checkpoint.json").read_text())["finished"] == 2

    capsys.readouterr()
    assert cli(tmp_path / "other-seed", "--checkpoint-dir", str(checkpoint), "--seed", "1") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --checkpoint-dir") and "seed" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "other-seed").exists()

    assert cli(tmp_path / "resumed", "--checkpoint-dir", str(checkpoint)) == 0
    assert ((tmp_path / "resumed" / "model.safetensors").read_bytes()
            == (tmp_path / "plain" / "model.safetensors").read_bytes())
    assert not checkpoint.exists()
