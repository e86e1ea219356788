"""Benchmark: layer-wise reconstruction error ||X (W' - W)ᵀ||² / ||X Wᵀ||² of real SmolLM2 layers
(not a test): SparseGPT, ADMM (ALPS), Wanda, and Wanda's mask refitted by --update obs / admm, at
50%, 70% and 2:4, for the q/k/v, gate/up and down groups of one decoder layer of the dense model,
calibrated on 8 x 512 tokens of emma (seed 0). A quick proxy of one-shot quality; the perplexities
are in bench_unstructured.

Usage: python eval/bench_layer_error.py LAYER   (prints one line per group and sparsity)
"""
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import llmprune.methods.admm as A
from llmprune import data
from llmprune.methods.sparsegpt import InputHessian, sparsegpt_prune
from llmprune.methods.wanda import InputNorms, Wanda
from llmprune.models.loading import builtin_model_folder

AUSTEN = Path(__file__).resolve().parents[2] / "shared" / "data" / "austen"
GROUPS = {"q": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
          "gate": ("mlp.gate_proj", "mlp.up_proj"), "down": ("mlp.down_proj",)}


def group_inputs(model, layer, calibration) -> dict:
    """{group: [tokens, in] inputs of the group's first linear layer} over the calibration windows."""
    inputs = {name: [] for name in GROUPS}

    def hook(name):
        def record(module, args):
            inputs[name].append(args[0].reshape(-1, args[0].shape[-1]).detach())
        return record

    handles = [layer.get_submodule(first).register_forward_pre_hook(hook(name))
               for name, (first, *_) in GROUPS.items()]
    with torch.no_grad():
        for window in calibration:
            model(window.unsqueeze(0))
    for handle in handles:
        handle.remove()
    return {name: torch.cat(parts) for name, parts in inputs.items()}


def relative_error(x: torch.Tensor, weight: torch.Tensor, pruned: list[torch.Tensor]) -> float:
    """||X (W' - W)^T||^2 / ||X W^T||^2, rounded."""
    change = (x @ (torch.cat(pruned) - weight).t()).pow(2).sum()
    return round((change / (x @ weight.t()).pow(2).sum()).item(), 5)


def main() -> None:
    torch.set_num_threads(1)
    folder = builtin_model_folder("llama")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    calibration = data.calibration_ids(tokenizer, [str(AUSTEN / "emma.txt.gz")], 8, 512, seed=0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    layer = model.model.layers[int(sys.argv[1])]
    for name, x in group_inputs(model, layer, calibration).items():
        hessian, norms = InputHessian(x.shape[1], torch.device("cpu")), InputNorms(x.shape[1], torch.device("cpu"))
        hessian.add_batch(x)
        norms.add_batch(x)
        weights = [layer.get_submodule(n).weight.detach().float() for n in GROUPS[name]]
        weight, h = torch.cat(weights), hessian.hessian()
        for sparsity, pattern in [(0.5, None), (0.7, None), (0.5, A.NMPattern(2, 4))]:
            wanda = Wanda().prune_group(weights, norms, sparsity, pattern)
            results = {
                "sparsegpt": sparsegpt_prune(weights, h, sparsity, pattern),
                "admm": A.admm_prune(weights, h, sparsity, pattern),
                "wanda": wanda,
                "wanda+obs": sparsegpt_prune(weights, h, sparsity, pattern, removed=[w == 0 for w in wanda]),
                "wanda+admm": A.refit_on_support(weights, wanda, h),
            }
            print(name, sparsity, pattern, *(f"{k} {relative_error(x, weight, v)}" for k, v in results.items()),
                  flush=True)


if __name__ == "__main__":
    main()
