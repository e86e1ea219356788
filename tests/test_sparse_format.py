"""Sparse checkpoints (values + bitmask), sparse execution (CPU CSR/BSR chooser, 2:4 on CUDA) and the
block:B pattern, on tiny random models."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

import llmprune
from llmprune import api
from llmprune.__main__ import main
from llmprune.errors import UsageError
from llmprune.save import save_folder

from conftest import tiny_model

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


def pruned(dtype=torch.float32, sparsity=0.5, pattern=None, tie=False):
    """A tiny Llama, magnitude-pruned, with a -0.0 and a NaN among its pruned weights."""
    model = tiny_model("llama", tie_word_embeddings=tie).to(dtype)
    api.prune(model, None, method="magnitude", sparsity=sparsity, pattern=pattern, progress=False)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, :2] = torch.tensor([-0.0, float("nan")])
    return model


def same_bits(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Every tensor of the two state dicts identical to the bit (NaN and -0.0 included)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name].contiguous().view(torch.uint8), sb[name].contiguous().view(torch.uint8)), name


def save_pair(model, tmp_path, tokenizer=None):
    dense, sparse = tmp_path / "dense", tmp_path / "sparse"
    save_folder(model, tokenizer, dense, {}, "card")
    save_folder(model, tokenizer, sparse, {}, "card", save_format="sparse")
    return dense, sparse


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_roundtrip_is_bitwise_with_both_loaders(dtype, tmp_path):
    from transformers import AutoModelForCausalLM

    dense, sparse = save_pair(pruned(dtype, tie=dtype == torch.float32), tmp_path)
    assert not (sparse / "model.safetensors").exists() and (sparse / "model.sparse.safetensors").is_file()
    reference = AutoModelForCausalLM.from_pretrained(dense)
    own = llmprune.load_sparse(sparse)
    remote = AutoModelForCausalLM.from_pretrained(sparse, trust_remote_code=True)
    same_bits(reference, own)
    same_bits(reference, remote)
    assert type(remote).__name__ == "LlamaForCausalLM" and remote.dtype == dtype
    if dtype == torch.float32:  # tied embeddings stay tied
        assert remote.lm_head.weight is remote.model.embed_tokens.weight
    # 50%: values + a bitmask take 0.5 + 1/(8 * bytes per entry) of the pruned weights' bytes
    from safetensors import safe_open

    with safe_open(str(sparse / "model.sparse.safetensors"), "pt") as handle:
        values = handle.get_tensor("model.layers.1.mlp.up_proj.weight.sparse_values")
        bitmask = handle.get_tensor("model.layers.1.mlp.up_proj.weight.sparse_bitmask")
    assert values.numel() == 128 * 64 // 2 and values.dtype == dtype and bitmask.numel() == 128 * 64 // 8


def test_plain_loading_is_refused_never_random(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    _, sparse = save_pair(pruned(), tmp_path)
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(sparse)
    with pytest.raises(OSError, match="model.safetensors"):  # the family class directly: no weights file to fill
        LlamaForCausalLM.from_pretrained(sparse)
    config = json.loads((sparse / "config.json").read_text())
    assert config["model_type"] == "llmprune_sparse" and config["llmprune_sparse"]["base_model_type"] == "llama"


def corrupt(folder, name, change):
    from safetensors.torch import load_file, save_file

    path = folder / "model.sparse.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(path)
    tensors[name] = change(tensors[name])
    save_file(tensors, path, metadata=metadata)


@pytest.mark.parametrize("what", ["bitmask", "values"])
def test_corruption_is_refused_naming_the_tensor(what, tmp_path, tiny_folder, capsys):
    from transformers import AutoTokenizer

    _, sparse = save_pair(pruned(), tmp_path, AutoTokenizer.from_pretrained(tiny_folder))
    name = "model.layers.2.self_attn.o_proj.weight"
    if what == "bitmask":  # one more kept entry than values stored
        corrupt(sparse, name + ".sparse_bitmask", lambda b: torch.cat([b[:1] | 0xFF, b[1:]]))
    else:
        corrupt(sparse, name + ".sparse_values", lambda v: v[:-1])
    with pytest.raises(UsageError, match=f"{name}: .* values stored but its bitmask keeps"):
        llmprune.load_sparse(sparse)
    capsys.readouterr()
    assert main(["eval", str(sparse), "--eval-data", "none", "--speed", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and name in err and "\n" not in err


def test_convert_both_ways_and_refusals(tmp_path, tiny_folder, text_file, capsys):
    from transformers import AutoModelForCausalLM

    from llmprune.save import CARD_STORAGE

    dense = tmp_path / "dense"  # an llmprune output: its card and report say how it is stored
    assert main(["--model", str(tiny_folder), "--method", "magnitude", "--eval-data", "none", "--no-speed",
                 "--no-progress", "--output", str(dense)]) == 0
    assert CARD_STORAGE["dense"] in (dense / "README.md").read_text()
    assert main(["convert", str(dense), "--to", "sparse", "--output", str(tmp_path / "s")]) == 0
    card = (tmp_path / "s" / "README.md").read_text()
    assert CARD_STORAGE["sparse"] in card and CARD_STORAGE["dense"] not in card
    assert json.loads((tmp_path / "s" / "llmprune.json").read_text())["save_format"] == "sparse"
    assert main(["convert", str(tmp_path / "s"), "--to", "dense", "--output", str(tmp_path / "d")]) == 0
    assert {p.name for p in (tmp_path / "d").iterdir()} == {p.name for p in dense.iterdir()}
    assert (tmp_path / "d" / "README.md").read_bytes() == (dense / "README.md").read_bytes()
    reports = [json.loads((folder / "llmprune.json").read_text()) for folder in (dense, tmp_path / "d")]
    assert reports[0] == reports[1]
    assert json.loads((tmp_path / "d" / "config.json").read_text()) == json.loads((dense / "config.json").read_text())
    same_bits(AutoModelForCausalLM.from_pretrained(dense), AutoModelForCausalLM.from_pretrained(tmp_path / "d"))
    same_bits(AutoModelForCausalLM.from_pretrained(dense), llmprune.load_sparse(tmp_path / "s"))
    capsys.readouterr()
    for argv, message in [
        (["convert", str(dense), "--to", "dense", "--output", str(tmp_path / "x")], "already stored dense"),
        (["convert", str(dense), "--to", "sparse", "--output", str(tmp_path / "s")], "not empty"),
        (["convert", str(tiny_folder), "--to", "sparse", "--output", str(tmp_path / "y")], "no zeros to gain"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_cli_sparse_run_structured_refused_and_eval(tmp_path, tiny_folder, text_file, capsys):
    common = ["--model", str(tiny_folder), "--calib-data", str(text_file), "--eval-data", "none", "--nsamples", "2",
              "--seqlen", "32", "--no-progress", "--save-format", "sparse"]
    assert main(common + ["--method", "structured", "--heads", "0.5", "--output", str(tmp_path / "st")]) == 2
    assert "no zeros to gain from" in capsys.readouterr().err and not (tmp_path / "st").exists()
    assert main(common + ["--method", "wanda", "--sparsity", "0.7", "--output", str(tmp_path / "w")]) == 0
    report = json.loads((tmp_path / "w" / "llmprune.json").read_text())
    assert report["save_format"] == "sparse" and (tmp_path / "w" / "modeling_llmprune_sparse.py").is_file()
    from llmprune.models.loading import load_model

    model, _ = load_model(str(tmp_path / "w"))
    linears = [m.weight for n, m in model.model.layers.named_modules() if isinstance(m, torch.nn.Linear)]
    zeros = sum(int((w == 0).sum()) for w in linears) / sum(w.numel() for w in linears)
    assert zeros == report["prune"]["overall_sparsity"] == pytest.approx(0.7, abs=0.02)
    with one_thread():
        assert main(["eval", str(tmp_path / "w"), "--eval-data", str(text_file), "--eval-seqlen", "32",
                     "--eval-tokens", "128", "--execute", "sparse", "--no-progress"]) == 0
    assert "decoder linear layers" in capsys.readouterr().out  # which switched depends on the machine


@contextlib.contextmanager
def one_thread():
    """Kernel timings on one thread: two threads on a busy two-core machine time barriers, not kernels."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def test_sparse_linear_matches_dense_and_chooser_keeps_dense_at_half():
    from llmprune.sparse_execute import SparseLinear, execute_sparse, sparse_weight

    model = pruned(sparsity=0.5)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 1] = 0.0  # no NaN for the product
    linear = model.model.layers[1].mlp.up_proj
    x = torch.randn(3, 5, 64)
    for kind in ("csr", "bsr"):
        module = SparseLinear(sparse_weight(linear.weight, kind), None, 64, 128, kind)
        torch.testing.assert_close(module(x), linear(x), rtol=1e-5, atol=1e-5)
    csr = sparse_weight(linear.weight, "csr")
    assert csr.crow_indices().dtype == torch.int32 and csr.col_indices().dtype == torch.int32
    with one_thread():
        execution = execute_sparse(model, tokens=8, repeats=5)
    assert len(execution.choices) == 3 * 7 and not execution.switched
    assert execution.summary().startswith("no layer switched: dense was fastest for all 21")
    assert type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "admm"])
def test_block_pattern_is_exact(method):
    from llmprune.methods.masks import block_sums, check_blocks

    calibration = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    model = tiny_model("llama")
    extra = {"blocksize": 40} if method == "sparsegpt" else {}  # rounded down to 32: two column blocks of 64
    report = api.prune(model, calibration, method=method, sparsity=0.5, pattern="block:16", progress=False, **extra)
    assert report.pattern == "block:16"
    for layer in model.model.layers:
        for linear in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.mlp.down_proj):
            removed = linear.weight == 0
            assert check_blocks(removed, 16)
            blocks = block_sums(removed.float(), 16) == 256  # [out / 16, in / 16]
            if method == "wanda":  # half of every row of blocks
                assert (blocks.sum(1) == blocks.shape[1] // 2).all()
            else:
                assert int(blocks.sum()) == blocks.numel() // 2
    with pytest.raises(UsageError, match="not made of 48 x 48 blocks"):
        api.prune(tiny_model("llama"), None, method="magnitude", sparsity=0.5, pattern="block:48", progress=False)


def test_semi_structured_refused_on_cpu():
    from llmprune.sparse_execute import execute_semi_structured

    model = tiny_model("llama").half()
    with pytest.raises(UsageError, match="needs the model on an NVIDIA GPU"):
        execute_semi_structured(model)


@CUDA
def test_semi_structured_on_cuda_matches_dense():
    from llmprune.sparse_execute import execute_semi_structured

    model = tiny_model("llama", hidden_size=128, intermediate_size=256, head_dim=32)
    api.prune(model, None, method="magnitude", pattern="2:4", progress=False)
    model = model.half().cuda()
    ids = torch.randint(0, 512, (1, 64), device="cuda")
    with torch.no_grad():
        expected = model(ids).logits
        execute_semi_structured(model)
        got = model(ids).logits
    assert type(model.model.layers[0].mlp.up_proj.weight).__name__.startswith("SparseSemiStructuredTensor")
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)


@CUDA
def test_semi_structured_refuses_float32_and_unpruned_on_cuda():
    from llmprune.sparse_execute import execute_semi_structured

    model = tiny_model("llama", hidden_size=128, intermediate_size=256, head_dim=32).cuda()
    with pytest.raises(UsageError, match="float16 or bfloat16"):
        execute_semi_structured(model)
    with pytest.raises(UsageError, match="not 2:4 sparse"):
        execute_semi_structured(model.half())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal of a CPU-only machine")
def test_eval_execute_2of4_refused_on_cpu(tiny_folder, capsys):
    assert main(["eval", str(tiny_folder), "--execute", "2:4", "--eval-data", "none", "--speed", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: --execute 2:4 needs the model on an NVIDIA GPU (semi-structured sparse kernels are CUDA "
                   "only); it is on cpu")


FAST_RUN = ["--nsamples", "4", "--seqlen", "32", "--no-progress", "--eval-data", "none"]


def _prune_cli(folder, text_file, output, *extra):
    return main(["--model", str(folder), "--calib-data", str(text_file), "--output", str(output), *FAST_RUN, *extra])


@pytest.mark.slow
def test_streamed_sparse_output_equals_the_in_memory_one(tiny_folder, text_file, tmp_path):
    from llmprune.models.modeling_llmprune_sparse import read_state_dict

    assert _prune_cli(tiny_folder, text_file, tmp_path / "memory", "--method", "sparsegpt", "--save-format",
                      "sparse") == 0
    assert _prune_cli(tiny_folder, text_file, tmp_path / "stream", "--method", "sparsegpt", "--save-format", "sparse",
                      "--stream") == 0
    files = {p.name for p in (tmp_path / "stream").iterdir()}
    assert "model.sparse.safetensors.index.json" in files and "model.safetensors.index.json" not in files
    assert all(name.endswith(".sparse.safetensors") for name in files if name.endswith(".safetensors"))
    memory, stream = read_state_dict(tmp_path / "memory"), read_state_dict(tmp_path / "stream")
    assert memory.keys() == stream.keys() and all(torch.equal(memory[k], stream[k]) for k in memory)
    report = json.loads((tmp_path / "stream" / "llmprune.json").read_text())
    assert report["save_format"] == "sparse" and report["storage"].startswith("sparse safetensors")


def test_recover_keeps_a_sparse_student_sparse_and_refuses_a_structured_one(tiny_folder, text_file, tmp_path,
                                                                           capsys):
    recover = ["--teacher", str(tiny_folder), "--data", str(text_file), "--tokens", "64", "--seqlen", "32",
               "--batch", "2", "--curve-tokens", "64", "--eval-data", str(text_file), "--eval-seqlen", "32",
               "--no-progress", "--save-format", "sparse"]
    assert _prune_cli(tiny_folder, text_file, tmp_path / "w", "--method", "wanda", "--save-format", "sparse") == 0
    assert main(["recover", str(tmp_path / "w"), "--output", str(tmp_path / "r"), *recover]) == 0
    student, recovered = llmprune.load_sparse(tmp_path / "w"), llmprune.load_sparse(tmp_path / "r")
    for (name, before), (_, after) in zip(student.model.layers.named_parameters(),
                                          recovered.model.layers.named_parameters()):
        if before.dim() == 2:
            assert torch.equal(before == 0, after == 0), name
    assert not torch.equal(student.model.layers[0].mlp.up_proj.weight, recovered.model.layers[0].mlp.up_proj.weight)
    capsys.readouterr()
    assert _prune_cli(tiny_folder, text_file, tmp_path / "s", "--method", "structured", "--heads", "0.5") == 0
    assert main(["recover", str(tmp_path / "s"), "--output", str(tmp_path / "rs"), *recover]) == 2
    err = capsys.readouterr().err.strip()
    assert "no zeros to gain from" in err and "\n" not in err and not (tmp_path / "rs").exists()


def test_sweep_and_hub_upload_take_sparse_folders(tiny_folder, text_file, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    from fake_hub import FakeHub

    token = "hf_" + "Sp4" * 10
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with FakeHub(token) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", token)
        assert _prune_cli(tiny_folder, text_file, tmp_path / "w", "--method", "magnitude", "--save-format", "sparse",
                          "--push-to-hub", "me/tiny-sparse") == 0
    uploaded = hub.repos["me/tiny-sparse"]["files"]
    assert uploaded == {p.name: p.read_bytes() for p in (tmp_path / "w").iterdir() if p.is_file()}
    assert {"model.sparse.safetensors", "modeling_llmprune_sparse.py"} <= set(uploaded)
    assert "trust_remote_code=True" in uploaded["README.md"].decode()
    # a sparse folder as the input of a sweep: its dense model, pruned further
    assert main(["sweep", "--model", str(tmp_path / "w"), "--methods", "magnitude", "--sparsities", "0.5,0.7",
                 "--calib-data", str(text_file), "--eval-data", str(text_file), "--nsamples", "2", "--seqlen", "32",
                 "--eval-seqlen", "32", "--eval-tokens", "128", "--output", str(tmp_path / "sweep"),
                 "--no-progress"]) == 0
    runs = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["runs"]
    assert [round(r["realised_sparsity"], 1) for r in runs] == [0.5, 0.7]
