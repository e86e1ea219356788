#!/usr/bin/env bash
# GPU check for 2:4 semi-structured execution (device tool; not CI). Same .gpu/ folder as
# gpu_check.sh (whl/ with the transformers wheel, tok/ with SmolLM2's tokenizer and config).
# 1. tests/test_sparse_format.py, whose CUDA tests run here; 2. a random 1B Llama-shaped model and a
# SmolLM2-shaped one, 2:4 magnitude-pruned (no data needed), float16: `eval --execute 2:4 --speed`
# (decode and 512-token prefill against dense) and a batched prefill (8 x 512 tokens) timed
# dense against 2:4, interleaved, medians. Perplexities are not measured (random weights).
# Budget: under 10 minutes on one H100/H200-class GPU.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,compute_cap --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cusparselt', torch.backends.cusparselt.is_available())"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_sparse_format.py 2>&1 | tail -4

timeout 420 python3 - <<'PY' 2>&1 | tee "$OUT/gpu_sparse.txt"
import json, os, statistics, time
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
import llmprune
from llmprune.sparse_execute import execute_semi_structured

shapes = {"smollm2-shape": {}, "llama-1b-shape": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                                        num_attention_heads=32, num_key_value_heads=8, head_dim=64)}
results = {}
for name, over in shapes.items():
    config = AutoConfig.from_pretrained(".gpu/tok", **over)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval().cuda()
    llmprune.prune(model, None, method="magnitude", pattern="2:4", device="cuda", progress=False)
    model.half()
    folder = f"/tmp/{name}-2of4"
    from llmprune.save import save_folder
    save_folder(model, AutoTokenizer.from_pretrained(".gpu/tok"), folder, {}, "gpu check", save_format="sparse")
    ids = torch.randint(0, config.vocab_size, (8, 512), device="cuda")

    def timed():
        torch.cuda.synchronize(); started = time.perf_counter()
        with torch.no_grad():
            model(ids, use_cache=False)
        torch.cuda.synchronize(); return time.perf_counter() - started

    warm = [timed() for _ in range(3)]
    dense = [timed() for _ in range(10)]
    report = execute_semi_structured(model)
    warm = [timed() for _ in range(3)]
    sparse = [timed() for _ in range(10)]
    results[name] = {"execute": report, "prefill_8x512_dense_s": statistics.median(dense),
                     "prefill_8x512_2of4_s": statistics.median(sparse),
                     "speedup": statistics.median(dense) / statistics.median(sparse)}
    print(name, json.dumps(results[name]), flush=True)
    del model; torch.cuda.empty_cache()
json.dump(results, open(os.environ.get("OUT", "/tmp/out") + "/gpu_sparse.json", "w"), indent=2)
PY
for name in smollm2-shape llama-1b-shape; do
  timeout 150 python3 -m llmprune eval /tmp/$name-2of4 --device cuda --dtype float16 --eval-data none --speed \
    --execute 2:4 --no-progress --json "$OUT/eval-$name.json" | tail -6
done
