"""Decode speed and memory of recurrent generation: our model.step() vs mamba-ssm's generate(cg=True).

    python bench/bench_decode.py                                        # GPU: mamba-130m, bf16
    python bench/bench_decode.py --model=multitrack                     # the multi-track model (multitrack-130m)
    python bench/bench_decode.py --preset=tiny --gen_lengths=1024,4096,16384 --decode_tokens=128   # CPU
    python bench/bench_decode.py --device=cpu --batch_sizes=1 --gen_lengths= --repeats=5   # CPU: vs the bandwidth bound
    python bench/bench_decode.py --device=cpu --batch_sizes=1 --gen_lengths= --compile=True   # + the compiled step

With --model=multitrack the model is the parameter-matched multi-track preset (multitrack-130m for
mamba-130m, else the preset of the same name) with a sparse random narrative signal table, so the
router's signal path runs; mamba-ssm has no such model and its column is skipped.

Part 1, speed: greedy decoding of `decode_tokens` tokens at each batch size after a 16-token prompt,
tokens/s = batch * tokens / seconds (torch.cuda.synchronize() around the timed loop). Ours runs
model.step() captured as a CUDA graph (mamba_lm.generation.CUDAGraphStep) on GPU when available,
else a plain Python loop; mamba-ssm runs its own `generate(..., cg=True)` with the same weights.
On the CPU at batch 1 every weight is read once per token, so parameter bytes / the machine's read rate
(a 512 MiB tensor summed: bench_common.read_rate_gbs) bounds the speed. The read rate of a shared VM
moves between runs (measured on the development VM within minutes: 30-57 GB/s with 2 threads), so it is
measured right before and right after every timed batch-1 run, and each run's fraction is its tokens/s
over the bound of its own moment (the mean of the two reads); the median fraction over the `repeats`
runs is reported, with the bound and the fraction of every run. Beside it, the rate of summing the
model's own parameters tensor by tensor (bench_common.tensors_read_rate_gbs): what a read of the weights
as separate tensors reaches, below the one-stream rate (130M, 2 threads: 38-44 vs 50-56 GB/s,
bench/results/cpu_model.md). The speed run is repeated `repeats` times and the best tokens/s kept; the
load average is printed before and after (figures under load are several times too low).
Part 2, memory: one long greedy generation at batch 1 with memory read at each length of
`gen_lengths`; recurrent state is O(1), so the numbers must stay flat (GPU: max_memory_allocated since
the start of the run; CPU: current RSS). Prints markdown tables and one JSON line.
"""

import gc
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from bench_common import build_impl, cpu_setup, load_average, read_rate_gbs, set_random_signals, tensors_read_rate_gbs

from mamba_lm import ops
from mamba_lm.configurator import apply_overrides
from mamba_lm.errors import UserError, user_errors
from mamba_lm.mamba import MambaLMHeadModel, mamba_config

# ----------------------------------------------------------------------------------------------
preset = "mamba-130m"    # mamba_lm.mamba.PRESETS key
model = "mamba"          # "mamba" (ours, compared with mamba-ssm) or "multitrack" (its matching preset)
batch_sizes = "1,16"     # comma-separated decode batch sizes
decode_tokens = 256      # timed tokens per speed run [>=1]
prompt_len = 16          # prompt tokens (one parallel forward fills the cache) [>=1]
gen_lengths = "1024,16384,65536"  # memory checkpoints of the long generation (batch 1); "" skips it
vocab_size = 50277       # vocabulary (GPT-NeoX) [>=2]
device = "auto"          # "auto" (cuda if available), "cpu" or "cuda"
dtype = "auto"           # "auto" (bfloat16 on cuda, float32 on cpu), "float32", "bfloat16"
cuda_graph = True        # capture our step() as a CUDA graph when possible
seed = 1337              # torch seed [>=0]
repeats = 1              # speed runs per batch size; the best is kept (noisy shared machines) [>=1]
threads = 0              # CPU threads for torch (0: torch's default, the core count) [>=0]
compile = False          # CPU: also time the step through torch.compile (generate(compile=True)), next to the eager one
# ----------------------------------------------------------------------------------------------
config = apply_overrides(globals(), sys.argv[1:])


def sync(dev):
    if dev == "cuda":
        torch.cuda.synchronize()


def memory_gib(dev) -> float:
    """GPU: peak allocated since the last reset; CPU: current resident set size."""
    if dev == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def make_step(net, cache, batch, dev, compiled=False):
    """(step function ids (B,) -> logits, description). CUDA graph via mamba_lm.generation if possible;
    compiled: generation.CompiledStep, torch.compile(model.step) as generate(compile=True) runs it
    (compiled on the first warmup token)."""
    if compiled:
        from mamba_lm.generation import CompiledStep
        return CompiledStep(net, cache), "step() torch.compile"
    if dev == "cuda" and cuda_graph:
        try:
            from mamba_lm.generation import CUDAGraphStep
            return CUDAGraphStep(net, cache, batch, torch.device(dev)), "step() CUDA graph"
        except Exception as e:  # noqa: BLE001 - fall back to the eager loop, and say so
            print(f"  (CUDA graph unavailable: {type(e).__name__}: {e}; eager loop)")
            cache.reset()
    return (lambda ids: net.step(ids, cache)), "step() loop"


@torch.inference_mode()
def decode_ours(net, batch, n_tokens, dev, checkpoints=(), compiled=False):
    """Greedy decode; returns (tokens/s, method, {length: memory at that length}, seconds of the first
    warmup step: the compile time of a compiled step)."""
    cfg = net.config
    prompt = torch.randint(0, cfg.vocab_size, (batch, prompt_len), device=dev)
    cache = net.allocate_cache(batch)
    step, method = make_step(net, cache, batch, dev, compiled)
    logits = net(prompt, cache=cache)[:, -1]
    memory = {}
    t0 = time.perf_counter()
    for i in range(3):  # warmup (graph replays / allocator / compile)
        ids = logits[:, :cfg.vocab_size].argmax(-1)
        logits = step(ids)
        if i == 0:
            sync(dev)
            first_s = time.perf_counter() - t0
    sync(dev)
    t0 = time.perf_counter()
    for t in range(1, n_tokens + 1):
        ids = logits[:, :cfg.vocab_size].argmax(-1)
        logits = step(ids)
        if t in checkpoints:
            sync(dev)
            memory[t] = memory_gib(dev)
    sync(dev)
    return batch * n_tokens / (time.perf_counter() - t0), method, memory, first_s


@torch.inference_mode()
def decode_mamba_ssm(ours, batch, n_tokens, dev, torch_dtype):
    """mamba-ssm's generate(cg=True) with our weights; raises ImportError if mamba_ssm is missing."""
    from mamba_lm.convert import mamba_ssm_model
    c = ours.config
    net = mamba_ssm_model(c, device=dev, dtype=torch_dtype, fused_add_norm=True).eval()
    net.load_state_dict(ours.state_dict(), strict=True)
    prompt = torch.randint(0, c.vocab_size, (batch, prompt_len), device=dev)
    kwargs = dict(max_length=prompt_len + n_tokens, cg=True, top_k=1, return_dict_in_generate=False,
                  output_scores=False)
    net.generate(prompt, **kwargs)  # warmup: captures the graph
    sync(dev)
    t0 = time.perf_counter()
    out = net.generate(prompt, **kwargs)
    sync(dev)
    seconds = time.perf_counter() - t0
    generated = out.shape[1] - prompt_len
    del net
    return batch * generated / seconds


with user_errors():
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    dt_name = ("bfloat16" if dev == "cuda" else "float32") if dtype == "auto" else dtype
    torch_dtype = getattr(torch, dt_name)
    torch.manual_seed(seed)
    machine = cpu_setup(threads)
    name = torch.cuda.get_device_name() if dev == "cuda" else platform.processor() or platform.machine()
    print(f"device={dev} ({name})  torch={torch.__version__}  preset={preset}  dtype={dt_name}  "
          f"threads={machine['threads']}/{machine['cpus']}  load average before: {machine['load_before']}")
    ops.log_kernels_once()
    if model == "mamba":
        net = MambaLMHeadModel(mamba_config(preset, vocab_size=vocab_size), device=dev, dtype=torch_dtype).eval()
    elif model == "multitrack":
        net = build_impl("multitrack", preset, vocab_size, dev).to(torch_dtype).eval()
        set_random_signals(net)
    else:
        raise UserError(f"--model={model!r}: expected 'mamba' or 'multitrack'")

    param_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    bound = None
    if dev == "cpu":
        rate = read_rate_gbs()
        bound = {"read_gb_per_s": rate, "param_mb": param_bytes / 1e6, "tokens_per_s": rate * 1e9 / param_bytes}
        print(f"  batch-1 bound: {param_bytes / 1e6:,.0f} MB of weights read once per token at {rate:.1f} GB/s "
              f"(a 512 MiB tensor summed) = {bound['tokens_per_s']:,.1f} tok/s at the start; measured again "
              f"around every batch-1 run")
    speed_rows = []
    variants = [False, True] if compile and dev == "cpu" else [False]
    for batch in [int(b) for b in str(batch_sizes).split(",") if b.strip()]:
        for compiled in variants:
            tps, method, first, rounds = 0.0, "", [], []
            for _ in range(max(1, repeats)):
                before = read_rate_gbs(repeats=3) if bound and batch == 1 else None
                run_tps, method, _, first_s = decode_ours(net, batch, decode_tokens, dev, compiled=compiled)
                if before is not None:
                    moment = (before + read_rate_gbs(repeats=3)) / 2 * 1e9 / param_bytes   # tok/s bound now
                    per_tensor = tensors_read_rate_gbs(list(net.parameters())) * 1e9 / param_bytes
                    rounds.append({"tokens_per_s": run_tps, "bound_tokens_per_s": moment,
                                   "fraction": run_tps / moment, "tensor_sums_tokens_per_s": per_tensor})
                tps = max(tps, run_tps)
                first.append(first_s)
            label = "ours" if model == "mamba" else model
            row = {"impl": label, "method": method, "batch": batch, "tokens_per_s": tps}
            if compiled:
                row["compile_s"] = first[0]     # the first step of the first run compiles; later runs reuse it
            if rounds:
                fractions = sorted(r["fraction"] for r in rounds)
                row["fraction_of_bound"] = fractions[len(fractions) // 2]            # the median run's
                row["rounds"] = rounds
                print("  " + "; ".join(f"{r['tokens_per_s']:.1f} tok/s of {r['bound_tokens_per_s']:.1f} "
                                       f"({r['fraction']:.0%}; the weights summed tensor by tensor: "
                                       f"{r['tensor_sums_tokens_per_s']:.1f})" for r in rounds))
            speed_rows.append(row)
            of_bound = (f", median {row['fraction_of_bound']:.0%} of the bound measured around each run"
                        if "fraction_of_bound" in row else "")
            compiling = f", compiled in {row['compile_s']:.1f} s" if compiled else ""
            print(f"  {label:<10} batch {batch:>3}: {tps:>10,.0f} tok/s ({method}{of_bound}{compiling})", flush=True)
        if model != "mamba":
            continue
        try:
            tps = decode_mamba_ssm(net, batch, decode_tokens, dev, torch_dtype)
            row = {"impl": "mamba_ssm", "method": "generate(cg=True)", "batch": batch, "tokens_per_s": tps}
        except ImportError as e:
            row = {"impl": "mamba_ssm", "method": f"not installed ({e.name or e})", "batch": batch}
        except Exception as e:  # noqa: BLE001 - report, keep going
            row = {"impl": "mamba_ssm", "method": f"failed: {type(e).__name__}: {str(e)[:100]}", "batch": batch}
        speed_rows.append(row)
        print(f"  mamba_ssm  batch {batch:>3}: "
              f"{format(row['tokens_per_s'], '>10,.0f') if 'tokens_per_s' in row else '         -'} tok/s "
              f"({row['method']})", flush=True)

    memory = {}
    lengths = sorted(int(n) for n in str(gen_lengths).split(",") if n.strip())
    if lengths:
        gc.collect()
        if dev == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        start = memory_gib(dev)
        tps, method, memory, _ = decode_ours(net, 1, lengths[-1], dev, checkpoints=set(lengths))
        print(f"  long generation: {lengths[-1]:,} tokens at {tps:,.0f} tok/s ({method})")

    print("\n| implementation | method | batch | decode tokens/s |")
    print("|---|---|---|---|")
    for r in speed_rows:
        tps = format(r["tokens_per_s"], ",.0f") if "tokens_per_s" in r else "-"
        print(f"| {r['impl']} | {r['method']} | {r['batch']} | {tps} |")
    if memory:
        kind = "max_memory_allocated" if dev == "cuda" else "RSS"
        print(f"\n| tokens generated (batch 1) | {kind} (GiB) |")
        print("|---|---|")
        print(f"| 0 (before) | {start:.3f} |")
        for n, m in memory.items():
            print(f"| {n:,} | {m:.3f} |")
        growth = max(memory.values()) - min(memory.values())
        print(f"\nmemory growth between {min(memory):,} and {max(memory):,} tokens: {growth * 1024:.1f} MiB")
    machine["load_after"] = load_average()
    print(f"\nload average before: {machine['load_before']}  after: {machine['load_after']}")
    print(json.dumps({"bench": "decode", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      "device": dev, "device_name": name, "torch": torch.__version__, "kernels": ops.KERNELS,
                      "machine": machine, "config": config, "batch1_bound": bound, "speed": speed_rows,
                      "memory_gib": memory}))
