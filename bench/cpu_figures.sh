#!/usr/bin/env bash
# Every CPU figure of bench/results/cpu_model.md, one benchmark command each, printed as one JSON line
# per benchmark (the scripts' last line) prefixed with the figure's name and the revision it ran at.
#
#   bench/cpu_figures.sh                  # this checkout
#   bench/cpu_figures.sh 36406da          # also revision 36406da (exported to a temporary folder): for each
#                                         # figure old, new, old, new, so both see the same machine state
#   FIGURES="train-small decode-small" bench/cpu_figures.sh
#
# Figures: train-small train-small-compiled train-small-bf16 train-130m train-130m-compiled train-130m-bf16
# decode-small decode-small-compiled decode-130m decode-130m-compiled decode-multitrack
# decode-multitrack-compiled mt-ratio ops-decode ops-train
# (train-*-compiled: the scan's blocks compiled, as trainer.choose_cpu_scan picks for long CPU runs;
# train-*-bf16: that plus bf16 autocast, --dtype=bfloat16 of the train scripts, other numbers than fp32;
# decode-*-compiled: the eager step and the torch.compile'd one, as generate(compile=True) runs it, in one process). A revision older than the figure's flags runs the figure with the flags it knows
# (the *_NEW arguments are left out there); compiled and ops figures run at this checkout only.
# Run on an idle machine: `cat /proc/loadavg` before (each JSON line stores the load average before and
# after); with a load above the core count the figures come out several times too low.
# Environment: PY (python, default .venv/bin/python if present, else python3), ROUNDS (old/new pairs, 2),
# THREADS (OMP_NUM_THREADS / MKL_NUM_THREADS for both revisions; default: torch's, the core count. On a
# loaded machine THREADS=1 gives the steadier before/after ratio: a 2-thread op waits on a descheduled thread).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac   # absolute, venv kept: the old revision runs elsewhere
ROUNDS=${ROUNDS:-2}
FIGURES=${FIGURES:-train-small train-small-compiled train-small-bf16 train-130m train-130m-compiled train-130m-bf16 decode-small decode-small-compiled decode-130m decode-130m-compiled decode-multitrack decode-multitrack-compiled mt-ratio ops-decode ops-train}
OLD=${1:-}
if [ -n "${THREADS:-}" ]; then export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS; fi

# figure -> "script|arguments every revision knows|arguments of this checkout only"
declare -A FIG=(
  [train-small]="bench_throughput.py|--preset=small-cpu --vocab_size=4096 --seq_len=256 --batch_sizes=8 --steps=5 --warmup=2 --device=cpu|"
  [train-small-compiled]="bench_throughput.py|--preset=small-cpu --vocab_size=4096 --seq_len=256 --batch_sizes=8 --steps=5 --warmup=2 --device=cpu|--cpu_scan=compiled"
  [train-small-bf16]="bench_throughput.py|--preset=small-cpu --vocab_size=4096 --seq_len=256 --batch_sizes=8 --steps=5 --warmup=2 --device=cpu|--cpu_scan=compiled --cpu_amp=True"
  [train-130m]="bench_throughput.py|--preset=mamba-130m --seq_len=256 --batch_sizes=2 --steps=3 --warmup=1 --device=cpu|"
  [train-130m-compiled]="bench_throughput.py|--preset=mamba-130m --seq_len=256 --batch_sizes=2 --steps=3 --warmup=1 --device=cpu|--cpu_scan=compiled"
  [train-130m-bf16]="bench_throughput.py|--preset=mamba-130m --seq_len=256 --batch_sizes=2 --steps=3 --warmup=1 --device=cpu|--cpu_scan=compiled --cpu_amp=True"
  [decode-small]="bench_decode.py|--preset=small-cpu --vocab_size=4096 --device=cpu --batch_sizes=1 --decode_tokens=256 --gen_lengths=|--repeats=5"
  [decode-small-compiled]="bench_decode.py|--preset=small-cpu --vocab_size=4096 --device=cpu --batch_sizes=1 --decode_tokens=256 --gen_lengths=|--repeats=5 --compile=True"
  [decode-130m]="bench_decode.py|--device=cpu --batch_sizes=1 --decode_tokens=64 --gen_lengths=|--repeats=3"
  [decode-130m-compiled]="bench_decode.py|--device=cpu --batch_sizes=1 --decode_tokens=64 --gen_lengths=|--repeats=3 --compile=True"
  [decode-multitrack]="bench_decode.py|--model=multitrack --preset=small-cpu --vocab_size=4096 --device=cpu --batch_sizes=1 --decode_tokens=256 --gen_lengths=|--repeats=5"
  [decode-multitrack-compiled]="bench_decode.py|--model=multitrack --preset=small-cpu --vocab_size=4096 --device=cpu --batch_sizes=1 --decode_tokens=256 --gen_lengths=|--repeats=5 --compile=True"
  [mt-ratio]="bench_multitrack_speed.py|--baseline=small-cpu --multitrack=small-cpu --device=cpu --dtype=float32 --batch_size=4 --seq_len=128 --train_steps=2 --decode_tokens=256|"
  [ops-decode]="count_ops.py|--mode=decode --preset=small-cpu --vocab_size=4096 --batch_size=1|"
  [ops-train]="count_ops.py|--preset=small-cpu --vocab_size=4096|"
)
NEW_ONLY="train-small-compiled train-small-bf16 train-130m-compiled train-130m-bf16 decode-small-compiled decode-130m-compiled decode-multitrack-compiled ops-decode ops-train"

old_dir=""
if [ -n "$OLD" ]; then
  old_dir=$(mktemp -d)
  trap 'rm -rf "$old_dir"' EXIT
  git archive "$OLD" | tar -x -C "$old_dir" || { echo "cannot export revision $OLD" >&2; exit 2; }
fi

run() {  # run DIR REV FIGURE ARGS...
  local dir=$1 rev=$2 name=$3; shift 3
  local spec=${FIG[$name]} script
  script=${spec%%|*}
  local last
  last=$(cd "$dir" && "$PY" "bench/$script" "$@" 2>/dev/null | tail -n 1)
  echo "$name @ $rev: $last"
}

echo "# cpu_figures $(date -u +%FT%TZ)  $(getconf _NPROCESSORS_ONLN) cores  threads: ${THREADS:-default}  load average: $(cut -d' ' -f1-3 /proc/loadavg)"
here=$(git rev-parse --short HEAD 2>/dev/null || echo worktree)
for name in $FIGURES; do
  spec=${FIG[$name]:-}
  [ -n "$spec" ] || { echo "unknown figure $name (known: ${!FIG[*]})" >&2; exit 2; }
  rest=${spec#*|}
  common=${rest%%|*}
  new_only=${rest#*|}
  rounds=1
  if [ -n "$old_dir" ] && [[ " $NEW_ONLY " != *" $name "* ]]; then rounds=$ROUNDS; fi
  for _ in $(seq "$rounds"); do
    if [ -n "$old_dir" ] && [[ " $NEW_ONLY " != *" $name "* ]]; then
      # shellcheck disable=SC2086
      run "$old_dir" "$OLD" "$name" $common
    fi
    # shellcheck disable=SC2086
    run . "$here" "$name" $common $new_only
  done
done
echo "# done $(date -u +%FT%TZ)  load average: $(cut -d' ' -f1-3 /proc/loadavg)"
