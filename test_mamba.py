"""Verify the Mamba implementation on this machine (CPU or GPU) and print a readable summary.

    python test_mamba.py                       # tiny config, GPU if available
    python test_mamba.py --device=cpu --preset=small-cpu

Checks: block-level shapes, forward/backward, recurrent step() == parallel forward, chunked forward
with a carried cache == one forward, bf16 autocast, and where CUDA kernels exist: kernel path vs the
PyTorch path (logits and gradients) and our model vs mamba-ssm's own MambaLMHeadModel with the same
weights (if mamba_ssm imports). Exits 1 if any check fails.
"""

import sys

import torch
import torch.nn.functional as F

from mamba_lm import ops
from mamba_lm.configurator import apply_overrides
from mamba_lm.errors import user_errors
from mamba_lm.mamba import MambaLMHeadModel, mamba_config

# ----------------------------------------------------------------------------------------------
device = "auto"          # "auto" (cuda if available), "cpu" or "cuda"
preset = "tiny"          # mamba_lm.mamba.PRESETS key
vocab_size = 1000        # vocabulary of the test model [>=2]
batch_size = 2           # sequences per test batch [>=1]
seq_len = 67             # tokens per sequence (odd: crosses scan chunk boundaries) [>=1]
seed = 1337              # torch seed [>=0]
# ----------------------------------------------------------------------------------------------
config = apply_overrides(globals(), sys.argv[1:])

results = []  # (name, ok, detail)


def check(name: str, ok: bool, detail: str = "") -> None:
    results.append((name, bool(ok), detail))
    print(f"{'PASS' if ok else 'FAIL'}  {name:<48} {detail}")


def max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def grads_of(model, ids):
    """Gradients of a next-token loss w.r.t. every parameter, as {name: tensor}."""
    model.zero_grad(set_to_none=True)
    logits = model(ids[:, :-1])
    logits = getattr(logits, "logits", logits)  # mamba_ssm's model returns CausalLMOutput(logits=...)
    F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
    return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def compare_grads(ga, gb) -> float:
    """Largest gradient difference relative to the gradient's own scale, over all parameters."""
    return max(max_diff(ga[n], gb[n]) / (ga[n].abs().max().item() + 1e-12) for n in ga)


with user_errors():
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    torch.manual_seed(seed)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 comparisons below must be fp32
    torch.backends.cudnn.allow_tf32 = False
    print(f"device={dev}  torch={torch.__version__}")
    cfg = mamba_config(preset, vocab_size=vocab_size)
    model = MambaLMHeadModel(cfg, device=dev)
    print(f"preset={preset}: d_model={cfg.d_model} n_layer={cfg.n_layer} d_inner={cfg.d_inner} "
          f"N={cfg.d_state} params={model.num_params():,}")
    ids = torch.randint(0, vocab_size, (batch_size, seq_len), device=dev)

    # 0. the selective scan this device runs == the sequential reference (odd length, initial state, grads)
    g = torch.Generator(device=dev).manual_seed(seed)
    b_, d_, n_, l_ = 2, 16, 8, 101
    scan_in = [torch.randn(b_, d_, l_, generator=g, device=dev), torch.randn(b_, d_, l_, generator=g, device=dev),
               -torch.rand(d_, n_, generator=g, device=dev) - 0.5, torch.randn(b_, 2, n_, l_, generator=g, device=dev),
               torch.randn(b_, 2, n_, l_, generator=g, device=dev), torch.randn(d_, generator=g, device=dev),
               torch.randn(b_, d_, l_, generator=g, device=dev), torch.randn(d_, generator=g, device=dev),
               torch.randn(b_, d_, n_, generator=g, device=dev)]
    # mamba_ssm's SelectiveScanFn ignores the gradient w.r.t. its last_state output, so the kernel is
    # checked on (out, grads of a loss on out) and, separately, on the last state's value.
    diffs, lasts = [], []
    for fn in (ops.selective_scan_ref, ops.selective_scan):
        leaves = [t.clone().requires_grad_() for t in scan_in]
        # with an initial state, the CUDA-kernel path is the kernel plus the decayed state (linearity)
        out = fn(*leaves[:8], delta_softplus=True, initial_state=leaves[8])
        out.square().sum().backward()
        diffs.append([out.detach()] + [t.grad for t in leaves])
        with torch.no_grad():
            lasts.append(fn(*scan_in[:8], delta_softplus=True, return_last_state=True, initial_state=scan_in[8])[1])
    names = ["out", "du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias", "dh0"]
    rel = {n: max_diff(a, b) / (a.abs().max().item() + 1e-6) for n, a, b in zip(names, *diffs)}
    worst = max(rel, key=rel.get)
    # fp32 tolerance of mamba-ssm's own tests (rtol 6e-4, x5 for gradients of delta), relative to scale
    check(f"selective_scan ({ops.KERNELS['selective_scan']}) == ref", rel[worst] < 3e-3,
          f"max rel diff={rel[worst]:.2e} ({worst}; out, all grads, initial state)")
    d = max_diff(*lasts) / (lasts[0].abs().max().item() + 1e-6)
    check(f"selective_scan last state ({ops.KERNELS['selective_scan']}) == ref", d < 1e-4, f"max rel diff={d:.2e}")

    # 1. block-level shapes
    x = torch.randn(batch_size, seq_len, cfg.d_model, device=dev)
    block = model.backbone.layers[0]
    out, residual = block(x)
    mix = block.mixer(x)
    check("block: (B,L,D) -> (B,L,D), residual fp32",
          out.shape == x.shape and residual.shape == x.shape and residual.dtype == torch.float32
          and mix.shape == x.shape, f"{tuple(out.shape)}")
    logits = model(ids)
    check("model: (B,L) -> (B,L,V_pad)", logits.shape == (batch_size, seq_len, cfg.padded_vocab_size),
          f"{tuple(logits.shape)}")

    # 2. forward/backward
    _, grads = grads_of(model, ids)
    finite = all(torch.isfinite(g).all() for g in grads.values())
    nonzero = all(g.abs().sum() > 0 for g in grads.values())
    check("forward/backward: finite nonzero grads", finite and nonzero, f"{len(grads)} tensors")

    # 3./4. recurrent step and chunked cache vs one parallel forward (PyTorch and kernel paths alike)
    model.eval()
    with torch.no_grad():
        full = model(ids)
        cache = model.allocate_cache(batch_size)
        steps = torch.stack([model.step(ids[:, t], cache) for t in range(seq_len)], dim=1)
        d = max_diff(steps, full)
        check("step() teacher-forced == forward()", d < 1e-4 * max(1.0, full.abs().max().item()), f"max|diff|={d:.2e}")
        cache2 = model.allocate_cache(batch_size)
        cut = seq_len // 3
        chunked = torch.cat([model(ids[:, :cut], cache=cache2), model(ids[:, cut:], cache=cache2)], dim=1)
        d = max_diff(chunked, full)
        check("chunked forward with cache == forward()", d < 1e-4 * max(1.0, full.abs().max().item()),
              f"max|diff|={d:.2e}")
        d = max(max_diff(a, b) for a, b in zip(cache.ssm_states, cache2.ssm_states))
        check("cache after chunks == cache after steps", d < 1e-4, f"max|diff|={d:.2e}")

    # 5. bf16 autocast
    with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16):
        low = model(ids)
    d = max_diff(low, full)
    check("bf16 autocast forward close to fp32", torch.isfinite(low.float()).all() and d < 0.1 * full.abs().max(),
          f"max|diff|={d:.2e}")

    # 6. kernel path vs PyTorch path (only where a kernel runs)
    model.train()
    if dev == "cuda" and ops.KERNELS["selective_scan"] == "mamba_ssm":
        logits_k, grads_k = grads_of(model, ids)
        with ops.force_pytorch():
            logits_p, grads_p = grads_of(model, ids)
        d, dg = max_diff(logits_k, logits_p), compare_grads(grads_k, grads_p)
        check("kernels == PyTorch path (logits, grads)", d < 1e-3 and dg < 1e-2, f"logits {d:.2e}, rel grad {dg:.2e}")
        with torch.no_grad():  # kernel + initial state (linearity path) vs the chunked PyTorch scan
            c_k, c_p = model.allocate_cache(batch_size), model.allocate_cache(batch_size)
            a = torch.cat([model(ids[:, :cut], cache=c_k), model(ids[:, cut:], cache=c_k)], dim=1)
            with ops.force_pytorch():
                b = torch.cat([model(ids[:, :cut], cache=c_p), model(ids[:, cut:], cache=c_p)], dim=1)
        check("kernels == PyTorch path (chunked with cache)", max_diff(a, b) < 1e-3, f"max|diff|={max_diff(a, b):.2e}")
    else:
        print(f"skip  kernel vs PyTorch path: {ops.KERNELS['selective_scan']} on {dev}")

    # 7. our model vs mamba-ssm's MambaLMHeadModel with the same weights
    try:
        from mamba_lm.convert import mamba_ssm_model
        ssm = mamba_ssm_model(cfg, device=dev).train()
    except Exception as e:  # noqa: BLE001 - mamba_ssm missing or broken on this machine
        print(f"skip  vs mamba_ssm.MambaLMHeadModel: not importable ({type(e).__name__})")
    else:
        ssm.load_state_dict(model.state_dict(), strict=True)
        logits_s, grads_s = grads_of(ssm, ids)
        logits_o, grads_o = grads_of(model, ids)
        d, dg = max_diff(logits_s, logits_o), compare_grads(grads_o, grads_s)
        check("ours == mamba_ssm.MambaLMHeadModel (logits, grads)", d < 1e-3 and dg < 1e-2,
              f"logits {d:.2e}, rel grad {dg:.2e}")

    failed = [r for r in results if not r[1]]
    print(f"\n{len(results) - len(failed)}/{len(results)} checks passed on {dev}")
    sys.exit(1 if failed else 0)
