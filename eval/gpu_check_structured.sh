#!/usr/bin/env bash
# GPU check for structured pruning (device tool; not CI). Same .gpu/ folder as gpu_check.sh.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_structured.py 2>&1 | tail -4
python3 - <<'PY'
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
config = AutoConfig.from_pretrained(".gpu/tok", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                    num_attention_heads=32, num_key_value_heads=8, head_dim=64)
torch.manual_seed(0)
AutoModelForCausalLM.from_config(config).save_pretrained("/tmp/llama-1b-shape")
AutoTokenizer.from_pretrained(".gpu/tok").save_pretrained("/tmp/llama-1b-shape")
PY
A=.gpu/austen
for args in "--heads 0.25 --ffn 0.25 --score flap" "--heads 0.25 --ffn 0.4 --score wanda --allocation global --round-to 128"; do
  python3 -m llmprune --model /tmp/llama-1b-shape --device cuda --dtype bfloat16 --method structured $args \
    --calib-data $A/emma.txt.gz $A/mansfieldpark.txt.gz --nsamples 128 --seqlen 2048 \
    --eval-data $A/persuasion.txt.gz --eval-seqlen 2048 --eval-tokens 32768 --no-progress \
    --output /tmp/s-$RANDOM | tail -10
done
cp /tmp/s-*/llmprune.json "$OUT/" 2>/dev/null; for f in /tmp/s-*/llmprune.json; do cp $f "$OUT/$(basename $(dirname $f)).json"; done
