#!/usr/bin/env bash
# The GPU work of the project as stages, each well under 10 minutes on one H200, so that anyone with one
# GPU (or a short lease) can repeat every GPU number in the docs. Results land in $RESULTS (default
# bench/results/gpu-<date>/), one log per stage; mamba_baseline.md and research_plan.md cite them.
#
#   bench/gpu_runs.sh all              every stage below in order, as a queue that survives short leases:
#                                      runs until BUDGET_S seconds (default 570) have passed, marks finished
#                                      stages in out/gpu_queue_done.txt, stops a training run with a checkpoint at
#                                      the budget; re-run the same command until it prints "all stages done"
#   bench/gpu_runs.sh setup            build mamba-ssm for this GPU (setup.sh --mamba-only)      ~3.5 min
#   bench/gpu_runs.sh setup-conv       also causal-conv1d (~6 min more on an H200): the fused mamba_inner_fn
#                                      configuration, for both models and mamba-ssm's; re-run throughput after it
#   bench/gpu_runs.sh verify           test_mamba.py, test_mamba_130m.py, GPU pytest selection     ~1 min
#   bench/gpu_runs.sh throughput       ours vs mamba-ssm's MambaLMHeadModel, batch 8 and 64; multitrack  ~2 min
#   bench/gpu_runs.sh throughput-compile  batch 8 under torch.compile (launch overhead of the small ops)   ~3 min
#   bench/gpu_runs.sh decode           decode tok/s vs mamba-ssm generate(cg=True); memory at 1k/16k tokens  ~2 min
#   bench/gpu_runs.sh profile          torch.profiler: where a training step's time goes, ours / mamba-ssm / multitrack  ~1.5 min
#   bench/gpu_runs.sh mtspeed          multitrack vs baseline: training, decode, kernels per decode step  ~1.5 min
#   bench/gpu_runs.sh data SRC [TOK]   prepare_data.py on parquet/jsonl/txt books SRC (tokenizer.json TOK)   ~1 min
#   bench/gpu_runs.sh train NAME [ARGS]  one <=PIECE_S piece of a run (resumes if out/NAME has a checkpoint);
#                                      NAME baseline-*: train_baseline.py, multitrack-*: train_multitrack.py;
#                                      a name ending in -sN trains with --seed=N; exit 0 when the run is complete
#   bench/gpu_runs.sh plan PLAN.toml   the research runs: run_plan.py on a plan (plans/gpu-*.toml) for BUDGET_S seconds
#                                      (default 570); runs already in bench/results/plans/<plan>/results.jsonl
#                                      are skipped; results, report and PNGs -> out/plans/<plan> (and $OUT/plans/<plan>:
#                                      copy them into bench/results/plans/<plan>/ and commit, so the next lease goes on)
#   bench/gpu_runs.sh eval CKPT,...    evaluate.py on the test split, checkpoints side by side, and their
#                                      training curves (bench/compare_runs.py)                          ~2 min
#   bench/gpu_runs.sh samples CKPT,... generate_text.py on held-out book openings, same prompts and settings
#
# Stages chain in one shell command, e.g. `bench/gpu_runs.sh setup && bench/gpu_runs.sh verify`.
# Environment: PY (python, default python3), DATA (data dir, default data/gutenberg-neox),
# TOKENS (token budget of each run, default 100M), PIECE_S (seconds per training piece, default 540),
# SDISTS (folder with the mamba-ssm sdist, default .sdist), RUNS (the `all` queue's training runs,
# default "baseline-s1337 multitrack-s1337 baseline-s2"), STAGES (the `all` queue, default "setup verify
# throughput train eval samples decode mtspeed profile"; train = the RUNS in order; NAME@TAG runs a stage
# again, e.g. "setup verify throughput setup-conv throughput@conv"), DATA_SRC / DATA_TOK (the `all` queue's data
# stage arguments), TRAIN_ARGS / EVAL_ARGS (extra flags for every training run / evaluate.py), OUT (if set, `all` leaves $OUT/gpu-results.tgz: the results, run logs and samples).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
DATA=${DATA:-data/gutenberg-neox}
TOKENS=${TOKENS:-100000000}
RUNS=${RUNS:-baseline-s1337 multitrack-s1337 baseline-s2}
STAGES=${STAGES:-setup verify throughput train eval samples decode mtspeed profile}
PIECE_S=${PIECE_S:-540}
SDISTS=${SDISTS:-.sdist}
RESULTS=${RESULTS:-bench/results/gpu-$(date -u +%Y%m%d)}
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p "$RESULTS"
stage=${1:-}; shift || true
log() { tee -a "$RESULTS/$1.log"; }
header() { echo "# $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1): $*"; }

case "$stage" in
  setup|setup-conv)
    only=(--mamba-only); [ "$stage" = setup-conv ] && only=()     # setup-conv: causal-conv1d too
    { header "setup.sh --use-system-torch ${only[*]}"; ./setup.sh --use-system-torch --offline --wheelhouse "$SDISTS" "${only[@]}"; } 2>&1 \
      | grep -v "ptxas\|bytes stack frame\|registers, " | log setup ;;
  verify)
    { header verify; $PY test_mamba.py; $PY test_mamba_130m.py; MAMBA_NARRATIVE_FLA=1 $PY -m pytest tests/test_gpu.py -q -s; } 2>&1 | log verify ;;
  throughput)
    { header throughput; $PY bench/bench_throughput.py --batch_sizes=8,64 --model=multitrack; } 2>&1 | log throughput ;;
  throughput-compile)
    { header throughput-compile; $PY bench/bench_throughput.py --batch_sizes=8 --model=multitrack --compile=True; } 2>&1 \
      | log throughput-compile ;;
  profile)
    { header profile; $PY bench/profile_step.py --csv_dir="$RESULTS/profile-csv"; } 2>&1 | grep -v "^USDT:" | log profile ;;
  mtspeed)
    { header mtspeed; $PY bench/bench_multitrack_speed.py --train_steps=5 --decode_batch=16; } 2>&1 | log mtspeed ;;
  decode)
    { header decode; $PY bench/bench_decode.py --gen_lengths=1024,16384; } 2>&1 | log decode ;;
  data)
    src=${1:?usage: gpu_runs.sh data SRC [TOKENIZER_JSON]}; tok=${2:-EleutherAI/gpt-neox-20b}
    { header data "$src"; $PY prepare_data.py --source="$src" --tokenizer="$tok" --num_books=0 --out_dir="$DATA"; } 2>&1 \
      | tr '\r' '\n' | grep -v "^prepare: .*%|" | log data ;;
  train)
    name=${1:?usage: gpu_runs.sh train NAME [ARGS]}; shift
    case "$name" in multitrack*) script=train_multitrack.py ;; *) script=train_baseline.py ;; esac
    seed=(); [[ "$name" =~ -s([0-9]+)$ ]] && seed=(--seed="${BASH_REMATCH[1]}")
    resume=False; [ -f "out/$name/ckpt_latest.pt" ] && resume=True
    # SIGTERM at the end of the piece: the trainer saves ckpt_latest.pt (exit 143); the next piece resumes exactly.
    { header "train $name (resume=$resume)"; timeout --preserve-status -k 60 -s TERM "$PIECE_S" $PY "$script" --data_dir="$DATA" --out_dir="out/$name" \
        --max_tokens="$TOKENS" --resume=$resume "${seed[@]}" "$@"; echo "exit $?" | tee "$RESULTS/.train-exit"; } 2>&1 \
        | tr '\r' '\n' | grep -v "s/step,\|step/s," | log "train-$name"
    for f in epochs.md epochs.csv loss.png router_usage.png log.txt metrics.jsonl; do
      [ -f "out/$name/$f" ] && cp "out/$name/$f" "$RESULTS/$name-$f"; done
    code=$(sed 's/exit //' "$RESULTS/.train-exit"); exit "${code:-1}" ;;
  plan)
    planfile=${1:?usage: gpu_runs.sh plan plans/NAME.toml}; name=$(basename "$planfile" .toml)
    { header "plan $planfile"; $PY run_plan.py --plan="$planfile" --budget_s="${BUDGET_S:-570}" \
        --results_dir="out/plans/$name" --results_from="bench/results/plans/$name/results.jsonl"; echo "exit $?" \
        | tee "$RESULTS/.plan-exit"; } 2>&1 | tr '\r' '\n' | grep -v "tok/s]$" | log "plan-$name"
    if [ -n "${OUT:-}" ]; then mkdir -p "$OUT/plans/$name"
      cp out/plans/"$name"/results.jsonl out/plans/"$name"/report.md out/plans/"$name"/*.png "$OUT/plans/$name/" 2>/dev/null; fi
    code=$(sed 's/exit //' "$RESULTS/.plan-exit"); exit "${code:-1}" ;;
  eval)
    ckpts=${1:?usage: gpu_runs.sh eval CKPT[,CKPT...]}
    { header eval; $PY evaluate.py --ckpts="$ckpts" --data_dir="$DATA" --dtype=bfloat16 --resume=True --out="$RESULTS/eval.md" ${EVAL_ARGS:-} &&
      $PY bench/compare_runs.py --runs="$(for c in ${ckpts//,/ }; do printf '%s,' "$(dirname "$c")"; done)" \
          --out="$RESULTS/compare_runs.png"; } 2>&1 | log eval ;;
  samples)
    ckpts=${1:?usage: gpu_runs.sh samples CKPT[,CKPT...]}
    prompts="$RESULTS/prompts_test_openings.txt"
    { header samples; $PY bench/book_openings.py --data_dir="$DATA" --split=test --num_books=4 --out="$prompts" &&
      for ckpt in ${ckpts//,/ }; do
        $PY generate_text.py --ckpt="$ckpt" --prompt="" --prompt_file="$prompts" --max_new_tokens=300 --num_samples=2 \
            --temperature=0.8 --top_p=0.95 --repetition_penalty=1.1 --seed=1337 --stream=False || exit 1
      done; } 2>&1 | log samples ;;
  all)
    t_end=$(( $(date +%s) + ${BUDGET_S:-570} ))
    # the queue's state lives under out/ (ignored by git): a lent machine that re-copies the working tree
    # before each call (tracked folders like bench/results replaced) keeps it, with the checkpoints
    done_file=${QUEUE_STATE:-out/gpu_queue_done.txt}; mkdir -p "$(dirname "$done_file")"; touch "$done_file"
    is_done() { grep -qx "$1" "$done_file"; }
    left() { echo $(( t_end - $(date +%s) )); }
    pack() {
      [ -n "${OUT:-}" ] || return 0
      tar czf "$OUT/gpu-results.tgz" "$RESULTS" generations 2>/dev/null
      echo "packed $RESULTS and generations/ into \$OUT/gpu-results.tgz"
    }
    ckpt_list() { local c=(); for r in $RUNS; do [ -f "out/$r/ckpt_latest.pt" ] && c+=("out/$r/ckpt_latest.pt"); done
                  (IFS=,; echo "${c[*]}"); }
    # stage name:seconds it needs at least (not started with less left: nothing is cut off halfway);
    # NAME@TAG runs stage NAME again under another label (e.g. throughput@conv after setup-conv)
    declare -A need_s=([setup]=300 [verify]=120 [throughput]=120 [eval]=150 [samples]=100 [decode]=60 [mtspeed]=120 [profile]=120 [setup-conv]=480 [throughput-compile]=240)
    plan=()
    for st in $STAGES; do
      if [ "$st" = train ]; then for r in $RUNS; do plan+=("train:$r:60"); done; else plan+=("$st:${need_s[${st%@*}]:-120}"); fi
    done
    # data preparation runs on the CPUs beside the kernel build; training waits for it
    data_pid=""
    if [[ " ${plan[*]}" == *" train:"* ]] && ! is_done data; then
      ( nice -n 10 "$0" data "${DATA_SRC:?set DATA_SRC (and DATA_TOK) for the data stage}" "${DATA_TOK:-EleutherAI/gpt-neox-20b}" \
          >/dev/null 2>&1 && echo data >> "$done_file" ) &
      data_pid=$!
    fi
    for item in "${plan[@]}"; do
      need=${item##*:}; stage=${item%:*}
      is_done "$stage" && continue
      if [ "$(left)" -lt "$need" ]; then echo "budget: $(left) s left, $stage needs ~$need s: stopping here"; pack; exit 3; fi
      echo "== $stage ($(left) s left)"
      case "$stage" in
        train:*)
          [ -n "$data_pid" ] && { wait "$data_pid"; data_pid=""; }
          is_done data || { echo "data stage failed: see $RESULTS/data.log"; pack; exit 1; }
          PIECE_S=$(( $(left) - 25 )) "$0" train "${stage#train:}" ${TRAIN_ARGS:-}; code=$?
          if [ $code -eq 0 ]; then echo "$stage" >> "$done_file"
          elif [ $code -eq 143 ]; then echo "budget: $stage stopped with a checkpoint, resumes next call"; pack; exit 3
          else echo "$stage failed (exit $code)"; pack; exit 1; fi ;;
        *)
          name=${stage%@*}
          args=(); [ "$name" = eval ] || [ "$name" = samples ] && args=("$(ckpt_list)")
          timeout "$(left)" "$0" "$name" "${args[@]}"; code=$?
          echo "$stage" >> "$done_file"      # a failed check is recorded in its log and does not block the queue
          [ $code -ne 0 ] && echo "$stage: exit $code (see $RESULTS/$name.log)"
          [[ "$name" == setup* ]] && [ $code -ne 0 ] && { pack; exit 1; } ;;
      esac
    done
    [ -n "$data_pid" ] && wait "$data_pid"
    echo "all stages done"; pack ;;
  *)
    sed -n '2,/^set -uo/p' "$0" | grep '^#'; exit 2 ;;
esac
