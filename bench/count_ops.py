"""Compute ops dispatched by one training step (forward + backward), or by one decode step, counted on
the CPU: the launch count that bounds a small-batch GPU step, without a GPU.

    python bench/count_ops.py                                   # 130M presets: ours, mamba-ssm layout; multitrack
    python bench/count_ops.py --preset=tiny --seq_len=16        # seconds
    python bench/count_ops.py --mode=decode --preset=small-cpu  # ops of one model.step() at batch 1 (fp32)

Decode (--mode=decode): every aten op of one `model.step(ids, cache)` at batch `batch_size` under
inference_mode in fp32, as the CPU runs it (no stand-ins: the state update and the conv update are
PyTorch composites there); on a GPU the same ops are what a CUDA graph of the step replays, less the
ones a Triton/CUDA kernel fuses. At batch 1 on the CPU these dispatches, not the arithmetic, set the
decode speed of the small models.

At batch 8 × 1024 on an H200 the training step of these models is CPU-bound (the GPU idles 29-57% of a
step: bench/results/gpu-20261129-profile/), so the number of ops that Python, the dispatcher and
autograd issue per step sets the speed there. This script counts them with a TorchDispatchMode under bf16
autocast, as the GPU step runs: every aten op that computes or copies (views are free and not counted),
forward and backward. The selective scan and the causal conv, single CUDA kernels on a GPU but PyTorch
composites on the CPU, count as one op each way. The count does not depend on batch or sequence length.
The GPU profile's kernels per step (`bench/profile_step.py`) are the measured counterpart: on the
code of commit 4589693 this script counts 1,078 ops for ours and 2,524 for the multi-track model, where
the H200 ran 1,090 and 2,509 kernels per step with mamba-ssm alone (962 and 2,349 with causal-conv1d too,
whose fused path the baseline takes). It is a proxy for launches, not for GPU time: the channels-first
mixing added ops and still trained 40% faster at batch 8, because it removed slow strided kernels.
"""

import json
import os
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from bench_common import build_impl, train_step  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from mamba_lm import ops  # noqa: E402
from mamba_lm.configurator import apply_overrides  # noqa: E402
from mamba_lm.errors import UserError, user_errors  # noqa: E402

# ----------------------------------------------------------------------------------------------
preset = "mamba-130m"          # mamba_lm.mamba.PRESETS key (the multi-track model: its matching preset)
impls = "ours,multitrack"      # models to count (bench_common.IMPLS without mamba_ssm)
batch_size = 2                 # the count does not depend on it [>=1]
seq_len = 64                   # nor on this [>=1]
vocab_size = 1000              # nor on this (the LM head is one matmul either way) [>=2]
top = 12                       # most frequent ops listed per model [>=1]
mode = "train"                 # "train": one training step (fwd + bwd); "decode": one model.step() (batch_size 1 advised)
# ----------------------------------------------------------------------------------------------
config = apply_overrides(globals(), sys.argv[1:])

VIEW_OPS = {"view", "_unsafe_view", "_reshape_alias", "reshape", "as_strided", "t", "transpose", "permute",
            "expand", "unsqueeze", "squeeze", "select", "slice", "unbind", "split", "split_with_sizes",
            "chunk", "unflatten", "diagonal", "detach", "alias", "lift_fresh", "promote_types"}


class OpCounter(TorchDispatchMode):
    """Counts compute ops by name; `paused` > 0 hides the ops inside a stand-in kernel."""

    def __init__(self):
        super().__init__()
        self.ops, self.paused = Counter(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if not self.paused and name not in VIEW_OPS:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


COUNTER = OpCounter()


class _OneKernel(torch.autograd.Function):
    """Runs `fn` (a PyTorch composite) as one counted op forward and one backward, like a CUDA kernel."""

    @staticmethod
    def forward(ctx, name, fn, *args):
        COUNTER.paused += 1
        try:
            with torch.enable_grad():
                inputs = [a.detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                          for a in args]
                out = fn(*inputs)
        finally:
            COUNTER.paused -= 1
        COUNTER.ops[name] += 1
        ctx.name, ctx.inputs, ctx.out = name, inputs, out
        return out.detach()

    @staticmethod
    def backward(ctx, grad):
        COUNTER.paused += 1
        try:
            need = [a for a in ctx.inputs if isinstance(a, torch.Tensor) and a.requires_grad]
            grads = iter(torch.autograd.grad(ctx.out, need, grad, allow_unused=True))
        finally:
            COUNTER.paused -= 1
        COUNTER.ops[ctx.name + "_bwd"] += 1
        return (None, None) + tuple(next(grads) if isinstance(a, torch.Tensor) and a.requires_grad else None
                                    for a in ctx.inputs)


def _as_kernels():
    """Replace ops.selective_scan / ops.causal_conv1d (training path: no cache) by one-op stand-ins."""
    scan, conv = ops.selective_scan, ops.causal_conv1d

    def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, initial_state=None, chunk_size=64, last_state_grad=None):
        if return_last_state or initial_state is not None:
            raise ValueError("count_ops counts the training step (no cache)")
        return _OneKernel.apply("selective_scan", lambda *a: scan(*a, delta_softplus=delta_softplus),
                                u, delta, A, B, C, D, z, delta_bias)

    def causal_conv1d(x, weight, bias=None, activation=None, initial_states=None, return_final_states=False):
        if initial_states is not None or return_final_states:
            raise ValueError("count_ops counts the training step (no cache)")
        return _OneKernel.apply("causal_conv1d", lambda *a: conv(*a, activation=activation), x, weight, bias)

    ops.selective_scan, ops.causal_conv1d = selective_scan, causal_conv1d


def count(impl: str) -> tuple[int, Counter]:
    """(compute ops of one fwd + bwd, by name) for one model, after one uncounted warmup step."""
    torch.manual_seed(0)
    net = build_impl(impl, preset, vocab_size, "cpu").train()
    ids = torch.randint(0, vocab_size, (batch_size, seq_len + 1))
    train_step(net, None, ids, "cpu", amp=True)   # one-off work (warnings, lazy init) is not counted
    COUNTER.ops.clear()
    with COUNTER:
        train_step(net, None, ids, "cpu", amp=True)
    return sum(COUNTER.ops.values()), Counter(COUNTER.ops)


def count_decode(impl: str) -> tuple[int, Counter]:
    """(compute ops of one model.step() in fp32, by name) for one model, after a prompt and two uncounted steps."""
    from bench_common import set_random_signals

    torch.manual_seed(0)
    net = build_impl(impl, preset, vocab_size, "cpu").eval()   # built outside inference_mode, as generation does
    if impl == "multitrack":
        set_random_signals(net)
    with torch.inference_mode():
        return _count_steps(net)


def _count_steps(net) -> tuple[int, Counter]:
    cache = net.allocate_cache(batch_size)
    logits = net(torch.randint(0, vocab_size, (batch_size, 4)), cache=cache)[:, -1]
    for _ in range(2):   # one-off work (lazily derived tensors) is not counted
        logits = net.step(logits.argmax(-1), cache)
    ids = logits.argmax(-1)
    COUNTER.ops.clear()
    with COUNTER:
        net.step(ids, cache)
    return sum(COUNTER.ops.values()), Counter(COUNTER.ops)


def main():
    if mode not in ("train", "decode"):
        raise UserError(f"--mode={mode!r}: expected 'train' or 'decode'")
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    if mode == "train":
        _as_kernels()
        print(f"# compute ops per training step (forward + backward, bf16 autocast), preset {preset}")
    else:
        print(f"# compute ops per decode step (model.step at batch {batch_size}, fp32), preset {preset}")
    rows = {}
    for impl in [i.strip() for i in impls.split(",") if i.strip()]:
        total, by_name = count(impl) if mode == "train" else count_decode(impl)
        rows[impl] = total
        listed = ", ".join(f"{name} {n}" for name, n in by_name.most_common(top))
        print(f"{impl}: {total:,} ops  ({listed})")
        if mode == "train":
            print("  as one op each: " + ", ".join(f"{k} {by_name[k]} + {by_name[k + '_bwd']} backward"
                                                     for k in ("selective_scan", "causal_conv1d")))
    if "ours" in rows and len(rows) > 1:
        for impl, total in rows.items():
            if impl != "ours":
                print(f"{impl} / ours: {total / rows['ours']:.2f}x ({total - rows['ours']:+,} ops)")
    print(json.dumps({"bench": "count_ops", "mode": mode, "torch": torch.__version__, "config": config,
                      "ops": rows}))


if __name__ == "__main__":
    with user_errors():
        main()
