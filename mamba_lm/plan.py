"""Experiment plans: a declarative TOML file -> a validated queue of paired training runs, run in pieces.

A plan (see plans/*.toml) names the data sets, the arms (model + flags + training mode), the sizes,
the seeds and the token budget; the queue is their product, one run per (data, size, seed, arm),
ordered seed-major so that a plan cut short still has every arm at its first seeds. Runs that differ
only in the arm share the seed, the data dir and every data-order flag (arms may only set model
flags), so their differences are paired.

Each run is driven through its train script's command line (train_baseline.py / train_multitrack.py,
as `subprocess`), in pieces: a piece starts the script (`--resume=True` once a checkpoint exists)
and, at its deadline, sends SIGTERM, on which the trainer saves ckpt_latest.pt after the current
step and exits 143; the next piece continues exactly there. A finished run (exit 0) is scored
(recall gate on the final weights, evaluate.py metrics the plan names) and appended to
results.jsonl as one small JSON row; finished runs are skipped on the next invocation.

    load_plan(path) -> Plan                      parse + validate (UserError, one line, before any work)
    Plan.queue() -> list[Run]                    the runs, seed-major
    script_flags(script) -> dict                 the constants a train script accepts (read with ast)
    run_piece(cmd, log, seconds, grace) -> rc    one piece, stopped by SIGTERM at its deadline
    collect_result(run, data_dir, ...) -> dict   the JSON row of a finished run
"""

from __future__ import annotations

import ast
import json
import math
import os
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mamba_lm import recall_gate
from mamba_lm.checkpoint import model_from_checkpoint
from mamba_lm.data import load_meta
from mamba_lm.errors import UserError
from mamba_lm.runtime import resolve_device

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = {"mamba": "train_baseline.py", "multitrack": "train_multitrack.py"}
MODES = {"windowed": {}, "stateful": {"stateful": True}}       # training mode -> flags
# sizes whose preset name differs between the two models
SIZE_PRESETS = {"130m": {"mamba": "mamba-130m", "multitrack": "multitrack-130m"}}
# flags an arm may not set: they fix the data, its order and the budget, which paired runs share
PAIRED_FLAGS = {"data_dir", "out_dir", "seed", "batch_size", "grad_accum", "seq_len", "max_tokens", "max_steps",
                "epochs", "resume", "overwrite", "init_from", "preset", "loss_on"}
RUNNER_FLAGS = {"data_dir", "out_dir", "seed", "max_tokens", "epochs", "resume", "overwrite", "preset"}
PLAN_KEYS = {"name", "description", "tokens", "sizes", "seeds", "data", "baseline", "train", "arm", "expect",
             "lease_s", "max_epochs", "evaluate", "device_note"}
ARM_KEYS = {"name", "model", "flags", "mode", "optional", "note", "data"}
DATA_KEYS = {"prepare", "dir", "gate", "train", "tokens", "evaluate"}
RESULTS = "results.jsonl"


@dataclass
class Arm:
    name: str
    model: str
    flags: dict
    mode: str = "windowed"
    optional: bool = False
    note: str = ""
    data: list | None = None     # the data sets it runs on (None: all)


@dataclass
class Run:
    id: str
    data: str
    size: str
    arm: Arm
    seed: int
    tokens: int

    @property
    def script(self) -> str:
        return SCRIPTS[self.arm.model]

    @property
    def preset(self) -> str:
        return SIZE_PRESETS.get(self.size, {}).get(self.arm.model, self.size)


@dataclass
class Plan:
    path: str
    name: str
    description: str
    tokens: int | dict           # training tokens per run, or per size {size: tokens} (a ladder)
    sizes: list
    seeds: list
    data: dict                   # name -> {"prepare": {...prepare_data flags}, "gate": bool, "dir": str,
                                 #          "train": {...train flags of every run on it}, "tokens": its budget
                                 #          (None: the plan's), "evaluate": run [evaluate] on its runs}
    arms: list
    baseline: str
    train: dict
    expect: dict
    lease_s: float
    max_epochs: float
    evaluate: dict
    skipped_arms: dict = field(default_factory=dict)   # optional arm -> why it is skipped

    def queue(self) -> list[Run]:
        """Every run, seed-major: (seed, data, size, arm) with the baseline first."""
        arms = sorted(self.arms, key=lambda a: a.name != self.baseline)
        return [Run(f"{d}/{size}/{arm.name}/s{seed}", d, size, arm, seed, self.tokens_of(size, d))
                for seed in self.seeds for d in self.data for size in self.sizes for arm in arms
                if arm.data is None or d in arm.data]

    def tokens_of(self, size: str, data: str | None = None) -> int:
        """Training tokens of a run of `size` on data set `data` (its own `tokens`, else the plan's)."""
        tokens = (self.data[data]["tokens"] if data else None) or self.tokens
        return tokens[size] if isinstance(tokens, dict) else tokens

    def estimate_s(self, run: Run) -> float | None:
        """Expected seconds of a run from `expect` (baseline tokens/s per size, ratio per model), or None."""
        tok_s = self.expect.get("tok_per_s", {}).get(run.size)
        if not tok_s:
            return None
        ratio = self.expect.get("ratio", {}).get(run.arm.model, 1.0)
        return run.tokens / (tok_s * ratio) + float(self.expect.get("overhead_s", 0))


def _fail(path, msg: str):
    raise UserError(f"plan {path}: {msg}")


def _need(table: dict, key: str, kind, path, where: str):
    if key not in table:
        _fail(path, f"{where} is missing the field '{key}'")
    value = table[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        _fail(path, f"{where}.{key} must be {names}, got {value!r}")
    return value


def script_flags(script: str) -> dict:
    """{name: default} of the module-level constants a train script accepts as --name=value: the
    assignments of its top block, before `config = apply_overrides(...)` (read with ast, not run)."""
    tree = ast.parse((ROOT / script).read_text(), filename=script)
    flags = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name == "config":
                break
            try:
                flags[name] = ast.literal_eval(node.value)
            except ValueError:
                flags[name] = None          # not a literal: accepted, type unchecked
    return flags


def _check_value(path, where: str, key: str, value, default):
    if default is None:
        return
    ok = (isinstance(value, bool) if isinstance(default, bool) else
          isinstance(value, int) and not isinstance(value, bool) if isinstance(default, int) else
          isinstance(value, (int, float)) and not isinstance(value, bool) if isinstance(default, float) else
          isinstance(value, str) if isinstance(default, str) else True)
    if not ok:
        _fail(path, f"{where}: {key}={value!r} but the script's default is {default!r} ({type(default).__name__})")


def load_plan(path: str, presets: dict) -> Plan:
    """Parse and validate a plan file; every problem is a one-line UserError before anything runs.

    presets: model -> its preset names ({"mamba": mamba.PRESETS, "multitrack": multitrack_config.PRESETS};
    the script passes them, as the core never imports multitrack)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"plan {path} not found (see plans/*.toml)")
    try:
        raw = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        _fail(path, f"not valid TOML ({e})")
    unknown = set(raw) - PLAN_KEYS
    if unknown:
        _fail(path, f"unknown field(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(PLAN_KEYS))}")
    name = _need(raw, "name", str, path, "the plan")
    tokens = _need(raw, "tokens", (int, dict), path, "the plan")
    sizes = _need(raw, "sizes", list, path, "the plan")
    _check_tokens(path, "tokens", tokens, sizes)
    seeds = _need(raw, "seeds", list, path, "the plan")
    if not sizes or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        _fail(path, "sizes and seeds must be non-empty lists (seeds of integers)")
    if len(set(seeds)) != len(seeds):
        _fail(path, f"seeds repeat: {seeds}")
    data = _parse_data(path, _need(raw, "data", dict, path, "the plan"))
    for dname, spec in data.items():
        if spec["tokens"] is not None:
            _check_tokens(path, f"data.{dname}.tokens", spec["tokens"], sizes)
    train = raw.get("train", {})
    arms_raw = _need(raw, "arm", list, path, "the plan")
    arms, skipped = _parse_arms(path, arms_raw, train, sizes, presets, set(data))
    baseline = raw.get("baseline", "baseline")
    if baseline not in {a.name for a in arms}:
        _fail(path, f"the baseline arm {baseline!r} is not among the arms {[a.name for a in arms]}")
    plan = Plan(str(path), name, raw.get("description", ""), tokens, sizes, seeds, data, arms, baseline, train,
                raw.get("expect", {}), float(raw.get("lease_s", 0)), float(raw.get("max_epochs", 100)),
                raw.get("evaluate", {}), skipped)
    _check_evaluate(path, plan.evaluate)
    _check_budget(plan)
    return plan


def _check_tokens(path, where: str, tokens, sizes: list) -> None:
    per_size = tokens if isinstance(tokens, dict) else {s: tokens for s in sizes}
    if set(per_size) != set(sizes) or not all(isinstance(t, int) and not isinstance(t, bool) and t > 0
                                              for t in per_size.values()):
        _fail(path, f"{where} must be a positive integer, or a table with one for each size {sizes}")


def _parse_data(path, data: dict) -> dict:
    if not data:
        _fail(path, "[data] names no data set")
    out = {}
    for dname, spec in data.items():
        if not isinstance(spec, dict) or set(spec) - DATA_KEYS or ("prepare" in spec) == ("dir" in spec):
            _fail(path, f"data.{dname}: expected a table with either prepare = {{prepare_data.py flags}} or "
                        f"dir = \"an already prepared data dir\" (and optionally gate = true, train = {{flags}})")
        train = _data_train_flags(path, dname, spec)
        prep = _prepare_flags(path, dname, spec) if "prepare" in spec else None
        gate = bool(spec.get("gate", prep is not None and prep.get("source") == "recall-gate"))
        out[dname] = {"prepare": prep, "gate": gate, "dir": prep["out_dir"] if prep else spec["dir"],
                      "train": _gate_loss(gate, train),
                      "tokens": spec.get("tokens"), "evaluate": bool(spec.get("evaluate", True))}
    return out


def _prepare_flags(path, dname: str, spec: dict) -> dict:
    """data.NAME.prepare: prepare_data.py flags, each checked against the script's constants."""
    prep = dict(_need(spec, "prepare", dict, path, f"data.{dname}"))
    known = script_flags("prepare_data.py")
    for k, v in prep.items():
        if k not in known:
            _fail(path, f"data.{dname}.prepare: prepare_data.py has no --{k}")
        _check_value(path, f"data.{dname}.prepare", k, v, known[k])
    prep.setdefault("out_dir", f"data/{dname}")
    return prep


def _data_train_flags(path, dname: str, spec: dict) -> dict:
    """data.NAME.train: train-script flags of every run on this data (shared by all arms, so still paired)."""
    train = dict(spec.get("train", {}))
    known = script_flags(SCRIPTS["mamba"])
    for k, v in train.items():
        if k not in known or k in RUNNER_FLAGS:
            _fail(path, f"data.{dname}.train: --{k} is not a train flag a data set may set")
        _check_value(path, f"data.{dname}.train", k, v, known[k])
    return train


def _gate_loss(gate: bool, train: dict) -> dict:
    """Runs on a recall gate score only its answers (the MQAR objective), unless the plan says otherwise."""
    return {"loss_on": "answers", **train} if gate else train


def _parse_arms(path, arms_raw: list, train: dict, sizes: list, presets: dict, data_names: set) -> tuple[list, dict]:
    if not arms_raw:
        _fail(path, "no [[arm]]")
    arms, skipped, names = [], {}, set()
    for i, a in enumerate(arms_raw):
        where = f"arm {a.get('name', i)!r}"
        if set(a) - ARM_KEYS:
            _fail(path, f"{where}: unknown field(s) {', '.join(sorted(set(a) - ARM_KEYS))}; known: {sorted(ARM_KEYS)}")
        arm = Arm(_need(a, "name", str, path, where), _need(a, "model", str, path, where), dict(a.get("flags", {})),
                  a.get("mode", "windowed"), bool(a.get("optional", False)), a.get("note", ""), a.get("data"))
        if arm.data is not None and (not isinstance(arm.data, list) or not arm.data
                                     or any(d not in data_names for d in arm.data)):
            _fail(path, f"{where}: data must be a non-empty list of the plan's data sets {sorted(data_names)}")
        if arm.name in names or "/" in arm.name:
            _fail(path, f"{where}: arm names must be unique and contain no '/'")
        names.add(arm.name)
        if arm.model not in SCRIPTS:
            _fail(path, f"{where}: unknown model {arm.model!r}; choose one of {', '.join(SCRIPTS)}")
        if arm.mode not in MODES:
            _fail(path, f"{where}: unknown training mode {arm.mode!r}; choose one of {', '.join(MODES)}")
        bad = PAIRED_FLAGS & set(arm.flags)
        if bad:
            _fail(path, f"{where} sets {', '.join(sorted(bad))}: arms may only change the model (paired runs share "
                        f"seed, data and budget); put shared settings in [train]")
        known = script_flags(SCRIPTS[arm.model])
        flags = {**train, **arm.flags, **MODES[arm.mode]}
        missing = [k for k in flags if k not in known]
        if missing:
            if arm.optional:
                skipped[arm.name] = f"{SCRIPTS[arm.model]} has no --{', --'.join(missing)} yet"
                continue
            _fail(path, f"{where}: {SCRIPTS[arm.model]} has no --{missing[0]} (unknown variant flag; "
                        f"see the constants at the top of the script)")
        for k, v in flags.items():
            _check_value(path, where, k, v, known[k])
        for size in sizes:
            preset = SIZE_PRESETS.get(size, {}).get(arm.model, size)
            if preset not in presets[arm.model]:
                _fail(path, f"{where}: size {size!r} has no {arm.model} preset {preset!r}; "
                            f"known: {', '.join(sorted(presets[arm.model]))}")
        arms.append(arm)
    return arms, skipped


def _check_evaluate(path, ev: dict):
    if not ev:
        return
    known = script_flags("evaluate.py")
    for k in ev.get("flags", {}):
        if k not in known or k in ("ckpts", "names", "data_dir", "out"):
            _fail(path, f"evaluate.flags: evaluate.py has no settable --{k}")
    if not isinstance(ev.get("metrics", []), list):
        _fail(path, "evaluate.metrics must be a list of 'stage.key' paths, e.g. ['loss.bits_per_byte']")


def _check_budget(plan: Plan):
    """A run that cannot fit one lease (plan.lease_s, from the expected tokens/s) is refused."""
    if plan.lease_s <= 0:
        return
    for run in plan.queue():
        est = plan.estimate_s(run)
        if est is not None and est > plan.lease_s:
            _fail(plan.path, f"run {run.id} needs ~{est / 60:.0f} min at the expected speed, more than one lease "
                             f"(lease_s={plan.lease_s:.0f}); lower tokens or split the plan")


# ---- running ------------------------------------------------------------------------------------


def train_command(plan: Plan, run: Run, out_dir: Path, data_dir: str, epochs: int, python: str) -> list[str]:
    """The train script's command line for one piece of `run`."""
    flags = {**plan.train, **plan.data[run.data]["train"], **run.arm.flags, **MODES[run.arm.mode],
             "preset": run.preset, "data_dir": data_dir,
             "out_dir": str(out_dir), "seed": run.seed, "max_tokens": run.tokens, "epochs": epochs}
    if (out_dir / "ckpt_latest.pt").exists():
        flags["resume"] = True
    else:
        flags["overwrite"] = True       # no checkpoint yet: logs of a piece stopped before its first save
    return [python, str(ROOT / run.script)] + [f"--{k}={_fmt(v)}" for k, v in flags.items()]


def _fmt(v) -> str:
    return str(v) if not isinstance(v, float) else repr(v)


def epochs_for(tokens: int, data_dir: str, train: dict) -> tuple[int, float]:
    """Epochs to pass so that max_tokens decides the run's length, and the epochs it spans."""
    meta = load_meta(data_dir)
    seq_len = train.get("seq_len") or meta["seq_len"]
    n_seq = (meta["splits"]["train"]["tokens"] - 1) // seq_len
    gb = train.get("batch_size", 8) * train.get("grad_accum", 1)
    steps_per_epoch = n_seq // gb
    if steps_per_epoch == 0:
        raise UserError(f"{data_dir}: its train split has fewer than one batch of {gb} x {seq_len} tokens")
    steps = math.ceil(tokens / (gb * seq_len))
    return math.ceil(steps / steps_per_epoch), steps / steps_per_epoch


_child: subprocess.Popen | None = None
_stop_requested = False


def _forward_stop(signum, frame):
    """The runner was asked to stop (SIGTERM/SIGINT): stop the piece in flight cleanly, then exit."""
    global _stop_requested
    _stop_requested = True
    if _child is not None and _child.poll() is None:
        _child.send_signal(signal.SIGTERM)


def install_signal_handlers():
    signal.signal(signal.SIGTERM, _forward_stop)
    signal.signal(signal.SIGINT, _forward_stop)


def stop_requested() -> bool:
    return _stop_requested


def run_piece(cmd: list[str], log_path: Path, seconds: float, grace_s: float) -> int:
    """Run one piece; at `seconds` send SIGTERM (the trainer saves and exits 143); after `grace_s`
    more, SIGKILL (the piece's progress since its last checkpoint is lost). Returns the exit code."""
    global _child
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        _child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline, termed = time.time() + seconds, _stop_requested
        if termed:
            _child.send_signal(signal.SIGTERM)
        while _child.poll() is None:
            time.sleep(0.2)
            if not termed and (time.time() >= deadline or _stop_requested):
                _child.send_signal(signal.SIGTERM)
                termed, deadline = True, time.time() + grace_s
            elif termed and time.time() >= deadline:
                _child.kill()
        rc = _child.wait()
        _child = None
    return rc


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def progress_tokens(out_dir: Path) -> int:
    """Training tokens of the last logged step of a run (0 when it has not started)."""
    rows = [r for r in read_jsonl(out_dir / "metrics.jsonl") if "tokens" in r]
    return int(rows[-1]["tokens"]) if rows else 0


def collect_result(plan: Plan, run: Run, out_dir: Path, data_dir: str, device: str) -> dict:
    """The result row of a finished run: losses, the eval curve, tokens/s, gate scores, evaluate.py metrics."""
    rows = read_jsonl(out_dir / "metrics.jsonl")
    evals = [r for r in rows if r.get("kind") == "eval"]
    epochs = [r for r in rows if r.get("kind") == "epoch"]
    train = [r for r in rows if r.get("kind") == "train"]
    cfg_rows = [r for r in rows if r.get("kind") == "config"]
    if not evals or not all(math.isfinite(r["val_loss"]) for r in evals):
        raise UserError(f"run {run.id}: no finite eval loss in {out_dir / 'metrics.jsonl'}; not recorded")
    tok_s = sorted(r["tok_per_s"] for r in train if r.get("tok_per_s"))
    result = {"id": run.id, "plan": plan.name, "status": "done", "data": run.data, "size": run.size,
              "arm": run.arm.name, "model": run.arm.model, "mode": run.arm.mode, "flags": run.arm.flags,
              "seed": run.seed, "tokens": evals[-1]["tokens"], "num_params": cfg_rows[0]["num_params"] if cfg_rows else None,
              "final_val_loss": evals[-1]["val_loss"], "best_val_loss": min(r["val_loss"] for r in evals),
              "val_loss_full": epochs[-1]["val_loss"] if epochs else None,
              "curve": [[r["tokens"], r["val_loss"]] for r in evals],
              "tok_per_s": tok_s[len(tok_s) // 2] if tok_s else None,
              "minutes": evals[-1].get("minutes"), "out_dir": str(out_dir)}
    if plan.data[run.data]["gate"]:
        result["gate"] = score_gate_of(out_dir, data_dir, device)
    if plan.evaluate and plan.data[run.data]["evaluate"]:
        result["evaluate"] = evaluate_metrics(plan, run, out_dir, data_dir)
    return result


def score_gate_of(out_dir: Path, data_dir: str, device: str) -> dict:
    """Recall-gate scores of a run's final weights (ckpt_latest.pt), windows of its training length."""
    dev = resolve_device(device)
    model, ckpt = model_from_checkpoint(str(out_dir / "ckpt_latest.pt"), device=dev)
    probes = recall_gate.load_probe_set(data_dir)
    tok = ckpt["tokenizer"]
    if probes["tokenizer_sha256"] != tok["sha256"]:
        raise UserError(f"{data_dir}/gate_probes.json was built with another tokenizer; prepare the data again")
    with torch.no_grad():
        return recall_gate.score_gate(model, probes, ckpt["data"]["seq_len"], tok["vocab_size"], tok["eos_id"], device=dev)


def evaluate_metrics(plan: Plan, run: Run, out_dir: Path, data_dir: str) -> dict:
    """Run evaluate.py on the run's best checkpoint and pick the plan's 'stage.key' metrics."""
    ev = plan.evaluate
    report = out_dir / "eval" / "eval.md"
    cmd = [sys.executable, str(ROOT / "evaluate.py"), f"--ckpts={out_dir / 'ckpt_best.pt'}", f"--names={run.arm.name}",
           f"--data_dir={data_dir}", f"--out={report}", f"--state_dir={out_dir / 'eval' / 'state'}", "--resume=True"]
    cmd += [f"--{k}={_fmt(v)}" for k, v in ev.get("flags", {}).items()]
    with open(out_dir / "eval.log", "a") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if rc != 0:
        return {"error": f"evaluate.py exited {rc}; see {out_dir / 'eval.log'}"}
    results = json.loads(report.with_suffix(".json").read_text())["results"][run.arm.name]
    picked = {}
    for path in ev.get("metrics", []):
        value = results
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        picked[path] = value
    return picked


def append_result(path: Path, row: dict) -> None:
    """Append one JSON row (flushed and fsynced: a killed command loses no finished run)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def finished_ids(path: Path) -> dict:
    """run id -> its latest result row."""
    return {r["id"]: r for r in read_jsonl(path)}
