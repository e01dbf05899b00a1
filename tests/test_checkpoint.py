"""Checkpoints: atomic writes, weights_only loading, strict model rebuild, RNG state round trip."""

import random

import numpy as np
import pytest
import torch

from mamba_lm.checkpoint import FORMAT, load_checkpoint, model_from_checkpoint, rng_state, save_checkpoint, set_rng_state
from mamba_lm.errors import UserError
from mamba_lm.weights import load_weights


def make_ckpt(model, step=1):
    from mamba_lm.models import model_config_dict
    from mamba_lm.tokenizer import load_tokenizer
    return {"model_type": "mamba", "model_config": model_config_dict(model), "model": model.state_dict(),
            "optimizer": None, "train_config": {"lr": 1e-3}, "tokenizer": load_tokenizer("byte").to_dict(),
            "data": {"dir": "d", "fingerprint": "f", "seq_len": 32}, "step": step, "epoch": 0, "step_in_epoch": step,
            "tokens_seen": 0, "best_val_loss": float("inf"), "metrics": {}, "rng": rng_state(), "history": []}


def test_atomic_write_keeps_old_checkpoint(tmp_path, tiny_model, monkeypatch):
    """A crash in the middle of torch.save leaves the previous checkpoint intact and no temp file behind."""
    path = tmp_path / "ckpt_latest.pt"
    save_checkpoint(path, make_ckpt(tiny_model(), step=1))
    real_save = torch.save

    def crashing_save(obj, f, *args, **kwargs):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError):
        save_checkpoint(path, make_ckpt(tiny_model(), step=2))
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt_latest.pt"]


def test_weights_only_load_and_strict_rebuild(tmp_path, tiny_model):
    """The file loads with torch.load(weights_only=True) and rebuilds a model with identical logits."""
    model = tiny_model().eval()
    path = tmp_path / "c.pt"
    save_checkpoint(path, make_ckpt(model))
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == FORMAT and raw["created"]
    rebuilt, ckpt = model_from_checkpoint(path)
    x = torch.randint(0, 257, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))
    m2, tok, info = load_weights(path)
    assert tok.kind == "byte" and info["num_params"] == model.num_params() and info["step"] == 1


def test_mmap_load_gives_the_same_checkpoint(tmp_path, tiny_model):
    """load_checkpoint(mmap=True) (evaluate.py's tokenizer precheck) returns the same metadata and weights
    as a full read, and a corrupt file is the same one-line UserError."""
    model = tiny_model()
    path = tmp_path / "c.pt"
    save_checkpoint(path, make_ckpt(model))
    full, mapped = load_checkpoint(path), load_checkpoint(path, mmap=True)
    assert mapped["tokenizer"] == full["tokenizer"] and mapped["model_config"] == full["model_config"]
    assert all(torch.equal(mapped["model"][k], v) for k, v in full["model"].items())
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="corrupt"):
        load_checkpoint(tmp_path / "junk.pt", mmap=True)


def test_load_errors_are_user_errors(tmp_path, tiny_model):
    """Missing, corrupt, foreign-format and mismatched-weights checkpoints give a clear UserError."""
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="corrupt"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not a mamba-narrative checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    ckpt = make_ckpt(tiny_model())
    ckpt["model_config"] = {**ckpt["model_config"], "d_model": 48}
    with pytest.raises(UserError, match="do not fit"):
        model_from_checkpoint(ckpt)


def test_compiled_and_ddp_prefixes_are_stripped(tiny_model):
    """State dicts saved from torch.compile / DDP wrappers load into a plain model."""
    model = tiny_model()
    ckpt = make_ckpt(model)
    ckpt["model"] = {"_orig_mod.module." + k: v for k, v in ckpt["model"].items()}
    rebuilt, _ = model_from_checkpoint(ckpt)
    assert torch.equal(rebuilt.lm_head.weight, model.lm_head.weight)


def test_rng_state_round_trip(tmp_path):
    """RNG states survive a weights_only save/load and reproduce the same torch/numpy/python draws."""
    torch.manual_seed(3); np.random.seed(3); random.seed(3)
    save_checkpoint(tmp_path / "r.pt", {"rng": rng_state()})
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99); np.random.seed(99); random.seed(99)
    set_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]
