"""What the benchmarks share (bench_throughput.py, profile_step.py, count_ops.py, bench_decode.py,
bench_multitrack_speed.py): the three models at one preset, one training step, and a random narrative
signal table. Import after the script has put the repository root on sys.path."""

import os
import time

import torch
import torch.nn.functional as F

IMPLS = ("ours", "mamba_ssm", "multitrack")


def build_impl(impl: str, preset: str, vocab_size: int, dev: str):
    """ours: mamba_lm.mamba at `preset`; mamba_ssm: mamba-ssm's own MambaLMHeadModel with that config
    (ImportError when not installed); multitrack: the parameter-matched multi-track preset
    (multitrack-130m for the mamba-130m presets, else the preset of the same name)."""
    from mamba_lm import models
    from mamba_lm.mamba import mamba_config

    cfg = mamba_config(preset, vocab_size=vocab_size)
    if impl == "ours":
        return models.build_model("mamba", cfg, device=dev)
    if impl == "mamba_ssm":
        from mamba_lm.convert import mamba_ssm_model
        return mamba_ssm_model(cfg, device=dev)
    if impl == "multitrack":
        from multitrack.multitrack_config import PRESETS, multitrack_config
        name = "multitrack-130m" if preset.startswith("mamba-130m") else preset
        if name not in PRESETS:
            raise ValueError(f"no multitrack preset matching {preset!r} (have {', '.join(PRESETS)})")
        return models.build_model("multitrack", multitrack_config(name, vocab_size=vocab_size), device=dev)
    raise ValueError(f"unknown implementation {impl!r}: expected one of {', '.join(IMPLS)}")


def train_step(net, opt, ids, dev, amp=None):
    """forward (bf16 autocast: on CUDA, or as `amp` says) + cross-entropy (+ the model's aux loss) + backward
    + optimizer step; with opt None the gradients are dropped instead (count_ops.py: the step without AdamW)."""
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda" if amp is None else amp):
        logits = net(ids[:, :-1])
    logits = getattr(logits, "logits", logits)  # mamba_ssm's model returns CausalLMOutput(logits=...)
    loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
    aux = net.aux_loss() if hasattr(net, "aux_loss") else None
    (loss if aux is None else loss + aux).backward()
    if opt is None:
        net.zero_grad(set_to_none=True)
    else:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss


def set_random_signals(model, density: float = 0.05, seed: int = 0) -> None:
    """Give a multi-track model a sparse random narrative signal table (each flag set with probability
    `density`), so that speed runs exercise the router's signal path without a tokenizer."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.rand(model.config.vocab_size, model.signal_table.shape[1], generator=g) < density
    model.set_signal_table(rows.to(torch.uint8))


def load_average() -> list[float]:
    """The 1, 5 and 15-minute load averages (os.getloadavg). Printed before and after every CPU benchmark:
    on a shared machine a load above the core count means other jobs took the cores, and CPU figures
    taken then are several times too low (2-thread OpenMP ops wait on a descheduled thread)."""
    return [round(x, 2) for x in os.getloadavg()]


def cpu_setup(threads: int) -> dict:
    """Set torch's CPU threads (0: keep torch's default) and describe the machine for the JSON line."""
    if threads:
        torch.set_num_threads(threads)
    return {"cpus": os.cpu_count(), "threads": torch.get_num_threads(), "load_before": load_average()}


def best_seconds(fn, repeats: int) -> float:
    """Seconds of the fastest of `repeats` calls of fn(), after one untimed call that warms it up."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def read_rate_gbs(mib: int = 512, repeats: int = 5) -> float:
    """The machine's rate of reading a large float32 tensor once (GB/s, best of `repeats`): `mib` MiB
    summed, the access pattern of a batch-1 decode step that reads every weight once. Sets the decode
    bound: parameter bytes / this rate = seconds per token at the very best."""
    x = torch.ones(mib * 2**20 // 4)
    return x.numel() * 4 / best_seconds(x.sum, repeats) / 1e9


def tensors_read_rate_gbs(tensors, repeats: int = 3) -> float:
    """The rate of reading `tensors` (a model's parameters) once, each summed in turn (GB/s, best of
    `repeats`): the weights as the decode step meets them, dozens of separate tensors of 0.1-180 MB rather
    than one 512 MiB stream. What any per-tensor read (a sum or a product) can reach on this machine."""
    total = sum(t.numel() * t.element_size() for t in tensors)
    return total / best_seconds(lambda: [t.sum() for t in tensors], repeats) / 1e9
