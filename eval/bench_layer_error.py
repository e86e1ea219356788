"""Benchmark: layer-wise reconstruction error ||X (W' - W)ᵀ||² / ||X Wᵀ||² of real SmolLM2 layers
(not a test): SparseGPT, ADMM (ALPS), Wanda, and Wanda's mask refitted by --update obs / admm, at
50%, 70% and 2:4, for the q/k/v, gate/up and down groups of one decoder layer of the dense model,
calibrated on 8 x 512 tokens of emma (seed 0). A quick proxy of one-shot quality; the perplexities
are in bench_unstructured.

Usage: python eval/bench_layer_error.py LAYER   (prints one line per group and sparsity)
"""
import torch, time, sys
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer
from llmprune import data
from llmprune.models.loading import builtin_model_folder
from llmprune.methods.sparsegpt import InputHessian, sparsegpt_prune
from llmprune.methods.wanda import InputNorms, Wanda
import llmprune.methods.admm as A
torch.set_num_threads(1)
AUSTEN = Path("/work/shared/data/austen")
folder = builtin_model_folder("llama")
tok = AutoTokenizer.from_pretrained(folder)
cal = data.calibration_ids(tok, [str(AUSTEN / "emma.txt.gz")], 8, 512, seed=0)
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
layer = model.model.layers[int(sys.argv[1])]
xs = {}
def hook(name):
    def f(m, args): xs.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1]).detach())
    return f
hs = [layer.mlp.gate_proj.register_forward_pre_hook(hook("gate")), layer.mlp.down_proj.register_forward_pre_hook(hook("down")),
      layer.self_attn.q_proj.register_forward_pre_hook(hook("q"))]
with torch.no_grad():
    for c in cal[:, :]: model(c.unsqueeze(0))
for name, lin in [("q", [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]), ("gate", [layer.mlp.gate_proj, layer.mlp.up_proj]), ("down", [layer.mlp.down_proj])]:
    x = torch.cat(xs[name]); h = InputHessian(x.shape[1], torch.device("cpu")); h.add_batch(x)
    n = InputNorms(x.shape[1], torch.device("cpu")); n.add_batch(x)
    ws = [l.weight.detach().float() for l in lin]; w = torch.cat(ws)
    def err(out): o = torch.cat(out); return round(((x @ (o - w).t()).pow(2).sum() / (x @ w.t()).pow(2).sum()).item(), 5)
    for sp, pat in [(0.5, None), (0.7, None), (0.5, A.NMPattern(2, 4))]:
        s = sparsegpt_prune(ws, h.hessian(), sp, pat); a = A.admm_prune(ws, h.hessian(), sp, pat)
        wa = Wanda().prune_group(ws, n, sp, pat); wr = A.refit_on_support(ws, wa, h.hessian())
        wo = sparsegpt_prune(ws, h.hessian(), sp, pat, removed=[p == 0 for p in wa])
        print(name, sp, pat, "sparsegpt", err(s), "admm", err(a), "wanda", err(wa), "wanda+obs", err(wo), "wanda+admm", err(wr), flush=True)
