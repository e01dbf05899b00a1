"""Training throughput and peak memory: our Mamba vs mamba-ssm's own MambaLMHeadModel (same config, same run).

    python bench/bench_throughput.py                                   # GPU: mamba-130m, batch 8 and 64 x 1024
    python bench/bench_throughput.py --model=multitrack                # also the multi-track model
    python bench/bench_throughput.py --model=multitrack --compile=True # the same under torch.compile
    python bench/bench_throughput.py --preset=small-cpu --vocab_size=4096 --seq_len=256 --batch_sizes=8 --steps=5 --warmup=2   # CPU
    python bench/bench_throughput.py ... --cpu_scan=compiled           # CPU: the scan's blocks compiled by inductor

On the CPU the load average is printed before and after (and stored in the JSON line): figures taken while
other jobs load the cores (load above the core count) are several times too low; re-run on an idle machine.

With --compile=True (or --cpu_scan=compiled) the first warmup steps include the compilation (the first
step's seconds are in the JSON as first_step_s; inductor caches the code on disk, so a second run of the
same shapes compiles in seconds); a model that does not compile runs eager (the trainer's warning says so). One timed step = forward + cross-entropy + backward + AdamW step
(bench_common.train_step: bf16 autocast on CUDA, fp32 on CPU unless --cpu_amp=True), timed with torch.cuda.synchronize()
after `warmup` untimed steps. Peak memory is torch.cuda.max_memory_allocated() per run on GPU, the
process's peak RSS on CPU (monotone over the whole process, so only the first CPU row is a clean number). Prints a markdown table and one JSON line.
Runs that do not fit (CUDA OOM) or implementations that are not installed are reported, not fatal.
"""

import gc
import json
import os
import platform
import resource
import sys
import time
from datetime import datetime, timezone

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from bench_common import build_impl, cpu_setup, load_average, train_step

from mamba_lm import ops
from mamba_lm.configurator import apply_overrides
from mamba_lm.errors import UserError, user_errors

# ----------------------------------------------------------------------------------------------
preset = "mamba-130m"    # mamba_lm.mamba.PRESETS key (the multitrack model uses its matching preset)
batch_sizes = "8,64"     # comma-separated batch sizes
seq_len = 1024           # tokens per sequence [>=1]
steps = 10               # timed training steps per run [>=1]
warmup = 3               # untimed steps before timing (kernel autotuning, allocator warmup) [>=0]
model = "mamba"          # "mamba": ours vs mamba-ssm; "multitrack": additionally the multi-track model
vocab_size = 50277       # vocabulary (GPT-NeoX) [>=2]
device = "auto"          # "auto" (cuda if available), "cpu" or "cuda"
lr = 3e-4                # AdamW learning rate (speed does not depend on it) [>0]
compile = False          # torch.compile each model first (trainer.try_compile: eager if compiling fails)
seed = 1337              # torch seed [>=0]
cpu_scan = "eager"       # CPU scan: "eager" (blocked loop) or "compiled" (its blocks by torch.compile; ops.set_cpu_scan)
threads = 0              # CPU threads for torch (0: torch's default, the core count) [>=0]
cpu_amp = False          # CPU: bf16 autocast (oneDNN's bf16 matmuls; other numbers than fp32: report apart)
# ----------------------------------------------------------------------------------------------
config = apply_overrides(globals(), sys.argv[1:])


def sync(dev):
    if dev == "cuda":
        torch.cuda.synchronize()


def peak_memory_gib(dev) -> float:
    if dev == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def bench_one(name, impl, batch, dev) -> dict:
    row = {"impl": name, "batch": batch, "seq_len": seq_len}
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    net = opt = None
    try:
        torch.manual_seed(seed)
        net = build_impl(impl, preset, vocab_size, dev).train()
        row["params"] = sum(p.numel() for p in net.parameters())
        if compile:
            from mamba_lm.trainer import try_compile
            net = try_compile(net, torch.device(dev), seq_len)
        opt = torch.optim.AdamW(net.parameters(), lr=lr, fused=dev == "cuda")
        ids = torch.randint(0, vocab_size, (batch, seq_len + 1), device=dev)
        first_step_s = None
        for i in range(warmup):
            t_step = time.perf_counter()
            train_step(net, opt, ids, dev, amp)
            sync(dev)
            if i == 0:   # includes compiling, with --compile or --cpu_scan=compiled (cached on disk later)
                first_step_s = time.perf_counter() - t_step
        t0 = time.perf_counter()
        fastest = float("inf")
        for _ in range(steps):
            t_step = time.perf_counter()
            loss = train_step(net, opt, ids, dev, amp)
            sync(dev)
            fastest = min(fastest, time.perf_counter() - t_step)
        seconds = time.perf_counter() - t0
        row.update(status="ok", tokens_per_s=batch * seq_len * steps / seconds,
                   ms_per_step=1000 * seconds / steps, ms_fastest_step=1000 * fastest,
                   peak_mem_gib=peak_memory_gib(dev), loss=loss.item(), first_step_s=first_step_s)
    except ImportError as e:
        row.update(status=f"not installed ({e.name or e})")
    except torch.cuda.OutOfMemoryError:
        row.update(status="OOM", peak_mem_gib=peak_memory_gib(dev))
    except Exception as e:  # noqa: BLE001 - a benchmark row fails, the run goes on
        row.update(status=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}")
    del net, opt
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()
    return row


def fmt(row, key, spec):
    return format(row[key], spec) if key in row else "-"


with user_errors():
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    sizes = [int(b) for b in str(batch_sizes).split(",") if b.strip()]
    if cpu_scan not in ("eager", "compiled"):
        raise UserError(f"--cpu_scan={cpu_scan!r}: expected 'eager' or 'compiled'")
    ops.set_cpu_scan(cpu_scan)
    amp = True if dev == "cpu" and cpu_amp else None     # None: train_step's default (bf16 on CUDA, fp32 on CPU)
    machine = cpu_setup(threads)
    impls = [("ours (mamba_lm.mamba)", "ours"), ("mamba_ssm.MambaLMHeadModel", "mamba_ssm")]
    if model == "multitrack":
        impls.append(("multitrack (models.build_model)", "multitrack"))
    gpu = torch.cuda.get_device_name() if dev == "cuda" else platform.processor() or platform.machine()
    print(f"device={dev} ({gpu})  torch={torch.__version__}  preset={preset}  seq_len={seq_len}  "
          f"steps={steps} warmup={warmup}  threads={machine['threads']}/{machine['cpus']} cpu_scan={cpu_scan}  "
          f"{'bf16 autocast  ' if amp else ''}"
          f"load average before: {machine['load_before']}")
    ops.log_kernels_once()
    rows = []
    for batch in sizes:
        for name, impl in impls:
            row = bench_one(name, impl, batch, dev)
            rows.append(row)
            print(f"  {name:<32} batch {batch:>3}: {row['status']:<10} {fmt(row, 'tokens_per_s', ',.0f')} tok/s  "
                  f"peak {fmt(row, 'peak_mem_gib', '.2f')} GiB", flush=True)

    print(f"\n| implementation | batch x seq | params | tokens/s | ms/step | peak memory (GiB) | status |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['impl']} | {r['batch']} x {r['seq_len']} | {fmt(r, 'params', ',')} | {fmt(r, 'tokens_per_s', ',.0f')} "
              f"| {fmt(r, 'ms_per_step', '.1f')} | {fmt(r, 'peak_mem_gib', '.2f')} | {r['status']} |")
    machine["load_after"] = load_average()
    print(f"load average before: {machine['load_before']}  after: {machine['load_after']}")
    print(json.dumps({"bench": "throughput", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      "device": dev, "device_name": gpu, "torch": torch.__version__, "kernels": ops.KERNELS,
                      "machine": machine, "config": config, "rows": rows}))
