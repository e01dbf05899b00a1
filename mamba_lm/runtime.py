"""Run-time helpers every script shares: device, dtype, autocast, atomic file writes, parameter counts.

    resolve_device("auto" | "cpu" | "cuda" | "cuda:N") -> torch.device   (UserError without CUDA)
    resolve_dtype("auto" | "float32" | "bfloat16" | "float16", device) -> torch.dtype
    autocast(device, dtype)             mixed-precision context (nothing for float32)
    atomic_path(path, keep_suffix=False)  context manager: write to the yielded tmp path, renamed on success
    atomic_write_bytes / atomic_write_text / atomic_write_json / atomic_torch_save (path, ...)
    replace_folder(tmp, dest)           rename a finished folder into place, the old one removed last
    count_params(model) -> int          distinct parameters (a tied embedding / head counted once)

Atomic writes: the data goes to `.{name}.tmp{pid}` in the target's directory, is fsynced, then
`os.replace`d over the target (and the directory fsynced), so a crash mid-write leaves the previous
file intact and never a half-written one. With keep_suffix=True the tmp name is `.{stem}.tmp{pid}{suffix}`,
for writers that infer the format from the suffix (matplotlib's savefig). mamba_lm/rundir.py knows
both patterns (leftovers of a killed run).

This module imports nothing of the project but `errors`: it is the bottom layer (CONTRACTS.md "Layers").
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch
import torch.nn as nn

from mamba_lm.errors import UserError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


# -----------------------------------------------------------------------------
# device and precision

def resolve_device(device: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; UserError for a CUDA device on a machine without one."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device={device} but CUDA is not available here; use --device=cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Autocast dtype: auto -> bfloat16 on CUDA (fp16 if bf16 is unsupported), float32 on CPU."""
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in DTYPES:
        raise UserError(f"--dtype={dtype} is not one of auto, float32, bfloat16, float16")
    if device.type != "cuda" and DTYPES[dtype] == torch.float16:
        raise UserError("--dtype=float16 needs CUDA; use float32 or bfloat16 on CPU")
    return DTYPES[dtype]


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision context: torch.autocast for bf16/fp16, nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def count_params(model: nn.Module) -> int:
    """Number of distinct parameters (the model's own num_params() when it has one: tied weights once)."""
    if hasattr(model, "num_params"):
        return int(model.num_params())
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# -----------------------------------------------------------------------------
# atomic writes

@contextlib.contextmanager
def atomic_path(path, keep_suffix: bool = False, fsync: bool = True):
    """Yield a tmp path next to `path`; on a clean exit it is fsynced and renamed over `path`.

    On an exception the tmp file is removed and `path` is untouched. The parent folder is created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    name = f".{path.stem}.tmp{os.getpid()}{path.suffix}" if keep_suffix else f".{path.name}.tmp{os.getpid()}"
    tmp = path.with_name(name)
    try:
        yield tmp
        if fsync:
            _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        _fsync_dir(path.parent)


def atomic_write_bytes(path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path, text: str) -> Path:
    """`path.write_text(text)` (utf-8), atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path, data, **dumps_kwargs) -> Path:
    """`json.dumps(data, **dumps_kwargs)` to `path`, atomically."""
    return atomic_write_text(path, json.dumps(data, **dumps_kwargs))


def atomic_torch_save(path, obj) -> Path:
    """`torch.save(obj)` to `path`, atomically (the previous file survives a crash mid-write)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
    return Path(path)


def replace_folder(tmp, dest) -> None:
    """Rename the finished folder `tmp` to `dest`; an old `dest` is moved aside first and removed last,
    so at every moment either the old or the new folder is complete under `dest`'s name."""
    tmp, dest = Path(tmp), Path(dest)
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
