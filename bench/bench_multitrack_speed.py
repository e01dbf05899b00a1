"""Speed of the multi-track model relative to the Mamba baseline on the same device (research_plan.md §5).

    python bench/bench_multitrack_speed.py                                  # 130M presets, GPU, bf16
    python bench/bench_multitrack_speed.py --baseline=small-cpu --multitrack=small-cpu --device=cpu \
        --dtype=float32 --batch_size=2 --seq_len=256 --train_steps=3 --decode_tokens=32

Training: tokens/s of forward + backward + AdamW step (autocast `dtype`, fp32 params), after warmup.
Decode: tokens/s of `mamba_lm.generation.generate` (prompt 128 tokens, CUDA graphs on CUDA) at
batch 1 and `decode_batch`, the two models measured in turn `decode_repeats` times and each one's best
kept (alternating, so both see the same machine state: on a shared CPU one-shot figures moved by 10%
from round to round). Ops per decode step: aten ops dispatched by one eager `model.step` at
batch 1 (torch.profiler), and on CUDA the GPU kernels it launches: the launch count that bounds
decode speed at batch 1. Prints one table with the ratio multitrack / baseline; the goal is >= 0.8
for the speeds. Random weights and random ids: speed does not depend on them.
"""

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_common import set_random_signals  # noqa: E402

from mamba_lm import ops  # noqa: E402
from mamba_lm.configurator import apply_overrides  # noqa: E402
from mamba_lm.errors import user_errors  # noqa: E402

# ----------------------------------------------------------------------------------------------
baseline = "mamba-130m"       # mamba_lm.mamba.PRESETS name
multitrack = "multitrack-130m"  # multitrack.multitrack_config.PRESETS name
ablation = ""                 # extra MultiTrackConfig overrides, e.g. "router=uniform,cross_track=False"
device = "cuda"               # cuda | cpu
dtype = "bfloat16"            # autocast dtype for training: bfloat16 | float32
batch_size = 8                # training micro-batch [>=1]
seq_len = 1024                # training sequence length [>=1]
train_steps = 10              # timed training steps (after 3 warmup steps) [>=1]
decode_tokens = 256           # generated tokens per decode measurement [>=1]
decode_batch = 8              # second decode batch size (the first is 1) [>=1]
decode_repeats = 3            # decode measurements per model and batch size, alternating the models; best kept [>=1]
# ----------------------------------------------------------------------------------------------
config = apply_overrides(globals(), sys.argv[1:])


def sync():
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_speed(model) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.startswith("cuda"))
    x = torch.randint(0, model.config.vocab_size, (batch_size, seq_len + 1), device=device)
    amp = torch.autocast(device.split(":")[0], dtype=getattr(torch, dtype), enabled=dtype != "float32")
    for i in range(3 + train_steps):
        if i == 3:
            sync()
            t0 = time.time()
        with amp:
            logits = model(x[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
            aux = model.aux_loss() if hasattr(model, "aux_loss") else None
        (loss if aux is None else loss + aux).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync()
    return train_steps * batch_size * seq_len / (time.time() - t0)


@torch.no_grad()
def decode_speed(model, batch: int) -> float:
    from mamba_lm.generation import generate
    prompt = torch.randint(0, model.config.vocab_size, (batch, 128), device=device)
    generate(model, prompt, 8, temperature=1.0)                               # warmup / graph capture
    sync()
    t0 = time.time()
    generate(model, prompt, decode_tokens, temperature=1.0)
    sync()
    return batch * decode_tokens / (time.time() - t0)


@torch.no_grad()
def ops_per_step(model) -> dict:
    """aten ops (and CUDA kernels on a GPU) of one eager decode step at batch 1, after two warmup steps."""
    from torch.profiler import ProfilerActivity, profile
    model.eval()
    cache = model.allocate_cache(1)
    ids = torch.randint(0, model.config.vocab_size, (1,), device=device)
    for _ in range(2):
        model.step(ids, cache)
    sync()
    cuda = device.startswith("cuda")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        model.step(ids, cache)
        sync()
    events = prof.events()
    out = {"aten ops per step": sum(e.name.startswith("aten::") for e in events)}
    if cuda:
        out["GPU kernels per step"] = sum(e.device_type.name == "CUDA" for e in events)
    model.train()
    return out


def main():
    from mamba_lm.mamba import MambaLMHeadModel, mamba_config
    from multitrack.multitrack_model import MultiTrackLM, multitrack_config

    overrides = {}
    for item in filter(None, ablation.split(",")):
        key, value = item.split("=")
        overrides[key] = {"True": True, "False": False}.get(value, int(value) if value.isdigit() else value)
    models = {"baseline": MambaLMHeadModel(mamba_config(baseline)).to(device),
              "multitrack": MultiTrackLM(multitrack_config(multitrack, **overrides)).to(device)}
    mt = models["multitrack"]
    set_random_signals(mt)                                # sparse random signals: exercise the signal path
    print(ops.describe_kernels())
    rows = {}
    for name, model in models.items():
        model.train()
        rows[name] = {"params": model.num_params(), "train tok/s": train_speed(model)}
        if device.startswith("cuda"):
            rows[name]["train peak GiB"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
    for batch in (1, decode_batch):
        key = f"decode tok/s (batch {batch})"
        for _ in range(decode_repeats):                   # alternating: both models see the same machine
            for name, model in models.items():
                rows[name][key] = max(rows[name].get(key, 0.0), decode_speed(model, batch))
    for name, model in models.items():
        rows[name].update(ops_per_step(model))
        print(name, rows[name], flush=True)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    print(f"\n{name} | batch {batch_size} x {seq_len} | {dtype} | ablation: {ablation or 'none'}\n")
    print("| metric | baseline | multitrack | ratio |\n|---|---:|---:|---:|")
    for key in rows["baseline"]:
        b, m = rows["baseline"][key], rows["multitrack"][key]
        print(f"| {key} | {b:,.1f} | {m:,.1f} | {m / b:.3f} |")
    load = [round(x, 2) for x in os.getloadavg()]
    print(f"\nload average after: {load} on {os.cpu_count()} cores (above the core count: CPU figures too low)")
    print(json.dumps({"bench": "multitrack_speed", "device": name, "torch": torch.__version__, "threads":
                      torch.get_num_threads(), "load_after": load, "config": config, "rows": rows,
                      "ratio": {k: rows["multitrack"][k] / rows["baseline"][k] for k in rows["baseline"]}}))


if __name__ == "__main__":
    with user_errors():
        main()
