#!/usr/bin/env bash
# The whole pipeline on the embedded demo corpus, offline, on a CPU, in a few minutes:
#   prepare (procedural stories -> BPE trained on the fly -> uint16 memmaps in data/demo)
#   -> train a small baseline (out/demo) -> write a markdown sample (generations/generations_YYYYMMDD.md).
# Extra arguments go to train_baseline.py, e.g. ./demo.sh --max_steps=200
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-.venv/bin/python}
if ! "$PY" -c 'import torch, tokenizers' 2>/dev/null; then
  echo "demo.sh: $PY cannot import torch/tokenizers: run ./setup.sh first (or set PYTHON=/path/to/python)"; exit 2
fi
T0=$(date +%s)
echo "==> 1/3 prepare data/demo (procedural stories, BPE trained on the fly)"
"$PY" prepare_data.py --source=demo
echo "==> 2/3 train the small-cpu baseline into out/demo"
"$PY" train_baseline.py --preset=small-cpu --data_dir=data/demo --out_dir=out/demo --seq_len=256 \
    --max_steps=60 --eval_interval=20 --overwrite=True "$@"
echo "==> 3/3 write a markdown sample to generations/"
"$PY" generate_text.py --ckpt=out/demo/ckpt_best.pt --prompt="CHAPTER I" --max_new_tokens=200 \
    --num_samples=1 --temperature=0.8
echo "demo.sh: done in $(( $(date +%s) - T0 )) s (checkpoint out/demo/ckpt_best.pt, sample in generations/)"
