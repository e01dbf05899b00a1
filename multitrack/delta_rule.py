"""The gated delta rule: a key-value memory with constant state (Gated DeltaNet, arXiv 2412.06464).

Per head, with keys k_t and queries q_t L2-normalised (d_k each), values v_t (d_v), decay α_t = exp(g_t)
in (0, 1] and write strength β_t in (0, 1):

    S_t = α_t S_{t-1} (I - β_t k_t k_tᵀ) + β_t v_t k_tᵀ          S: (d_v, d_k), the paper's notation
    o_t = S_t (scale q_t)                                         scale = d_k^-1/2 (fla's default)

Written as flash-linear-attention stores it, h = Sᵀ: (d_k, d_v); one step is

    h <- α_t h;   u_t = β_t (v_t - hᵀ k_t);   h <- h + k_t u_tᵀ;   o_t = hᵀ (scale q_t)

i.e. the memory first forgets by α_t, then moves its read-out at key k_t a fraction β_t of the way
to v_t (the delta rule: a write that corrects what is there instead of adding on top of it).

Layouts are fla's (token-major, heads second to last): q, k (b, t, h, d_k); v (b, t, h, d_v);
g (log α), beta (b, t, h); state (b, h, d_k, d_v) float32.

Paths (same arguments, tested equal in outputs, final state and gradients):
    gated_delta_rule_ref        per-step recurrence, the formulas above: the obviously correct twin
    gated_delta_rule_chunked    chunked WY / UT-transform form in PyTorch (the CPU training path)
    gated_delta_rule            fla's Triton `chunk_gated_delta_rule` on CUDA when fla imports, else chunked
    gated_delta_rule_step       one token, state updated in place (decode): fla's
                                `fused_recurrent_gated_delta_rule` on CUDA when fla imports, else PyTorch

The chunked form. Inside a chunk of C tokens with log-decay cumsum Γ_t = Σ_{s<=t} g_s (γ_t = e^Γ_t)
and the state h_0 before it, unrolling the step gives u_t = β_t (v_t - γ_t h_0ᵀ k_t
- Σ_{s<t} (γ_t / γ_s) (k_tᵀ k_s) u_s), a unit lower-triangular system (I + A) U = ... with
A_ts = β_t (γ_t / γ_s) k_tᵀ k_s (s < t). Solved once per chunk (the UT transform):

    U = Ũ - W h_0,   Ũ = (I + A)^-1 diag(β) V,   W = (I + A)^-1 diag(β γ) K
    O = diag(γ) Q h_0 + (Q Kᵀ ⊙ Γ-decay ⊙ causal) U                  (Q scaled)
    h_C = γ_C h_0 + (K ⊙ γ_C / γ)ᵀ U

so the only sequential work is one (d_k x d_v) state update per chunk. Odd lengths are padded with
k = v = 0, β = 0, g = 0, which leaves the state unchanged.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from mamba_lm import ops

# flash-linear-attention's Triton kernels (PyPI flash-linear-attention / fla-core). Its import needs
# triton and, on a CPU-only machine, can fail with more than ImportError: any failure means no kernel.
try:
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as _fla_chunk
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as _fla_recurrent
except Exception:  # noqa: BLE001
    _fla_chunk = _fla_recurrent = None

# fla's kernels are opt-in (MAMBA_NARRATIVE_FLA=1) until tests/test_gpu.py's fla-vs-twin tests pass on a GPU. On one
# H100 (2026-12-06, fla-core 0.6.0, torch 2.11 / Triton 3.6; bench/results/gpu-20261206b/) fla refuses its own chunk
# backward (a RuntimeError: Triton >= 3.4, < 3.7.1 miscompiles it on Hopper, fla issue #640), its fp32 chunk forward
# is 7e-4 from the float64 twin (TF32 dots) and its decode step 2e-7. So by default the tested PyTorch chunked twin
# runs on CUDA tensors too (slower, never silently different from the CPU reference).
FLA_OPT_IN = os.environ.get("MAMBA_NARRATIVE_FLA", "").strip() == "1"
KERNEL = ("fla-triton" if (_fla_chunk is not None and FLA_OPT_IN and torch.cuda.is_available()
                           and not ops._FORCED_PYTORCH)
          else "pytorch-chunked")       # what runs on CUDA tensors (CPU tensors: always PyTorch)
_described = False


def log_kernel_once() -> None:
    """Print which gated-delta-rule implementation runs, the first time a model with the memory is built."""
    global _described
    if not _described:
        _described = True
        note = (" (fla importable but opt-in: MAMBA_NARRATIVE_FLA=1; on Hopper its backward needs Triton >= 3.7.1)"
                if _fla_chunk is not None and not FLA_OPT_IN and torch.cuda.is_available() else "")
        print(f"kernels: gated_delta_rule={KERNEL}{note}")


def _use_fla(kernel, *tensors) -> bool:
    """fla's kernel for CUDA tensors, unless mamba_lm.ops forces the PyTorch paths (env or force_pytorch())."""
    return kernel is not None and FLA_OPT_IN and not ops._pytorch_only and not ops._FORCED_PYTORCH and all(
        t.is_cuda for t in tensors)


def _acc(v: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: float32, or float64 for float64 inputs (tight gradient checks in the tests)."""
    return torch.promote_types(v.dtype, torch.float32)


def _scale(q: torch.Tensor, scale: float | None) -> float:
    return q.shape[-1] ** -0.5 if scale is None else scale


def gated_delta_rule_ref(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False):
    """Per-step recurrence (module docstring), fp32 math.

    q, k: (b, t, h, d_k); v: (b, t, h, d_v); g, beta: (b, t, h); initial_state: (b, h, d_k, d_v) | None.
    Returns (o (b, t, h, d_v) in v's dtype, final state (b, h, d_k, d_v) float32 (float64 for float64 inputs) | None).
    """
    dtype = v.dtype
    b, t, nh, dk = k.shape
    dv = v.shape[-1]
    acc = _acc(v)
    q, k, v, g, beta = (x.to(acc) for x in (q, k, v, g, beta))
    q = q * _scale(q, scale)
    h = q.new_zeros(b, nh, dk, dv) if initial_state is None else initial_state.to(acc)
    outs = []
    for i in range(t):
        h = h * g[:, i].exp()[..., None, None]                                   # forget: α_t h
        u = beta[:, i, :, None] * (v[:, i] - torch.einsum("bhkv,bhk->bhv", h, k[:, i]))
        h = h + k[:, i, :, :, None] * u[:, :, None, :]                           # write: + k_t u_tᵀ
        outs.append(torch.einsum("bhkv,bhk->bhv", h, q[:, i]))                  # read: hᵀ q_t
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(b, 0, nh, dv)
    return o.to(dtype), (h if output_final_state else None)


def gated_delta_rule_chunked(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                             chunk_size=64):
    """Chunked WY / UT-transform form (module docstring); same arguments and results as the reference."""
    b, t, nh, dk = k.shape
    dv, dtype, acc = v.shape[-1], v.dtype, _acc(v)
    c = max(1, min(chunk_size, t))
    n = -(-t // c)
    pad = n * c - t
    # (b, h, n, c, ·) float32; padded tokens have k = v = q = 0, β = 0, g = 0: no change to the state
    q, k, v = (F.pad(x.to(acc), (0, 0, 0, 0, 0, pad)).transpose(1, 2).unflatten(2, (n, c)) for x in (q, k, v))
    g, beta = (F.pad(x.to(acc), (0, 0, 0, pad)).transpose(1, 2).unflatten(2, (n, c)) for x in (g, beta))
    q = q * _scale(q, scale)
    gam = g.cumsum(-1)                                                           # Γ_t, (b, h, n, c)
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()           # s <= t
    decay = (gam[..., :, None] - gam[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # γ_t/γ_s
    strict = (beta[..., None] * (k @ k.transpose(-1, -2)) * decay).tril(-1)      # A, (b, h, n, c, c)
    eye = torch.eye(c, dtype=q.dtype, device=q.device)
    rhs = torch.cat([beta[..., None] * v, (beta * gam.exp())[..., None] * k], dim=-1)
    solved = torch.linalg.solve_triangular(eye + strict, rhs, upper=False, unitriangular=True)
    u_tilde, w = solved.split([dv, dk], dim=-1)                                   # Ũ (.., c, d_v), W (.., c, d_k)
    attn = (q @ k.transpose(-1, -2)) * decay                                     # causal, diagonal included
    q_decayed = q * gam.exp()[..., None]
    k_to_end = k * (gam[..., -1:] - gam).exp()[..., None]                        # k_s γ_C / γ_s
    h = q.new_zeros(b, nh, dk, dv) if initial_state is None else initial_state.to(acc)
    outs = []
    for i in range(n):
        u = u_tilde[:, :, i] - w[:, :, i] @ h                                    # U = Ũ - W h_0
        outs.append(q_decayed[:, :, i] @ h + attn[:, :, i] @ u)
        h = gam[:, :, i, -1, None, None].exp() * h + k_to_end[:, :, i].transpose(-1, -2) @ u
    o = torch.stack(outs, dim=2).flatten(2, 3)[:, :, :t].transpose(1, 2)         # (b, t, h, d_v)
    return o.to(dtype), (h if output_final_state else None)


def gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, chunk_size=64):
    """Fast path: fla's chunked Triton kernel on CUDA (when importable), else `gated_delta_rule_chunked`.

    Shapes as `gated_delta_rule_ref`. On the kernel, q, k, beta are cast to v's dtype and g to float32,
    as fla's GatedDeltaNet layer passes them; the state stays float32.
    """
    if _use_fla(_fla_chunk, q, v):
        dtype = v.dtype
        state = None if initial_state is None else initial_state.float()
        o, last = _fla_chunk(q.to(dtype), k.to(dtype), v, g.float(), beta.to(dtype), scale=_scale(q, scale),
                             initial_state=state, output_final_state=output_final_state)
        return o, last
    return gated_delta_rule_chunked(q, k, v, g, beta, scale, initial_state, output_final_state, chunk_size)


def gated_delta_rule_step(q, k, v, g, beta, state, scale=None):
    """One token of the recurrence, `state` (b, h, d_k, d_v) float32 updated in place (the decode step).

    q, k: (b, h, d_k); v: (b, h, d_v); g, beta: (b, h) -> o (b, h, d_v) in v's dtype. Equal to
    `gated_delta_rule_ref` on one token (tested). On CUDA, fla's fused recurrent kernel (one launch).
    """
    dtype = v.dtype
    if _use_fla(_fla_recurrent, q, state):
        o, last = _fla_recurrent(q[:, None].to(dtype), k[:, None].to(dtype), v[:, None], g[:, None].float(),
                                 beta=beta[:, None].to(dtype), scale=_scale(q, scale), initial_state=state,
                                 output_final_state=True)
        state.copy_(last)
        return o[:, 0]
    q, k, v, g, beta = (t.to(state.dtype) for t in (q, k, v, g, beta))         # fp32 math (the state's)
    h = state * g.exp()[..., None, None]                                         # forget: α_t h
    u = beta[..., None] * (v - torch.einsum("bhkv,bhk->bhv", h, k))
    h = h + k[..., None] * u[..., None, :]                                       # write: + k_t u_tᵀ
    state.copy_(h)
    return torch.einsum("bhkv,bhk->bhv", h, q * _scale(q, scale)).to(dtype)
