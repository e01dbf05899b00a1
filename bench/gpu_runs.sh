#!/usr/bin/env bash
# The GPU work of the project as stages, each well under 10 minutes on one H200, so that anyone with one
# GPU (or a short lease) can repeat every GPU number in the docs. Results land in $RESULTS (default
# bench/results/gpu-<date>/), one log per stage; mamba_baseline.md and research_plan.md cite them.
#
#   bench/gpu_runs.sh setup            build mamba-ssm for this GPU (setup.sh --mamba-only)      ~3.5 min
#   bench/gpu_runs.sh verify           test_mamba.py, test_mamba_130m.py, GPU pytest selection     ~1 min
#   bench/gpu_runs.sh throughput       ours vs mamba-ssm's MambaLMHeadModel, batch 8 and 64; multitrack  ~2 min
#   bench/gpu_runs.sh decode           decode tok/s vs mamba-ssm generate(cg=True); memory at 1k/16k tokens  ~2 min
#   bench/gpu_runs.sh data SRC [TOK]   prepare_data.py on parquet/jsonl/txt books SRC (tokenizer.json TOK)   ~1 min
#   bench/gpu_runs.sh train NAME [ARGS]  one <=9-minute piece of a run (resumes if out/NAME has a checkpoint);
#                                      NAME baseline-*: train_baseline.py, multitrack-*: train_multitrack.py
#   bench/gpu_runs.sh eval CKPT,...    evaluate.py on the test split, checkpoints side by side            ~3 min
#   bench/gpu_runs.sh samples CKPT     generate_text.py on held-out book openings                          ~1 min
#
# Stages chain in one shell command, e.g. `bench/gpu_runs.sh setup && bench/gpu_runs.sh verify`.
# Environment: PY (python, default python3), DATA (data dir, default data/gutenberg-neox),
# TOKENS (token budget of each run, default 100M), PIECE_S (seconds per training piece, default 540),
# SDISTS (folder with the mamba-ssm sdist, default .sdist).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
DATA=${DATA:-data/gutenberg-neox}
TOKENS=${TOKENS:-100000000}
PIECE_S=${PIECE_S:-540}
SDISTS=${SDISTS:-.sdist}
RESULTS=${RESULTS:-bench/results/gpu-$(date -u +%Y%m%d)}
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p "$RESULTS"
stage=${1:-}; shift || true
log() { tee -a "$RESULTS/$1.log"; }
header() { echo "# $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1): $*"; }

case "$stage" in
  setup)
    { header "setup.sh --use-system-torch --mamba-only"; ./setup.sh --use-system-torch --offline --wheelhouse "$SDISTS" --mamba-only; } 2>&1 \
      | grep -v "ptxas\|bytes stack frame\|registers, " | log setup ;;
  verify)
    { header verify; $PY test_mamba.py; $PY test_mamba_130m.py; $PY -m pytest tests/test_gpu.py -q -s; } 2>&1 | log verify ;;
  throughput)
    { header throughput; $PY bench/bench_throughput.py --batch_sizes=8,64 --model=multitrack; } 2>&1 | log throughput ;;
  decode)
    { header decode; $PY bench/bench_decode.py --gen_lengths=1024,16384; } 2>&1 | log decode ;;
  data)
    src=${1:?usage: gpu_runs.sh data SRC [TOKENIZER_JSON]}; tok=${2:-EleutherAI/gpt-neox-20b}
    { header data "$src"; $PY prepare_data.py --source="$src" --tokenizer="$tok" --num_books=0 --out_dir="$DATA"; } 2>&1 \
      | tr '\r' '\n' | grep -v "^prepare: .*%|" | log data ;;
  train)
    name=${1:?usage: gpu_runs.sh train NAME [ARGS]}; shift
    case "$name" in multitrack*) script=train_multitrack.py ;; *) script=train_baseline.py ;; esac
    resume=False; [ -f "out/$name/ckpt_latest.pt" ] && resume=True
    # SIGTERM at the end of the piece: the trainer saves ckpt_latest.pt; the next piece resumes exactly.
    { header "train $name (resume=$resume)"; timeout -s TERM "$PIECE_S" $PY "$script" --data_dir="$DATA" --out_dir="out/$name" \
        --max_tokens="$TOKENS" --resume=$resume "$@"; echo "exit $?"; } 2>&1 | tr '\r' '\n' | grep -v "s/step,\|step/s," | log "train-$name"
    for f in epochs.md loss.png router_usage.png; do [ -f "out/$name/$f" ] && cp "out/$name/$f" "$RESULTS/$name-$f"; done ;;
  eval)
    ckpts=${1:?usage: gpu_runs.sh eval CKPT[,CKPT...]}
    { header eval; $PY evaluate.py --ckpts="$ckpts" --data_dir="$DATA" --dtype=bfloat16 --out="$RESULTS/eval.md"; } 2>&1 | log eval ;;
  samples)
    ckpt=${1:?usage: gpu_runs.sh samples CKPT}
    { header samples; $PY generate_text.py --ckpt="$ckpt" --max_new_tokens=400 --num_samples=2 \
        --prompt="It was late in the evening when"; } 2>&1 | log samples ;;
  *)
    sed -n '2,22p' "$0"; exit 2 ;;
esac
