"""The layer-by-layer runner and the Python API on tiny random models of every supported family."""

from __future__ import annotations

import pytest
import torch

import llmprune
from llmprune.calibrate import capture_layer_inputs
from llmprune.errors import NumericalError, UsageError
from llmprune.methods.masks import NMPattern, check_nm
from llmprune.models.adapters import adapter_for

from conftest import ARCHITECTURES, tiny_model

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def calibration(n=6, length=32, seed=1):
    return torch.randint(0, 512, (n, length), generator=torch.Generator().manual_seed(seed))


def pruned_weights(model):
    return {f"{i}.{name}": layer.get_submodule(name).weight.detach()
            for i, layer in enumerate(model.model.layers) for name in LINEARS}


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", [None, "2:4", "4:8"])
def test_every_matrix_has_exact_sparsity(architecture, method, pattern):
    model = tiny_model(architecture)
    untouched = {k: v.clone() for k, v in model.state_dict().items()
                 if not any(name in k for name in LINEARS)}
    report = llmprune.prune(model, calibration(), method=method, sparsity=0.5 if pattern is None else None,
                            pattern=pattern, batch_size=4, progress=False)
    assert report.overall_sparsity == pytest.approx(0.5, abs=1e-12)
    assert len(report.modules) == len(LINEARS) * model.config.num_hidden_layers
    for name, weight in pruned_weights(model).items():
        zeros = weight == 0
        if pattern:
            assert check_nm(zeros, NMPattern(*map(int, pattern.split(":")))), name
        elif method == "wanda":  # compared within each output row
            assert (zeros.sum(1) == weight.shape[1] // 2).all(), name
        else:  # magnitude per matrix; sparsegpt per block of columns: exact in total here
            assert int(zeros.sum()) == weight.numel() // 2, name
        assert torch.isfinite(weight).all()
    # Embeddings, norms and the LM head are never pruned.
    for key, value in model.state_dict().items():
        if key in untouched:
            assert torch.equal(value, untouched[key]), key


def test_sparsity_other_than_half_and_zero():
    model = tiny_model()
    report = llmprune.prune(model, calibration(), method="wanda", sparsity=0.3, progress=False)
    for name, weight in pruned_weights(model).items():
        assert ((weight == 0).sum(1) == int(weight.shape[1] * 0.3)).all(), name
    assert report.per_layer_sparsity == pytest.approx([0.3] * 3, abs=0.01)
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    llmprune.prune(model, calibration(), method="sparsegpt", sparsity=0.0, progress=False)
    for key, value in model.state_dict().items():
        assert torch.allclose(value, before[key]), key


def reference_wanda(model, ids, sparsity):
    """Independent reference: before pruning layer i, run the *whole* model (layers < i already
    pruned) with hooks collecting the inputs of layer i's linears; prune each row by |W|*||X_j||."""
    layers = model.model.layers
    for layer in layers:
        sums = {}

        def hook(module, args, output, key, sums=sums):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[key] = sums.get(key, 0) + x.pow(2).sum(0)

        handles = [layer.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: hook(m, a, o, n))
                   for n in LINEARS]
        with torch.no_grad():
            for row in ids:
                model(row.unsqueeze(0), use_cache=False)
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for name in LINEARS:
                weight = layer.get_submodule(name).weight
                scores = weight.abs().double() * sums[name].sqrt()
                k = int(weight.shape[1] * sparsity)
                for r in range(weight.shape[0]):
                    weight[r, scores[r].argsort()[:k]] = 0


@pytest.mark.parametrize("architecture", ["llama", "gemma3_text"])
def test_runner_matches_whole_model_reference(architecture):
    """Captured arguments, per-layer kwargs (Gemma 3 sliding vs full attention) and propagation
    of pruned outputs are right when the masks equal a reference that reruns the whole model."""
    ids = calibration(n=4, length=24)
    ours, reference = tiny_model(architecture), tiny_model(architecture)
    llmprune.prune(ours, ids, method="wanda", sparsity=0.5, batch_size=3, progress=False)
    reference_wanda(reference, ids, 0.5)
    for (name, a), b in zip(pruned_weights(ours).items(), pruned_weights(reference).values()):
        assert torch.equal(a == 0, b == 0), name


def test_capture_records_per_layer_arguments():
    model = tiny_model("gemma3_text")
    inputs = capture_layer_inputs(model, adapter_for(model), calibration(n=5, length=24), 2, torch.device("cpu"))
    assert [h.shape for h in inputs.hidden] == [(2, 24, 64), (2, 24, 64), (1, 24, 64)]
    assert all(len(per_layer) == 3 for per_layer in inputs.layer_args)
    sliding, full = inputs.layer_args[0][0][1], inputs.layer_args[1][0][1]
    assert sliding["use_cache"] is False and "position_embeddings" in sliding
    # Sliding-window and full-attention layers get different masks and rotary tables.
    assert isinstance(sliding["attention_mask"], torch.Tensor)
    assert full["attention_mask"] is None or not torch.equal(sliding["attention_mask"], full["attention_mask"])
    assert not torch.equal(sliding["position_embeddings"][0], full["position_embeddings"][0])
    # Layer 0 receives the (scaled) embeddings.
    with torch.no_grad():
        expected = model.model.embed_tokens(calibration(n=5, length=24)[:2])
    assert torch.allclose(inputs.hidden[0], expected)
    # The model's own layers are back in place.
    assert all(type(layer).__name__ == "Gemma3DecoderLayer" for layer in model.model.layers)


def test_magnitude_needs_no_calibration_and_others_do():
    llmprune.prune(tiny_model(), None, method="magnitude", sparsity=0.5, progress=False)
    with pytest.raises(UsageError, match="calibration"):
        llmprune.prune(tiny_model(), None, method="wanda", progress=False)


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="nope"), "unknown method"),
    (dict(sparsity=1.0), r"\[0, 1\)"),
    (dict(sparsity=-0.1), r"\[0, 1\)"),
    (dict(sparsity=float("nan")), r"\[0, 1\)"),
    (dict(sparsity="half"), "number"),
    (dict(pattern="4:4"), "0 < N < M"),
    (dict(pattern="3:7"), "not a multiple of 7"),
    (dict(sparsity=0.3, pattern="2:4"), "disagrees"),
])
def test_bad_requests_are_refused_before_any_change(kwargs, message):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UsageError, match=message):
        llmprune.prune(model, calibration(), **{"method": "wanda", **kwargs}, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_unsupported_architecture_is_refused_by_model_type():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UsageError, match="unsupported architecture 'gpt2'"):
        llmprune.prune(model, calibration(), progress=False)


def test_non_finite_activations_name_the_module():
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[1].input_layernorm.weight[3] = float("nan")
    with pytest.raises(NumericalError, match=r"model\.layers\.1\.self_attn\.q_proj"):
        llmprune.prune(model, calibration(), method="sparsegpt", progress=False)


def test_report_describes_the_run():
    report = llmprune.prune(tiny_model(), calibration(n=3, length=16), method="sparsegpt", pattern="2:4",
                            progress=False)
    assert (report.method, report.pattern, report.target_sparsity) == ("sparsegpt", "2:4", 0.5)
    assert (report.nsamples, report.seqlen) == (3, 16)
    # Per-layer times are parts of the whole pruning time.
    assert len(report.layer_seconds) == 3 and min(report.layer_seconds) > 0
    assert sum(report.layer_seconds) <= report.seconds
    assert report.modules["model.layers.2.mlp.down_proj"]["shape"] == [64, 128]


def test_half_precision_models_keep_their_dtype_and_exact_sparsity():
    model = tiny_model().to(torch.bfloat16)
    llmprune.prune(model, calibration(), method="sparsegpt", pattern="2:4", progress=False)
    for name, weight in pruned_weights(model).items():
        assert weight.dtype == torch.bfloat16
        assert check_nm(weight == 0, NMPattern(2, 4)), name
