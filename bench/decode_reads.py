"""Where a batch-1 CPU decode step's time goes: reading the weights, and everything else.

    python bench/decode_reads.py                                 # mamba-130m, 2 threads (torch's default)
    python bench/decode_reads.py --preset=small-cpu --vocab_size=4096 --rounds=5

At batch 1 a decode step reads every weight once per token, so bench_decode.py sets its bound at the
rate one 512 MiB tensor is summed. This script measures, in `rounds` alternating rounds so that every
figure sees the same machine state (a shared VM's read rate moves by 2x within minutes):

    stream      one 512 MiB tensor summed: the bound's definition (bench_common.read_rate_gbs)
    sums        the model's own parameters, each summed in turn: what any per-tensor read reaches
    products    every projection of the step (in_proj, x_proj, dt_proj, out_proj, LM head) through
                ops.linear_step on a one-row input, in the step's order: the step's weight reads alone
    mkl_packed  the same products through MKL's packed sgemm (torch.ops.mkl._mkl_linear), if built in
    onednn      the same through oneDNN's packed linear (torch.ops.mkldnn._linear_pointwise), if built in
    step        one model.step (greedy token in, logits out)
    rest        model.step with every projection replaced by a zero tensor of its output shape: the time
                of the step's other ops (norms, conv and state updates, gating)

Rates in GB/s of the weights read (parameter bytes / seconds), times in ms per token; the best of each
round's repeats, then the median over rounds. Prints a table and one JSON line.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench_common import (best_seconds, build_impl, cpu_setup, load_average, read_rate_gbs,  # noqa: E402
                          tensors_read_rate_gbs)

from mamba_lm import ops  # noqa: E402
from mamba_lm.configurator import apply_overrides  # noqa: E402
from mamba_lm.errors import user_errors  # noqa: E402

# ----------------------------------------------------------------------------------------------
preset = "mamba-130m"    # mamba_lm.mamba.PRESETS key (the baseline model)
vocab_size = 50277       # vocabulary (GPT-NeoX) [>=2]
rounds = 3               # alternating rounds of every measurement; the median is reported [>=1]
repeats = 3              # timed repeats per measurement and round; the best is kept [>=1]
tokens = 16              # decode steps per timed step / rest measurement [>=1]
threads = 0              # CPU threads for torch (0: torch's default, the core count) [>=0]
seed = 1337              # torch seed [>=0]
# ----------------------------------------------------------------------------------------------
config = apply_overrides(globals(), sys.argv[1:])


def projections(net) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(weight, bias) of every projection model.step runs, in its order; the LM head last."""
    out = []
    for layer in net.backbone.layers:
        m = layer.mixer
        out += [(m.in_proj.weight, m.in_proj.bias), (m.x_proj.weight, None),
                (m.dt_proj.weight, m.dt_proj.bias), (m.out_proj.weight, m.out_proj.bias)]
    return out + [(net.lm_head.weight, None)]


# packed library paths: name -> (pack(weight) -> packed, product(x, packed, weight, bias))
PACKED = {
    "mkl_packed": (lambda w: torch.ops.mkl._mkl_reorder_linear_weight(w, 1),
                   lambda x, p, w, b: torch.ops.mkl._mkl_linear(x, p, w, b, 1)),
    "onednn": (lambda w: torch.ops.mkldnn._reorder_linear_weight(w, 1),
               lambda x, p, w, b: torch.ops.mkldnn._linear_pointwise(x, p, b, "none", [], "")),
}


def product_runners(weights) -> dict:
    """name -> fn() running every projection on a one-row input: linear_step, and each packed library
    path this torch build has (skipped, with the reason, when absent or when it computes otherwise)."""
    inputs = [torch.ones(1, w.shape[1]) for w, _ in weights]
    runners = {"products": lambda: [ops.linear_step(x, w, b) for x, (w, b) in zip(inputs, weights)]}
    for name, (pack, product) in PACKED.items():
        try:
            packed = [pack(w) for w, _ in weights]
            got = product(inputs[0], packed[0], *weights[0])
        except (AttributeError, RuntimeError) as e:              # op not in this build
            print(f"  {name} skipped: {type(e).__name__}: {str(e)[:80]}")
            continue
        if not torch.allclose(got, F.linear(inputs[0], *weights[0]), atol=1e-3, rtol=1e-3):
            print(f"  {name} skipped: its product differs from F.linear")
            continue
        runners[name] = (lambda packed=packed, product=product:
                         [product(x, p, w, b) for x, p, (w, b) in zip(inputs, packed, weights)])
    return runners


def step_runner(net, cache):
    ids = torch.zeros(1, dtype=torch.long)

    def run():
        nonlocal ids
        for _ in range(tokens):
            ids = net.step(ids, cache)[:, :vocab_size].argmax(-1)
    return run


def zero_products(x, weight, bias=None):
    return x.new_zeros(x.shape[0], weight.shape[0])


@torch.inference_mode()
def main():
    torch.manual_seed(seed)
    machine = cpu_setup(threads)
    print(f"preset={preset}  threads={machine['threads']}/{machine['cpus']}  "
          f"load average before: {machine['load_before']}")
    net = build_impl("ours", preset, vocab_size, "cpu").eval()
    params = list(net.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    weights = projections(net)
    runners = product_runners(weights)
    cache = net.allocate_cache(1)
    net(torch.zeros(1, 4, dtype=torch.long), cache=cache)
    step = step_runner(net, cache)
    real_linear_step = ops.linear_step
    per_round = []
    for r in range(rounds):
        row = {"stream": read_rate_gbs(repeats=repeats), "sums": tensors_read_rate_gbs(params, repeats)}
        for name, fn in runners.items():
            row[name] = param_bytes / best_seconds(fn, repeats) / 1e9
        row["step_ms"] = best_seconds(step, repeats) / tokens * 1e3
        ops.linear_step = zero_products                            # the step without its weight reads
        try:
            row["rest_ms"] = best_seconds(step, repeats) / tokens * 1e3
        finally:
            ops.linear_step = real_linear_step
        row["step_share"] = param_bytes / row["stream"] / 1e6 / row["step_ms"]     # of this round's bound
        per_round.append(row)
        print(f"  round {r + 1}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()), flush=True)
    median = {k: sorted(row[k] for row in per_round)[len(per_round) // 2] for k in per_round[0]}
    bound_ms = param_bytes / median["stream"] / 1e6
    print(f"\n{param_bytes / 1e6:,.0f} MB of weights; medians over {rounds} rounds\n")
    print("| read | GB/s | ms per token | share of the one-stream bound |\n|---|---:|---:|---:|")
    for k in ("stream", "sums", *runners):
        ms = param_bytes / median[k] / 1e6
        print(f"| {k} | {median[k]:.1f} | {ms:.2f} | {bound_ms / ms:.0%} |")
    print(f"| step (model.step) | {param_bytes / median['step_ms'] / 1e6:.1f} | {median['step_ms']:.2f} | "
          f"{bound_ms / median['step_ms']:.0%} |")
    print(f"| rest (the step without its products) | | {median['rest_ms']:.2f} | |")
    shares = ", ".join(f"{row['step_share']:.0%}" for row in per_round)
    print(f"\nthe step's share of the bound of its own round: {shares} (median {median['step_share']:.0%})")
    machine["load_after"] = load_average()
    print(f"\nload average before: {machine['load_before']}  after: {machine['load_after']}")
    print(json.dumps({"bench": "decode_reads", "torch": torch.__version__, "machine": machine, "config": config,
                      "param_mb": param_bytes / 1e6, "median": median, "rounds": per_round}))


if __name__ == "__main__":
    with user_errors():
        main()
