#!/usr/bin/env bash
# GPU check (run on a lent CUDA machine through the device tool; not part of CI).
# Expects, in the ignored folder .gpu/: whl/ (transformers wheel matching the CPU venv),
# austen/ (emma, mansfieldpark, persuasion .txt.gz) and tok/ (SmolLM2 tokenizer + config).
# 1. the CUDA tests and the runner tests; 2. the CLI with --device cuda at paper scale
# (128 x 2048 calibration) on a SmolLM2-shaped model and on a random 1B Llama-shaped model (the
# 98 MB built-in GGUF cannot travel there, so the first is SmolLM2's config with random weights:
# timings and memory are real, perplexities are not meaningful).
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_runner.py 2>&1 | tail -4

python3 - <<'PY'
import json, torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(".gpu/tok")
shapes = {"smollm2-shape": {}, "llama-1b-shape": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                                        num_attention_heads=32, num_key_value_heads=8, head_dim=64)}
for name, over in shapes.items():
    config = AutoConfig.from_pretrained(".gpu/tok", **over)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(f"/tmp/{name}")
    tok.save_pretrained(f"/tmp/{name}")
PY
A=.gpu/austen
for model in smollm2-shape llama-1b-shape; do
  for method in wanda sparsegpt; do
    /usr/bin/time -v python3 -m llmprune --model /tmp/$model --device cuda --dtype float32 --method $method \
      --calib-data $A/emma.txt.gz $A/mansfieldpark.txt.gz --nsamples 128 --seqlen 2048 \
      --eval-data $A/persuasion.txt.gz --eval-seqlen 2048 --eval-tokens 65536 --no-progress \
      --output /tmp/pruned-$model-$method 2> >(grep -E "Maximum resident|error" >&2) | tail -9
    cp /tmp/pruned-$model-$method/llmprune.json "$OUT/$model-$method.json"
  done
done
