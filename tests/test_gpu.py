"""CUDA path (runs where a GPU exists; CI has none): layer-by-layer onloading gives the CPU result."""

from __future__ import annotations

import pytest
import torch

import llmprune

from conftest import tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_cuda_pruning_of_a_cpu_model_matches_cpu(method):
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    on_cpu, via_cuda = tiny_model(), tiny_model()
    llmprune.prune(on_cpu, ids, method=method, progress=False)
    torch.cuda.reset_peak_memory_stats()
    llmprune.prune(via_cuda, ids, method=method, device="cuda", progress=False)
    # The model stays on the CPU; each layer visited the GPU and came back.
    assert all(p.device.type == "cpu" for p in via_cuda.parameters())
    for (name, a), b in zip(on_cpu.named_parameters(), via_cuda.parameters()):
        if method == "wanda":
            assert torch.equal(a == 0, b == 0), name
        else:
            assert (a == 0).float().mean() == (b == 0).float().mean(), name
            assert torch.allclose(a, b, rtol=1e-3, atol=1e-4), name


def test_structured_pruning_on_cuda_matches_cpu():
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    on_cpu, via_cuda = tiny_model(), tiny_model()
    a = llmprune.prune_structured(on_cpu, ids, heads=0.5, ffn=0.25, layers=1, score="flap", progress=False)
    b = llmprune.prune_structured(via_cuda, ids, heads=0.5, ffn=0.25, layers=1, score="flap", device="cuda",
                                  progress=False)
    assert a.removed_layers == b.removed_layers and a.layer_sizes == b.layer_sizes
    assert all(p.device.type == "cpu" for p in via_cuda.parameters())
    probe = ids[:2]
    with torch.no_grad():
        assert torch.allclose(on_cpu(probe).logits, via_cuda(probe).logits, atol=1e-4)
