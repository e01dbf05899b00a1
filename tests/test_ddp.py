"""Data parallelism: the global batch is what matters, not how it is split (grad_accum, DDP over gloo)."""

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

ROOT = Path(__file__).resolve().parents[1]


def build():
    from mamba_lm.mamba import mamba_config
    from mamba_lm.models import build_model
    return build_model("mamba", mamba_config("tiny", vocab_size=257, d_model=32))


def train_losses(out_dir):
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in rows if r["kind"] == "train"]


def assert_same_run(a, b, atol=1e-5):
    la, lb = train_losses(a), train_losses(b)
    assert len(la) == len(lb) == 4
    assert np.allclose(la, lb, rtol=0, atol=atol), (la, lb)
    wa, wb = (load_checkpoint(Path(d) / "ckpt_latest.pt")["model"] for d in (a, b))
    assert all(torch.allclose(wa[k], wb[k], atol=atol) for k in wa)


def test_grad_accum_matches_one_big_batch(demo_data_dir, tmp_path, train_config):
    """batch_size=2 x grad_accum=2 trains like batch_size=4 x 1 (same global batch, same losses and weights)."""
    trainer.train(train_config(demo_data_dir, tmp_path / "big", batch_size=4, max_steps=4, eval_interval=0),
                  build, script="test")
    trainer.train(train_config(demo_data_dir, tmp_path / "acc", batch_size=2, grad_accum=2, max_steps=4,
                               eval_interval=0), build, script="test")
    assert_same_run(tmp_path / "big", tmp_path / "acc")


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_gloo_processes_match_single(demo_data_dir, tmp_path, train_config, fsdp):
    """torchrun with 2 CPU (gloo) processes (DDP, or FSDP2 fully_shard), each on half of every global batch,
    matches one process: same losses, same final weights (gathered into a plain checkpoint)."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    trainer.train(train_config(demo_data_dir, tmp_path / "single", batch_size=4, max_steps=4, eval_interval=0),
                  build, script="train_baseline.py")
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_baseline.py", f"--fsdp={fsdp}",
            "--preset=tiny",
            "--d_model=32", f"--data_dir={demo_data_dir}", f"--out_dir={tmp_path / 'ddp'}", "--batch_size=4",
            "--epochs=1", "--max_steps=4", "--eval_interval=0", "--eval_batches=2", "--log_interval=1",
            "--lr=3e-3", "--warmup_steps=2", "--device=cpu", "--dtype=float32", "--tensorboard=False"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "x2" + (" fsdp" if fsdp else "") in (tmp_path / "ddp" / "log.txt").read_text()  # really 2 processes
    assert_same_run(tmp_path / "single", tmp_path / "ddp")
