"""A training run's out_dir: what a fresh run may replace, what a resume continues from, what kills leave behind.

Checks (they touch no file; the trainer runs them all, and builds the model, before anything is written):

    check_out_dir(out_dir)                      a folder (or to be one) that is writable and not cwd or a parent
    checkpoint_to_resume(out_dir)               ckpt_latest.pt of a --resume run, loaded safely
    refuse_replacing(out_dir, overwrite)        a fresh run does not replace a checkpoint without --overwrite=True
    check_resume_data(ckpt, ...)                same script, tokenizer and data fingerprint as the checkpoint
    check_resume_batches(ckpt, ...)             same global batch, seq_len and seed (they fix the data position)
    check_same_model(ckpt, probe, ...)          the model the flags build is the checkpoint's

Then, on rank 0, once everything is validated:

    remove_leftovers(out_dir)                   temporary files of writes cut by a kill (only those)
    clear_outputs(out_dir)                      a fresh run: the previous run's checkpoints, logs, tables, plots
    trim_step_logs(out_dir, upto_step)          a resume: *.jsonl rows after the checkpoint's step dropped, and a
                                                last line half-written by a kill dropped (reported, not an error)
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from mamba_lm.checkpoint import load_checkpoint
from mamba_lm.data import check_tokenizer_match
from mamba_lm.errors import UserError
from mamba_lm.runtime import atomic_write_text

LATEST, BEST = "ckpt_latest.pt", "ckpt_best.pt"
OUTPUTS = (LATEST, BEST, "log.txt", "epochs.md", "epochs.csv", "loss.png")  # plus *.jsonl and tb/
# temporary files of atomic writes (mamba_lm.runtime.atomic_path): ".<name>.tmp<pid>",
# ".loss.tmp<pid>.png"; a kill between the write and the rename leaves them behind
LEFTOVER = re.compile(r"^\.(ckpt_latest\.pt|ckpt_best\.pt|epochs\.md|epochs\.csv|log\.txt|[^/]+\.jsonl)\.tmp\d*$"
                      r"|^\.loss\.tmp\d*\.png$")


def check_out_dir(out_dir: Path) -> None:
    """out_dir is a folder or can be made one, is writable, and is not the working directory or one of its
    parents (a fresh run deletes its outputs there)."""
    resolved = out_dir.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise UserError(f"--out_dir={out_dir} is the working directory or one of its parents; "
                        "give the run its own folder, e.g. --out_dir=out/run1")
    if resolved.exists() and not resolved.is_dir():
        raise UserError(f"--out_dir={out_dir} is a file, not a folder; pick another --out_dir")
    existing = next(p for p in (resolved, *resolved.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--out_dir={out_dir}: {existing} is not writable; pick a folder you can write to")


def checkpoint_to_resume(out_dir: Path) -> dict:
    latest = out_dir / LATEST
    if not latest.exists():
        raise UserError(f"--resume=True but {latest} does not exist; start a fresh run without --resume")
    return load_checkpoint(latest)


def refuse_replacing(out_dir: Path, overwrite: bool) -> None:
    existing = [p for p in (out_dir / LATEST, out_dir / BEST) if p.exists()]
    if existing and not overwrite:
        raise UserError(f"{out_dir} already holds {existing[0].name}; continue it with its original flags "
                        "plus --resume=True, or start over with --overwrite=True (its checkpoints and logs are "
                        "replaced), or pick another --out_dir")


def check_resume_data(ckpt: dict, *, script: str, meta: dict, data_dir: Path, out_dir: Path) -> None:
    """The checkpoint was written by this script, with this data dir's tokenizer and token stream."""
    if ckpt.get("script") not in (None, script):
        raise UserError(f"{out_dir}/{LATEST} was written by {ckpt['script']}, not {script}; "
                        "resume it with that script or use another --out_dir")
    check_tokenizer_match(meta["tokenizer"], ckpt["tokenizer"])
    fp_ckpt, fp_data = ckpt.get("data", {}).get("fingerprint"), meta.get("fingerprint")
    if fp_ckpt and fp_data and fp_ckpt != fp_data:
        raise UserError(f"{out_dir} was trained on data with fingerprint {fp_ckpt[:12]}, but "
                        f"{data_dir} has {fp_data[:12]}; resume with the original "
                        f"--data_dir={ckpt['data'].get('dir', '?')}")


def check_resume_batches(ckpt: dict, *, global_batch: int, seq_len: int, seed: int) -> None:
    """The data position (epoch, step in epoch) means the same sequences only with the same batch, seq_len, seed."""
    if ckpt.get("global_batch", global_batch) != global_batch:
        raise UserError(f"the checkpoint used batch_size*grad_accum = {ckpt['global_batch']} sequences per step, "
                        f"this run {global_batch}; resume with the same global batch")
    if ckpt.get("data", {}).get("seq_len", seq_len) != seq_len:
        raise UserError(f"the checkpoint trained on sequences of {ckpt['data']['seq_len']} tokens, this run "
                        f"{seq_len} (its data position counts sequences); resume with the original "
                        f"--seq_len={ckpt['data']['seq_len']}")
    if ckpt["train_config"].get("seed", seed) != seed:
        raise UserError(f"the checkpoint used --seed={ckpt['train_config']['seed']} (it fixes the data order); "
                        "resume with the same seed")


def check_same_model(ckpt: dict, want_type: str, want_config: dict, *, out_dir: Path, flags_hint: str) -> None:
    """Resume refuses a run whose flags build another model than the checkpoint's. flags_hint: ' (--preset=x)',
    the original run's flags that differ from this run's (or '')."""
    want = json.loads(json.dumps(want_config))
    have = json.loads(json.dumps(ckpt["model_config"]))
    diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
    if want_type != ckpt["model_type"] or diff:
        shown = ", ".join(f"{k}: checkpoint {have.get(k)!r} vs now {want.get(k)!r}" for k in diff[:4])
        raise UserError(f"{out_dir}/{LATEST} holds a different model "
                        f"({ckpt['model_type']} vs {want_type}{'; ' + shown if shown else ''}); "
                        f"resume with the original run's model flags{flags_hint} or use another --out_dir")


# ----------------------------------------------------------------------------------------------
# after validation (rank 0 only)


def remove_leftovers(out_dir: Path) -> list[str]:
    """Delete the temporary files that a kill in the middle of an atomic write left (and nothing else)."""
    if not out_dir.is_dir():
        return []
    removed = sorted(p.name for p in out_dir.iterdir() if p.is_file() and LEFTOVER.match(p.name))
    for name in removed:
        (out_dir / name).unlink(missing_ok=True)
    return removed


def clear_outputs(out_dir: Path) -> None:
    """A fresh run: delete the previous run's checkpoints, logs (every *.jsonl step log too), tables, plots, tb/."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:
        (out_dir / name).unlink(missing_ok=True)
    for path in out_dir.glob("*.jsonl"):  # metrics.jsonl and the hooks' step logs
        path.unlink()
    shutil.rmtree(out_dir / "tb", ignore_errors=True)


def read_step_log(path: Path) -> tuple[list[dict], bool]:
    """The rows of a JSONL step log, and whether its last line was cut (half-written by a kill) and dropped.
    A broken line elsewhere is not a kill's doing: UserError naming the line."""
    lines = [(i, line) for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
             if line.strip()]
    rows = []
    for n, (i, line) in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            if n == len(lines) - 1:
                return rows, True
            raise UserError(f"{path} line {i} is not a JSON row (a kill only cuts the last line, so the file was "
                            "edited or damaged); repair or delete that line, then resume")
        rows.append(row)
    return rows, False


def trim_step_logs(out_dir: Path, upto_step: int) -> tuple[list[dict], list[str]]:
    """On resume: drop the rows after the checkpoint's step (they will be redone) from metrics.jsonl and every
    other *.jsonl step log (a hook's, e.g. router_stats.jsonl), and a half-written last line of those and of
    log.txt. Returns (metrics.jsonl's kept rows, names of the files whose cut last line was dropped)."""
    metrics, cut_files = [], []
    for path in sorted(out_dir.glob("*.jsonl")):
        rows, cut = read_step_log(path)
        kept = [r for r in rows if r.get("step", 0) <= upto_step]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
        if cut:
            cut_files.append(path.name)
        if path.name == "metrics.jsonl":
            metrics = kept
    log = out_dir / "log.txt"
    if log.is_file():
        text = log.read_bytes()
        if text and not text.endswith(b"\n"):
            with open(log, "r+b") as f:
                f.truncate(text.rfind(b"\n") + 1)
            cut_files.append(log.name)
    return metrics, cut_files
