"""Verify the 130M baseline configuration on this machine: size, training step, generation, memory, speed.

    python test_mamba_130m.py                  # GPU if available: batch 8 x 1024, bf16 autocast
    python test_mamba_130m.py --device=cpu     # CPU: batch 2 x 256, fp32

Prints a summary and exits 1 if a check fails: the parameter count is exactly 126,924,672, a
forward/backward step gives finite gradients, greedy generation via step() reproduces the parallel
forward's argmax, and peak memory / tokens per second are reported (no thresholds).

On the idle 2-core development VM (AMD EPYC, fp32, 2 threads) the CPU run reported about 84 tokens/s
training and 38 tokens/s decode with the code of 2026-11-29. On 2026-12-06, with one thread
(OMP_NUM_THREADS=1) at load 2.7 (other jobs on the cores), it reported 51 tokens/s training (the eager
scan: this script calls the model directly; the trainer compiles the scan for long runs) and 31.6 tokens/s
decode, 63-76% of the memory-bandwidth bound (bench/results/cpu_model.md: paired before/after figures,
`bench/cpu_figures.sh`). On the idle VM (load 0.36 before, 0.83 after, 2 threads, 2026-12-06 07:38 UTC)
it reported 88 tokens/s training and 55.2 tokens/s decode. The load average is printed before and after: above the core count other jobs
share the cores and the figures come out several times lower (the 5 and 4 tokens/s once recorded for
this script were such figures).
"""

import math
import os
import resource
import sys
import time

import torch
import torch.nn.functional as F

from mamba_lm.configurator import apply_overrides
from mamba_lm.errors import user_errors
from mamba_lm.mamba import MambaLMHeadModel, mamba_config

# ----------------------------------------------------------------------------------------------
device = "auto"          # "auto" (cuda if available), "cpu" or "cuda"
preset = "mamba-130m"    # mamba_lm.mamba.PRESETS key
expected_params = 126_924_672  # parameter count of mamba-130m (measured with mamba-ssm) [>=0]
batch_size = 0           # 0: 8 on GPU, 2 on CPU [>=0]
seq_len = 0              # 0: 1024 on GPU, 256 on CPU [>=0]
train_steps = 0          # 0: 3 on GPU, 2 on CPU (the first one is warmup, not timed) [>=0]
gen_tokens = 32          # greedy tokens generated with step() [>=1]
seed = 1337              # torch seed [>=0]
# ----------------------------------------------------------------------------------------------
config = apply_overrides(globals(), sys.argv[1:])

results = []


def check(name: str, ok: bool, detail: str = "") -> None:
    results.append((name, bool(ok)))
    print(f"{'PASS' if ok else 'FAIL'}  {name:<44} {detail}")


def sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def peak_memory(dev: str) -> str:
    """Peak allocated CUDA memory, or the process's peak RSS on CPU."""
    if dev == "cuda":
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (max_memory_allocated)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (peak RSS)"


with user_errors():
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    B = batch_size or (8 if dev == "cuda" else 2)
    L = seq_len or (1024 if dev == "cuda" else 256)
    n_steps = max(2, train_steps or (3 if dev == "cuda" else 2))
    amp = torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda")
    torch.manual_seed(seed)
    load_before = os.getloadavg()
    print(f"device={dev}  torch={torch.__version__}  preset={preset}  batch={B} x {L} tokens  "
          f"threads={torch.get_num_threads()}  load average {load_before[0]:.2f} on {os.cpu_count()} cores")

    cfg = mamba_config(preset)
    model = MambaLMHeadModel(cfg, device=dev)
    n = model.num_params()
    check("parameter count", preset != "mamba-130m" or n == expected_params, f"{n:,} (expected {expected_params:,})")

    ids = torch.randint(0, cfg.vocab_size, (B, L + 1), device=dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times, losses = [], []
    for it in range(n_steps):  # first iteration is warmup
        sync(dev)
        t0 = time.perf_counter()
        with amp:
            logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(dev)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        print(f"  train step {it}: loss {loss.item():.4f}  {times[-1] * 1000:.0f} ms")
    ln_v = math.log(cfg.vocab_size)
    check("forward/backward/AdamW step", all(math.isfinite(x) for x in losses) and abs(losses[0] - ln_v) < 1.0
          and losses[-1] < losses[0], f"loss {losses[0]:.3f} -> {losses[-1]:.3f} on one batch (ln V = {ln_v:.2f})")
    train_tps = B * L / min(times[1:])
    print(f"  training throughput: {train_tps:,.0f} tokens/s; peak memory {peak_memory(dev)}")

    model.eval()
    prompt = ids[:1, :16]
    with torch.no_grad(), amp:
        cache = model.allocate_cache(1)
        next_logits = model(prompt, cache=cache)[:, -1]
        out = []
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(gen_tokens):
            tok = next_logits[:, :cfg.vocab_size].argmax(-1)
            out.append(tok)
            next_logits = model.step(tok, cache)
        sync(dev)
        gen_s = time.perf_counter() - t0
        generated = torch.stack(out, dim=1)
        full = model(torch.cat([prompt, generated], dim=1))[:, prompt.shape[1] - 1:-1, :cfg.vocab_size]
    agree = (full.argmax(-1) == generated).float().mean().item()
    check("greedy step() generation == forward argmax", agree >= (0.9 if dev == "cuda" else 1.0),
          f"{agree * 100:.0f}% of {gen_tokens} tokens agree")
    print(f"  decode: {gen_tokens / gen_s:,.1f} tokens/s (batch 1, plain step loop)")
    print(f"peak memory: {peak_memory(dev)}")

    failed = [r for r in results if not r[1]]
    load_after = os.getloadavg()
    loaded = dev == "cpu" and max(load_before[0], load_after[0]) > (os.cpu_count() or 1)
    print(f"\n{len(results) - len(failed)}/{len(results)} checks passed on {dev}; "
          f"train {train_tps:,.0f} tok/s, decode {gen_tokens / gen_s:,.1f} tok/s; load average before "
          f"{load_before[0]:.2f}, after {load_after[0]:.2f} on {os.cpu_count()} cores"
          f"{' (other jobs shared the cores: these CPU figures are too low)' if loaded else ''}")
    sys.exit(1 if failed else 0)
