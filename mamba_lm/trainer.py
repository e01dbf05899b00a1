"""The training loop shared by train_baseline.py and train_multitrack.py, and its pieces.

    param_groups(model, weight_decay)            AdamW groups: decay only 2-D weights of nn.Linear
    get_lr(step, warmup, total, lr, min_lr)      linear warmup, then cosine decay to min_lr
    lm_loss(logits, targets, vocab_size)         mean token cross-entropy, padded logits cut off
    estimate_loss(model, split, seq_indices,...) mean token CE over given sequences, one process (tests, notebooks;
                                                 the loop's evals shard `loss_sums` over ranks)
    check_config(config)                         every TRAIN_KEYS key present, each in the trainer's range
    train(config, build_model, *, script, on_eval=None, on_end=None) -> final metrics
        setup(cfg, build_model, script, dist)    validate every input, build the model; only then touch out_dir
        loop(run, state, on_eval, on_end)        the loop: get batch, forward, loss, backward, clip, step, log,
                                                 eval, checkpoint; `Run` holds what setup fixed, `RunState` the
                                                 counters a checkpoint saves

One optimizer step consumes a *global batch* of `batch_size * grad_accum` sequences of `seq_len`
tokens (the reference run: 8 x 1024), taken in the epoch's deterministic order
(`data.epoch_order(num_sequences, epoch, seed)`). Under torchrun (DDP, or FSDP with `fsdp=True`)
each rank takes a disjoint contiguous slice of that global batch and runs it in micro-batches of at
most `batch_size`; the per-micro-batch losses are weighted by their share of the global batch, so
the gradient equals the single-process one (up to float summation order) for any world size.

Outputs in `out_dir` (rank 0 only): ckpt_latest.pt (each eval, epoch end, SIGINT/SIGTERM, end),
ckpt_best.pt (best val loss on the fixed eval subset), metrics.jsonl, log.txt, epochs.md,
epochs.csv, loss.png, tb/. Hooks may add their own `*.jsonl` step logs (rows with "step", e.g.
router_stats.jsonl); they are handled like metrics.jsonl: deleted by a fresh run (`overwrite=True`),
cut back to the checkpoint's step on resume.

A resumed run (`resume=True`) continues from ckpt_latest.pt exactly: same weights, optimizer moments,
LR position, data position, RNG states -> the same losses. It must repeat the original run's
--data_dir, --seq_len and model flags (e.g. --preset): the data dir is read again, and the model
those flags build is compared with the checkpoint's (a mismatch is refused, naming the flags).

Config keys: `TRAIN_KEYS`, every one required; their defaults and comments live at the top of each train
script (equal in both: tests/test_trainer.py::test_train_scripts_share_their_defaults), never a third copy here.

Before the first step, everything is validated and the model is built (`setup`), so a refused run (a bad
flag, data dir, --init_from, preset, resume mismatch) deletes and writes nothing, even with --overwrite=True.
A non-finite loss stops the run without saving: the error names the step of the ckpt_latest.pt that is intact.
Temporary files of checkpoint and log writes cut by a kill are removed by the next run in out_dir
(`rundir.remove_leftovers`); a log line cut by a kill is dropped on resume (`rundir.trim_step_logs`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import resource
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from mamba_lm import ops
from mamba_lm.checkpoint import model_from_checkpoint, rng_state, save_checkpoint, set_rng_state
from mamba_lm.data import IGNORE, LOSS_ON, TokenSplit, batch_indices, check_tokenizer_match, epoch_order, load_meta
from mamba_lm.distributed import (Dist, gather_model_state, gather_optimizer_state, load_optimizer_state,
                                  no_sync_unless, wrap_for_ranks)
from mamba_lm.errors import UserError
from mamba_lm.models import model_config_dict
from mamba_lm.report import plot_losses, write_epoch_tables
from mamba_lm.rundir import (BEST, LATEST, check_out_dir, check_resume_batches, check_resume_data, check_same_model,
                             checkpoint_to_resume, clear_outputs, refuse_replacing, remove_leftovers, trim_step_logs)
from mamba_lm.runtime import autocast, count_params, resolve_device, resolve_dtype
from mamba_lm.stateful import forward_with_resets
from mamba_lm.stream_training import CarriedTraining, carried_val_loss
from mamba_lm.tokenizer import load_tokenizer
from mamba_lm.weights import check_data_tokenizer, load_weights


# ----------------------------------------------------------------------------------------------
# optimizer, schedule, loss


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: weight decay only on the 2-D weights of nn.Linear layers.

    No decay: embeddings (and the lm_head tied to them), norm weights, biases, the depthwise
    conv1d kernel, A_log, D, dt_proj.bias, and anything flagged `_no_weight_decay = True`
    (mamba-ssm's convention). Each parameter appears once (tied weights counted once).
    """
    no_decay_ids = {id(p) for p in model.parameters() if getattr(p, "_no_weight_decay", False)}
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            no_decay_ids.add(id(module.weight))
    decay_ids = {id(m.weight) for m in model.modules()
                 if isinstance(m, nn.Linear) and m.weight.dim() == 2} - no_decay_ids
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        (decay if id(p) in decay_ids else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def describe_groups(groups: list[dict]) -> str:
    return ", ".join(f"{g['name']}: {len(g['params'])} tensors / {sum(p.numel() for p in g['params']):,} params "
                     f"(wd {g['weight_decay']})" for g in groups)


def get_lr(step: int, warmup: int, total: int, lr: float, min_lr: float) -> float:
    """LR for optimizer step `step` (0-based): linear warmup to `lr` over `warmup` steps, then
    cosine decay reaching `min_lr` at step `total`; `min_lr` after that."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if step >= total:
        return min_lr
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def lm_loss(logits, targets, vocab_size: int | None = None):
    """Mean next-token cross-entropy (nats) over the scored targets. logits: (B, L, V_padded); targets: (B, L).

    Logits beyond `vocab_size` (the embedding's padding to a multiple of 8) are cut off, so
    padded ids never take probability mass. Targets equal to data.IGNORE (loss_on="answers": everything
    but a recall gate's answers) are skipped; a batch without a scored target gives 0 (and no gradient).
    Computed in fp32.
    """
    if vocab_size is not None and logits.size(-1) != vocab_size:
        logits = logits[..., :vocab_size]
    flat = targets.reshape(-1)
    total = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), flat, ignore_index=IGNORE, reduction="sum")
    return total / (flat != IGNORE).sum().clamp(min=1)


@torch.no_grad()
def loss_sums(model, split, seq_indices, *, batch_size=8, device="cpu", dtype=torch.float32,
              vocab_size=None, progress: str | None = None) -> tuple[float, int]:
    """(sum of token CE, number of tokens) over the sequences `seq_indices` of `split` (a TokenSplit)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    chunks = [seq_indices[i:i + batch_size] for i in range(0, len(seq_indices), batch_size)]
    if progress:
        chunks = tqdm(chunks, desc=progress, unit="batch", leave=False)
    for chunk in chunks:
        x, y = split.get_batch(np.asarray(chunk), device=device)
        with autocast(device, dtype):
            logits = model(x)
        scored = int((y != IGNORE).sum())
        total += lm_loss(logits, y, vocab_size).item() * scored
        count += scored
    model.train(was_training)
    return total, count


def estimate_loss(model, split, seq_indices, *, batch_size=8, device="cpu", dtype=torch.float32,
                  vocab_size=None, progress: str | None = None) -> float:
    """Mean token cross-entropy (nats/token) of `model` on sequences `seq_indices` of `split`.

    split: a data.TokenSplit; seq_indices: sequence numbers (sequence k = tokens [k*L, k*L+L));
    autocast to `dtype` on CUDA; logits beyond `vocab_size` ignored. Restores train/eval mode.
    """
    total, count = loss_sums(model, split, seq_indices, batch_size=batch_size, device=device, dtype=dtype,
                             vocab_size=vocab_size, progress=progress)
    if count == 0:
        raise UserError("estimate_loss over zero sequences measures nothing; pass at least one sequence index")
    return total / count


def eval_subset(num_sequences: int, n: int, seed: int) -> np.ndarray:
    """A fixed, deterministic subset of n sequence indices (sorted) for the periodic evals."""
    if n >= num_sequences:
        return np.arange(num_sequences)
    return np.sort(np.random.default_rng(seed).permutation(num_sequences)[:n])


# ----------------------------------------------------------------------------------------------
# logging


class RunLog:
    """metrics.jsonl rows, log.txt lines, TensorBoard scalars, loss.png; a no-op on ranks > 0."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool):
        self.out_dir, self.enabled = out_dir, enabled
        self.curve: list[dict] = []  # rows with step/train_loss/val_loss for loss.png
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional: needs the tensorboard package
                self.tb = SummaryWriter(str(out_dir / "tb"))
            except ImportError:
                warnings.warn("tensorboard is not installed; no tb/ logs (pip install tensorboard)")

    def metrics(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if row.get("kind") in ("train", "eval"):
            self.curve.append({k: row[k] for k in ("kind", "step", "train_loss", "val_loss") if k in row})
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self.tb.add_scalar(f"{row.get('kind', 'misc')}/{k}", v, row["step"])
            self.tb.flush()

    def line(self, text: str, echo: bool = True) -> None:
        if not self.enabled:
            return
        with open(self.out_dir / "log.txt", "a") as f:
            f.write(text + "\n")
        if echo:
            tqdm.write(text)

    def plot(self, title: str) -> None:
        if self.enabled:
            plot_losses(self.curve, self.out_dir / "loss.png", title=title)

    def close(self):
        if self.tb is not None:
            self.tb.close()


# ----------------------------------------------------------------------------------------------
# stop requests (SIGINT / SIGTERM)

_stop = threading.Event()
_stop_signal: list[int] = []   # the signal number that asked for the stop (empty: request_stop() or none)


def request_stop() -> None:
    """Ask the running loop to save ckpt_latest.pt and return after the current optimizer step."""
    _stop.set()


@contextlib.contextmanager
def _stop_on_signals():
    """SIGINT/SIGTERM -> request_stop (a second SIGINT interrupts at once)."""
    _stop.clear()
    _stop_signal.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if _stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        _stop_signal.append(signum)
        _stop.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class TrainingDiverged(UserError):
    """Loss or gradient norm became NaN/inf; the last good checkpoint is left as it was."""


# ----------------------------------------------------------------------------------------------
# the config: every key required, each in range


TRAIN_KEYS = ("data_dir", "out_dir", "seq_len", "batch_size", "grad_accum", "lr", "min_lr", "warmup_steps",
              "warmup_frac", "epochs", "max_steps", "max_tokens", "weight_decay", "beta1", "beta2", "grad_clip",
              "eval_interval", "eval_batches", "eval_max_batches", "log_interval", "tensorboard", "seed", "device",
              "dtype", "compile", "fsdp", "resume", "overwrite", "init_from", "stateful", "loss_on")

_INT, _NUM, _BOOL, _STR = (int,), (int, float), (bool,), (str,)


def _any(value) -> bool:
    return True


# the trainer's own invariants, whoever calls it (a script's CLI or Python): key -> (types, ok(value), what it must be)
RANGES = {
    "data_dir": (_STR, bool, "a folder path (not empty)"),
    "out_dir": (_STR, bool, "a folder path (not empty)"),
    "seq_len": (_INT, lambda v: v >= 0, ">= 0 (0: the data's seq_len)"),
    "batch_size": (_INT, lambda v: v >= 1, ">= 1"),
    "grad_accum": (_INT, lambda v: v >= 1, ">= 1"),
    "lr": (_NUM, lambda v: 0 <= v < math.inf, ">= 0 and finite"),
    "min_lr": (_NUM, lambda v: 0 <= v < math.inf, ">= 0 and finite"),
    "warmup_steps": (_INT, lambda v: v >= 0, ">= 0 (0: warmup_frac of the run)"),
    "warmup_frac": (_NUM, lambda v: 0 <= v <= 1, "in [0, 1]"),
    "epochs": (_INT, lambda v: v >= 0, ">= 0"),
    "max_steps": (_INT, lambda v: v >= 0, ">= 0 (0: no limit)"),
    "max_tokens": (_INT, lambda v: v >= 0, ">= 0 (0: no limit)"),
    "weight_decay": (_NUM, lambda v: 0 <= v < math.inf, ">= 0 and finite"),
    "beta1": (_NUM, lambda v: 0 <= v < 1, "in [0, 1)"),
    "beta2": (_NUM, lambda v: 0 <= v < 1, "in [0, 1)"),
    "grad_clip": (_NUM, lambda v: 0 <= v < math.inf, ">= 0 and finite (0: off)"),
    "eval_interval": (_INT, lambda v: v >= 0, ">= 0 (0: evals at epoch ends only)"),
    "eval_batches": (_INT, lambda v: v >= 1, ">= 1 (an eval over zero sequences measures nothing)"),
    "eval_max_batches": (_INT, lambda v: v >= 0, ">= 0 (0: the whole val split)"),
    "log_interval": (_INT, lambda v: v >= 1, ">= 1"),
    "tensorboard": (_BOOL, _any, "True or False"),
    "seed": (_INT, lambda v: 0 <= v < 2**63, ">= 0"),
    "device": (_STR, bool, "auto, cpu, cuda or cuda:N"),
    "dtype": (_STR, bool, "auto, float32, bfloat16 or float16"),
    "compile": (_BOOL, _any, "True or False"),
    "fsdp": (_BOOL, _any, "True or False"),
    "resume": (_BOOL, _any, "True or False"),
    "overwrite": (_BOOL, _any, "True or False"),
    "init_from": (_STR, _any, "scratch, resume, or a path"),
    "stateful": (_BOOL, _any, "True or False"),
    "loss_on": (_STR, lambda v: v in LOSS_ON, " or ".join(LOSS_ON)),
}
_BOOL_OK = {k for k, (types, _, _) in RANGES.items() if types is _BOOL}


def check_config(config: dict) -> dict:
    """The config as the trainer uses it, after checking that every TRAIN_KEYS key is there (a missing key is an
    error, never a silent default: the train scripts define them all at their top) and in the trainer's range."""
    missing = [k for k in TRAIN_KEYS if k not in config]
    if missing:
        raise UserError(f"the training config lacks {', '.join(missing)}; every train script defines these "
                        "constants at its top (copy them from train_baseline.py)")
    for key, (types, ok, what) in RANGES.items():
        value = config[key]
        right_type = isinstance(value, types) and (key in _BOOL_OK or not isinstance(value, bool))
        if not right_type or (isinstance(value, float) and math.isnan(value)) or not ok(value):
            raise UserError(f"--{key}={value!r} is out of range: it must be {what}")
    if config["min_lr"] > config["lr"]:
        raise UserError(f"--min_lr={config['min_lr']!r} is above --lr={config['lr']!r}; the cosine decays from lr "
                        "to min_lr, so lower --min_lr")
    if config["stateful"] and config["compile"]:
        raise UserError("--stateful=True does not run under --compile=True yet (the carried cache changes between "
                        "calls and would recompile); drop --compile")
    if config["resume"] and config["overwrite"]:
        raise UserError("--resume=True and --overwrite=True contradict each other: resume continues the run in "
                        "out_dir, overwrite starts it over; pass one of them")
    return dict(config)


# ----------------------------------------------------------------------------------------------
# the run: what setup() fixes, and the counters the loop moves


@dataclass
class RunData:
    """The prepared data dir as this run reads it."""
    dir: Path
    meta: dict
    train: TokenSplit
    val: TokenSplit
    seq_len: int
    tokenizer: object              # TextTokenizer
    vocab_size: int


@dataclass
class Budget:
    """How long the run is: a global batch per optimizer step, total steps (the LR schedule spans them)."""
    global_batch: int              # sequences per optimizer step, over all ranks and micro-batches
    steps_per_epoch: int
    total_steps: int
    warmup: int

    def tokens_per_step(self, seq_len: int) -> int:
        return self.global_batch * seq_len


@dataclass
class Run:
    """What stays fixed once setup() has validated everything and built the model."""
    cfg: dict                      # the script's config snapshot (saved in every checkpoint)
    script: str
    dist: Dist
    device: torch.device
    dtype: torch.dtype             # autocast dtype
    out_dir: Path
    data: RunData
    budget: Budget
    raw: nn.Module                 # the model itself: weights, aux_loss / stats hooks
    model: nn.Module               # what the forward calls: raw, compiled and/or DDP / FSDP-wrapped
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler   # active only for float16
    groups: list                   # AdamW parameter groups (for the header line)
    eval_idx: np.ndarray           # the fixed val subset of the periodic evals
    log: RunLog
    init_note: str = ""            # "initialised from ..." for the header
    carried: CarriedTraining | None = None   # --stateful=True: streams and carried caches of this rank

    @property
    def fsdp(self) -> bool:
        return self.cfg["fsdp"] and self.dist.enabled

    @property
    def model_type(self) -> str:
        return getattr(self.raw, "model_type", type(self.raw).__name__)


@dataclass
class RunState:
    """The counters of a run: saved in every checkpoint next to weights and optimizer, restored by a resume."""
    step: int = 0                  # optimizer steps done
    epoch: int = 0                 # current epoch (0-based)
    step_in_epoch: int = 0         # the data position: batches of this epoch done
    tokens_seen: int = 0
    best_val_loss: float = math.inf
    history: list = field(default_factory=list)       # one row per epoch (epochs.md)
    metrics: dict = field(default_factory=dict)       # the last eval's numbers
    epoch_loss: list = field(default_factory=lambda: [0.0, 0])  # sum of step losses, steps, in this epoch
    elapsed_s: float = 0.0         # training seconds of earlier sessions of this run
    init_from: str = "scratch"
    saved_step: int | None = None  # step of the ckpt_latest.pt on disk (None: none yet); not saved
    first_step: int = 0            # the step this session started at (peak memory is logged after it); not saved
    t_start: float = field(default_factory=time.time)

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> "RunState":
        return cls(step=ckpt["step"], epoch=ckpt["epoch"], step_in_epoch=ckpt["step_in_epoch"],
                   tokens_seen=ckpt["tokens_seen"], best_val_loss=ckpt["best_val_loss"],
                   history=list(ckpt.get("history", [])), metrics=dict(ckpt.get("metrics", {})),
                   epoch_loss=list(ckpt.get("epoch_loss", [0.0, 0])), elapsed_s=float(ckpt.get("elapsed_s", 0.0)),
                   init_from=ckpt.get("init_from", "scratch"), saved_step=ckpt["step"], first_step=ckpt["step"])

    def to_checkpoint(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "tokens_seen": self.tokens_seen, "best_val_loss": self.best_val_loss, "metrics": self.metrics,
                "history": self.history, "epoch_loss": list(self.epoch_loss), "elapsed_s": self.minutes() * 60,
                "init_from": self.init_from}

    def minutes(self) -> float:
        return (self.elapsed_s + time.time() - self.t_start) / 60


# ----------------------------------------------------------------------------------------------
# train = setup + loop


def train(config: dict, build_model: Callable[[], nn.Module], *, script: str,
          on_eval: Callable[[nn.Module, int, str], dict] | None = None,
          on_end: Callable[[nn.Module, str, list], None] | None = None) -> dict:
    """Train `build_model()` on config["data_dir"]; returns the final metrics dict.

    config: the script's config snapshot (saved into checkpoints); it must hold every `TRAIN_KEYS` key
    (see `check_config`). build_model: builds the trained model for a fresh run (`init_from="scratch"`). A
    resumed run takes its weights from the checkpoint, but still calls `build_model()` (on the meta
    device when it can) and refuses to go on unless it gives the checkpoint's model_type and
    model_config, so a resume must repeat the original --data_dir and model flags (e.g. --preset).
    on_eval(model, step, out_dir) -> extra scalars, called at each eval before the val loss is
    computed (all ranks; rank 0's are logged); then `model.reset_stats()` runs if the model has it, so
    router statistics cover the training steps since the previous eval. on_end(model, out_dir,
    history) runs on rank 0 after the last step.
    Returns {"step", "tokens_seen", "val_loss", "val_ppl", "best_val_loss", "interrupted", "out_dir", ...}.

    SIGINT / SIGTERM: ckpt_latest.pt is saved after the current optimizer step, then the process exits
    with status 128 + signal (130 / 143, what shells and schedulers expect from an interrupted job;
    `SystemExit` is raised). `request_stop()` from inside the process stops the same way but returns
    normally with "interrupted": True.
    """
    cfg = check_config(config)
    dist = Dist(resolve_device(cfg["device"]))
    try:
        with _stop_on_signals(), _disk_full_is_a_user_error():
            run, state = setup(cfg, build_model, script, dist)
            result = loop(run, state, on_eval, on_end)
        dist.barrier()  # every rank past its last collective (rank 0 saves last) before the group goes
    finally:
        dist.close()
    if result["interrupted"] and _stop_signal:
        raise SystemExit(128 + _stop_signal[0])
    return result


def loop(run: Run, state: RunState, on_eval=None, on_end=None) -> dict:
    """The training loop, from `state` to the end of the budget (or a stop request). Each step: get this rank's
    batch, forward, loss, backward (micro-batches), clip, optimizer step; then log, eval, checkpoint."""
    cfg, budget, dist = run.cfg, run.budget, run.dist
    log_header(run, state)
    state.t_start = time.time()
    order = epoch_order(run.data.train.num_sequences, state.epoch, cfg["seed"])
    bar = tqdm(total=budget.total_steps, initial=state.step, unit="step", dynamic_ncols=True,
               disable=not dist.main, desc=run.out_dir.name)
    interrupted, timer = False, Throughput(state.tokens_seen)
    while state.step < budget.total_steps:
        lr = get_lr(state.step, budget.warmup, budget.total_steps, cfg["lr"], cfg["min_lr"])
        loss_sum = torch.zeros((), device=run.device, dtype=torch.float64)   # of the global batch
        aux_sum, has_aux = torch.zeros((), device=run.device, dtype=torch.float64), False
        micro_batches = run.carried.micro_batches() if run.carried else get_batch(run, order, state.step_in_epoch)
        for j, (x, y, weight, carry) in enumerate(micro_batches):
            with no_sync_unless(run.model, last=j == len(micro_batches) - 1):
                with autocast(run.device, run.dtype):
                    logits, aux = forward(run, x, carry)
                    loss = lm_loss(logits, y, run.data.vocab_size)
                total = loss if aux is None else loss + aux
                # DDP averages gradients over ranks: scale by world so the sum matches one process
                run.scaler.scale(total * weight * dist.world).backward()
            loss_sum += loss.detach().double() * weight
            if aux is not None:
                has_aux, aux_sum = True, aux_sum + aux.detach().double() * weight
        loss, aux = all_reduce_mean(dist, loss_sum), (all_reduce_mean(dist, aux_sum) if has_aux else None)
        if not math.isfinite(loss):
            diverged(run, state, f"loss is {loss}", lr)
        grad_norm = clip_gradients(run)
        if not math.isfinite(grad_norm) and run.dtype != torch.float16:  # fp16: the scaler skips the step
            diverged(run, state, f"gradient norm is {grad_norm}", lr)
        optimizer_step(run, lr)
        if run.carried:
            run.carried.detach_()                 # truncated BPTT: the next window starts from a constant state
        if state.step == state.first_step:
            log_peak_memory(run)
        state.step, state.step_in_epoch = state.step + 1, state.step_in_epoch + 1
        state.tokens_seen += budget.tokens_per_step(run.data.seq_len)
        state.epoch_loss = [state.epoch_loss[0] + loss, state.epoch_loss[1] + 1]
        bar.update(1)

        if state.step % cfg["log_interval"] == 0 or state.step == budget.total_steps:
            tok_s, ms_per_step = timer.measure(state.tokens_seen, budget.tokens_per_step(run.data.seq_len))
            log_train(run, state, loss, aux, lr, grad_norm, tok_s, ms_per_step)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}")
        if state.step_in_epoch == budget.steps_per_epoch:
            end_epoch(run, state, on_eval)  # full val eval, epoch row, checkpoints; counters move to the next epoch
            order = epoch_order(run.data.train.num_sequences, state.epoch, cfg["seed"])
            timer.reset(state.tokens_seen)  # throughput excludes eval time
        elif cfg["eval_interval"] and state.step % cfg["eval_interval"] == 0 and state.step < budget.total_steps:
            # (the last step's eval is the one of the partial epoch end after the loop, not done twice)
            eval_and_save(run, state, on_eval)
            timer.reset(state.tokens_seen)
        if dist.any(_stop.is_set()) and state.step < budget.total_steps:
            interrupted = True
            save(run, state, LATEST)
            run.log.line(f"stopped by signal at step {state.step}; saved {run.out_dir / LATEST} "
                         f"(continue with the same flags plus --resume=True)")
            break
    bar.close()
    if not interrupted and state.step_in_epoch > 0 and (not state.history or state.history[-1]["step"] != state.step):
        end_epoch(run, state, on_eval, partial=True)
    if not interrupted and dist.main and on_end is not None:
        on_end(run.raw, str(run.out_dir), state.history)
    run.log.close()
    return {"step": state.step, "tokens_seen": state.tokens_seen, "best_val_loss": state.best_val_loss,
            "interrupted": interrupted, "out_dir": str(run.out_dir), "history": state.history, **state.metrics}


# ----------------------------------------------------------------------------------------------
# the pieces of a step


def get_batch(run: Run, order: np.ndarray, step_in_epoch: int) -> list[tuple[torch.Tensor, torch.Tensor, float, None]]:
    """This rank's share of global batch `step_in_epoch` of the epoch's `order`, as micro-batches of at most
    batch_size sequences: [(x (b, l), y (b, l), weight, None)], weight = the micro-batch's share of the global
    batch (None: no carried state; a stateful run's batches come from `run.carried.micro_batches()`)."""
    global_batch, dist = run.budget.global_batch, run.dist
    batch = batch_indices(order, global_batch, step_in_epoch)
    share = global_batch // dist.world
    local = batch[dist.rank * share:(dist.rank + 1) * share]
    size = run.cfg["batch_size"]
    micro = [local[i:i + size] for i in range(0, len(local), size)]
    return [(*run.data.train.get_batch(idx, device=run.device), len(idx) / global_batch, None) for idx in micro]


def forward(run: Run, x: torch.Tensor, carry) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logits, the model's aux loss | None) of a micro-batch: from a zero state, or (stateful) from the rows'
    carried state with their resets, leaving the final state in carry.cache."""
    if carry is None:
        logits = run.model(x)
        return logits, (run.raw.aux_loss() if hasattr(run.raw, "aux_loss") else None)
    return forward_with_resets(run.model, x, carry.cache, carry.resets, state_grad=False, aux_from=run.raw)


def all_reduce_mean(dist: Dist, weighted_sum: torch.Tensor) -> float:
    """The global batch's mean from each rank's share-weighted sum."""
    if dist.enabled:
        torch.distributed.all_reduce(weighted_sum)
    return float(weighted_sum.item())


def clip_gradients(run: Run) -> float:
    """Unscale (fp16), clip the global gradient norm to grad_clip (0: measure only); returns the norm before."""
    run.scaler.unscale_(run.optimizer)
    params = [p for g in run.optimizer.param_groups for p in g["params"]]
    max_norm = run.cfg["grad_clip"] if run.cfg["grad_clip"] > 0 else float("inf")
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


def optimizer_step(run: Run, lr: float) -> None:
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)


def diverged(run: Run, state: RunState, what: str, lr: float):
    run.log.line(f"diverged at step {state.step + 1}: {what} (lr {lr:.3g})")
    raise TrainingDiverged(f"training diverged at step {state.step + 1}: {what} (lr {lr:.3g}); "
                           f"{intact_checkpoint(run, state)}; lower --lr or --grad_clip and resume/restart")


def intact_checkpoint(run: Run, state: RunState) -> str:
    """Which checkpoint a stopped run leaves good: ckpt_latest.pt of step saved_step, never a later one."""
    if state.saved_step is None:
        return "no checkpoint was written yet"
    return f"the last good checkpoint {run.out_dir / LATEST} (step {state.saved_step}) is intact"


class Throughput:
    """tokens/s and ms/step since the last log line (reset after evals, so they time training only)."""

    def __init__(self, tokens: int):
        self.reset(tokens)

    def reset(self, tokens: int) -> None:
        self.t, self.tokens = time.time(), tokens

    def measure(self, tokens: int, tokens_per_step: int) -> tuple[float, float]:
        dt = time.time() - self.t
        tok_s = (tokens - self.tokens) / max(dt, 1e-9)
        steps = max(1, (tokens - self.tokens) // tokens_per_step)
        self.reset(tokens)
        return tok_s, 1000 * dt / steps


# ----------------------------------------------------------------------------------------------
# evaluation, epoch ends, checkpoints


def val_loss(run: Run, indices: np.ndarray, desc: str | None = None) -> float:
    """Mean token CE on val sequences `indices`, sharded over ranks and summed. An eval over zero tokens is an
    error, never a loss of 0."""
    dist = run.dist
    mine = indices[dist.rank::dist.world]
    model = run.model if run.fsdp else run.raw
    total, count = loss_sums(model, run.data.val, mine, batch_size=run.cfg["batch_size"], device=run.device,
                             dtype=run.dtype, vocab_size=run.data.vocab_size, progress=desc if dist.main else None)
    count = dist.all_sum(count)
    if count == 0:
        raise UserError(f"the evaluation covered zero sequences of {run.data.dir}'s val split; "
                        "raise --eval_batches or prepare more validation data")
    return dist.all_sum(total) / count


def check_finite_eval(run: Run, state: RunState, what: str, loss: float) -> None:
    """A non-finite val loss stops the run before anything is saved: ckpt_latest.pt / ckpt_best.pt stay as they were."""
    if math.isfinite(loss):
        return
    run.log.line(f"diverged at the eval of step {state.step}: {what} is {loss}; nothing saved")
    raise TrainingDiverged(f"training diverged: {what} is {loss} at the eval of step {state.step}; nothing was saved, "
                           f"{intact_checkpoint(run, state)}, and {BEST} is as it was; lower --lr or --grad_clip "
                           "and resume/restart")


def subset_eval(run: Run, state: RunState, on_eval=None) -> float:
    """The periodic eval on the fixed val subset (after the hook); logged; returns the val loss."""
    extra = (on_eval(run.raw, state.step, str(run.out_dir)) or {}) if on_eval else {}
    loss = val_loss(run, run.eval_idx)
    carried = carried_eval(run)
    if hasattr(run.raw, "reset_stats"):
        run.raw.reset_stats()
    extra = {k: v for k, v in extra.items() if _scalar(v)}
    run.log.metrics({"kind": "eval", "step": state.step, "epoch": state.epoch, "tokens": state.tokens_seen,
                     "val_loss": loss, "val_ppl": _ppl(loss), "eval_sequences": len(run.eval_idx),
                     **(carried or {}), "minutes": state.minutes(), **extra})
    run.log.line(f"eval step {state.step} | val loss {loss:.4f} | val ppl {_ppl(loss):.2f} "
                 f"| {len(run.eval_idx)} sequences"
                 + (f" | carried {carried['val_loss_carried']:.4f} vs window reset {carried['val_loss_window_reset']:.4f}"
                    f" ({carried['val_carried_tokens']:,} tokens)" if carried else "")
                 + "".join(f" | {k} {v:.4g}" for k, v in extra.items()))
    return loss


def carried_eval(run: Run) -> dict | None:
    """Stateful runs: the val loss with the state carried over eval_batches consecutive val windows, and on
    the same windows from a zero state (`stream_training.carried_val_loss`; rows: batch_size, or the number
    of val books if fewer, so as many tokens as the subset eval when the val split has enough books)."""
    if run.carried is None:
        return None
    rows = run.cfg["batch_size"]
    result = carried_val_loss(run.model if run.fsdp else run.raw, run.raw, run.data.val, rows=rows,
                              windows=run.cfg["eval_batches"], dist=run.dist, device=run.device, dtype=run.dtype,
                              vocab_size=run.data.vocab_size)
    if result is None:
        run.log.line("note: the val split has fewer books than processes; no carried-state eval")
    return result


def eval_and_save(run: Run, state: RunState, on_eval=None, extra_metrics: dict | None = None) -> None:
    """Subset eval, then ckpt_latest.pt, ckpt_best.pt if the subset val loss improved, loss.png. A non-finite
    val loss saves nothing (check_finite_eval)."""
    loss = subset_eval(run, state, on_eval)
    check_finite_eval(run, state, "the val loss", loss)
    state.metrics = {"val_loss": loss, "val_ppl": _ppl(loss), "eval": "subset", "step": state.step,
                     **(extra_metrics or {})}
    improved = loss < state.best_val_loss
    if improved:
        state.best_val_loss = loss
    save(run, state, LATEST)
    if improved:
        save(run, state, BEST)
    run.log.plot(f"{run.model_type} - {run.out_dir.name}")


def end_epoch(run: Run, state: RunState, on_eval=None, partial: bool = False) -> None:
    """Full val eval (capped by eval_max_batches), epoch table row, then eval_and_save.

    After a complete epoch the counters move to the start of the next one before saving, so
    a resume starts there.
    """
    cap = run.cfg["eval_max_batches"] * run.cfg["batch_size"]
    full = np.arange(run.data.val.num_sequences)
    if cap > 0 and len(full) > cap:
        full = eval_subset(len(full), cap, run.cfg["seed"] + 1)
    val_full = val_loss(run, full, desc=f"val epoch {state.epoch + 1}")
    check_finite_eval(run, state, "the full val loss", val_full)
    row = {"epoch": state.epoch + 1, "epoch_frac": state.step_in_epoch / run.budget.steps_per_epoch,
           "step": state.step, "train_loss": state.epoch_loss[0] / max(state.epoch_loss[1], 1), "val_loss": val_full,
           "val_ppl": _ppl(val_full), "minutes": state.minutes(), "tokens": state.tokens_seen}
    if state.history and state.history[-1]["epoch"] == row["epoch"] and state.history[-1]["epoch_frac"] < 1:
        state.history.pop()  # a resumed run finishing an epoch that an earlier session left partial
    state.history.append(row)
    run.log.metrics({"kind": "epoch", **row, "val_sequences": len(full)})
    run.log.line(f"epoch {row['epoch']}{' (partial)' if partial else ''} | step {state.step} | train loss "
                 f"{row['train_loss']:.4f} | val loss {val_full:.4f} | val ppl {row['val_ppl']:.2f} "
                 f"| {row['minutes']:.1f} min | {state.tokens_seen:,} tokens")
    if run.dist.main:
        write_epoch_tables(state.history, run.out_dir / "epochs.md", run.out_dir / "epochs.csv")
    if not partial:
        state.epoch, state.step_in_epoch, state.epoch_loss = state.epoch + 1, 0, [0.0, 0]
    eval_and_save(run, state, on_eval, {"val_loss_full": val_full, "val_ppl_full": _ppl(val_full)})


def save(run: Run, state: RunState, name: str) -> None:
    """Write checkpoint `name` in out_dir (all ranks gather the state, rank 0 writes it atomically)."""
    model_state = gather_model_state(run.model, run.raw, run.fsdp)
    optim_state = gather_optimizer_state(run.model, run.optimizer, run.fsdp)
    carried = run.carried.state_dict() if run.carried else None    # a gather: every rank
    if run.dist.main:
        write_checkpoint(run, state, name, model_state, optim_state, carried)
    if name == LATEST:
        state.saved_step = state.step


def write_checkpoint(run: Run, state: RunState, name: str, model_state: dict, optim_state: dict,
                     carried: dict | None = None) -> None:
    cfg, data, budget = run.cfg, run.data, run.budget
    ckpt = {
        "model_type": run.model_type, "model_config": model_config_dict(run.raw), "model": model_state,
        "optimizer": optim_state, "optimizer_layout": "fqn" if run.fsdp else "torch",
        "train_config": cfg, "tokenizer": data.tokenizer.to_dict(),
        "data": {"dir": str(data.dir), "fingerprint": data.meta.get("fingerprint"), "seq_len": data.seq_len},
        **state.to_checkpoint(), "rng": rng_state(), "script": run.script,
        "schedule": {"warmup": budget.warmup, "total": budget.total_steps, "lr": cfg["lr"], "min_lr": cfg["min_lr"]},
        "global_batch": budget.global_batch, "world_size": run.dist.world,
        "carried": carried,        # --stateful=True: stream positions and every row's carried state
    }
    path = run.out_dir / name
    try:
        save_checkpoint(path, ckpt)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise UserError(f"no space left on device while writing {path}; it was not replaced "
                        f"({intact_checkpoint(run, state)}); free some space, then resume with --resume=True") from None


@contextlib.contextmanager
def _disk_full_is_a_user_error():
    """A full disk (ENOSPC) while writing a checkpoint or a log: one line naming the path, not a traceback.
    Checkpoints are written atomically, so the previous one is still intact."""
    try:
        yield
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise UserError(f"no space left on device while writing {e.filename or 'the output folder'}; "
                        "free some space, then resume with --resume=True") from None


# ----------------------------------------------------------------------------------------------
# logging


# CPU runs whose scan work (training tokens x the model's recurrent state elements per token, Σ numel(A_log))
# reaches this compile the scan's blocks: measured (2 cores, one thread) the compiled scan saves 6-10 ns per
# state element and token (small-cpu 1,057 -> 1,650 tokens/s, tiny 7.3k -> 9k) for a first compile of 11-21 s
# (3-5 s from inductor's disk cache), so it pays from about 2.5e9; twice that, for margin. The demo (123k
# tokens of small-cpu: 4e9) and tiny runs up to 1.2M tokens stay eager, 130M runs compile from 11k tokens.
CPU_SCAN_COMPILE_WORK = 5e9


def choose_cpu_scan(model: nn.Module, device: torch.device, planned_tokens: int) -> None:
    """On the CPU: the compiled scan (ops.set_cpu_scan("compiled")) for a run with enough scan work (see
    CPU_SCAN_COMPILE_WORK), the eager blocked scan otherwise (tests, the demo, short runs). A set
    MAMBA_NARRATIVE_CPU_SCAN decides instead. If compiling fails the scan warns and runs eagerly."""
    if device.type != "cpu" or os.environ.get("MAMBA_NARRATIVE_CPU_SCAN", "").strip():
        return
    state_elements = sum(p.numel() for name, p in model.named_parameters() if name.endswith("A_log"))
    ops.set_cpu_scan("compiled" if planned_tokens * state_elements >= CPU_SCAN_COMPILE_WORK else "eager")


def log_header(run: Run, state: RunState) -> None:
    cfg, data, budget = run.cfg, run.data, run.budget
    n_params = count_params(run.raw)
    tokens_per_step = budget.tokens_per_step(data.seq_len)
    lines = [
        f"run {run.out_dir} | {run.script} | {'resumed at step ' + str(state.step) if state.step else 'fresh'}"
        f" | device {run.device} x{run.dist.world} {'fsdp' if run.fsdp else ''}"
        f" | dtype {str(run.dtype).replace('torch.', '')}",
        f"model {run.model_type} | {n_params:,} params | {json.dumps(model_config_dict(run.raw))}",
        f"data {data.dir} | train {data.train.num_sequences:,} x {data.seq_len} tokens | "
        f"val {data.val.num_sequences:,} sequences | tokenizer {data.tokenizer.name} (vocab {data.vocab_size})",
        f"steps {budget.total_steps:,} ({budget.steps_per_epoch:,}/epoch, {budget.total_steps * tokens_per_step:,} "
        f"tokens) | global batch {budget.global_batch} x {data.seq_len} = {tokens_per_step:,} tokens | "
        f"warmup {budget.warmup} | lr {cfg['lr']:g} -> {cfg['min_lr']:g} cosine",
        f"optimizer AdamW betas ({cfg['beta1']}, {cfg['beta2']}) | {describe_groups(run.groups)}",
    ]
    if run.device.type == "cpu":
        lines.append(f"cpu scan {ops.cpu_scan()} (trainer.choose_cpu_scan; MAMBA_NARRATIVE_CPU_SCAN=eager|compiled "
                     "to choose)")
    if run.carried:
        lines.append(run.carried.describe())
    if run.init_note:
        lines.append(run.init_note)
    for line in lines:
        run.log.line(line)
    run.log.metrics({"kind": "config", "step": state.step, "config": cfg, "num_params": n_params,
                     "total_steps": budget.total_steps, "warmup": budget.warmup})


def log_peak_memory(run: Run) -> None:
    """After this session's first optimizer step: peak memory so far (CUDA: max_memory_allocated of this rank's
    GPU; CPU: the process's peak resident set), in log.txt and metrics.jsonl (kind "memory")."""
    if run.device.type == "cuda":
        peak, what = torch.cuda.max_memory_allocated(run.device), "CUDA max_memory_allocated"
    else:
        peak, what = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak process RSS"
    tokens = run.budget.tokens_per_step(run.data.seq_len)
    run.log.metrics({"kind": "memory", "step": 1, "peak_bytes": peak, "what": what, "seq_len": run.data.seq_len,
                     "tokens_per_step": tokens})
    run.log.line(f"memory after the first step: {peak / 2**30:.2f} GiB ({what}; {run.data.seq_len}-token windows, "
                 f"{tokens:,} tokens per step{', stateful' if run.carried else ''})")


def log_train(run: Run, state: RunState, loss, aux, lr, grad_norm, tok_s, ms_per_step) -> None:
    row = {"kind": "train", "step": state.step, "epoch": state.epoch, "tokens": state.tokens_seen,
           "train_loss": loss, "lr": lr, "grad_norm": grad_norm, "tok_per_s": tok_s, "ms_per_step": ms_per_step}
    if aux is not None:
        row["aux_loss"] = aux
    run.log.metrics(row)
    run.log.line(f"step {state.step}/{run.budget.total_steps} | epoch {state.epoch + 1} | loss {loss:.4f}"
                 + (f" | aux {aux:.4f}" if aux is not None else "")
                 + f" | lr {lr:.3e} | grad_norm {grad_norm:.3f} | tok/s {tok_s:,.0f} "
                   f"| ms/step {ms_per_step:.1f} | tokens {state.tokens_seen:,}", echo=False)


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def _scalar(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# ----------------------------------------------------------------------------------------------
# setup: validate every input and build the model before any file is touched


def setup(cfg: dict, build_model, script: str, dist: Dist) -> tuple[Run, RunState]:
    """Everything before the first step. Order matters: data, budget, out_dir and (on resume) the checkpoint
    are checked and the model is built and wrapped before anything in out_dir is deleted or written; then
    leftovers of killed writes go, a fresh run clears the old outputs, a resume trims its step logs."""
    device = dist.device
    dtype = resolve_dtype(cfg["dtype"], device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out_dir = Path(cfg["out_dir"])
    check_out_dir(out_dir)
    resume = cfg["resume"] or cfg["init_from"] == "resume"
    data = load_run_data(cfg, resume)
    budget = plan_budget(cfg, data, dist.world)
    ckpt = checkpoint_to_resume(out_dir) if resume else None
    if ckpt is None:
        refuse_replacing(out_dir, cfg["overwrite"])
    else:
        check_resume_data(ckpt, script=script, meta=data.meta, data_dir=data.dir, out_dir=out_dir)
        check_resume_batches(ckpt, global_batch=budget.global_batch, seq_len=data.seq_len, seed=cfg["seed"])
        if bool(ckpt.get("carried")) != cfg["stateful"]:
            raise UserError(f"the checkpoint was trained with --stateful={not cfg['stateful']}; resume with the "
                            "same mode")

    torch.manual_seed(cfg["seed"])
    np.random.seed(cfg["seed"] % 2**32)
    raw, init_note = make_model(cfg, build_model, script, data, ckpt, out_dir)
    raw.to(device).train()
    check_vocab(raw, data.vocab_size)
    choose_cpu_scan(raw, device, budget.total_steps * budget.global_batch * data.seq_len)
    model = try_compile(raw, device, data.seq_len) if cfg["compile"] else raw
    model = wrap_for_ranks(model, dist, cfg["fsdp"])
    carried = (CarriedTraining(raw, data.train, budget.global_batch, cfg["batch_size"], data.seq_len, cfg["seed"],
                               dist, device) if cfg["stateful"] else None)
    if carried is not None and ckpt is not None:
        carried.load_state_dict(ckpt["carried"])
    groups = param_groups(raw, cfg["weight_decay"])  # after FSDP sharding: the optimizer holds the shards
    optimizer = make_optimizer(groups, cfg, device)
    if ckpt is not None:
        load_optimizer_state(model, optimizer, ckpt["optimizer"], cfg["fsdp"] and dist.enabled)

    # every input is validated and the model is built: only now is out_dir touched
    metrics_rows, cut_files, leftovers = [], [], []
    if dist.main:
        leftovers = remove_leftovers(out_dir)
        if ckpt is None:
            clear_outputs(out_dir)
        else:
            metrics_rows, cut_files = trim_step_logs(out_dir, ckpt["step"])
    dist.barrier()
    log = RunLog(out_dir, dist.main, cfg["tensorboard"])
    log.curve = [r for r in metrics_rows if r.get("kind") in ("train", "eval")]
    run = Run(cfg=cfg, script=script, dist=dist, device=device, dtype=dtype, out_dir=out_dir, data=data,
              budget=budget, raw=raw, model=model, optimizer=optimizer,
              scaler=torch.amp.GradScaler("cuda", enabled=dtype == torch.float16), groups=groups,
              eval_idx=eval_subset(data.val.num_sequences, cfg["eval_batches"] * cfg["batch_size"], cfg["seed"]),
              log=log, init_note=init_note, carried=carried)
    if leftovers:
        log.line(f"note: removed {len(leftovers)} temporary file(s) left by a killed write: {', '.join(leftovers)}")
    if cut_files:
        log.line(f"note: dropped the half-written last line of {', '.join(cut_files)} (cut by a kill)")
    if ckpt is None:
        return run, RunState(init_from=cfg["init_from"])
    state = RunState.from_checkpoint(ckpt)
    set_rng_state(ckpt.get("rng"))
    schedule = ckpt.get("schedule", {})
    if schedule and (schedule.get("total"), schedule.get("warmup")) != (budget.total_steps, budget.warmup):
        log.line(f"note: LR schedule now spans {budget.total_steps} steps (warmup {budget.warmup}); "
                 f"the checkpoint's spanned {schedule.get('total')} (warmup {schedule.get('warmup')})")
    return run, state


def load_run_data(cfg: dict, resume: bool) -> RunData:
    """The data dir's meta, train/val splits (windowed at --seq_len, or the data's), and tokenizer."""
    data_dir = Path(cfg["data_dir"])
    try:
        meta = load_meta(data_dir)
    except UserError as e:
        if not resume:
            raise
        raise UserError(f"{e} (resuming: repeat the original run's --data_dir and model flags)") from None
    train_split = TokenSplit(data_dir, "train", cfg["seq_len"] or None, loss_on=cfg["loss_on"])
    val_split = TokenSplit(data_dir, "val", cfg["seq_len"] or None, loss_on=cfg["loss_on"])
    tokenizer = data_tokenizer(data_dir, meta)
    if val_split.num_sequences == 0:
        raise UserError(f"the val split of {data_dir} has no full sequence of {val_split.seq_len} tokens; "
                        "prepare more validation data or lower --seq_len")
    return RunData(dir=data_dir, meta=meta, train=train_split, val=val_split, seq_len=train_split.seq_len,
                   tokenizer=tokenizer, vocab_size=tokenizer.vocab_size)


def plan_budget(cfg: dict, data: RunData, world: int) -> Budget:
    """Global batch, steps per epoch, total optimizer steps (epochs capped by max_steps and max_tokens), warmup."""
    global_batch = cfg["batch_size"] * cfg["grad_accum"]
    if global_batch % world:
        raise UserError(f"batch_size*grad_accum = {global_batch} sequences must divide evenly over "
                        f"{world} processes; change --batch_size or --grad_accum")
    steps_per_epoch = data.train.num_sequences // global_batch
    if steps_per_epoch == 0:
        raise UserError(f"the train split has {data.train.num_sequences} sequences of {data.seq_len} tokens, "
                        f"fewer than one batch of {global_batch}; lower --batch_size or --seq_len")
    total = cfg["epochs"] * steps_per_epoch
    if cfg["max_steps"] > 0:
        total = min(total, cfg["max_steps"])
    if cfg["max_tokens"] > 0:
        total = min(total, math.ceil(cfg["max_tokens"] / (global_batch * data.seq_len)))
    if total <= 0:
        raise UserError("the run has no steps: set --epochs, --max_steps or --max_tokens above 0")
    warmup = cfg["warmup_steps"] or max(1, round(cfg["warmup_frac"] * total))
    return Budget(global_batch=global_batch, steps_per_epoch=steps_per_epoch, total_steps=total, warmup=warmup)


def make_model(cfg: dict, build_model, script: str, data: RunData, ckpt: dict | None, out_dir: Path):
    """The model to train, and a note for the header: the checkpoint's (resume; the flags must build the same
    model), the script's fresh one (scratch), or pretrained weights (init_from: a repo .pt or an HF / mamba-ssm
    folder of the script's model type, with the data's tokenizer)."""
    if ckpt is not None:
        model, _ = model_from_checkpoint(ckpt)
        if cfg["init_from"] in ("scratch", "resume", ""):  # else the model came from pretrained weights
            probe = probe_model(build_model)
            check_same_model(ckpt, _model_type(probe), model_config_dict(probe), out_dir=out_dir,
                             flags_hint=original_flags(ckpt, cfg))
        return model, ""
    if cfg["init_from"] in ("scratch", ""):
        return build_model(), ""
    if not Path(cfg["init_from"]).exists():
        raise UserError(f"--init_from={cfg['init_from']}: no such file or folder; use scratch, resume, "
                        "or the path of a repo .pt checkpoint or an HF / mamba-ssm folder")
    model, tokenizer, info = load_weights(cfg["init_from"])
    want_type = _model_type(probe_model(build_model))
    if model.model_type != want_type:
        raise UserError(f"--init_from={cfg['init_from']} holds a {model.model_type!r} model, but "
                        f"{script} trains {want_type!r} models; use the script for that model type")
    if tokenizer is not None:
        check_tokenizer_match(data.meta["tokenizer"], tokenizer.to_dict())
    else:  # an HF / mamba-ssm folder without a tokenizer: only the vocabulary size can be checked
        check_data_tokenizer(info, data.meta["tokenizer"], data.dir)
    return model.train(), f"initialised from {cfg['init_from']} ({info.layout})"


def probe_model(build_model):
    """The model the script would build, on the meta device when it allows (no memory, no init)."""
    try:
        with torch.device("meta"):
            return build_model()
    except Exception:
        return build_model()


def _model_type(model) -> str:
    return getattr(model, "model_type", type(model).__name__)


def original_flags(ckpt: dict, cfg: dict) -> str:
    """' (--preset=tiny --d_model=64)': the script's own (model) flags, --data_dir and --init_from whose values
    in the checkpoint's train_config differ from this run's; '' when none differ (or none are known)."""
    original = ckpt.get("train_config") or {}
    flags = [f"--{k}={v}" for k, v in original.items()
             if (k not in TRAIN_KEYS or k in ("data_dir", "init_from")) and k in cfg and cfg[k] != v]
    return f" ({' '.join(flags)})" if flags else ""


def check_vocab(model, vocab_size: int) -> None:
    model_vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if model_vocab is not None and model_vocab < vocab_size:
        raise UserError(f"the model's vocab_size {model_vocab} is smaller than the data tokenizer's "
                        f"{vocab_size}; build the model with vocab_size={vocab_size}")


def make_optimizer(groups: list[dict], cfg: dict, device: torch.device) -> torch.optim.AdamW:
    extra = {"fused": True} if device.type == "cuda" and not cfg["fsdp"] else {}
    return torch.optim.AdamW([{k: v for k, v in g.items() if k != "name"} for g in groups], lr=cfg["lr"],
                             betas=(cfg["beta1"], cfg["beta2"]), **extra)


# ----------------------------------------------------------------------------------------------
# helpers: tokenizer of a data dir, compile


def data_tokenizer(data_dir, meta: dict):
    """The TextTokenizer a data dir was prepared with (its tokenizer.json, or byte-level)."""
    kind = meta["tokenizer"].get("kind")
    tokenizer = load_tokenizer("byte") if kind == "byte" else load_tokenizer(str(Path(data_dir) / "tokenizer.json"))
    check_tokenizer_match(meta["tokenizer"], tokenizer.to_dict())
    return tokenizer


def try_compile(model, device, seq_len):
    """torch.compile with a test forward; on any failure warn and return the eager model."""
    try:
        compiled = torch.compile(model)
        with torch.no_grad():
            compiled(torch.zeros(1, min(seq_len, 64), dtype=torch.long, device=device))
        return compiled
    except Exception as e:
        warnings.warn(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); training eagerly")
        return model


