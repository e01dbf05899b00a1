"""Run an experiment plan (plans/*.toml) as a resumable queue of paired training runs, then report it.

    python run_plan.py --plan=plans/cpu.toml --dry_run=True       # validate, list the queue, estimate the time
    python run_plan.py --plan=plans/cpu.toml                       # run everything (no wall-clock limit)
    python run_plan.py --plan=plans/gpu-gate.toml --budget_s=540   # one 10-minute command; run it again to go on
    python run_plan.py --plan=plans/cpu.toml --report_only=True    # rebuild report.md from results.jsonl

A plan lists data sets, arms (model, flags, training mode), sizes, seeds and a token budget; the runs
are their product (mamba_lm/plan.py). Each run is driven through train_baseline.py / train_multitrack.py
in pieces under the wall-clock budget: at a piece's deadline the runner sends SIGTERM, the trainer saves
ckpt_latest.pt and exits, and the next piece (this command, or the next one) resumes it exactly with
--resume=True. A SIGTERM/Ctrl-C to the runner stops the piece in flight the same way. Finished runs
are appended to `results_dir/results.jsonl` (losses, eval curve, tokens/s, recall-gate scores,
evaluate.py metrics) and skipped from then on; `report.md` + PNGs (mamba_lm/plan_report.py:
mean ± sd over seeds, paired differences to the baseline with 95% t intervals, tokens-to-target, the
decision rule of research_plan.md) are rewritten after every finished run.

On a GPU lease, checkpoints stay on the machine; keep results.jsonl with the repository (the default
results_dir for plans/gpu-*.toml is under bench/results/plans/) so that the next lease skips the runs
that are done. A run cut by the end of a lease restarts from scratch on the next one.
"""

import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

import multitrack  # registers the "multitrack" model type: the gate scoring loads any run's checkpoint
from mamba_lm import plan as P
from mamba_lm.configurator import apply_overrides
from mamba_lm.errors import UserError, user_errors
from mamba_lm.mamba import PRESETS as MAMBA_PRESETS
from mamba_lm.plan_report import write_report
from multitrack.multitrack_config import PRESETS as MULTITRACK_PRESETS

# ----------------------------------------------------------------------------------------------
plan = "plans/cpu.toml"       # the plan file (TOML; see plans/ and mamba_lm/plan.py)
budget_s = 0.0                # wall-clock seconds for this command (0: no limit); stops cleanly before it [>=0]
piece_s = 0.0                 # at most this many seconds per training piece (0: up to the budget) [>=0]
results_dir = ""              # results.jsonl, report.md, PNGs ("" -> out/plans/<plan name>)
runs_dir = ""                 # checkpoints and logs of the runs ("" -> out/plans/<plan name>/runs)
results_from = ""             # results.jsonl files of earlier sessions (e.g. the copy kept in bench/results from
                              # past GPU leases), comma-separated: merged into results_dir first, their runs skipped
only = ""                     # comma-separated substrings: run only the run ids containing one
dry_run = False               # validate, print the queue and the time estimate; run nothing
report_only = False           # rebuild the report from results.jsonl; run nothing
retry_failed = False          # run again the runs recorded as failed
reserve_s = 45.0              # seconds kept at the end of the budget for scoring and the report [>=0]
min_piece_s = 30.0            # a piece shorter than this is not started [>=0]
grace_s = 180.0               # seconds a stopped piece gets to save its checkpoint before SIGKILL [>=0]
device = "auto"               # device of the gate scoring (the runs take theirs from the plan's [train])
# ----------------------------------------------------------------------------------------------
config = apply_overrides(globals(), sys.argv[1:])


def main():
    t_start = time.time()
    if budget_s and budget_s < min_piece_s + reserve_s:
        raise UserError(f"--budget_s={budget_s:g} cannot fit one piece: it needs at least min_piece_s + reserve_s "
                        f"= {min_piece_s + reserve_s:g} s")
    pl = P.load_plan(plan, {"mamba": MAMBA_PRESETS, "multitrack": MULTITRACK_PRESETS})
    out = Path(results_dir or f"out/plans/{pl.name}")
    runs_root = Path(runs_dir or out / "runs")
    results_path = out / P.RESULTS
    merge_results(results_path, [Path(f) for f in results_from.split(",") if f])
    queue = [r for r in pl.queue() if not only or any(s in r.id for s in only.split(","))]
    done = P.finished_ids(results_path)
    todo = [r for r in queue if r.id not in done or (retry_failed and done[r.id]["status"] != "done")]
    for arm, why in pl.skipped_arms.items():
        print(f"note: optional arm {arm!r} skipped: {why}")
    print(f"plan {pl.name}: {len(queue)} runs, {len(queue) - len(todo)} done, {len(todo)} to go -> {out}")
    if report_only:
        print(f"wrote {write_report(pl, out, P.read_jsonl(results_path))}")
        return
    if dry_run:
        print_estimate(pl, todo)
        return
    P.install_signal_handlers()
    deadline = t_start + budget_s if budget_s else float("inf")
    for d, spec in pl.data.items():                   # prepare_data.py reuses a data dir that matches
        if any(r.data == d for r in todo):
            prepare(spec)
    bar = tqdm(total=sum(r.tokens for r in todo), unit="tok", unit_scale=True, dynamic_ncols=True, desc=pl.name)
    for i, run in enumerate(todo):
        out_dir = runs_root / run.id
        bar.update(P.progress_tokens(out_dir))
        status = run_to_end(pl, run, out_dir, deadline, bar)
        if status == "stopped":
            break
        row = status if isinstance(status, dict) else None
        if row is not None:
            P.append_result(results_path, row)
            write_report(pl, out, P.read_jsonl(results_path))
            bar.write(f"[{i + 1}/{len(todo)}] {run.id}: " + (f"final val loss {row['final_val_loss']:.4f}"
                      if row["status"] == "done" else f"FAILED ({row['error']})"))
    bar.close()
    rows = P.read_jsonl(results_path)
    left = len([r for r in queue if r.id not in P.finished_ids(results_path)])
    print(f"wrote {write_report(pl, out, rows)}; {left} run(s) left"
          + (" (run the same command again to continue)" if left else ""))


def merge_results(path: Path, sources: list[Path]):
    """Append to results_dir/results.jsonl the rows of `sources` whose run id it does not have yet."""
    have = P.finished_ids(path)
    for src in sources:
        if not src.exists():
            print(f"note: --results_from: {src} does not exist (yet); nothing merged from it")
            continue
        for row in P.read_jsonl(src):
            if row["id"] not in have:
                P.append_result(path, row)
                have[row["id"]] = row


def prepare(spec: dict):
    """prepare_data.py with the plan's flags (it reuses the data dir when source and options match); a data set
    given as `dir` must already be prepared."""
    if spec["prepare"] is None:
        if not (Path(spec["dir"]) / "meta.json").exists():
            raise UserError(f"{spec['dir']} is not a prepared data dir; prepare it first (prepare_data.py, or "
                            f"bench/gpu_runs.sh data SRC TOK on a GPU machine)")
        return
    cmd = [sys.executable, "prepare_data.py"] + [f"--{k}={v}" for k, v in spec["prepare"].items()]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise UserError(f"preparing {spec['dir']} failed: {(res.stderr or res.stdout).strip().splitlines()[-1]}")
    print(res.stdout.strip().splitlines()[-1])


def run_to_end(pl, run, out_dir: Path, deadline: float, bar):
    """Pieces until the run finishes (-> its result row), fails (-> a failed row) or the budget ends (-> "stopped")."""
    data_dir = pl.data[run.data]["dir"]
    epochs, span = P.epochs_for(run.tokens, data_dir, pl.train)
    if span > pl.max_epochs:
        return {"id": run.id, "plan": pl.name, "status": "failed", "error": f"{run.tokens:,} tokens are {span:.1f} "
                f"epochs of {data_dir}, more than max_epochs={pl.max_epochs:g}"}
    piece = piece_s
    while True:
        left = deadline - time.time() - reserve_s
        if P.stop_requested() or left < min_piece_s:
            return "stopped"
        seconds = min(left, piece) if piece else left
        before = P.progress_tokens(out_dir)
        cmd = P.train_command(pl, run, out_dir, data_dir, epochs, sys.executable)
        rc = P.run_piece(cmd, out_dir / "runner.log", seconds, grace_s)
        moved = P.progress_tokens(out_dir) - before
        bar.update(max(0, moved))
        if moved <= 0 and piece:
            piece *= 2                         # a piece too short to get past start-up: give the next one more
        if rc == 0:
            try:
                return P.collect_result(pl, run, out_dir, data_dir, device)
            except UserError as e:
                return {"id": run.id, "plan": pl.name, "status": "failed", "error": str(e)}
        if rc in (130, 143, -15, -9):          # stopped at the deadline (or killed after the grace)
            continue
        tail = (out_dir / "runner.log").read_text().strip().splitlines()[-1:] or [""]
        return {"id": run.id, "plan": pl.name, "status": "failed", "error": f"exit {rc}: {tail[0][:300]}"}


def print_estimate(pl, todo):
    """The queue with expected minutes (plan [expect]) and how it splits over commands of --budget_s."""
    total, unknown = 0.0, 0
    for run in todo:
        est = pl.estimate_s(run)
        total += est or 0
        unknown += est is None
        print(f"  {run.id:<48} {run.arm.model:<10} {run.tokens:>12,} tok"
              + (f"  ~{est / 60:.1f} min" if est else "  (no [expect] speed)"))
    line = f"expected: {total / 60:.1f} min for {len(todo)} runs"
    if budget_s:
        line += f", about {max(1, -(-total // (budget_s - reserve_s))):.0f} command(s) of --budget_s={budget_s:g}"
    print(line + (f" ({unknown} runs without an expected speed)" if unknown else ""))


if __name__ == "__main__":
    with user_errors():
        main()
