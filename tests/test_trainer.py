"""The shared training loop: LR schedule, weight-decay groups, loss/eval, exact resume, safety refusals, CLI."""

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mamba_lm import trainer
from mamba_lm.checkpoint import load_checkpoint, save_checkpoint
from mamba_lm.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def builder(d_model=32, vocab_size=257):
    def build():
        from mamba_lm.mamba import mamba_config
        from mamba_lm.models import build_model
        return build_model("mamba", mamba_config("tiny", vocab_size=vocab_size, d_model=d_model))
    return build


def train_losses(out_dir):
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in rows if r["kind"] == "train"}


def test_lr_schedule():
    """Linear warmup to lr, cosine to min_lr at `total`, min_lr after; monotone decay after warmup."""
    lr, min_lr = 1e-3, 1e-5
    assert trainer.get_lr(0, 10, 100, lr, min_lr) == pytest.approx(1e-4)
    assert trainer.get_lr(9, 10, 100, lr, min_lr) == pytest.approx(lr)
    assert trainer.get_lr(55, 10, 100, lr, min_lr) == pytest.approx((lr + min_lr) / 2)
    assert trainer.get_lr(100, 10, 100, lr, min_lr) == pytest.approx(min_lr)
    assert trainer.get_lr(500, 10, 100, lr, min_lr) == min_lr
    decay = [trainer.get_lr(s, 10, 100, lr, min_lr) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_weight_decay_groups(tiny_model):
    """Decay exactly on 2-D Linear weights; embedding (tied lm_head), norms, biases, conv, A_log, D undecayed."""
    model = tiny_model()
    decay, no_decay = trainer.param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)].split(".")[-2] for p in decay["params"]}
    assert decayed == {"in_proj", "x_proj", "dt_proj", "out_proj"}
    undecayed = {names[id(p)] for p in no_decay["params"]}
    assert "backbone.embedding.weight" in undecayed and "backbone.norm_f.weight" in undecayed
    for suffix in ("A_log", "D", "conv1d.weight", "conv1d.bias", "dt_proj.bias", "norm.weight"):
        assert any(n.endswith(suffix) for n in undecayed), suffix
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    n_grouped = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n_grouped == model.num_params()  # tied lm_head counted once, nothing missing


def test_lm_loss_ignores_padded_logits():
    """Logits beyond the vocabulary (embedding padding) take no probability mass in the loss."""
    logits = torch.randn(2, 5, 8)
    targets = torch.randint(0, 6, (2, 5))
    padded = logits.clone()
    padded[..., 6:] = 50.0
    expected = torch.nn.functional.cross_entropy(logits[..., :6].reshape(-1, 6), targets.reshape(-1))
    assert torch.allclose(trainer.lm_loss(padded, targets, 6), expected)


def test_estimate_loss_is_token_mean(demo_data_dir, tiny_model):
    """estimate_loss = mean token CE over the given sequences, independent of the batch size."""
    from mamba_lm.data import TokenSplit
    split = TokenSplit(demo_data_dir, "val")
    model = tiny_model().eval()
    idx = np.array([0, 3, 5, 9, 11])
    x, y = split.get_batch(idx)
    with torch.no_grad():
        manual = trainer.lm_loss(model(x), y, 257).item()
    for bs in (1, 2, 8):
        assert trainer.estimate_loss(model, split, idx, batch_size=bs, vocab_size=257) == pytest.approx(manual, rel=1e-5)


def test_overfit_one_batch(demo_data_dir, tiny_model):
    """The model + loss + optimizer groups can memorise one batch: loss falls far below its start in 100 steps."""
    from mamba_lm.data import TokenSplit
    torch.manual_seed(0)
    model = tiny_model(d_model=48)
    x, y = TokenSplit(demo_data_dir, "train").get_batch(np.arange(4))
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "name"} for g in trainer.param_groups(model, 0.0)],
                            lr=1e-2)
    losses = []
    for _ in range(100):
        loss = trainer.lm_loss(model(x), y, 257)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"overfit: {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < 0.35 * losses[0]


def test_train_outputs_and_resume_is_exact(demo_data_dir, tmp_path, train_config):
    """N steps straight == N/2, stop (request_stop), resume N/2: identical losses and weights; all outputs written."""
    straight = trainer.train(train_config(demo_data_dir, tmp_path / "a", max_steps=6, eval_interval=3,
                                          tensorboard=True), builder(), script="test")
    assert straight["step"] == 6 and not straight["interrupted"]
    out = tmp_path / "a"
    for name in ("ckpt_latest.pt", "ckpt_best.pt", "metrics.jsonl", "log.txt", "epochs.md", "epochs.csv", "loss.png"):
        assert (out / name).exists(), name
    assert "| epoch | train loss | val loss | val ppl | minutes | tokens |" in (out / "epochs.md").read_text()
    assert "step 6/6" in (out / "log.txt").read_text()
    assert list((out / "tb").glob("events.out.tfevents.*"))

    def stop_at_3(model, step, out_dir):
        if step == 3:
            trainer.request_stop()
        return {"probe": 1.0}

    cfg_b = train_config(demo_data_dir, tmp_path / "b", max_steps=6, eval_interval=3)
    first = trainer.train(cfg_b, builder(), script="test", on_eval=stop_at_3)
    assert first["interrupted"] and first["step"] == 3
    assert load_checkpoint(tmp_path / "b" / "ckpt_latest.pt")["step"] == 3
    resumed = trainer.train({**cfg_b, "resume": True}, builder(), script="test")
    assert resumed["step"] == 6
    a, b = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert np.allclose([a[s] for s in a], [b[s] for s in a], rtol=0, atol=1e-6), (a, b)
    wa = load_checkpoint(tmp_path / "a" / "ckpt_latest.pt")["model"]
    wb = load_checkpoint(tmp_path / "b" / "ckpt_latest.pt")["model"]
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    assert resumed["val_loss"] == pytest.approx(straight["val_loss"], abs=1e-6)
    assert [r["step"] for r in resumed["history"]] == [6]  # one row per epoch, partial rows replaced
    assert resumed["history"][0]["val_loss"] == pytest.approx(straight["history"][0]["val_loss"], abs=1e-6)
    extended = trainer.train({**cfg_b, "resume": True, "max_steps": 8}, builder(), script="test")
    assert [r["step"] for r in extended["history"]] == [8]  # the earlier partial row of epoch 1 was replaced


def test_resume_errors_name_the_original_flags(demo_data_dir, tmp_path, train_config):
    """A resume that forgets the original --data_dir, model flags or --seq_len is refused, naming them;
    a missing --init_from path is named as such (not as a missing --ckpt)."""
    cfg = train_config(demo_data_dir, tmp_path / "r", max_steps=1, eval_interval=0, preset="orig", seq_len=64)
    trainer.train(cfg, builder(), script="test")
    with pytest.raises(UserError, match="different model.*original run's model flags \\(--preset=orig\\)"):
        trainer.train({**cfg, "resume": True, "preset": "other"}, builder(d_model=48), script="test")
    with pytest.raises(UserError, match="no prepared data.*resuming: repeat the original run's --data_dir"):
        trainer.train({**cfg, "resume": True, "data_dir": str(tmp_path / "elsewhere")}, builder(), script="test")
    with pytest.raises(UserError, match="sequences of 64 tokens, this run 32.*--seq_len=64"):
        trainer.train({**cfg, "resume": True, "seq_len": 32}, builder(), script="test")
    with pytest.raises(UserError, match="--init_from=.*nowhere.pt: no such file or folder"):
        trainer.train({**cfg, "out_dir": str(tmp_path / "ft"), "init_from": str(tmp_path / "nowhere.pt")},
                      builder(), script="test")


def test_hook_step_logs_follow_resume_and_overwrite(demo_data_dir, tmp_path, train_config):
    """A hook's own *.jsonl step log (like router_stats.jsonl) is cut back to the checkpoint's step on
    resume (no duplicated or stale rows) and deleted by a fresh --overwrite run, like metrics.jsonl; a last
    step that is also an eval_interval step is evaluated once, not twice."""
    log = tmp_path / "h" / "hook.jsonl"

    def on_eval(model, step, out_dir):
        with open(log, "a") as f:
            f.write(json.dumps({"step": step}) + "\n")
        if step == 2 and not stale:
            trainer.request_stop()
        return {}

    stale = False
    cfg = train_config(demo_data_dir, tmp_path / "h", max_steps=4, eval_interval=2)
    assert trainer.train(cfg, builder(), script="test", on_eval=on_eval)["step"] == 2
    with open(log, "a") as f:  # a row written after the checkpoint, e.g. by a session that then crashed
        f.write(json.dumps({"step": 3}) + "\n")
    stale = True
    trainer.train({**cfg, "resume": True}, builder(), script="test", on_eval=on_eval)
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == [2, 4]  # step 3 dropped; step 4 evaluated once (interval and run end coincide)
    trainer.train({**cfg, "overwrite": True, "max_steps": 2, "eval_interval": 0}, builder(), script="test",
                  on_eval=on_eval)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [2]


def test_refusals(demo_data_dir, tmp_path, train_config):
    """Existing checkpoint without resume/overwrite, different model on resume, tokenizer mismatch: clear errors."""
    cfg = train_config(demo_data_dir, tmp_path / "r", max_steps=2, eval_interval=0)
    trainer.train(cfg, builder(), script="test")
    with pytest.raises(UserError, match="already holds"):
        trainer.train(cfg, builder(), script="test")
    with pytest.raises(UserError, match="different model"):
        trainer.train({**cfg, "resume": True, "max_steps": 3}, builder(d_model=48), script="test")
    ckpt_path = tmp_path / "r" / "ckpt_latest.pt"
    ckpt = load_checkpoint(ckpt_path)
    from mamba_lm.tokenizer import train_demo_bpe
    ckpt["tokenizer"] = train_demo_bpe(["a tiny corpus for another tokenizer, not the bytes"] * 20, 300).to_dict()
    save_checkpoint(ckpt_path, ckpt)
    with pytest.raises(UserError, match="tokenizer mismatch"):
        trainer.train({**cfg, "resume": True, "max_steps": 3}, builder(), script="test")
    with pytest.raises(UserError, match="tokenizer mismatch"):  # fine-tuning from it is refused too
        trainer.train({**cfg, "out_dir": str(tmp_path / "ft"), "init_from": str(ckpt_path)}, builder(), script="test")
    done = trainer.train({**cfg, "overwrite": True}, builder(), script="test")  # explicit overwrite works
    assert done["step"] == 2 and load_checkpoint(ckpt_path)["tokenizer"]["sha256"] == "byte-v1"
    # init_from a checkpoint: starts at step 0 from its weights (same val loss before any step)
    ft = trainer.train({**cfg, "out_dir": str(tmp_path / "ft"), "init_from": str(ckpt_path), "max_steps": 1,
                        "lr": 0.0, "min_lr": 0.0}, builder(d_model=48), script="test")
    assert ft["step"] == 1 and "initialised from" in (tmp_path / "ft" / "log.txt").read_text()
    assert ft["val_loss_full"] == pytest.approx(done["val_loss_full"], abs=1e-6)


def test_nan_loss_stops_and_keeps_checkpoint(demo_data_dir, tmp_path, train_config, monkeypatch):
    """A NaN loss stops training with a clear error; the last good checkpoint is left untouched."""
    real = trainer.lm_loss
    calls = {"train": 0}

    def nan_after_5(logits, targets, vocab_size=None):
        loss = real(logits, targets, vocab_size)
        if torch.is_grad_enabled():
            calls["train"] += 1
            if calls["train"] > 5:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(trainer, "lm_loss", nan_after_5)
    cfg = train_config(demo_data_dir, tmp_path / "n", max_steps=10, eval_interval=4)
    with pytest.raises(trainer.TrainingDiverged, match="diverged at step 6.*intact"):
        trainer.train(cfg, builder(), script="test")
    ckpt = load_checkpoint(tmp_path / "n" / "ckpt_latest.pt")
    assert ckpt["step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_cli_sigterm_saves_and_resumes(demo_data_dir, tmp_path):
    """SIGTERM mid-run saves ckpt_latest.pt, then exits with status 143 (128 + SIGTERM, as shells expect
    from an interrupted job); --resume=True continues from it to the end."""
    out = tmp_path / "sig"
    args = ["train_baseline.py", "--preset=tiny", "--d_model=32", f"--data_dir={demo_data_dir}", f"--out_dir={out}",
            "--batch_size=2", "--max_steps=100000", "--eval_interval=0", "--log_interval=1", "--device=cpu",
            "--tensorboard=False"]
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    log = out / "log.txt"
    deadline = time.time() + 90
    while time.time() < deadline and not (log.exists() and "step 3/" in log.read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr, stderr
    ckpt = load_checkpoint(out / "ckpt_latest.pt")
    assert ckpt["step"] >= 3 and "stopped by signal" in log.read_text()
    r = run_cli(*args[:-5], f"--max_steps={ckpt['step'] + 2}", "--eval_interval=0", "--log_interval=1",
                "--device=cpu", "--tensorboard=False", "--resume=True")
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(out / "ckpt_latest.pt")["step"] == ckpt["step"] + 2


def test_cli_smoke_train_then_generate(demo_data_dir, tmp_path):
    """train_baseline.py (5 steps) then generate_text.py on its checkpoint writes the sample markdown."""
    out = tmp_path / "smoke"
    r = run_cli("train_baseline.py", "--preset=tiny", f"--data_dir={demo_data_dir}", f"--out_dir={out}",
                "--batch_size=2", "--max_steps=5", "--eval_interval=5", "--eval_max_batches=4", "--device=cpu")
    assert r.returncode == 0, r.stderr
    assert math.isfinite(load_checkpoint(out / "ckpt_best.pt")["metrics"]["val_loss"])
    r = run_cli("generate_text.py", f"--ckpt={out / 'ckpt_best.pt'}", "--max_new_tokens=10", "--num_samples=1",
                f"--generations_dir={tmp_path / 'gen'}", "--device=cpu")
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "gen").glob("generations_*.md"))) == 1


def test_cli_bad_key_and_missing_data(tmp_path):
    """Unknown key or missing data dir: one line `error: ...`, exit 2, no traceback."""
    for arg in ("--learning_rate=1e-3", f"--data_dir={tmp_path / 'none'}"):
        r = run_cli("train_baseline.py", arg, f"--out_dir={tmp_path / 'o'}", "--device=cpu", timeout=60)
        assert r.returncode == 2 and r.stderr.strip().startswith("error:") and "Traceback" not in r.stderr, r.stderr


def test_train_scripts_share_their_defaults():
    """The one set of defaults: both train scripts define every key the trainer requires, and each shared key
    (all but out_dir, which names each script's own run folder) with the same value and the same comment, so
    the two copies a user edits cannot drift apart silently; every constant outside a script's `# model`
    section is a trainer key (a new loop setting goes to both scripts and to TRAIN_KEYS)."""
    from conftest import script_constants

    scripts = {name: script_constants(ROOT / name) for name in ("train_baseline.py", "train_multitrack.py")}
    for name, constants in scripts.items():
        assert set(trainer.TRAIN_KEYS) <= set(constants), (name, set(trainer.TRAIN_KEYS) - set(constants))
        source = (ROOT / name).read_text().splitlines()
        model_section = source.index("# model"), source.index("# data and output")
        model_keys = {line.split(" = ")[0] for line in source[model_section[0]:model_section[1]] if " = " in line}
        assert set(constants) - model_keys == set(trainer.TRAIN_KEYS), name
    base, multi = scripts.values()
    drifted = [k for k in trainer.TRAIN_KEYS if k != "out_dir" and base[k] != multi[k]]
    assert not drifted, {k: (base[k], multi[k]) for k in drifted}


def test_config_without_every_key_is_refused(demo_data_dir, tmp_path, train_config):
    """The trainer has no defaults of its own: a config missing a key is an error naming it, not a silent default."""
    cfg = train_config(demo_data_dir, tmp_path / "m")
    del cfg["grad_clip"], cfg["eval_batches"]
    with pytest.raises(UserError, match="lacks grad_clip, eval_batches"):
        trainer.train(cfg, builder(), script="test")
    assert not (tmp_path / "m").exists()


# ----------------------------------------------------------------------------------------------
# hardening: validate before acting, never call a broken result good, survive what kills leave behind


def snapshot(folder: Path) -> dict:
    """{relative path: bytes} of every file under `folder`."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("bad", [
    {"batch_size": 0}, {"batch_size": -2, "grad_accum": -1}, {"grad_accum": 0}, {"log_interval": 0}, {"lr": -1.0},
    {"lr": float("nan")}, {"min_lr": 1e-2}, {"eval_batches": 0}, {"beta2": 1.0}, {"warmup_frac": 2.0},
    {"seed": -1}, {"batch_size": True}, {"epochs": -1}, {"resume": True, "overwrite": True}, {"out_dir": "."},
], ids=lambda bad: ",".join(f"{k}={v}" for k, v in bad.items()))
def test_out_of_range_config_is_refused_before_any_work(demo_data_dir, tmp_path, train_config, bad):
    """The trainer's own invariants hold for Python callers too: each bad value is a UserError naming the flag,
    raised before the out_dir is created (no ZeroDivisionError, no 'training' with loss 0.0, no ckpt_best)."""
    cfg = {**train_config(demo_data_dir, tmp_path / "o"), **bad}
    with pytest.raises(UserError, match="--(" + "|".join(bad) + ")"):
        trainer.train(cfg, builder(), script="test")
    assert not (tmp_path / "o").exists()


def test_empty_eval_is_an_error_not_a_loss_of_zero(demo_data_dir, tiny_model):
    """An evaluation over zero sequences measures nothing: estimate_loss refuses it instead of returning 0.0
    (the loop's evals refuse it too: eval_batches=0 is out of range, above)."""
    from mamba_lm.data import TokenSplit
    with pytest.raises(UserError, match="zero sequences"):
        trainer.estimate_loss(tiny_model(), TokenSplit(demo_data_dir, "val"), np.arange(0))


def test_overwrite_deletes_nothing_when_a_later_input_is_bad(demo_data_dir, tmp_path, train_config):
    """--overwrite=True with a mistyped --init_from, a bad preset (build_model fails) or a resume-less run whose
    data dir is missing is refused with every file of the old run byte-identical: the run validates all its
    inputs and builds the model before it deletes anything."""
    cfg = train_config(demo_data_dir, tmp_path / "old", max_steps=2, eval_interval=0, tensorboard=True)
    trainer.train(cfg, builder(), script="test")
    before = snapshot(tmp_path / "old")
    assert "ckpt_latest.pt" in before and any(k.startswith("tb/") for k in before)

    def bad_preset():
        raise UserError("unknown preset 'tinny'; choose one of tiny, small-cpu, mamba-130m")

    attempts = [({"init_from": str(tmp_path / "typo.pt")}, builder(), "no such file"),
                ({}, bad_preset, "unknown preset"),
                ({"data_dir": str(tmp_path / "nodata")}, builder(), "no prepared data")]
    for overrides, build, message in attempts:
        with pytest.raises(UserError, match=message):
            trainer.train({**cfg, "overwrite": True, **overrides}, build, script="test")
        assert snapshot(tmp_path / "old") == before, overrides


def test_nan_eval_saves_nothing_and_names_the_intact_step(demo_data_dir, tmp_path, train_config, monkeypatch):
    """A NaN val loss at an eval stops the run without replacing ckpt_latest.pt or ckpt_best.pt (both stay
    byte-identical to the step-4 files), and the message names step 4, the checkpoint that really is intact."""
    real = trainer.loss_sums
    files = {}

    def nan_from_step_8(model, split, idx, **kw):
        total, count = real(model, split, idx, **kw)
        return (float("nan"), count) if files else (total, count)

    def on_eval(model, step, out_dir):
        if step == 8:  # before the step-8 val loss: what is on disk is the step-4 checkpoints
            files.update({n: (tmp_path / "n" / n).read_bytes() for n in ("ckpt_latest.pt", "ckpt_best.pt")})
        return {}

    monkeypatch.setattr(trainer, "loss_sums", nan_from_step_8)
    cfg = train_config(demo_data_dir, tmp_path / "n", max_steps=12, eval_interval=4)
    with pytest.raises(trainer.TrainingDiverged, match=r"val loss is nan at the eval of step 8.*ckpt_latest\.pt "
                                                       r"\(step 4\) is intact"):
        trainer.train(cfg, builder(), script="test", on_eval=on_eval)
    assert files and all((tmp_path / "n" / n).read_bytes() == b for n, b in files.items())
    assert load_checkpoint(tmp_path / "n" / "ckpt_latest.pt")["step"] == 4


def test_resume_drops_a_log_line_cut_by_a_kill(demo_data_dir, tmp_path, train_config):
    """A kill in the middle of a log write leaves a half line: the resume drops it (metrics.jsonl, a hook's
    *.jsonl, log.txt), says so once, and goes on; a broken line that is not the last is refused, naming it."""
    out = tmp_path / "c"

    def stop_at_2(model, step, out_dir):
        if step == 2:
            trainer.request_stop()
        return {}

    cfg = train_config(demo_data_dir, out, max_steps=4, eval_interval=2)
    trainer.train(cfg, builder(), script="test", on_eval=stop_at_2)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 3, "train_lo')
    (out / "hook.jsonl").write_text('{"step": 1}\n{"step": 2, "x": [1, 2')
    with open(out / "log.txt", "a") as f:
        f.write("step 3/4 | epoch 1 | lo")
    done = trainer.train({**cfg, "resume": True}, builder(), script="test")
    assert done["step"] == 4
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]  # all whole rows
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4]
    assert (out / "hook.jsonl").read_text() == '{"step": 1}\n'
    log = (out / "log.txt").read_text()
    assert log.count("dropped the half-written last line of hook.jsonl, metrics.jsonl, log.txt") == 1
    assert "| lo\n" not in log and "| lostep" not in log
    (out / "hook.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(UserError, match=r"hook\.jsonl line 2 is not a JSON row"):
        trainer.train({**cfg, "resume": True, "max_steps": 5}, builder(), script="test")


def test_next_run_removes_only_the_leftovers_of_killed_writes(demo_data_dir, tmp_path, train_config):
    """Temporary files that a SIGKILL between write and rename leaves (checkpoint, step log, table, plot) are
    removed by the next run in the same out_dir; files that merely look similar are kept."""
    out = tmp_path / "l"
    cfg = train_config(demo_data_dir, out, max_steps=2, eval_interval=0)
    trainer.train(cfg, builder(), script="test")
    leftovers = [".ckpt_latest.pt.tmp4242", ".ckpt_best.pt.tmp7", ".metrics.jsonl.tmp", ".epochs.csv.tmp99",
                 ".loss.tmp12.png"]
    kept = ["ckpt_latest.pt.tmp4242", ".notes.tmp1", "mine.pt", ".ckpt_latest.pt.bak"]
    for name in leftovers + kept:
        (out / name).write_bytes(b"partial")
    trainer.train({**cfg, "resume": True, "max_steps": 3}, builder(), script="test")
    assert not [n for n in leftovers if (out / n).exists()]
    assert all((out / n).read_bytes() == b"partial" for n in kept)
    assert "removed 5 temporary file(s) left by a killed write" in (out / "log.txt").read_text()


def test_full_disk_while_checkpointing_is_one_line(demo_data_dir, tmp_path, train_config, monkeypatch):
    """ENOSPC while writing a checkpoint: a UserError that says "no space left on device" and the path; the
    temporary file is gone."""
    import errno

    def full_disk(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    cfg = train_config(demo_data_dir, tmp_path / "f", max_steps=2, eval_interval=0)
    with pytest.raises(UserError, match=r"no space left on device while writing .*ckpt_latest\.pt") as e:
        trainer.train(cfg, builder(), script="test")
    assert "\n" not in str(e.value)
    assert not list((tmp_path / "f").glob(".*tmp*"))


def test_cpu_runs_compile_the_scan_only_when_it_pays(monkeypatch, tiny_model):
    """trainer.choose_cpu_scan: a CPU run whose scan work (tokens x Σ numel(A_log)) reaches
    CPU_SCAN_COMPILE_WORK takes the compiled scan, a shorter one the eager scan; a set
    MAMBA_NARRATIVE_CPU_SCAN (as the test suite sets it) or a GPU leaves the choice alone."""
    from mamba_lm import ops
    from mamba_lm.trainer import CPU_SCAN_COMPILE_WORK, choose_cpu_scan
    monkeypatch.setattr(ops, "_cpu_scan", "eager")                 # restored after the test
    model = tiny_model()
    per_token = sum(p.numel() for n, p in model.named_parameters() if n.endswith("A_log"))
    enough = int(CPU_SCAN_COMPILE_WORK // per_token) + 1
    cpu = torch.device("cpu")
    choose_cpu_scan(model, cpu, enough)
    assert ops.cpu_scan() == "eager"                                # the suite's MAMBA_NARRATIVE_CPU_SCAN decides
    monkeypatch.delenv("MAMBA_NARRATIVE_CPU_SCAN", raising=False)
    choose_cpu_scan(model, cpu, enough)
    assert ops.cpu_scan() == "compiled"
    choose_cpu_scan(model, cpu, enough - 2)
    assert ops.cpu_scan() == "eager"
    choose_cpu_scan(model, torch.device("meta"), enough)           # not a CPU run: untouched
    assert ops.cpu_scan() == "eager"
