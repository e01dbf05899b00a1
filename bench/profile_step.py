"""Where the time of a training step goes: torch.profiler over a few steps of our baseline, mamba-ssm's own
MambaLMHeadModel and the multi-track model (same config, batch and precision).

    python bench/profile_step.py                                   # GPU: 130M presets, batch 8 and 64 x 1024, bf16
    python bench/profile_step.py --preset=tiny --seq_len=64 --batch_sizes=2 --device=cpu --steps=1 --warmup=1

One step = forward + cross-entropy + backward + AdamW (bench_common.train_step, as in
bench_throughput.py). Per model and batch size it prints the wall time per step, the GPU busy time per
step (the kernels' summed durations; on CPU the self time of the aten ops), the idle share
(1 - busy / wall: launch-bound when large), the busy time by kernel family (matmul, selective scan,
Triton, element-wise, reductions, conv, copies, optimizer) and the `top` kernels by time. The same
kernels in two models show where one spends more.
"""

import gc
import os
import re
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from bench_common import build_impl, train_step  # noqa: E402

from mamba_lm import ops  # noqa: E402
from mamba_lm.configurator import apply_overrides  # noqa: E402
from mamba_lm.errors import user_errors  # noqa: E402

# ----------------------------------------------------------------------------------------------
preset = "mamba-130m"      # mamba_lm.mamba.PRESETS key (the multi-track model uses multitrack-130m, else the same name)
batch_sizes = "8,64"       # comma-separated batch sizes
seq_len = 1024             # tokens per sequence [>=1]
steps = 3                  # profiled steps (after warmup) [>=1]
warmup = 3                 # unprofiled steps first (autotuning, allocator) [>=0]
impls = "ours,mamba_ssm,multitrack"  # which models
top = 12                   # kernels listed per run [>=1]
csv_dir = ""               # if set, every kernel of each run into <csv_dir>/profile-<impl>-b<batch>.csv [output folder]
vocab_size = 50277         # GPT-NeoX [>=2]
device = "auto"            # auto | cuda | cpu
# ----------------------------------------------------------------------------------------------
config = apply_overrides(globals(), sys.argv[1:])

FAMILIES = [  # (family, regex on the kernel name), first match wins
    ("selective scan", r"selective_scan|scan_fwd|scan_bwd"),
    ("matmul", r"gemm|cutlass|xmma|matmul|sm90_|sm80_|cublas|nvjet|^aten::(mm|bmm|addmm|linear|baddbmm)$"),
    ("triton", r"^triton|_kernel$|layer_norm|rms"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("conv", r"conv"),
    ("copy / cat / cast", r"copy|Memcpy|Memset|cat|to_copy|CatArray"),
    ("reduction", r"reduce|sum|mean|softmax|nll|cross_entropy|norm|max|min|cumsum"),
    ("element-wise", r"elementwise|vectorized|unrolled|pointwise|silu|exp|mul|add|sub|div|fill|where|neg|pow|"
                     r"rsqrt|sigmoid|softplus|clamp|zero"),
]


def family(name: str) -> str:
    for fam, pattern in FAMILIES:
        if re.search(pattern, name, re.IGNORECASE):
            return fam
    return "other"


def sync(dev):
    if dev == "cuda":
        torch.cuda.synchronize()


def profile_one(impl: str, batch: int, dev: str) -> dict:
    """{'wall_ms', 'busy_ms', 'kernels': {name: (calls, ms)}} per step."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    net = build_impl(impl, preset, vocab_size, dev).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=dev == "cuda")
    ids = torch.randint(0, vocab_size, (batch, seq_len + 1), device=dev)
    for _ in range(warmup):
        train_step(net, opt, ids, dev)
    sync(dev)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            train_step(net, opt, ids, dev)
        sync(dev)
        wall = time.perf_counter() - t0
    kernels = defaultdict(lambda: [0, 0.0])
    if dev == "cuda":
        for e in prof.events():
            if e.device_type.name == "CUDA":
                k = kernels[e.name]
                k[0] += 1
                k[1] += (e.time_range.end - e.time_range.start) / 1000
    else:  # CPU: self time of the aten ops
        for e in prof.key_averages():
            if e.key.startswith("aten::") and e.self_cpu_time_total > 0:
                kernels[e.key] = [e.count, e.self_cpu_time_total / 1000]
    del net, opt
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()
    per_step = {name: (calls / steps, ms / steps) for name, (calls, ms) in kernels.items()}
    return {"wall_ms": 1000 * wall / steps, "busy_ms": sum(ms for _, ms in per_step.values()), "kernels": per_step}


def report(impl: str, batch: int, r: dict, unit: str) -> None:
    idle = max(0.0, 1 - r["busy_ms"] / r["wall_ms"])
    print(f"\n### {impl}, batch {batch} x {seq_len}: {r['wall_ms']:.1f} ms/step wall, {r['busy_ms']:.1f} ms busy "
          f"({100 * idle:.0f}% idle), {sum(c for c, _ in r['kernels'].values()):,.0f} {unit}/step\n")
    fams = defaultdict(float)
    for name, (_, ms) in r["kernels"].items():
        fams[family(name)] += ms
    print("| family | ms/step | share of busy |\n|---|---:|---:|")
    for fam, ms in sorted(fams.items(), key=lambda kv: -kv[1]):
        print(f"| {fam} | {ms:.2f} | {100 * ms / max(r['busy_ms'], 1e-9):.1f}% |")
    print(f"\n| top {unit} | calls/step | ms/step |\n|---|---:|---:|")
    for name, (calls, ms) in sorted(r["kernels"].items(), key=lambda kv: -kv[1][1])[:top]:
        short = name if len(name) <= 90 else name[:87] + "..."
        print(f"| `{short}` | {calls:.0f} | {ms:.2f} |")


def write_csv(impl: str, batch: int, r: dict) -> None:
    """All kernels of one run (name, calls/step, ms/step, family), for diffs between models."""
    import csv
    os.makedirs(csv_dir, exist_ok=True)
    path = os.path.join(csv_dir, f"profile-{impl}-b{batch}.csv")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["kernel", "calls_per_step", "ms_per_step", "family"])
        for name, (calls, ms) in sorted(r["kernels"].items(), key=lambda kv: -kv[1][1]):
            w.writerow([name, f"{calls:g}", f"{ms:.4f}", family(name)])


def main():
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    print(f"# profile of one training step: {name}, torch {torch.__version__}, preset {preset}, "
          f"{'bf16 autocast' if dev == 'cuda' else 'fp32'}, {steps} profiled steps after {warmup}")
    ops.log_kernels_once()
    for batch in [int(b) for b in str(batch_sizes).split(",") if b.strip()]:
        for impl in [i.strip() for i in impls.split(",") if i.strip()]:
            try:
                r = profile_one(impl, batch, dev)
                report(impl, batch, r, "GPU kernels" if dev == "cuda" else "aten ops")
                if csv_dir:
                    write_csv(impl, batch, r)
            except ImportError as e:
                print(f"\n### {impl}, batch {batch}: not installed ({e.name or e})")
            except torch.cuda.OutOfMemoryError:
                print(f"\n### {impl}, batch {batch}: out of memory")
                gc.collect()
                torch.cuda.empty_cache()


if __name__ == "__main__":
    with user_errors():
        main()
