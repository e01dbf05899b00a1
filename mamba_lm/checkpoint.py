"""Self-describing repo checkpoints: atomic save, safe load, model from checkpoint, RNG states.

A checkpoint is one `*.pt` file holding a plain dict (tensors, dicts, lists, str, int, float,
bool, None only), so it loads with `torch.load(path, weights_only=True)`:

    {"format": "mamba-narrative-ckpt/1", "model_type": "mamba"|"multitrack", "model_config": dict,
     "model": state_dict, "optimizer": state_dict|None, "train_config": dict,
     "tokenizer": TextTokenizer.to_dict(), "data": {"dir", "fingerprint", "seq_len"},
     "step", "epoch", "step_in_epoch", "tokens_seen", "best_val_loss", "metrics", "rng",
     "history", "created", "script", ...}

The model is rebuilt from `model_type` + `model_config` alone (nanoGPT `sample.py`), and the
tokenizer from `tokenizer` (it carries the tokenizer.json text), so a checkpoint needs neither the
data dir nor the training script to generate text.

Writes are atomic: the dict is saved to a temporary file in the same directory, fsynced, then
`os.replace`d over the target, so a crash mid-write leaves the previous checkpoint intact.

This module reads and writes repo `.pt` files only. Loading any of the three weight forms (repo .pt,
Hugging Face folder, mamba-ssm folder) into (model, tokenizer, info) is mamba_lm/weights.py.
"""

from __future__ import annotations

import datetime
import random
from pathlib import Path

import numpy as np
import torch

from mamba_lm.errors import UserError, torch_load_problem, unpickling_refused
from mamba_lm.models import build_model
from mamba_lm.runtime import atomic_torch_save

FORMAT = "mamba-narrative-ckpt/1"


def save_checkpoint(path, ckpt: dict) -> None:
    """Write `ckpt` to `path` atomically (runtime.atomic_torch_save); the old file survives a crash."""
    atomic_torch_save(path, {"format": FORMAT, "created": now_iso(), **ckpt})


def load_checkpoint(path, map_location="cpu", mmap: bool = False) -> dict:
    """Load a repo checkpoint safely (weights_only=True). UserError if missing, corrupt or foreign.

    mmap=True maps the file instead of reading it: tensors are read only when touched, so a caller
    that wants the metadata (config, tokenizer, step) of a large checkpoint reads little of it.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found; train one with train_baseline.py or pass --ckpt=<path to a .pt>")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # truncated file, pickle with foreign objects, not a torch file at all
        refused = unpickling_refused(e)
        if refused:
            raise UserError(f"cannot read checkpoint {path}: {refused}; load only checkpoints written by this "
                            "repository (plain tensors and containers)") from None
        raise UserError(f"cannot read checkpoint {path} ({torch_load_problem(e)}); it is corrupt or not a "
                        "mamba-narrative checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(f"{path} is not a mamba-narrative checkpoint (format {found!r}, expected {FORMAT!r})")
    return ckpt


def clean_state_dict(state_dict: dict) -> dict:
    """Strip wrapper prefixes (`_orig_mod.` from torch.compile, `module.` from DDP) from the keys."""
    out = {}
    for k, v in state_dict.items():
        for prefix in ("_orig_mod.", "module."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k.replace("._orig_mod.", ".")] = v
    return out


def model_from_checkpoint(ckpt_or_path, device="cpu"):
    """Rebuild the model from the checkpoint alone (model_type + model_config), load weights strictly.

    Returns (model, ckpt); the model is in eval mode on `device`. A model type that is not registered
    (mamba_lm.models) is a UserError naming the package to import.
    """
    ckpt = ckpt_or_path if isinstance(ckpt_or_path, dict) else load_checkpoint(ckpt_or_path)
    try:
        model = build_model(ckpt["model_type"], ckpt["model_config"], device="cpu")
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"cannot rebuild model_type={ckpt.get('model_type')!r} from the checkpoint's model_config ({e})")
    missing, unexpected = _load_strict(model, clean_state_dict(ckpt["model"]))
    if missing or unexpected:
        raise UserError(f"checkpoint weights do not fit model_type={ckpt['model_type']!r}: "
                        f"missing {missing[:4]}, unexpected {unexpected[:4]}")
    return model.to(device).eval(), ckpt


def _load_strict(model, state_dict):
    """load_state_dict that reports missing/unexpected keys and shape mismatches as a UserError."""
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:  # size mismatch
        first = str(e).strip().splitlines()
        raise UserError(f"checkpoint weights do not fit the model: {' '.join(first[-1:])[:300]}")
    return list(result.missing_keys), list(result.unexpected_keys)


# ----------------------------------------------------------------------------------------------
# RNG states in weights_only-safe form (tensors and plain Python values only)

def rng_state() -> dict:
    """torch / cuda / numpy / python RNG states as tensors and lists (loadable with weights_only=True)."""
    np_state = np.random.get_state()  # ('MT19937', uint32[624], pos, has_gauss, cached_gaussian)
    py_state = random.getstate()      # (version, tuple of 625 ints, gauss_next)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss_next": py_state[2]},
    }


def set_rng_state(state: dict) -> None:
    """Inverse of `rng_state` (cuda states restored only when the device count matches)."""
    if not state:
        return
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
    n = state.get("numpy")
    if n:
        np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
    p = state.get("python")
    if p:
        random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


def now_iso() -> str:
    """The current UTC time as ISO 8601 to the second ("2026-12-06T03:20:56+00:00")."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
