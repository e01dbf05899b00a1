"""Stateful training through the shared trainer (`--stateful=True`, mamba_lm/stream_training.py): exact resume,
independence of grad_accum and of the number of DDP processes, the carried-state eval, long windows in both
modes, and the refusals (mode switch on resume, --compile)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mamba_lm import trainer
from mamba_lm.checkpoint import load_checkpoint
from mamba_lm.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def build():
    from mamba_lm.mamba import mamba_config
    from mamba_lm.models import build_model
    return build_model("mamba", mamba_config("tiny", vocab_size=257, d_model=32))


def rows(out_dir, kind):
    return [r for r in (json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == kind]


def losses(out_dir):
    return {r["step"]: r["train_loss"] for r in rows(out_dir, "train")}


def assert_same_run(a, b, steps, atol=1e-5):
    la, lb = losses(a), losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, steps + 1))
    assert np.allclose([la[s] for s in la], [lb[s] for s in la], rtol=0, atol=atol), (la, lb)
    ca, cb = (load_checkpoint(Path(d) / "ckpt_latest.pt") for d in (a, b))
    assert all(torch.allclose(ca["model"][k], cb["model"][k], atol=atol) for k in ca["model"])
    assert ca["carried"]["streams"] == cb["carried"]["streams"]
    for x, y in zip(ca["carried"]["state"], cb["carried"]["state"]):
        assert torch.allclose(x.float(), y.float(), atol=atol)


def test_stateful_run_logs_carried_eval_and_resumes_exactly(demo_data_dir, tmp_path, train_config):
    """Guards exact resume of a stateful run: 6 steps straight == 3 steps, stop, resume 3 (same losses, weights,
    stream positions and carried states); the eval logs the carried-state val loss and the same windows from a
    zero state (metrics.jsonl keys and log line); the header says stateful; peak memory is logged; the
    carried state is nonzero and detached in the checkpoint."""
    cfg = train_config(demo_data_dir, tmp_path / "a", max_steps=6, eval_interval=3, stateful=True)
    trainer.train(cfg, build, script="test")
    log = (tmp_path / "a" / "log.txt").read_text()
    assert "stateful: 4 rows each read whole books" in log and "memory after the first step" in log
    assert " | carried " in log and "vs window reset" in log
    evals = rows(tmp_path / "a", "eval")
    assert evals and all(np.isfinite(r["val_loss_carried"]) and np.isfinite(r["val_loss_window_reset"]) for r in evals)
    assert evals[-1]["val_loss_carried"] != evals[-1]["val_loss_window_reset"]
    assert rows(tmp_path / "a", "memory")[0]["peak_bytes"] > 0
    ckpt = load_checkpoint(tmp_path / "a" / "ckpt_latest.pt")
    assert ckpt["carried"]["streams"]["windows"] == 6
    assert any(t.is_floating_point() and t.abs().sum() > 0 for t in ckpt["carried"]["state"])

    def stop_at_3(model, step, out_dir):
        if step == 3:
            trainer.request_stop()
        return {}

    cfg_b = {**cfg, "out_dir": str(tmp_path / "b")}
    first = trainer.train(cfg_b, build, script="test", on_eval=stop_at_3)
    assert first["interrupted"] and first["step"] == 3
    trainer.train({**cfg_b, "resume": True}, build, script="test")
    assert_same_run(tmp_path / "a", tmp_path / "b", 6, atol=1e-6)
    with pytest.raises(UserError, match="stateful"):
        trainer.train({**cfg_b, "resume": True, "stateful": False, "max_steps": 8}, build, script="test")


def test_stateful_grad_accum_matches_one_big_batch(demo_data_dir, tmp_path, train_config):
    """Guards the row layout: batch_size=2 x grad_accum=2 (two micro-batches, each its own rows and cache)
    trains like batch_size=4 x 1 in stateful mode: same losses, weights, positions and carried states."""
    for name, bs, acc in (("big", 4, 1), ("acc", 2, 2)):
        trainer.train(train_config(demo_data_dir, tmp_path / name, batch_size=bs, grad_accum=acc, max_steps=4,
                                   eval_interval=0, stateful=True), build, script="test")
    assert_same_run(tmp_path / "big", tmp_path / "acc", 4)


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_stateful_two_gloo_processes_match_single(demo_data_dir, tmp_path, train_config, fsdp):
    """Guards stateful DDP / FSDP: torchrun with 2 CPU (gloo) processes, each running its own 2 rows with their
    own carried state, gives the single-process losses, weights, and (gathered) carried states."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    trainer.train(train_config(demo_data_dir, tmp_path / "single", batch_size=4, max_steps=4, eval_interval=0,
                               stateful=True), build, script="train_baseline.py")
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_baseline.py", "--preset=tiny",
            "--d_model=32", f"--data_dir={demo_data_dir}", f"--out_dir={tmp_path / 'ddp'}", "--batch_size=4",
            "--epochs=1", "--max_steps=4", "--eval_interval=0", "--eval_batches=2", "--log_interval=1",
            "--lr=3e-3", "--warmup_steps=2", "--device=cpu", "--dtype=float32", "--tensorboard=False",
            "--stateful=True", f"--fsdp={fsdp}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "x2" + (" fsdp" if fsdp else "") in (tmp_path / "ddp" / "log.txt").read_text()
    assert_same_run(tmp_path / "single", tmp_path / "ddp", 4)


@pytest.mark.parametrize("stateful", [False, True])
def test_long_windows_on_the_same_data(demo_data_dir, tmp_path, train_config, stateful):
    """Guards --seq_len beyond the prepared one (128 on data prepared at 32: re-windowed, nothing re-tokenised)
    in both modes: the run trains, logs 128-token windows and the peak memory, and evaluates."""
    cfg = train_config(demo_data_dir, tmp_path / "long", seq_len=128, batch_size=2, max_steps=2, eval_interval=0,
                       eval_batches=1, stateful=stateful)
    result = trainer.train(cfg, build, script="test")
    assert result["step"] == 2 and np.isfinite(result["val_loss"])
    mem = rows(tmp_path / "long", "memory")[0]
    assert mem["seq_len"] == 128 and mem["tokens_per_step"] == 256 and mem["peak_bytes"] > 0
    assert load_checkpoint(tmp_path / "long" / "ckpt_latest.pt")["data"]["seq_len"] == 128


def test_stateful_refusals(demo_data_dir, tmp_path, train_config):
    """Guards the up-front checks: --stateful with --compile, and more rows than train books, are refused before
    anything is written."""
    with pytest.raises(UserError, match="compile"):
        trainer.train(train_config(demo_data_dir, tmp_path / "c", stateful=True, compile=True), build, script="test")
    with pytest.raises(UserError, match="books"):
        trainer.train(train_config(demo_data_dir, tmp_path / "r", stateful=True, batch_size=8), build, script="test")
    assert not (tmp_path / "c").exists() and not (tmp_path / "r").exists()
