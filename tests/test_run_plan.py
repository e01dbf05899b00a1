"""run_plan.py and mamba_lm/plan.py: a two-run plan end to end, resume of an interrupted plan, one-line errors
for bad plans before anything runs, pairing of the runs, and the parameter-matched size ladder."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mamba_lm import plan as P
from mamba_lm.errors import UserError
from mamba_lm.mamba import PRESETS as MAMBA_PRESETS
from mamba_lm.plan_report import compare
from multitrack.multitrack_config import PRESETS as MULTITRACK_PRESETS

PRESETS = {"mamba": MAMBA_PRESETS, "multitrack": MULTITRACK_PRESETS}

ROOT = Path(__file__).resolve().parent.parent

PLAN = """
name = "two"
description = "two tiny runs"
tokens = {tokens}
sizes = ["tiny"]
seeds = [3]
baseline = "baseline"
{extra}
[train]
seq_len = 16
batch_size = 2
eval_interval = 4
eval_batches = 1
log_interval = 4
tensorboard = false
device = "cpu"
[data.demo]
prepare = {{ source = "demo", seq_len = 16, demo_num_books = 4, demo_words_per_book = 300, demo_vocab_size = 280, out_dir = "{data}" }}
[[arm]]
name = "baseline"
model = "mamba"
mode = "windowed"
[[arm]]
name = "one-track"
model = "multitrack"
flags = {{ tracks = 1 }}
[[arm]]
name = "future"
model = "mamba"
flags = {{ switch_of_the_future = true }}
optional = true
"""


def write_plan(tmp_path, name="plan.toml", tokens=640, extra="", **kw):
    text = PLAN.format(tokens=tokens, data=tmp_path / "data", extra=extra)
    for old, new in kw.items():
        text = text.replace(old, new)
    path = tmp_path / name
    path.write_text(text)
    return path


def run_plan(*args, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(ROOT / "run_plan.py"), *args], capture_output=True, text=True,
                         cwd=ROOT, env=env)
    if check:
        assert res.returncode == 0, res.stdout + res.stderr
    return res


def results(path):
    return {r["id"]: r for r in P.read_jsonl(Path(path) / "results.jsonl")}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The two-run plan run once, uninterrupted."""
    tmp = tmp_path_factory.mktemp("plan")
    plan = write_plan(tmp)
    res = run_plan(f"--plan={plan}", f"--results_dir={tmp / 'out'}")
    return tmp, plan, res


def test_two_run_plan_end_to_end(finished):
    """Guards the whole path: both runs train through their scripts, results.jsonl has one complete row each
    (curve, losses, params, tokens/s), the optional arm whose flag the script lacks is skipped with a note,
    the report has the table and the loss PNG, and a second invocation runs nothing."""
    tmp, plan, res = finished
    rows = results(tmp / "out")
    assert set(rows) == {"demo/tiny/baseline/s3", "demo/tiny/one-track/s3"}
    for r in rows.values():
        assert r["status"] == "done" and r["tokens"] == 640 and r["seed"] == 3
        assert len(r["curve"]) >= 2 and r["final_val_loss"] == r["curve"][-1][1]
        assert r["best_val_loss"] <= r["final_val_loss"] and r["num_params"] > 0 and r["tok_per_s"] > 0
    assert "optional arm 'future' skipped: train_baseline.py has no --switch_of_the_future" in res.stdout
    report = (tmp / "out" / "report.md").read_text()
    assert "| one-track | 1 |" in report and (tmp / "out" / "loss_demo_tiny.png").exists()
    again = run_plan(f"--plan={plan}", f"--results_dir={tmp / 'out'}")
    assert "0 to go" in again.stdout and len(P.read_jsonl(tmp / "out" / "results.jsonl")) == 2


def test_interrupted_plan_resumes_to_the_same_results(finished, tmp_path):
    """Guards exact resume: the runner is stopped (SIGTERM, as a lease's command limit does) as soon as the
    first run has a checkpoint; the next invocation continues it with --resume=True and the finished plan has
    the same losses and eval curves as the uninterrupted one."""
    _, plan, _ = finished
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "run_plan.py"), f"--plan={plan}", f"--results_dir={out}"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ckpt = out / "runs" / "demo" / "tiny" / "baseline" / "s3" / "ckpt_latest.pt"
    t0 = time.time()
    while not ckpt.exists() and proc.poll() is None and time.time() - t0 < 120:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=300)
    assert not (out / "results.jsonl").exists() or len(P.read_jsonl(out / "results.jsonl")) < 2
    run_plan(f"--plan={plan}", f"--results_dir={out}")
    log = (ckpt.parent / "log.txt").read_text()
    assert "resumed at step" in log
    want, got = results(finished[0] / "out"), results(out)
    assert set(got) == set(want)
    for rid in want:
        assert got[rid]["final_val_loss"] == pytest.approx(want[rid]["final_val_loss"], abs=1e-6)
        assert [c[0] for c in got[rid]["curve"]] == [c[0] for c in want[rid]["curve"]]
        assert [c[1] for c in got[rid]["curve"]] == pytest.approx([c[1] for c in want[rid]["curve"]], abs=1e-6)


@pytest.mark.parametrize("edit, message", [
    ({'flags = { tracks = 1 }': 'flags = { trakcs = 1 }'}, "has no --trakcs"),
    ({'model = "multitrack"': 'model = "transformer"'}, "unknown model"),
    ({'tokens = 640': ''}, "missing the field 'tokens'"),
    ({'flags = { tracks = 1 }': 'flags = { seed = 9 }'}, "arms may only change the model"),
    ({'sizes = ["tiny"]': 'sizes = ["huge"]'}, "no mamba preset 'huge'"),
    ({'flags = { tracks = 1 }': 'flags = { tracks = "three" }'}, "tracks='three'"),
    ({'baseline = "baseline"': 'baseline = "nobody"'}, "baseline arm 'nobody'"),
    ({'mode = "windowed"': 'mode = "sideways"'}, "unknown training mode"),
])
def test_bad_plans_are_one_line_errors(tmp_path, edit, message):
    """Guards plan validation: unknown variant flag / model / size / mode, a missing field, an arm that would
    break pairing, a wrong flag type and an unknown baseline are UserErrors before anything runs."""
    text = PLAN.format(tokens=640, data=tmp_path / "data", extra="")
    for old, new in edit.items():
        text = text.replace(old, new, 1)
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("(", r"\(")):
        P.load_plan(str(path), PRESETS)


def test_budget_that_cannot_fit_is_refused_before_running(tmp_path):
    """Guards the budget checks: a run whose expected time exceeds one lease, and a --budget_s too short for
    one piece, are one-line errors (exit 2) and nothing is prepared or trained."""
    path = write_plan(tmp_path, extra="lease_s = 60\n[expect]\ntok_per_s = { tiny = 1 }\n")
    with pytest.raises(UserError, match="more than one lease"):
        P.load_plan(str(path), PRESETS)
    ok = write_plan(tmp_path, name="ok.toml")
    res = run_plan(f"--plan={ok}", f"--results_dir={tmp_path / 'out'}", "--budget_s=10", check=False)
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and "cannot fit one piece" in res.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "data").exists()


def test_queue_is_paired_and_seed_major(tmp_path):
    """Guards pairing: every arm of a (data, size, seed) gets the same seed, data dir and data-order flags in
    its command, only model flags differ, and the queue runs all arms of the first seed first."""
    path = write_plan(tmp_path, **{'seeds = [3]': 'seeds = [3, 4]'})
    pl = P.load_plan(str(path), PRESETS)
    q = pl.queue()
    assert [r.seed for r in q] == [3, 3, 4, 4] and q[0].arm.name == "baseline"
    cmds = [P.train_command(pl, r, tmp_path / r.id, "D", 1, "py") for r in q[:2]]
    shared = [{a for a in c if a.split("=")[0] in ("--seed", "--data_dir", "--seq_len", "--batch_size",
                                                   "--max_tokens", "--epochs")} for c in cmds]
    assert shared[0] == shared[1] and "--seed=3" in shared[0]
    assert "--tracks=1" in cmds[1] and not any(a.startswith("--tracks") for a in cmds[0])


def test_compare_applies_the_decision_rule():
    """Guards the report's statistics on known rows: an arm 0.1 below the baseline on each of 3 seeds with
    baseline noise ~0.01 is 'better'; one inside the noise is 'no difference at this budget'."""
    rows = []
    for seed, b in zip((1, 2, 3), (2.00, 2.01, 2.005)):
        rows += [{"arm": "baseline", "seed": seed, "final_val_loss": b},
                 {"arm": "good", "seed": seed, "final_val_loss": b - 0.1 + 0.001 * seed},
                 {"arm": "same", "seed": seed, "final_val_loss": b + 0.001 * (seed - 2)}]
    c = compare(rows, "baseline")
    assert c["good"]["verdict"] == "better" and c["same"]["verdict"] == "no difference at this budget"
    assert c["good"]["diff"]["mean"] == pytest.approx(-0.098) and c["baseline"]["summary"]["n"] == 3


LADDER = ("ladder-10m", "ladder-30m", "ladder-60m")


def _variants() -> dict:
    """Every multi-track variant multitrack_config names (VARIANTS when it has it), plus each boolean switch of
    MultiTrackConfig flipped and each router mode, so a new variant or switch is covered without editing here."""
    from dataclasses import fields

    import multitrack.multitrack_config as mc

    out = dict(getattr(mc, "VARIANTS", {"full": {}, "one-track": {"tracks": 1}}))
    default = mc.MultiTrackConfig(d_model=64, n_layer=1, vocab_size=256)
    for f in fields(mc.MultiTrackConfig):
        if f.init and isinstance(getattr(default, f.name), bool) and f.name not in ("match_params", "tie_embeddings",
                                                                                     "bias", "conv_bias",
                                                                                     "residual_in_fp32"):
            out[f"flip-{f.name}"] = {f.name: not getattr(default, f.name)}
    out.update({f"router-{m}": {"router": m} for m in mc.ROUTER_MODES})
    return out


@pytest.mark.parametrize("preset", LADDER)
def test_size_ladder_every_variant_parameter_matched(preset):
    """Guards the ladder's fair comparison: at each ladder size every multi-track variant is within 1% of the
    Mamba baseline of the same preset name, in total and in non-embedding parameters (the baseline built on the
    meta device; the variants by count_params, which test_multitrack.py checks against built models), and the
    ladder sits between small-cpu and mamba-130m in non-embedding parameters."""
    from mamba_lm.mamba import MambaLMHeadModel, mamba_config
    from multitrack.multitrack_config import count_params, multitrack_config

    base_cfg = mamba_config(preset)
    base = MambaLMHeadModel(base_cfg, device="meta").num_params()
    emb = base_cfg.padded_vocab_size * base_cfg.d_model
    for name, overrides in _variants().items():
        n = count_params(multitrack_config(preset, **overrides))
        assert abs(n - base) / base < 0.01, (preset, name, n, base)
        assert abs(n - base) / (base - emb) < 0.01, (preset, name, n, base)
    non_emb = [MambaLMHeadModel(mamba_config(p), device="meta").num_params() - mamba_config(p).padded_vocab_size
               * mamba_config(p).d_model for p in ("small-cpu",) + LADDER + ("mamba-130m",)]
    assert non_emb == sorted(non_emb)


@pytest.mark.parametrize("path", sorted((ROOT / "plans").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_plans_validate(path):
    """Guards the plans in plans/: each parses and validates against the current train scripts and presets
    (optional arms may be skipped), and every run fits its plan's lease at the expected speed."""
    pl = P.load_plan(str(path), PRESETS)
    assert pl.queue() and pl.baseline in {a.name for a in pl.arms}
