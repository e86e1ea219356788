"""ALPS (--method admm), --update (refit on a fixed mask) and --sequential (true-sequential pruning).
Random layers for the math, tiny random models for the runner and the command line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from test_methods import correlated_inputs, factor_inputs
from test_scale import FAST, ROOT, _calibration, _cli, _state

import llmprune
from llmprune.errors import UsageError
from llmprune.methods.admm import admm_prune, refit_on_support
from llmprune.methods.masks import BlockPattern, NMPattern, check_nm
from llmprune.methods.sparsegpt import InputHessian, sparsegpt_prune
from llmprune.methods.wanda import InputNorms, Wanda

from conftest import tiny_model

CPU = torch.device("cpu")
P24 = NMPattern(2, 4)


@pytest.fixture(autouse=True)
def one_thread():
    """Small matrices: a second thread only adds waiting (minutes on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def relative_error(x: torch.Tensor, dense: torch.Tensor, pruned: torch.Tensor) -> float:
    """||X (W' - W)ᵀ||² / ||X Wᵀ||²: the layer-wise reconstruction error."""
    return float((x @ (pruned - dense).t()).pow(2).sum() / (x @ dense.t()).pow(2).sum())


def hessian_of(x: torch.Tensor) -> InputHessian:
    stats = InputHessian(x.shape[1], CPU)
    for batch in x.split(256):
        stats.add_batch(batch)
    return stats


INPUTS = {"factor": lambda: factor_inputs(1024, 128, seed=1, noise=0.05),  # condition number ~1e4
          "correlated": lambda: correlated_inputs(1024, 128, seed=2)}


@pytest.mark.parametrize("inputs", list(INPUTS))
@pytest.mark.parametrize("sparsity, pattern", [(0.5, None), (0.7, None), (0.5, P24)])
def test_admm_reconstructs_better_than_sparsegpt_with_exact_sparsity(inputs, sparsity, pattern):
    x = INPUTS[inputs]()
    g = torch.Generator().manual_seed(3)
    weights = [torch.randn(48, 128, generator=g), torch.randn(16, 128, generator=g)]  # e.g. q and k: stacked
    stats = hessian_of(x)
    admm = admm_prune(weights, stats.hessian(), sparsity, pattern)
    sparsegpt = sparsegpt_prune(weights, stats.hessian(), sparsity, pattern)
    for dense, ours, theirs in zip(weights, admm, sparsegpt):
        assert relative_error(x, dense, ours) < 0.9 * relative_error(x, dense, theirs)
        if pattern is None:  # exact count per matrix
            assert int((ours == 0).sum()) == int(dense.numel() * sparsity)
        else:
            assert check_nm(ours == 0, pattern)


def test_admm_zeroes_dead_inputs_and_is_deterministic():
    x = factor_inputs(512, 64, seed=4)
    x[:, 5] = 0  # an input that is always zero: its weights are irrelevant and removed
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(5))
    stats = hessian_of(x)
    first = admm_prune([weight], stats.hessian(), 0.5, None)[0]
    assert (first[:, 5] == 0).all()
    assert torch.equal(first, admm_prune([weight], stats.hessian(), 0.5, None)[0])


@pytest.mark.parametrize("pattern", [None, P24, BlockPattern(16)])
def test_update_refits_a_wanda_mask_and_keeps_it(pattern):
    x = factor_inputs(1024, 128, seed=6, noise=0.1)
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(7))
    norms, stats = InputNorms(128, CPU), hessian_of(x)
    norms.add_batch(x)
    wanda = Wanda().prune_group([weight], norms, 0.5, pattern)[0]
    refit = refit_on_support([weight], [wanda], stats.hessian())[0]
    obs = sparsegpt_prune([weight], stats.hessian(), 0.5, pattern, removed=[wanda == 0])[0]
    for updated in (refit, obs):
        assert torch.equal(updated == 0, wanda == 0)  # the mask is Wanda's
        assert relative_error(x, weight, updated) < 0.8 * relative_error(x, weight, wanda)
    assert relative_error(x, weight, refit) <= relative_error(x, weight, obs) * 1.001  # the least-squares optimum


def _pruned(method="wanda", **options) -> dict[str, torch.Tensor]:
    model = tiny_model("llama")
    report = llmprune.prune(model, _calibration(), method=method, sparsity=0.5, progress=False, **options)
    assert abs(report.overall_sparsity - 0.5) < 0.01
    return {k: v.clone() for k, v in model.state_dict().items() if "proj" in k}


def test_update_keeps_each_methods_masks_and_changes_the_weights():
    """Magnitude's masks do not depend on data: all stay. Wanda's masks of layer 0 see the same
    inputs with or without the refit; later layers see the refitted outputs of earlier ones."""
    for method in ("magnitude", "wanda"):
        plain, updated = _pruned(method), _pruned(method, update="admm")
        same = [k for k in plain if method == "magnitude" or ".layers.0." in k]
        assert same and all(torch.equal(plain[k] == 0, updated[k] == 0) for k in same)
        assert not any(torch.equal(plain[k], updated[k]) for k in plain)
    with pytest.raises(UsageError):
        _pruned("wanda", update="lasso")


def test_sparsegpt_with_its_own_update_is_sparsegpt():
    """SparseGPT's statistics serve its refit too (one Hessian, read before the method spends it);
    the OBS update on SparseGPT's own masks repeats SparseGPT's own updates exactly."""
    plain, updated = _pruned("sparsegpt"), _pruned("sparsegpt", update="obs")
    assert all(torch.equal(plain[k], updated[k]) for k in plain)

@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "admm"])
def test_sequential_differs_from_parallel_and_is_deterministic(method):
    parallel, first, second = _pruned(method), _pruned(method, sequential=True), _pruned(method, sequential=True)
    assert all(torch.equal(first[k], second[k]) for k in first)
    q = "model.layers.0.self_attn.q_proj.weight"  # the first group reads the same inputs either way
    assert torch.equal(parallel[q], first[q])
    down = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(parallel[down], first[down])


def test_cli_flags_and_streaming_save_the_in_memory_result(tiny_folder, text_file, tmp_path):
    flags = ["--method", "admm", "--sequential", "--sparsity", "0.6", "--update", "obs"]
    assert _cli(tiny_folder, text_file, tmp_path / "memory", *flags) == 0
    assert _cli(tiny_folder, text_file, tmp_path / "stream", *flags, "--stream") == 0
    memory, stream = _state(tmp_path / "memory"), _state(tmp_path / "stream")
    assert [k for k in memory if not torch.equal(memory[k], stream[k])] == []
    pruned = [v for k, v in memory.items() if "proj" in k]
    assert sum(int((v == 0).sum()) for v in pruned) / sum(v.numel() for v in pruned) == pytest.approx(0.6, abs=0.01)


def test_a_checkpoint_remembers_update_and_sequential(tmp_path, monkeypatch):
    from llmprune.checkpoint import LayerCheckpoint

    original = LayerCheckpoint.save_layer

    def interrupted(self, index, tensors, next_inputs):
        original(self, index, tensors, next_inputs)
        raise KeyboardInterrupt

    folder = tmp_path / "ckpt"
    with monkeypatch.context() as patch:
        patch.setattr(LayerCheckpoint, "save_layer", interrupted)
        with pytest.raises(KeyboardInterrupt):
            llmprune.prune(tiny_model("llama"), _calibration(), method="wanda", checkpoint=folder, progress=False,
                           update="admm", sequential=True)
    with pytest.raises(UsageError, match="update"):
        llmprune.prune(tiny_model("llama"), _calibration(), method="wanda", checkpoint=folder, progress=False)
    resumed = tiny_model("llama")
    llmprune.prune(resumed, _calibration(), method="wanda", checkpoint=folder, progress=False, update="admm",
                   sequential=True)
    expected = _pruned("wanda", update="admm", sequential=True)
    assert all(torch.equal(resumed.state_dict()[k], v) for k, v in expected.items())


@pytest.mark.parametrize("method", [["--method", "admm"], ["--method", "wanda", "--update", "admm", "--sequential"]],
                         ids=["admm", "wanda-update-sequential"])
def test_two_processes_equal_one(tiny_folder, text_file, tmp_path, method):
    """2 gloo processes save what one process saves, at one thread per process: the Hessians are
    all-reduced in float64, Wanda's norms summed in batch order (each part of distributed.Joint
    in its own way), each group solved by one process."""
    assert _cli(tiny_folder, text_file, tmp_path / "one", *method) == 0  # one thread (the fixture)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--main_process_port", "0", "-m", "llmprune", "--model", str(tiny_folder), "--calib-data",
               str(text_file), "--eval-data", "none", "--output", str(tmp_path / "two"), *FAST, *method]
    done = subprocess.run(command, check=False, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = _state(tmp_path / "one"), _state(tmp_path / "two")
    assert [k for k in one if not torch.equal(one[k], two[k])] == []
