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

from conftest import ARCHITECTURES, tiny_model

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


@pytest.mark.slow
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


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_streaming_reads_only_the_embedding_rows_it_needs_and_follows_a_schedule(tmp_path, monkeypatch,
                                                                                 architecture):
    """Capture reads the rows of the tokens the calibration uses, never the whole embedding
    matrix (Gemma 3's scaled embedding too); an explicit per-layer schedule is applied as in memory."""
    from llmprune.stream import CheckpointReader, prune_streaming

    calibration = _calibration() % 40 + 100  # tokens 100..139 only
    schedule = [0.3, 0.5, 0.7]
    source = tmp_path / "source"
    tiny_model(architecture).save_pretrained(source)
    expected = tiny_model(architecture)
    assert len(expected.model.layers) == len(schedule)
    llmprune.prune(expected, calibration, method="wanda", sparsity=0.5, schedule=schedule, progress=False)
    whole, rows = [], []
    real_read, real_rows = CheckpointReader.read, CheckpointReader.read_rows
    monkeypatch.setattr(CheckpointReader, "read", lambda self, name, dtype: whole.append(name) or
                        real_read(self, name, dtype))
    monkeypatch.setattr(CheckpointReader, "read_rows", lambda self, name, r, dtype: rows.append((name, r)) or
                        real_rows(self, name, r, dtype))
    out = tmp_path / "out"
    out.mkdir()
    report, _ = prune_streaming(source, out, calibration, method="wanda", sparsity=0.5, pattern=None,
                                device=torch.device("cpu"), dtype=torch.float32, progress=False, schedule=schedule)
    assert rows == [("model.embed_tokens.weight", sorted(set(calibration.flatten().tolist())))]
    assert all(name.startswith("model.layers.") for name in whole)
    assert [round(x, 6) for x in report.schedule["per_layer"]] == schedule
    saved = _state(out)
    assert all(torch.equal(saved[name], tensor) for name, tensor in expected.state_dict().items())


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
@pytest.mark.parametrize("mmap_large_blocks", [False, True])
def test_freed_tensors_go_back_to_the_system_in_streaming_runs(mmap_large_blocks):
    """After glibc has freed an 8 MB block it serves a 6 MB tensor from the heap and keeps it when
    freed; with the fixed threshold --stream sets, the memory leaves the process at once."""
    script = ("import sys, psutil, torch\n"
              "from llmprune.memory import allocate_large_blocks_with_mmap\n"
              f"if {mmap_large_blocks}: allocate_large_blocks_with_mmap()\n"
              "a = torch.ones(2 * 2**20); del a\n"  # 8 MB
              "b = torch.ones(3 * 2**19)\n"  # 6 MB
              "before = psutil.Process().memory_info().rss; del b\n"
              "print((before - psutil.Process().memory_info().rss) / 2**20)\n")
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    returned_mib = float(done.stdout.split()[-1])
    assert returned_mib > 5.5 if mmap_large_blocks else returned_mib < 0.5


FAST = ["--nsamples", "6", "--seqlen", "32", "--no-progress"]


def _cli(folder, text_file, output, *extra):
    from llmprune.__main__ import main

    return main(["--model", str(folder), "--calib-data", str(text_file), "--eval-data", "none",
                 "--output", str(output), *FAST, *extra])


@pytest.mark.slow
def test_cli_stream_and_offload_save_the_in_memory_result(tiny_folder, text_file, tmp_path):
    assert _cli(tiny_folder, text_file, tmp_path / "memory", "--method", "sparsegpt") == 0
    assert _cli(tiny_folder, text_file, tmp_path / "stream", "--method", "sparsegpt", "--stream",
                "--activations-on-disk", str(tmp_path / "acts")) == 0
    assert _cli(tiny_folder, text_file, tmp_path / "offload", "--method", "sparsegpt", "--device-map", "auto",
                "--max-memory", "cpu=300000", "--offload-folder", str(tmp_path / "store")) == 0
    expected = _state(tmp_path / "memory")
    for mode in ("stream", "offload"):
        saved = _state(tmp_path / mode)
        assert set(saved) == set(expected)
        assert all(torch.equal(saved[k], v) for k, v in expected.items()), mode
    assert (tmp_path / "stream" / "model.safetensors.index.json").is_file()
    report = json.loads((tmp_path / "offload" / "llmprune.json").read_text())
    assert report["placement"]["mode"] == "offload" and "disk" in report["placement"]["hf_device_map"].values()
    assert json.loads((tmp_path / "stream" / "llmprune.json").read_text())["placement"]["mode"] == "stream"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


@pytest.mark.parametrize("extra", [["--stream", "--method", "structured", "--heads", "0.5"],
                                   ["--max-memory", "cpu=1GiB"], ["--device-map", "everywhere"],
                                   ["--activations-on-disk", "acts"],
                                   ["--stream", "--device-map", "auto"], ["--stream", "--schedule", "owl"]])
def test_bad_scale_options_are_refused_before_work(tiny_folder, text_file, tmp_path, capsys, extra):
    assert _cli(tiny_folder, text_file, tmp_path / "out", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_memory_estimate_parts_and_refusal(monkeypatch):
    from llmprune.errors import UsageError
    from llmprune.memory import estimate_peak, refuse_unless_fits

    from conftest import tiny_config

    config = tiny_config("llama", num_hidden_layers=24)
    common = dict(dtype_bytes=4, nsamples=8, seqlen=64, method="wanda")
    memory = estimate_peak(config, mode="memory", **common)
    stream = estimate_peak(config, mode="stream", **common)
    assert memory.parts["activations"] == stream.parts["activations"] == 8 * 64 * 64 * 4
    assert memory.parts["weights"] > 5 * stream.parts["weights"]  # 24 layers vs embeddings + 2 layers
    two = estimate_peak(config, mode="memory", processes=2, **common)
    assert two.parts["activations"] == memory.parts["activations"] // 2
    hessians = estimate_peak(config, mode="memory", **{**common, "method": "sparsegpt"})
    assert hessians.parts["statistics"] > 64 * 64 * 4 * 3  # [in, in] float32 per group
    # refused with the parts and the ways out, unless forced
    memory.host_available = memory.host - 1
    with pytest.raises(UsageError) as refusal:
        refuse_unless_fits(memory, "memory", force=False)
    assert all(word in str(refusal.value) for word in ("--stream", "--nsamples", "--offload-folder", "--force",
                                                       "activations"))
    refuse_unless_fits(memory, "memory", force=True)


def test_cli_refuses_what_memory_cannot_hold(tiny_folder, text_file, tmp_path, capsys):
    import psutil

    tokens = psutil.virtual_memory().total // 8  # the token ids alone exceed the machine's RAM
    assert _cli(tiny_folder, text_file, tmp_path / "out", "--nsamples", str(tokens // 64 + 1), "--seqlen", "64") == 2
    err = capsys.readouterr().err
    assert "estimated peak memory" in err and "--force" in err and "--stream" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("method", [["--method", "wanda"], ["--method", "sparsegpt"],
                                    ["--method", "structured", "--heads", "0.5", "--ffn", "0.25", "--layers", "1",
                                     "--score", "flap"]], ids=["wanda", "sparsegpt", "structured"])
def test_two_processes_equal_one(tiny_folder, text_file, tmp_path, method):
    """accelerate launch with 2 gloo processes on CPU: the calibration batches are split, the
    statistics combined, each group solved once; the saved model equals, bit for bit, the one of a
    single process at the same thread count (the launcher runs each process with one thread).
    SparseGPT too: its Hessians are summed in float64, so the split does not reach the results."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert _cli(tiny_folder, text_file, tmp_path / "one", *method) == 0
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--main_process_port", "0", "-m", "llmprune", "--model", str(tiny_folder), "--calib-data",
               str(text_file), "--eval-data", "none", "--output", str(tmp_path / "two"), *FAST, *method]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("llmprune summary") == 1  # only the main process reports and writes
    one, two = _state(tmp_path / "one"), _state(tmp_path / "two")
    assert set(one) == set(two)
    assert json.loads((tmp_path / "two" / "llmprune.json").read_text())["placement"]["processes"] == 2
    assert [k for k in one if not torch.equal(one[k], two[k])] == []


def test_device_map_and_max_memory_parsing(tmp_path):
    from llmprune.errors import UsageError
    from llmprune.placement import parse_device_map, parse_max_memory

    assert parse_max_memory("0=20GiB,1=20GiB,cpu=60GiB") == {0: "20GiB", 1: "20GiB", "cpu": "60GiB"}
    assert parse_max_memory("cuda:1=500MB, cpu=300000") == {1: "500MB", "cpu": 300000}
    for bad in ("0=20XB", "gpu=1GiB", "", "cpu"):
        with pytest.raises(UsageError):
            parse_max_memory(bad)
    assert parse_device_map("balanced") == "balanced"
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"model.embed_tokens": "cpu", "model.layers": "disk", "lm_head": 0}))
    assert parse_device_map(str(mapping))["model.layers"] == "disk"
    mapping.write_text(json.dumps({"model.layers": "tpu"}))
    with pytest.raises(UsageError, match="tpu"):
        parse_device_map(str(mapping))


def test_device_map_file_places_layers_on_disk(tmp_path, source):
    """--device-map FILE.json: the map as written, here every decoder layer on disk."""
    from transformers import AutoModelForCausalLM

    from llmprune.placement import parse_device_map

    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers": "disk",
                                   "model.norm": "cpu", "lm_head": "cpu"}))
    model = AutoModelForCausalLM.from_pretrained(source, device_map=parse_device_map(str(mapping)),
                                                 offload_folder=str(tmp_path / "store"), dtype=torch.float32)
    assert all(p.is_meta for p in model.model.layers.parameters())
    calibration = _calibration()
    expected = tiny_model("llama")
    llmprune.prune(expected, calibration, method="wanda", sparsity=0.5, progress=False)
    llmprune.prune(model, calibration, method="wanda", sparsity=0.5, device="cpu", progress=False)
    ids = calibration[:1]
    assert torch.equal(model(ids).logits, expected(ids).logits)  # the hooks read the pruned store


def test_streaming_holds_one_layer_at_a_time(tmp_path, monkeypatch):
    """Whatever the depth, at most one decoder layer's weights are real at any moment, and none
    outside the layers once capture is done."""
    from llmprune import stream

    folder = tmp_path / "deep"
    tiny_model("llama", num_hidden_layers=6).save_pretrained(folder)
    real_counts = []
    enter, leave = stream.StreamFromCheckpoint.enter, stream.StreamFromCheckpoint.leave

    def count(model):
        return sum(p.numel() for p in model.parameters() if not p.is_meta)

    def checked_enter(self, index, layer):
        enter(self, index, layer)
        real_counts.append(count(self.model))

    def checked_leave(self, index, layer):
        leave(self, index, layer)
        assert count(self.model) == 0

    monkeypatch.setattr(stream.StreamFromCheckpoint, "enter", checked_enter)
    monkeypatch.setattr(stream.StreamFromCheckpoint, "leave", checked_leave)
    out = tmp_path / "out"
    out.mkdir()
    stream.prune_streaming(folder, out, _calibration(), method="wanda", sparsity=0.5, pattern=None,
                           device=torch.device("cpu"), dtype=torch.float32, progress=False)
    layer_size = sum(p.numel() for p in tiny_model("llama").model.layers[0].parameters())
    assert real_counts == [layer_size] * 6


def test_failed_visit_of_an_offloaded_layer_writes_nothing(tmp_path, source):
    from llmprune.calibrate import WhereAcceleratePutIt

    model = _load_offloaded(source, tmp_path / "offload")
    layer = model.model.layers[2]
    placement = WhereAcceleratePutIt()
    placement.enter(2, layer)
    assert not layer.mlp.down_proj.weight.is_meta and not layer.mlp.down_proj._hf_hook.offload
    with torch.no_grad():
        layer.mlp.down_proj.weight.zero_()  # a change that must not reach the store
    placement.abandon(2, layer)
    assert layer.mlp.down_proj.weight.is_meta and layer.mlp.down_proj._hf_hook.offload
    ids = _calibration(1)
    assert torch.allclose(model(ids).logits, tiny_model("llama")(ids).logits, atol=1e-6)
