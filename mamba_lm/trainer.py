"""The training loop shared by train_baseline.py and train_multitrack.py, and its pieces.

    param_groups(model, weight_decay)            AdamW groups: decay only 2-D weights of nn.Linear
    get_lr(step, warmup, total, lr, min_lr)      linear warmup, then cosine decay to min_lr
    lm_loss(logits, targets, vocab_size)         mean token cross-entropy, padded logits cut off
    estimate_loss(model, split, seq_indices,...) mean token CE over given sequences (also evaluate.py)
    train(config, build_model, *, script, on_eval=None, on_end=None) -> final metrics

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

Config keys (the script's `config`; missing keys take `DEFAULTS` below): see `DEFAULTS`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mamba_lm.checkpoint import (clean_state_dict, load_any_model, load_checkpoint, model_from_checkpoint,
                                   rng_state, save_checkpoint, set_rng_state)
from mamba_lm.errors import UserError
from mamba_lm.report import plot_losses, write_epoch_tables

DEFAULTS = {
    "data_dir": "data/demo",      # prepared data dir (prepare_data.py)
    "out_dir": "out/run",         # checkpoints, logs, tables, plots
    "seq_len": 0,                 # 0: the data's seq_len (meta.json)
    "batch_size": 8,              # sequences per micro-batch (per process)
    "grad_accum": 1,              # micro-batches per optimizer step; global batch = batch_size * grad_accum
    "lr": 6e-4,                   # peak learning rate
    "min_lr": 1e-5,               # cosine decay floor
    "warmup_steps": 0,            # linear warmup steps; 0: warmup_frac of the run
    "warmup_frac": 0.02,          # warmup as a fraction of the total steps (when warmup_steps == 0)
    "epochs": 3,                  # passes over the train split
    "max_steps": 0,               # stop after this many optimizer steps (0: no limit)
    "max_tokens": 0,              # stop after this many training tokens (0: no limit)
    "weight_decay": 0.1,          # AdamW decay, 2-D Linear weights only
    "beta1": 0.9,
    "beta2": 0.95,
    "grad_clip": 1.0,             # max global grad norm (0: off)
    "eval_interval": 500,         # steps between evals on the fixed val subset (0: epoch ends only)
    "eval_batches": 20,           # batches in the fixed val subset
    "eval_max_batches": 0,        # cap on the full-val eval at epoch end (0: whole split)
    "log_interval": 10,           # steps between log lines
    "seed": 1337,                 # init, data order
    "device": "auto",             # auto | cpu | cuda | cuda:N
    "dtype": "auto",              # auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16
    "compile": False,             # torch.compile the model (falls back to eager on failure)
    "fsdp": False,                # under torchrun: shard with FSDP instead of DDP
    "resume": False,              # continue from out_dir/ckpt_latest.pt
    "overwrite": False,           # allow replacing an out_dir that already holds a checkpoint
    "init_from": "scratch",       # scratch | resume | path to a repo .pt or an HF / mamba-ssm folder
    "tensorboard": True,          # write tb/ event files (if tensorboard is installed)
}

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
    """Mean next-token cross-entropy (nats). logits: (B, L, V_padded); targets: (B, L).

    Logits beyond `vocab_size` (the embedding's padding to a multiple of 8) are cut off, so
    padded ids never take probability mass. Computed in fp32.
    """
    if vocab_size is not None and logits.size(-1) != vocab_size:
        logits = logits[..., :vocab_size]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))


def resolve_device(device: str) -> torch.device:
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
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise UserError(f"--dtype={dtype} is not one of auto, float32, bfloat16, float16")
    if device.type != "cuda" and table[dtype] == torch.float16:
        raise UserError("--dtype=float16 needs CUDA; use float32 or bfloat16 on CPU")
    return table[dtype]


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision context: autocast on CUDA for bf16/fp16, nothing for fp32 (CPU bf16 too)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


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
        from tqdm import tqdm
        chunks = tqdm(chunks, desc=progress, unit="batch", leave=False)
    for chunk in chunks:
        x, y = split.get_batch(np.asarray(chunk), device=device)
        with autocast(device, dtype):
            logits = model(x)
        total += lm_loss(logits, y, vocab_size).item() * y.numel()
        count += y.numel()
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
    return total / max(count, 1)


def eval_subset(num_sequences: int, n: int, seed: int) -> np.ndarray:
    """A fixed, deterministic subset of n sequence indices (sorted) for the periodic evals."""
    if n >= num_sequences:
        return np.arange(num_sequences)
    return np.sort(np.random.default_rng(seed).permutation(num_sequences)[:n])


# ----------------------------------------------------------------------------------------------
# distributed


class Dist:
    """Process-group facts for this process (single process: rank 0 of 1)."""

    def __init__(self, device_spec: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        self.owns_group = False
        device = resolve_device(device_spec)
        if self.enabled and device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        self.device = device
        if self.enabled and not torch.distributed.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend=backend)
            self.owns_group = True
        self.main = self.rank == 0

    def all_sum(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return float(t.item())

    def any(self, flag: bool) -> bool:
        return self.all_sum(1.0 if flag else 0.0) > 0

    def barrier(self):
        if self.enabled:
            torch.distributed.barrier()

    def close(self):
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


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
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(out_dir / "tb"))
            except ImportError:
                warnings.warn("tensorboard is not installed; no tb/ logs (pip install tensorboard)")

    def restore(self, upto_step: int) -> None:
        """On resume: drop the rows after the checkpoint's step (they will be redone) from metrics.jsonl
        and from every other *.jsonl step log in out_dir (a hook's, e.g. router_stats.jsonl); reload the curve."""
        if not self.enabled:
            return
        for path in sorted(self.out_dir.glob("*.jsonl")):
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            kept = [r for r in rows if r.get("step", 0) <= upto_step]
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, path)
            if path.name == "metrics.jsonl":
                self.curve = [r for r in kept if r.get("kind") in ("train", "eval")]

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
            from tqdm import tqdm
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
# the loop


def train(config: dict, build_model: Callable[[], nn.Module], *, script: str,
          on_eval: Callable[[nn.Module, int, str], dict] | None = None,
          on_end: Callable[[nn.Module, str, list], None] | None = None) -> dict:
    """Train `build_model()` on config["data_dir"]; returns the final metrics dict.

    config: the script's config snapshot (saved into checkpoints); keys missing from it take
    `DEFAULTS`. build_model: builds the trained model for a fresh run (`init_from="scratch"`). A
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
    cfg = {**DEFAULTS, **config}
    dist = Dist(cfg["device"])
    try:
        with _stop_on_signals():
            result = _Run(cfg, config, build_model, script, on_eval, on_end, dist).run()
        dist.barrier()  # every rank past its last collective (rank 0 saves last) before the group goes
    finally:
        dist.close()
    if result["interrupted"] and _stop_signal:
        raise SystemExit(128 + _stop_signal[0])
    return result


class _Run:
    """State of one training run; `run()` is the loop. Split into short methods, read top to bottom."""

    def __init__(self, cfg, config, build_model, script, on_eval, on_end, dist: Dist):
        from mamba_lm.data import TokenSplit, load_meta

        self.cfg, self.config, self.script, self.dist = cfg, dict(config), script, dist
        self.on_eval, self.on_end = on_eval, on_end
        self.device = dist.device
        self.dtype = resolve_dtype(cfg["dtype"], self.device)
        self.out_dir = Path(cfg["out_dir"])
        self.data_dir = Path(cfg["data_dir"])
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        resume = cfg["resume"] or cfg["init_from"] == "resume"
        try:
            self.meta = load_meta(self.data_dir)
        except UserError as e:
            if not resume:
                raise
            raise UserError(f"{e} (resuming: repeat the original run's --data_dir and model flags)") from None
        seq_len = cfg["seq_len"] or None
        self.train_split = TokenSplit(self.data_dir, "train", seq_len)
        self.val_split = TokenSplit(self.data_dir, "val", seq_len)
        self.seq_len = self.train_split.seq_len
        self.tokenizer = data_tokenizer(self.data_dir, self.meta)
        self.vocab_size = self.tokenizer.vocab_size

        self.global_batch = cfg["batch_size"] * cfg["grad_accum"]
        if self.global_batch % dist.world:
            raise UserError(f"batch_size*grad_accum = {self.global_batch} sequences must divide evenly over "
                            f"{dist.world} processes; change --batch_size or --grad_accum")
        self.steps_per_epoch = self.train_split.num_sequences // self.global_batch
        if self.steps_per_epoch == 0:
            raise UserError(f"the train split has {self.train_split.num_sequences} sequences of {self.seq_len} tokens, "
                            f"fewer than one batch of {self.global_batch}; lower --batch_size or --seq_len")
        if self.val_split.num_sequences == 0:
            raise UserError(f"the val split of {self.data_dir} has no full sequence of {self.seq_len} tokens; "
                            "prepare more validation data or lower --seq_len")
        self.total_steps = self._budget()
        self.warmup = cfg["warmup_steps"] or max(1, round(cfg["warmup_frac"] * self.total_steps))

        # counters (a resumed run overwrites them from the checkpoint)
        self.step = self.epoch = self.step_in_epoch = self.tokens_seen = 0
        self.best_val_loss = float("inf")
        self.history: list[dict] = []
        self.metrics_last: dict = {}
        self.epoch_loss = [0.0, 0]       # sum of step losses, steps, in the current epoch
        self.elapsed_before = 0.0        # seconds of training in earlier sessions of this run
        self.init_from = cfg["init_from"]

        ckpt = self._prepare_out_dir(resume)
        torch.manual_seed(cfg["seed"])
        np.random.seed(cfg["seed"] % 2**32)
        self.raw = self._make_model(ckpt, build_model)
        self.raw.to(self.device).train()
        self.model_type = getattr(self.raw, "model_type", type(self.raw).__name__)
        self._check_vocab()
        self.model = self._wrap(self.raw)
        self.groups = param_groups(self.raw, cfg["weight_decay"])
        self.optimizer = self._make_optimizer()
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16)
        self.eval_idx = eval_subset(self.val_split.num_sequences, cfg["eval_batches"] * cfg["batch_size"], cfg["seed"])
        self.log = RunLog(self.out_dir, dist.main, cfg["tensorboard"])
        if ckpt is not None:
            self._restore(ckpt)

    # -- setup ----------------------------------------------------------------------------------

    def _budget(self) -> int:
        """Total optimizer steps: epochs, capped by max_steps and max_tokens (the LR schedule spans this)."""
        cfg = self.cfg
        total = cfg["epochs"] * self.steps_per_epoch
        if cfg["max_steps"] > 0:
            total = min(total, cfg["max_steps"])
        if cfg["max_tokens"] > 0:
            total = min(total, math.ceil(cfg["max_tokens"] / (self.global_batch * self.seq_len)))
        if total <= 0:
            raise UserError("the run has no steps: set --epochs, --max_steps or --max_tokens above 0")
        return total

    def _prepare_out_dir(self, resume: bool):
        """Resume: load ckpt_latest.pt. Fresh: refuse to replace a checkpoint unless overwrite=True."""
        latest, best = self.out_dir / "ckpt_latest.pt", self.out_dir / "ckpt_best.pt"
        if resume:
            if not latest.exists():
                raise UserError(f"--resume=True but {latest} does not exist; start a fresh run without --resume")
            return load_checkpoint(latest)
        existing = [p for p in (latest, best) if p.exists()]
        if existing and not self.cfg["overwrite"]:
            raise UserError(f"{self.out_dir} already holds {existing[0].name}; continue it with its original flags "
                            "plus --resume=True, or start over with --overwrite=True (its checkpoints and logs are "
                            "replaced), or pick another --out_dir")
        if self.dist.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            for name in ("ckpt_latest.pt", "ckpt_best.pt", "log.txt", "epochs.md", "epochs.csv", "loss.png"):
                (self.out_dir / name).unlink(missing_ok=True)
            for path in self.out_dir.glob("*.jsonl"):  # metrics.jsonl and the hooks' step logs
                path.unlink()
            shutil.rmtree(self.out_dir / "tb", ignore_errors=True)
        self.dist.barrier()
        return None

    def _make_model(self, ckpt, build_model):
        from mamba_lm.data import check_tokenizer_match

        if ckpt is not None:
            if ckpt.get("script") not in (None, self.script):
                raise UserError(f"{self.out_dir}/ckpt_latest.pt was written by {ckpt['script']}, not {self.script}; "
                                "resume it with that script or use another --out_dir")
            check_tokenizer_match(self.meta["tokenizer"], ckpt["tokenizer"])
            fp_ckpt, fp_data = ckpt.get("data", {}).get("fingerprint"), self.meta.get("fingerprint")
            if fp_ckpt and fp_data and fp_ckpt != fp_data:
                raise UserError(f"{self.out_dir} was trained on data with fingerprint {fp_ckpt[:12]}, but "
                                f"{self.data_dir} has {fp_data[:12]}; resume with the original "
                                f"--data_dir={ckpt['data'].get('dir', '?')}")
            model, _ = model_from_checkpoint(ckpt)
            self._check_same_model(ckpt, build_model)
            self.init_from = ckpt.get("init_from", "scratch")
            return model
        if self.cfg["init_from"] in ("scratch", ""):
            return build_model()
        if not Path(self.cfg["init_from"]).exists():
            raise UserError(f"--init_from={self.cfg['init_from']}: no such file or folder; use scratch, resume, "
                            "or the path of a repo .pt checkpoint or an HF / mamba-ssm folder")
        model, tokenizer, info = load_any_model(self.cfg["init_from"])
        want_type = self._script_model_type(build_model)
        if model.model_type != want_type:
            raise UserError(f"--init_from={self.cfg['init_from']} holds a {model.model_type!r} model, but "
                            f"{self.script} trains {want_type!r} models; use the script for that model type")
        if tokenizer is not None:
            check_tokenizer_match(self.meta["tokenizer"], tokenizer.to_dict())
        else:  # an HF / mamba-ssm folder without a tokenizer: only the vocabulary size can be checked
            from mamba_lm.interop import check_data_tokenizer
            check_data_tokenizer(info, self.meta["tokenizer"], self.data_dir)
        self.log_init = f"initialised from {self.cfg['init_from']} ({info.get('layout', info.get('source'))})"
        return model.train()

    @staticmethod
    def _probe_model(build_model):
        """The model the script would build, on the meta device when it allows (no memory, no init)."""
        try:
            with torch.device("meta"):
                return build_model()
        except Exception:
            return build_model()

    @classmethod
    def _script_model_type(cls, build_model) -> str:
        probe = cls._probe_model(build_model)
        return getattr(probe, "model_type", type(probe).__name__)

    def _check_same_model(self, ckpt, build_model):
        """Resume refuses a run whose model settings differ from the checkpoint's."""
        from mamba_lm.models import model_config_dict

        if self.cfg["init_from"] not in ("scratch", "resume", ""):
            return  # the model came from a pretrained checkpoint: the script's preset does not describe it
        probe = self._probe_model(build_model)
        want_type = getattr(probe, "model_type", type(probe).__name__)
        want = json.loads(json.dumps(model_config_dict(probe)))
        have = json.loads(json.dumps(ckpt["model_config"]))
        diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        if want_type != ckpt["model_type"] or diff:
            shown = ", ".join(f"{k}: checkpoint {have.get(k)!r} vs now {want.get(k)!r}" for k in diff[:4])
            raise UserError(f"{self.out_dir}/ckpt_latest.pt holds a different model "
                            f"({ckpt['model_type']} vs {want_type}{'; ' + shown if shown else ''}); "
                            f"resume with the original run's model flags{self._original_flags(ckpt)} "
                            "or use another --out_dir")

    def _original_flags(self, ckpt) -> str:
        """' (--preset=tiny --d_model=64)': the script's own (model) flags, --data_dir and --init_from whose
        values in the checkpoint's train_config differ from this run's; '' when none differ (or none are known)."""
        original = ckpt.get("train_config") or {}
        flags = [f"--{k}={v}" for k, v in original.items()
                 if (k not in DEFAULTS or k in ("data_dir", "init_from")) and k in self.config and self.config[k] != v]
        return f" ({' '.join(flags)})" if flags else ""

    def _check_vocab(self):
        model_vocab = getattr(getattr(self.raw, "config", None), "vocab_size", None)
        if model_vocab is not None and model_vocab < self.vocab_size:
            raise UserError(f"the model's vocab_size {model_vocab} is smaller than the data tokenizer's "
                            f"{self.vocab_size}; build the model with vocab_size={self.vocab_size}")

    def _wrap(self, model):
        """torch.compile (optional, falls back to eager) and DDP / FSDP under torchrun."""
        if self.cfg["compile"]:
            model = try_compile(model, self.device, self.seq_len)
        if not self.dist.enabled:
            return model
        if self.cfg["fsdp"]:
            return shard_fsdp(model)
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(model, device_ids=ids)

    def _make_optimizer(self):
        cfg = self.cfg
        groups = self.groups
        extra = {"fused": True} if self.device.type == "cuda" and not cfg["fsdp"] else {}
        return torch.optim.AdamW([{k: v for k, v in g.items() if k != "name"} for g in groups], lr=cfg["lr"],
                                 betas=(cfg["beta1"], cfg["beta2"]), **extra)

    def _restore(self, ckpt: dict):
        """Continue exactly where ckpt_latest.pt stopped."""
        if ckpt.get("global_batch", self.global_batch) != self.global_batch:
            raise UserError(f"the checkpoint used batch_size*grad_accum = {ckpt['global_batch']} sequences per step, "
                            f"this run {self.global_batch}; resume with the same global batch")
        if ckpt.get("data", {}).get("seq_len", self.seq_len) != self.seq_len:
            raise UserError(f"the checkpoint trained on sequences of {ckpt['data']['seq_len']} tokens, this run "
                            f"{self.seq_len} (its data position counts sequences); resume with the original "
                            f"--seq_len={ckpt['data']['seq_len']}")
        if ckpt["train_config"].get("seed", self.cfg["seed"]) != self.cfg["seed"]:
            raise UserError(f"the checkpoint used --seed={ckpt['train_config']['seed']} (it fixes the data order); "
                            "resume with the same seed")
        load_optimizer_state(self.model, self.optimizer, ckpt["optimizer"], self.cfg["fsdp"] and self.dist.enabled)
        self.step, self.epoch, self.step_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["step_in_epoch"]
        self.tokens_seen, self.best_val_loss = ckpt["tokens_seen"], ckpt["best_val_loss"]
        self.history, self.metrics_last = list(ckpt.get("history", [])), dict(ckpt.get("metrics", {}))
        self.epoch_loss = list(ckpt.get("epoch_loss", [0.0, 0]))
        self.elapsed_before = float(ckpt.get("elapsed_s", 0.0))
        set_rng_state(ckpt.get("rng"))
        self.log.restore(self.step)
        schedule = ckpt.get("schedule", {})
        if schedule and (schedule.get("total"), schedule.get("warmup")) != (self.total_steps, self.warmup):
            self.log.line(f"note: LR schedule now spans {self.total_steps} steps (warmup {self.warmup}); "
                          f"the checkpoint's spanned {schedule.get('total')} (warmup {schedule.get('warmup')})")

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> dict:
        from tqdm import tqdm

        from mamba_lm.data import batch_indices, epoch_order

        cfg = self.cfg
        self._log_header()
        self.t_start = time.time()
        order = epoch_order(self.train_split.num_sequences, self.epoch, cfg["seed"])
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not self.dist.main, desc=self.out_dir.name)
        interrupted, t_log, tokens_log = False, time.time(), self.tokens_seen
        while self.step < self.total_steps:
            lr = get_lr(self.step, self.warmup, self.total_steps, cfg["lr"], cfg["min_lr"])
            batch = batch_indices(order, self.global_batch, self.step_in_epoch)
            loss, aux, grad_norm = self._train_step(batch, lr)
            self.step += 1
            self.step_in_epoch += 1
            self.tokens_seen += self.global_batch * self.seq_len
            self.epoch_loss[0] += loss
            self.epoch_loss[1] += 1
            bar.update(1)
            if self.step % cfg["log_interval"] == 0 or self.step == self.total_steps:
                dt = time.time() - t_log
                tok_s = (self.tokens_seen - tokens_log) / max(dt, 1e-9)
                steps_timed = max(1, (self.tokens_seen - tokens_log) // (self.global_batch * self.seq_len))
                self._log_train(loss, aux, lr, grad_norm, tok_s, 1000 * dt / steps_timed)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}")
                t_log, tokens_log = time.time(), self.tokens_seen
            if self.step_in_epoch == self.steps_per_epoch:
                self._end_epoch()  # moves the counters to the next epoch
                order = epoch_order(self.train_split.num_sequences, self.epoch, cfg["seed"])
                t_log, tokens_log = time.time(), self.tokens_seen  # throughput excludes eval time
            elif cfg["eval_interval"] and self.step % cfg["eval_interval"] == 0 and self.step < self.total_steps:
                # (the last step's eval is the one of the partial epoch end after the loop, not done twice)
                self._eval_and_save()
                t_log, tokens_log = time.time(), self.tokens_seen
            if self.dist.any(_stop.is_set()) and self.step < self.total_steps:
                interrupted = True
                self._save("ckpt_latest.pt")
                self.log.line(f"stopped by signal at step {self.step}; saved {self.out_dir / 'ckpt_latest.pt'} "
                              f"(continue with the same flags plus --resume=True)")
                break
        bar.close()
        if not interrupted and self.step_in_epoch > 0 and (not self.history or self.history[-1]["step"] != self.step):
            self._end_epoch(partial=True)
        if not interrupted and self.dist.main and self.on_end is not None:
            self.on_end(self.raw, str(self.out_dir), self.history)
        self.log.close()
        return {"step": self.step, "tokens_seen": self.tokens_seen, "best_val_loss": self.best_val_loss,
                "interrupted": interrupted, "out_dir": str(self.out_dir), "history": self.history,
                **self.metrics_last}

    def _train_step(self, batch: np.ndarray, lr: float):
        """One optimizer step on the global batch (this rank's slice, in micro-batches). Returns
        (mean LM loss of the global batch, mean aux loss or None, grad norm)."""
        cfg, dist = self.cfg, self.dist
        share = self.global_batch // dist.world
        local = batch[dist.rank * share:(dist.rank + 1) * share]
        micro = [local[i:i + cfg["batch_size"]] for i in range(0, len(local), cfg["batch_size"])]
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        aux_sum, has_aux = torch.zeros((), device=self.device, dtype=torch.float64), False
        for j, idx in enumerate(micro):
            x, y = self.train_split.get_batch(idx, device=self.device)
            weight = len(idx) / self.global_batch          # this micro-batch's share of the global batch
            last = j == len(micro) - 1
            sync = contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()
            with sync:
                with autocast(self.device, self.dtype):
                    logits = self.model(x)
                    loss = lm_loss(logits, y, self.vocab_size)
                    aux = self.raw.aux_loss() if hasattr(self.raw, "aux_loss") else None
                total = loss if aux is None else loss + aux
                # DDP averages gradients over ranks: scale by world so the sum matches one process
                self.scaler.scale(total * weight * dist.world).backward()
            loss_sum += loss.detach().double() * weight
            if aux is not None:
                has_aux = True
                aux_sum += aux.detach().double() * weight
        if dist.enabled:
            torch.distributed.all_reduce(loss_sum)
            torch.distributed.all_reduce(aux_sum)
        loss_value = float(loss_sum.item())
        if not math.isfinite(loss_value):
            self._diverged(f"loss is {loss_value}", lr)
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = cfg["grad_clip"] if cfg["grad_clip"] > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if not math.isfinite(grad_norm) and self.dtype != torch.float16:  # fp16: the scaler skips the step
            self._diverged(f"gradient norm is {grad_norm}", lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, (float(aux_sum.item()) if has_aux else None), grad_norm

    def _diverged(self, what: str, lr: float):
        latest = self.out_dir / "ckpt_latest.pt"
        kept = f"the last good checkpoint {latest} is intact" if latest.exists() else "no checkpoint was written yet"
        self.log.line(f"diverged at step {self.step + 1}: {what} (lr {lr:.3g})")
        raise TrainingDiverged(f"training diverged at step {self.step + 1}: {what} (lr {lr:.3g}); {kept}; "
                               f"lower --lr or --grad_clip and resume/restart")

    # -- evaluation, epoch ends, checkpoints ----------------------------------------------------

    def _val_loss(self, indices: np.ndarray, desc: str | None = None) -> float:
        """Mean token CE on val sequences `indices`, sharded over ranks and summed."""
        mine = indices[self.dist.rank::self.dist.world]
        model = self.model if self.cfg["fsdp"] and self.dist.enabled else self.raw
        total, count = loss_sums(model, self.val_split, mine, batch_size=self.cfg["batch_size"], device=self.device,
                                 dtype=self.dtype, vocab_size=self.vocab_size,
                                 progress=desc if self.dist.main else None)
        return self.dist.all_sum(total) / max(self.dist.all_sum(count), 1)

    def _subset_eval(self) -> dict:
        extra = (self.on_eval(self.raw, self.step, str(self.out_dir)) or {}) if self.on_eval else {}
        val_loss = self._val_loss(self.eval_idx)
        if hasattr(self.raw, "reset_stats"):
            self.raw.reset_stats()
        row = {"kind": "eval", "step": self.step, "epoch": self.epoch, "tokens": self.tokens_seen,
               "val_loss": val_loss, "val_ppl": _ppl(val_loss), "eval_sequences": len(self.eval_idx),
               "minutes": self._minutes(), **{k: v for k, v in extra.items() if _scalar(v)}}
        self.log.metrics(row)
        self.log.line(f"eval step {self.step} | val loss {val_loss:.4f} | val ppl {_ppl(val_loss):.2f} "
                      f"| {len(self.eval_idx)} sequences" + "".join(f" | {k} {v:.4g}" for k, v in extra.items()
                                                                     if _scalar(v)))
        self.metrics_last = {"val_loss": val_loss, "val_ppl": _ppl(val_loss), "eval": "subset", "step": self.step}
        return row

    def _eval_and_save(self, extra_metrics: dict | None = None):
        """Subset eval, ckpt_latest.pt, ckpt_best.pt if the subset val loss improved, loss.png."""
        row = self._subset_eval()
        self.metrics_last.update(extra_metrics or {})
        improved = row["val_loss"] < self.best_val_loss
        if improved:
            self.best_val_loss = row["val_loss"]
        self._save("ckpt_latest.pt")
        if improved:
            self._save("ckpt_best.pt")
        self.log.plot(f"{self.model_type} - {self.out_dir.name}")

    def _end_epoch(self, partial: bool = False):
        """Full val eval (capped by eval_max_batches), epoch table row, then checkpoints.

        After a complete epoch the counters move to the start of the next one before saving, so
        a resume starts there.
        """
        cap = self.cfg["eval_max_batches"] * self.cfg["batch_size"]
        full = np.arange(self.val_split.num_sequences)
        if cap > 0 and len(full) > cap:
            full = eval_subset(len(full), cap, self.cfg["seed"] + 1)
        val_full = self._val_loss(full, desc=f"val epoch {self.epoch + 1}")
        row = {"epoch": self.epoch + 1, "epoch_frac": self.step_in_epoch / self.steps_per_epoch, "step": self.step,
               "train_loss": self.epoch_loss[0] / max(self.epoch_loss[1], 1), "val_loss": val_full,
               "val_ppl": _ppl(val_full), "minutes": self._minutes(), "tokens": self.tokens_seen}
        if self.history and self.history[-1]["epoch"] == row["epoch"] and self.history[-1]["epoch_frac"] < 1:
            self.history.pop()  # a resumed run finishing an epoch that an earlier session left partial
        self.history.append(row)
        self.log.metrics({"kind": "epoch", **row, "val_sequences": len(full)})
        self.log.line(f"epoch {row['epoch']}{' (partial)' if partial else ''} | step {self.step} | train loss "
                      f"{row['train_loss']:.4f} | val loss {val_full:.4f} | val ppl {row['val_ppl']:.2f} "
                      f"| {row['minutes']:.1f} min | {self.tokens_seen:,} tokens")
        if self.dist.main:
            write_epoch_tables(self.history, self.out_dir / "epochs.md", self.out_dir / "epochs.csv")
        if not partial:
            self.epoch, self.step_in_epoch, self.epoch_loss = self.epoch + 1, 0, [0.0, 0]
        self._eval_and_save({"val_loss_full": val_full, "val_ppl_full": _ppl(val_full)})

    def _minutes(self) -> float:
        return (self.elapsed_before + time.time() - self.t_start) / 60

    def _save(self, name: str):
        """Write a checkpoint (all ranks gather state, rank 0 writes)."""
        fsdp = self.cfg["fsdp"] and self.dist.enabled
        model_state = gather_model_state(self.model, self.raw, fsdp)
        optim_state = gather_optimizer_state(self.model, self.optimizer, fsdp)
        if not self.dist.main:
            return
        from mamba_lm.models import model_config_dict
        ckpt = {
            "model_type": self.model_type, "model_config": model_config_dict(self.raw), "model": model_state,
            "optimizer": optim_state, "optimizer_layout": "fqn" if fsdp else "torch",
            "train_config": self.config, "tokenizer": self.tokenizer.to_dict(),
            "data": {"dir": str(self.data_dir), "fingerprint": self.meta.get("fingerprint"), "seq_len": self.seq_len},
            "step": self.step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
            "tokens_seen": self.tokens_seen, "best_val_loss": self.best_val_loss, "metrics": self.metrics_last,
            "rng": rng_state(), "history": self.history, "script": self.script,
            "schedule": {"warmup": self.warmup, "total": self.total_steps, "lr": self.cfg["lr"],
                         "min_lr": self.cfg["min_lr"]},
            "global_batch": self.global_batch, "epoch_loss": list(self.epoch_loss),
            "elapsed_s": self._minutes() * 60, "init_from": self.init_from, "world_size": self.dist.world,
        }
        save_checkpoint(self.out_dir / name, ckpt)

    # -- logging --------------------------------------------------------------------------------

    def _log_header(self):
        from mamba_lm.models import model_config_dict
        n_params = self.raw.num_params() if hasattr(self.raw, "num_params") else sum(
            p.numel() for p in self.raw.parameters())
        tokens_per_step = self.global_batch * self.seq_len
        lines = [
            f"run {self.out_dir} | {self.script} | {'resumed at step ' + str(self.step) if self.step else 'fresh'}"
            f" | device {self.device} x{self.dist.world} {'fsdp' if self.cfg['fsdp'] and self.dist.enabled else ''}"
            f" | dtype {str(self.dtype).replace('torch.', '')}",
            f"model {self.model_type} | {n_params:,} params | {json.dumps(model_config_dict(self.raw))}",
            f"data {self.data_dir} | train {self.train_split.num_sequences:,} x {self.seq_len} tokens | "
            f"val {self.val_split.num_sequences:,} sequences | tokenizer {self.tokenizer.name} "
            f"(vocab {self.vocab_size})",
            f"steps {self.total_steps:,} ({self.steps_per_epoch:,}/epoch, {self.total_steps * tokens_per_step:,} "
            f"tokens) | global batch {self.global_batch} x {self.seq_len} = {tokens_per_step:,} tokens | "
            f"warmup {self.warmup} | lr {self.cfg['lr']:g} -> {self.cfg['min_lr']:g} cosine",
            f"optimizer AdamW betas ({self.cfg['beta1']}, {self.cfg['beta2']}) | {describe_groups(self.groups)}",
        ]
        if getattr(self, "log_init", None):
            lines.append(self.log_init)
        for line in lines:
            self.log.line(line)
        self.log.metrics({"kind": "config", "step": self.step, "config": self.config, "num_params": n_params,
                          "total_steps": self.total_steps, "warmup": self.warmup})

    def _log_train(self, loss, aux, lr, grad_norm, tok_s, ms_per_step):
        row = {"kind": "train", "step": self.step, "epoch": self.epoch, "tokens": self.tokens_seen,
               "train_loss": loss, "lr": lr, "grad_norm": grad_norm, "tok_per_s": tok_s,
               "ms_per_step": ms_per_step}
        if aux is not None:
            row["aux_loss"] = aux
        self.log.metrics(row)
        self.log.line(f"step {self.step}/{self.total_steps} | epoch {self.epoch + 1} | loss {loss:.4f}"
                      + (f" | aux {aux:.4f}" if aux is not None else "")
                      + f" | lr {lr:.3e} | grad_norm {grad_norm:.3f} | tok/s {tok_s:,.0f} "
                        f"| ms/step {row['ms_per_step']:.1f} | tokens {self.tokens_seen:,}", echo=False)


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def _scalar(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# ----------------------------------------------------------------------------------------------
# helpers: tokenizer of a data dir, compile, FSDP state


def data_tokenizer(data_dir, meta: dict):
    """The TextTokenizer a data dir was prepared with (its tokenizer.json, or byte-level)."""
    from mamba_lm.data import check_tokenizer_match
    from mamba_lm.tokenizer import load_tokenizer

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


def shard_fsdp(model):
    """FSDP2 (`fully_shard`): shard each block of `backbone.layers` (if any), then the root."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as e:
        raise UserError(f"--fsdp=True needs torch.distributed.fsdp.fully_shard (torch >= 2.6): {e}")
    layers = getattr(getattr(model, "backbone", None), "layers", None)
    for layer in layers or []:
        fully_shard(layer)
    fully_shard(model)
    return model


def gather_model_state(model, raw, fsdp: bool) -> dict:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return clean_state_dict(get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                                     cpu_offload=True)))
    return {k: v.detach().cpu() for k, v in clean_state_dict(raw.state_dict()).items()}


def gather_optimizer_state(model, optimizer, fsdp: bool) -> dict:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                    cpu_offload=True))
    return optimizer.state_dict()


def load_optimizer_state(model, optimizer, state: dict | None, fsdp: bool) -> None:
    if not state:
        return
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                                 options=StateDictOptions(full_state_dict=True))
        return
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError) as e:
        raise UserError(f"the checkpoint's optimizer state does not fit this model/optimizer ({e}); "
                        "resume with the settings it was trained with")
