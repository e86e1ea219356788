"""Big-model paths: accelerate device maps with CPU/disk offload, streaming, several processes,
and the memory estimate. Tiny random models; everything on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import llmprune
from llmprune.placement import is_dispatched
from llmprune.structured import prune_structured

from conftest import tiny_model

ROOT = Path(__file__).resolve().parents[1]


def _calibration(n=4, seqlen=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 512, (n, seqlen), generator=generator)


def _state(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def _load_offloaded(folder: Path, offload: Path):
    """The tiny model forced into mixed CPU and disk offload: the embeddings (and maybe the first
    layer) stay in memory, everything else is read from the offload folder at every use."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, device_map="auto", max_memory={"cpu": 300_000},
                                                 offload_folder=str(offload), dtype=torch.float32)
    devices = set(model.hf_device_map.values())
    assert "disk" in devices and "cpu" in devices, model.hf_device_map
    assert is_dispatched(model)
    return model


@pytest.fixture
def source(tmp_path):
    folder = tmp_path / "source"
    tiny_model("llama").save_pretrained(folder)
    return folder


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_offloaded_prune_saves_what_in_memory_pruning_makes(tmp_path, source, method):
    calibration = _calibration()
    expected = tiny_model("llama")
    llmprune.prune(expected, calibration, method=method, sparsity=0.5, progress=False)

    model = _load_offloaded(source, tmp_path / "offload")
    before = {k: v.clone() for k, v in _state(source).items()}
    llmprune.prune(model, calibration, method=method, sparsity=0.5, device="cpu", progress=False)
    model.save_pretrained(tmp_path / "out")
    saved = _state(tmp_path / "out")
    for name, tensor in expected.state_dict().items():
        if name in saved:
            assert torch.equal(saved[name], tensor), name
    assert set(saved) == set(before)
    # the source checkpoint itself is untouched (write-back goes to the offload store only)
    assert all(torch.equal(before[k], v) for k, v in _state(source).items())
    # a disk-offloaded layer was really pruned in the store: reload and check zeros
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    weight = reloaded.model.layers[2].mlp.down_proj.weight
    assert (weight == 0).float().mean() == pytest.approx(0.5, abs=0.01)


def test_offloaded_structured_equals_in_memory(tmp_path, source):
    calibration = _calibration()
    options = dict(heads=0.5, ffn=0.25, layers=1, score="flap")
    expected = tiny_model("llama")
    prune_structured(expected, calibration, device="cpu", progress=False, **options)

    model = _load_offloaded(source, tmp_path / "offload")
    prune_structured(model, calibration, device="cpu", progress=False, **options)
    model.save_pretrained(tmp_path / "out")
    saved = _state(tmp_path / "out")
    reference = expected.state_dict()
    assert set(saved) == set(reference)
    for name, tensor in reference.items():
        assert torch.equal(saved[name], tensor), name
    # and it runs: the hooks read the new, smaller weights from the offload store
    ids = calibration[:1]
    assert torch.allclose(model(ids).logits, expected(ids).logits, atol=1e-5)


@pytest.mark.parametrize("method,on_disk", [("wanda", False), ("sparsegpt", True), ("magnitude", False)])
def test_streaming_writes_the_in_memory_result_as_sharded_checkpoint(tmp_path, source, method, on_disk):
    from llmprune.stream import prune_streaming

    calibration = None if method == "magnitude" else _calibration()
    expected = tiny_model("llama")
    llmprune.prune(expected, calibration, method=method, sparsity=0.5, progress=False)

    out = tmp_path / "out"
    out.mkdir()
    report, _ = prune_streaming(source, out, calibration, method=method, sparsity=0.5, pattern=None,
                                device=torch.device("cpu"), dtype=torch.float32, progress=False,
                                max_shard_bytes=200_000, activations_on_disk=tmp_path / "acts" if on_disk else None)
    assert report.overall_sparsity == pytest.approx(0.5, abs=0.01)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    saved = _state(out)
    assert set(saved) == set(expected.state_dict())
    for name, tensor in expected.state_dict().items():
        assert torch.equal(saved[name], tensor), name
    if on_disk:  # the memory-mapped activation files are gone
        assert not any((tmp_path / "acts").iterdir())
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = _calibration(1)
    assert torch.equal(reloaded(ids).logits, expected(ids).logits)
