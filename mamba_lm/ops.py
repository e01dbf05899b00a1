"""Mamba's low-level ops: selective scan, causal depthwise conv1d, RMSNorm, single-token updates.

Every model of the repository calls these functions, never a kernel directly. Each op has two paths:

* CUDA kernels from `mamba_ssm` / `causal_conv1d` when they import and the tensors are on a GPU
  (`selective_scan_fn`, the fused `mamba_inner_fn`, `causal_conv1d_fn`, the Triton
  `selective_state_update` and `rms_norm_fn`), exactly as mamba-ssm's own modules call them;
* pure PyTorch everywhere else: a slow, obviously correct sequential `selective_scan_ref`, and a
  fast scan (`selective_scan_chunked`) with a hand-written backward: the adjoint recurrence runs the
  same scan in reverse, and only the inputs are saved (the (l, b, d, n) tensors are recomputed, as
  in mamba-ssm's kernel). The recurrence itself is an in-place time loop on CPU and, on GPU, a
  chunked scan (all chunks of `chunk_size` steps scanned at once, then the state carried across
  chunks), so there are l/chunk + chunk steps instead of l.

Glossary (Mamba paper, Gu & Dao 2023), layouts are mamba-ssm's (channels first):

    b batch, d channels (d_inner = E * d_model), l sequence length, n = N = d_state,
    g groups of B/C (d % g == 0; channel c uses group c // (d / g)), w conv width (d_conv)
    u: (b, d, l) input x_t           Δ = delta: (b, d, l), softplus(Δ + Δ_bias) when delta_softplus
    A: (d, n) (negative reals)       B, C: (b, n, l) or (b, g, n, l)      D: (d,) skip
    z: (b, d, l) gate, y * silu(z)   state h: (b, d, n)
    h_t = exp(Δ_t A) * h_{t-1} + Δ_t B_t u_t,    y_t = C_t . h_t + D u_t

The environment variable MAMBA_NARRATIVE_KERNELS=pytorch forces the PyTorch path (GPU equivalence
tests); `force_pytorch()` does the same inside a `with` block.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.utils.checkpoint
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# optional CUDA kernels: every import guarded; `import mamba_ssm` raises more than ImportError on
# CPU-only machines (e.g. about selective_scan_cuda), so catch Exception
_FORCED_PYTORCH = os.environ.get("MAMBA_NARRATIVE_KERNELS", "").strip().lower() == "pytorch"

_ss_cuda = _mamba_inner_cuda = _ssu_triton = _rms_norm_triton = None
_conv_cuda = _conv_update_cuda = None
if not _FORCED_PYTORCH:
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _ss_cuda
    except Exception:  # noqa: BLE001 - any failure means: no kernel
        _ss_cuda = None
    try:
        import mamba_ssm.ops.selective_scan_interface as _ssi
        # mamba_inner_fn needs causal_conv1d's C++ functions, imported (or set to None) by mamba_ssm itself
        _mamba_inner_cuda = _ssi.mamba_inner_fn if getattr(_ssi, "causal_conv1d_fwd_function", None) else None
    except Exception:  # noqa: BLE001
        _mamba_inner_cuda = None
    try:
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update as _ssu_triton
    except Exception:  # noqa: BLE001
        _ssu_triton = None
    try:
        from mamba_ssm.ops.triton.layer_norm import rms_norm_fn as _rms_norm_triton
    except Exception:  # noqa: BLE001
        try:
            from mamba_ssm.ops.triton.layernorm import rms_norm_fn as _rms_norm_triton
        except Exception:  # noqa: BLE001
            _rms_norm_triton = None
    try:
        from causal_conv1d import causal_conv1d_fn as _conv_cuda
        from causal_conv1d import causal_conv1d_update as _conv_update_cuda
    except Exception:  # noqa: BLE001
        _conv_cuda = _conv_update_cuda = None

_CUDA = torch.cuda.is_available()
KERNELS = {
    "selective_scan": "mamba_ssm" if (_ss_cuda and _CUDA) else "pytorch-chunked",
    "mamba_inner": "mamba_ssm" if (_mamba_inner_cuda and _conv_cuda and _CUDA) else "pytorch",
    "causal_conv1d": "causal_conv1d" if (_conv_cuda and _CUDA) else "pytorch",
    "selective_state_update": "mamba_ssm-triton" if (_ssu_triton and _CUDA) else "pytorch",
    "rms_norm": "mamba_ssm-triton" if (_rms_norm_triton and _CUDA) else "pytorch",
}
_pytorch_only = False  # set by force_pytorch()
_described = False


def describe_kernels() -> str:
    """One log line saying which implementation of each op runs (CUDA tensors; CPU is always PyTorch)."""
    forced = " (forced by MAMBA_NARRATIVE_KERNELS=pytorch)" if _FORCED_PYTORCH else ""
    return "kernels: " + ", ".join(f"{k}={v}" for k, v in KERNELS.items()) + forced


def log_kernels_once() -> None:
    """Print `describe_kernels()` the first time a model is built in this process."""
    global _described
    if not _described:
        _described = True
        print(describe_kernels())


_noted: set = set()


def note_fallback(op: str, reason: str) -> None:
    """Print once per (op, reason) that a CUDA kernel could not take part and PyTorch ran instead."""
    if (op, reason) not in _noted:
        _noted.add((op, reason))
        print(f"kernels: {op} runs in PyTorch: {reason}")


@contextmanager
def force_pytorch():
    """Inside this block every op takes its PyTorch path, even on a GPU with kernels (equivalence tests)."""
    global _pytorch_only
    previous, _pytorch_only = _pytorch_only, True
    try:
        yield
    finally:
        _pytorch_only = previous


def _f32(t: torch.Tensor) -> torch.Tensor:
    """t in float32; returns t itself when it already is (no dispatched no-op conversion: decode runs
    a few hundred ops per token, and each `.float()` of a float32 tensor is one more dispatch)."""
    return t if t.dtype == torch.float32 else t.float()


def _use(kernel, *tensors) -> bool:
    return kernel is not None and not _pytorch_only and all(t.is_cuda for t in tensors)


# ----------------------------------------------------------------------------------------------
# selective scan

def _check_groups(BC: torch.Tensor, d: int) -> torch.Tensor:
    """B or C as (b, g, n, l); checks the layout and d % g == 0."""
    if BC.dim() == 3:
        BC = BC.unsqueeze(1)
    if BC.dim() != 4:
        raise ValueError(f"B/C must be (b, n, l) or (b, g, n, l), got shape {tuple(BC.shape)}")
    if d % BC.shape[1] != 0:
        raise ValueError(f"channels d={d} must be divisible by the number of B/C groups g={BC.shape[1]}")
    return BC


def _softplus_delta(delta, delta_bias, delta_softplus):
    """(Δ + Δ_bias, Δ') in float32, Δ' = softplus(Δ + Δ_bias) when delta_softplus. (b, d, l) each."""
    pre = delta.float()
    if delta_bias is not None:
        pre = pre + delta_bias.float()[:, None]
    return pre, (F.softplus(pre) if delta_softplus else pre)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, initial_state=None):
    """Sequential selective scan: one step per position, float32 math. The definition, for tests.

    u, delta, z: (b, d, l); A: (d, n); B, C: (b, n, l) or (b, g, n, l); D, delta_bias: (d,)
    initial_state: (b, d, n) or None (zeros)
    returns out (b, d, l) in u's dtype, and last_state (b, d, n) float32 if return_last_state
    """
    b, d, l = u.shape
    _, dt = _softplus_delta(delta, delta_bias, delta_softplus)
    Bg, Cg = _check_groups(B, d).float(), _check_groups(C, d).float()     # (b, g, n, l)
    Bd = Bg.repeat_interleave(d // Bg.shape[1], dim=1)                     # channel c uses group c // (d/g)
    Cd = Cg.repeat_interleave(d // Cg.shape[1], dim=1)                     # (b, d, n, l)
    uf = u.float()
    h = torch.zeros(b, d, A.shape[1], device=u.device, dtype=torch.float32)
    if initial_state is not None:
        h = h + initial_state.float()
    ys = []
    for t in range(l):
        dA = torch.exp(dt[:, :, t, None] * A.float())                       # exp(Δ_t A)      (b, d, n)
        dBu = (dt[:, :, t] * uf[:, :, t])[:, :, None] * Bd[:, :, :, t]     # Δ_t B_t u_t     (b, d, n)
        h = dA * h + dBu
        ys.append((h * Cd[:, :, :, t]).sum(-1))                            # C_t . h_t       (b, d)
    y = torch.stack(ys, dim=2) if l > 0 else uf * 0
    if D is not None:
        y = y + uf * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    out = y.to(u.dtype)
    return (out, h) if return_last_state else out


# The fast PyTorch path works time-major, (l, b, d, n), so that one time step is one contiguous block.

def _bc_time_major(BC, d):
    """B or C: (b, n, l) | (b, g, n, l) -> (l, b, g, n) float32 contiguous."""
    return _check_groups(BC, d).float().permute(3, 0, 1, 2).contiguous()


def _contract_n(X, Yt):
    """Σ_n X[l,b,d,n] Yt[l,b,g(d),n] -> (l, b, d): C . h, or g . B. Batched matmul on views, no copies."""
    l, b, d, n = X.shape
    g = Yt.shape[2]
    return torch.matmul(X.reshape(l * b * g, d // g, n), Yt.reshape(l * b * g, n, 1)).view(l, b, d)


def _contract_d(Y, X, g):
    """Σ_{d in group} Y[l,b,d] X[l,b,d,n] -> (l, b, g, n): dL/dC or dL/dB. Y: (l, b, d). No copies."""
    l, b, d, n = X.shape
    return torch.matmul(Y.reshape(l * b * g, 1, d // g), X.reshape(l * b * g, d // g, n)).view(l, b, g, n)


def _scan_loop(a, x, h0):
    """In place on x: x_t <- a_t * x_{t-1} + x_t (x_{-1} = h0), one contiguous step at a time.
    a, x: (l, b, d, n); h0: (b, d, n) | None. Fastest on CPU."""
    xs, as_ = x.unbind(0), a.unbind(0)                                     # views made once, not per step
    if h0 is not None:
        xs[0].addcmul_(as_[0], h0)
    for t in range(1, len(xs)):
        xs[t].addcmul_(as_[t], xs[t - 1])
    return x


def _scan_chunks(a, x, h0, chunk_size, reverse=False):
    """Chunked scan, the GPU default: all chunks advance together, so l/chunk_size times fewer steps.

    Forward:  h_t = a_t h_{t-1} + x_t.   reverse=True: g_t = x_t + a_t g_{t+1} (pass a shifted by one).
    a, x: (l, b, d, n); h0: (b, d, n) | None (forward only). Each chunk of T = chunk_size steps is
    first scanned from a zero state (T steps, every chunk at once) while the running product of its
    a's is kept; then the true state entering each chunk is carried across chunks (l/T small steps),
    and added: h_t = local_t + (Π_{s<=t in chunk} a_s) * carry. Only products of factors in (0, 1].
    """
    l, b, d, n = x.shape
    T = max(1, min(chunk_size, l))
    nc = -(-l // T)
    pad = nc * T - l
    x = torch.cat([x, x.new_zeros(pad, b, d, n)]) if pad else x.clone()
    prod = torch.cat([a, a.new_ones(pad, b, d, n)]) if pad else a.clone()
    x, prod = x.view(nc, T, b, d, n), prod.view(nc, T, b, d, n)
    steps = range(T - 2, -1, -1) if reverse else range(1, T)
    for t in steps:                                                        # scan inside every chunk at once
        s = t + 1 if reverse else t - 1
        x[:, t].addcmul_(prod[:, t], x[:, s])
        prod[:, t].mul_(prod[:, s])
    edge = 0 if reverse else T - 1                                         # the chunk's last step in scan order
    carry = [None] * nc
    h = x.new_zeros(b, d, n) if h0 is None else h0
    for c in (range(nc - 1, -1, -1) if reverse else range(nc)):           # carry the state across chunks
        carry[c] = h
        h = torch.addcmul(x[c, edge], prod[c, edge], h)
    x.addcmul_(prod, torch.stack(carry).unsqueeze(1))
    return x.view(nc * T, b, d, n)[:l]


# CPU: the scan in time blocks of T steps whose (T, b, d, n) tensors stay in the cache. The blocks run one
# after another (the state carried from block to block), the forward keeps only each block's starting
# state, and the backward recomputes one block at a time, in reverse. Same arithmetic in the same order
# as the whole-sequence loop; no (l, b, d, n) tensor is ever made: memory O(T b d n) for the block, plus
# l/T kept states of (b, d, n), no more than one more (b, d, l) input when T >= n.
_CPU_BLOCK_ELEMENTS = 1 << 18   # elements per (T, b, d, n) block tensor (1 MiB fp32, cache-sized)


def cpu_block_length(b: int, d: int, n: int, l: int) -> int:
    """T of the CPU blocked scan: as many steps as fit `_CPU_BLOCK_ELEMENTS`, but at least n (so that the
    l/T kept block states take no more memory than the (b, d, l) input), at most l."""
    return max(1, min(l, max(n, _CPU_BLOCK_ELEMENTS // max(1, b * d * n))))


def _pick(method: str, x: torch.Tensor) -> str:
    if method == "auto":
        return "blocked" if x.device.type == "cpu" else "chunked"
    if method not in ("loop", "chunked", "blocked"):
        raise ValueError(f"scan method must be 'auto', 'blocked', 'loop' or 'chunked', got {method!r}")
    return method


def _scan_affine(a, x, h0, chunk_size, method="auto"):
    """Inclusive scan h_t = a_t * h_{t-1} + x_t along dim 0 (may reuse x's memory).
    a, x: (l, b, d, n); h0: (b, d, n) | None. method: "loop" | "chunked" (GPU) | "auto"."""
    if _pick(method, x) in ("loop", "blocked"):
        return _scan_loop(a, x, h0)
    return _scan_chunks(a, x, h0, chunk_size)


def _scan_affine_reverse(a, x, chunk_size, method="auto"):
    """Adjoint scan g_t = x_t + a_{t+1} * g_{t+1} along dim 0, g_{l-1} = x_{l-1} (may reuse x's memory)."""
    if _pick(method, x) in ("loop", "blocked"):
        return _scan_loop_reverse(a, x)
    a_next = torch.cat([a[1:], torch.zeros_like(a[:1])])
    return _scan_chunks(a_next, x, None, chunk_size, reverse=True)


def _scan_loop_reverse(a, x):
    """In place on x: x_t <- x_t + a_{t+1} * x_{t+1}, from the end. a, x: (T, b, d, n)."""
    xs, as_ = x.unbind(0), a.unbind(0)
    for t in range(len(xs) - 2, -1, -1):
        xs[t].addcmul_(as_[t + 1], xs[t + 1])
    return x


def _forward_states(u, dt, A, Bt, h0, chunk_size, method):
    """dA = exp(Δ'A) and the states h, both (l, b, d, n). u, dt: (b, d, l); Bt: (l, b, g, n)."""
    # time-major copy first: a product with the permuted view would inherit its (b, d, l, n) memory
    # layout, and every step of the scan would then read a strided, cache-unfriendly slice dA[t]
    dt_t = dt.permute(2, 0, 1).contiguous()                                # (l, b, d)
    dtu_t = (dt * u.float()).permute(2, 0, 1).contiguous()                 # (same reason)
    h0f = h0.float() if h0 is not None else None
    return _block_states(dt_t, dtu_t, A.float(), Bt, h0f, chunk_size, method)


def _block_states(dt_t, dtu_t, Af, Bt, h0, chunk_size=64, method="loop"):
    """dA = exp(Δ'A) and the states h_t = dA_t h_{t-1} + Δ'_t u_t B_t from h0, both (T, b, d, n) contiguous.
    dt_t, dtu_t: (T, b, d) time-major Δ' and Δ'u; Af: (d, n); Bt: (T, b, g, n); h0: (b, d, n) | None (zeros)."""
    T, b, d = dt_t.shape
    g, n = Bt.shape[2], Bt.shape[3]
    dA = (dt_t.unsqueeze(-1) * Af).exp_()                                  # (T, b, d, n)
    dBu = (dtu_t.view(T, b, g, d // g, 1) * Bt.unsqueeze(3)).view(T, b, d, n)   # Δ' u B (group of each channel)
    return dA, _scan_affine(dA, dBu, h0, chunk_size, method)


def _dot_n(X, Yt):
    """Σ_n X[t,b,d,n] Yt[t,b,g(d),n] -> (t, b, d) as one vecdot over broadcast views: on the CPU's small
    blocks about 2x faster than the batched matvec of `_contract_n`."""
    t, b, d, n = X.shape
    g = Yt.shape[2]
    return torch.linalg.vecdot(X.view(t, b, g, d // g, n), Yt.unsqueeze(3)).view(t, b, d)


def _dot_d(Y, X, g):
    """Σ_{d in group} Y[t,b,d] X[t,b,d,n] -> (t, b, g, n): multiply and sum (about 2x faster than a
    (1, d/g) x (d/g, n) batched matmul on the CPU's small blocks)."""
    t, b, d, n = X.shape
    return (X.view(t, b, g, d // g, n) * Y.view(t, b, g, d // g, 1)).sum(3)


def _blocks(l: int, T: int) -> list[tuple[int, int]]:
    return [(s, min(s + T, l)) for s in range(0, l, T)]


def _scan_blocked_forward(dt_t, dtu_t, Af, Bt, Ct, h0, T):
    """CPU forward in blocks of T steps: y_t = C_t . h_t (l, b, d), each block's starting state (list, None
    for zeros) and the last state (b, d, n)."""
    l, b, d = dt_t.shape
    g = Bt.shape[2]
    y_t = dt_t.new_empty(l, b, d)
    starts, h = [], h0
    for s, e in _blocks(l, T):
        starts.append(h)
        _, hs = _block_states(dt_t[s:e], dtu_t[s:e], Af, Bt[s:e], h)
        y_t[s:e] = _dot_n(hs, Ct[s:e])
        h = hs[-1].clone()                                                 # not a view: frees the block
    return y_t, starts, (h if h is not None else dt_t.new_zeros(b, d, Af.shape[1]))


def _scan_blocked_backward(dt_t, dtu_t, Af, Bt, Ct, gy_t, glast, starts, T, need_y):
    """CPU backward in reverse blocks (each recomputed from its starting state), the adjoint g carried
    from block to block: at a block's last step g_{e-1} = gy_{e-1} C_{e-1} + exp(Δ'_e A) g_e.

    Returns y_t (l, b, d) or None, Σ_n dL/d(Δ'A)·A (l, b, d), dL/d(Δ'u) (l, b, d), dL/dA (d, n),
    dL/dB, dL/dC (l, b, g, n) and dL/dh0 (b, d, n) (= exp(Δ'_0 A) g_0).
    """
    l, b, d = dt_t.shape
    g, n = Bt.shape[2], Bt.shape[3]
    y_t = dt_t.new_empty(l, b, d) if need_y else None
    g_dtA_A, g_dtu = dt_t.new_empty(l, b, d), dt_t.new_empty(l, b, d)
    gB, gC = Bt.new_empty(l, b, g, n), Bt.new_empty(l, b, g, n)
    gA = Af.new_zeros(d, n)
    carry = glast.float() if glast is not None else None                   # what g_{e-1} gains from later steps
    blocks = _blocks(l, T)
    for k in range(len(blocks) - 1, -1, -1):
        s, e = blocks[k]
        h_start = starts[k]
        dA, hs = _block_states(dt_t[s:e], dtu_t[s:e], Af, Bt[s:e], h_start)
        if need_y:
            y_t[s:e] = _dot_n(hs, Ct[s:e])
        gC[s:e] = _dot_d(gy_t[s:e], hs, g)
        gs = (gy_t[s:e].view(e - s, b, g, d // g, 1) * Ct[s:e].unsqueeze(3)).view(e - s, b, d, n)  # gy C
        if carry is not None:
            gs[-1] += carry
        _scan_loop_reverse(dA, gs)                                         # g_t inside the block
        carry = dA[0] * gs[0]
        gdtA = dA.mul_(gs)                                                 # g_t e^{Δ'A}, then times h_{t-1}
        gdtA[1:] *= hs[:-1]
        if h_start is not None:
            gdtA[0] *= h_start
        else:
            gdtA[0] = 0
        g_dtA_A[s:e] = torch.linalg.vecdot(gdtA, Af)                       # Σ_n (.) A
        gA += gdtA.mul_(dt_t[s:e].unsqueeze(-1)).sum((0, 1))
        g_dtu[s:e] = _dot_n(gs, Bt[s:e])
        gB[s:e] = _dot_d(dtu_t[s:e], gs, g)
    return y_t, g_dtA_A, g_dtu, gA, gB, gC, carry


def _scan_whole_backward(dt_t, dtu_t, Af, Bt, Ct, gy_t, glast, h0, chunk_size, method, need_y):
    """GPU (chunked) and CPU "loop" backward over the whole (l, b, d, n) tensors; returns what
    `_scan_blocked_backward` returns."""
    l, b, d = dt_t.shape
    g, n = Bt.shape[2], Bt.shape[3]
    dA, hs = _block_states(dt_t, dtu_t, Af, Bt, h0, chunk_size, method)  # recomputed (l, b, d, n)
    y_t = _contract_n(hs, Ct) if need_y else None
    gC = _contract_d(gy_t, hs, g)                                          # (l, b, g, n)
    gs = (gy_t.view(l, b, g, d // g, 1) * Ct.unsqueeze(3)).reshape(l, b, d, n)   # dL/dh_t from y_t
    if glast is not None:
        gs[-1] += glast.float()
    gs = _scan_affine_reverse(dA, gs, chunk_size, method)                 # g_t
    gh0 = dA[0] * gs[0] if h0 is not None else None
    gdtA = gs * dA                                                         # d loss / d(Δ'A) = g_t e^{Δ'A} h_{t-1}
    del dA
    gdtA[1:] *= hs[:-1]
    if h0 is not None:
        gdtA[0] *= h0
    else:
        gdtA[0] = 0
    del hs
    g_dtA_A = (gdtA * Af).sum(-1)                                          # (l, b, d)
    gA = gdtA.mul_(dt_t.unsqueeze(-1)).sum((0, 1))                         # (d, n)
    del gdtA
    g_dtu = _contract_n(gs, Bt)                                            # d loss / d(Δ'u) (l, b, d)
    gB = _contract_d(dtu_t, gs, g)                                         # (l, b, g, n)
    return y_t, g_dtA_A, g_dtu, gA, gB, gC, gh0


# Optional: each block as one inductor-compiled function (torch.compile's C++ code generation on the
# CPU), the state kept in registers across the block's T steps and exp, products and contractions fused:
# about 6-7x faster than the eager block. Chosen by `set_cpu_scan("compiled")` or
# MAMBA_NARRATIVE_CPU_SCAN=compiled, and by the trainer for long CPU runs (trainer.choose_cpu_scan),
# because compiling costs 10-20 s per model shape on the first run (inductor caches the code on disk for
# later runs: about 3 s). The eager blocks above are its twin.
_COMPILED_T = 8                  # steps per compiled block (unrolled in the generated code)
_cpu_scan = os.environ.get("MAMBA_NARRATIVE_CPU_SCAN", "eager").strip().lower() or "eager"
_compiled_fns: dict = {}


def set_cpu_scan(mode: str) -> None:
    """"eager" (default): the eager blocked scan; "compiled": its blocks compiled by torch.compile (inductor)."""
    global _cpu_scan
    if mode not in ("eager", "compiled"):
        raise ValueError(f"cpu scan must be 'eager' or 'compiled', got {mode!r}")
    _cpu_scan = mode


def cpu_scan() -> str:
    """The CPU scan in use: "eager" or "compiled" (set_cpu_scan, MAMBA_NARRATIVE_CPU_SCAN)."""
    return _cpu_scan


def _block_forward_unrolled(dt, dtu, A, B, C, h):
    """One block written step by step for inductor. dt, dtu: (T, b, d); A: (d, n); B, C: (T, b, g, n);
    h: (b, d, n). Returns y_t = C_t . h_t (T, b, d) and h_T (b, d, n)."""
    T, b, d = dt.shape
    g, n = B.shape[2], B.shape[3]
    p = d // g
    Ag, hg, ys = A.view(g, p, n), h.view(b, g, p, n), []
    for t in range(T):
        hg = torch.exp(dt[t].view(b, g, p, 1) * Ag) * hg + dtu[t].view(b, g, p, 1) * B[t].view(b, g, 1, n)
        ys.append((hg * C[t].view(b, g, 1, n)).sum(-1))
    return torch.stack(ys).view(T, b, d), hg.reshape(b, d, n)


def _block_backward_unrolled(dt, dtu, A, B, C, h, gy, carry):
    """The backward of one block written step by step for inductor (the states recomputed from h, the
    adjoint g entering the block's last step as `carry`). Returns what `_scan_blocked_backward` returns
    for the block: y_t, Σ_n dL/d(Δ'A)·A, dL/d(Δ'u) (T, b, d), dL/dA (d, n), dL/dB, dL/dC (T, b, g, n) and
    the carry for the block before (exp(Δ'_0 A) g_0) (b, d, n)."""
    T, b, d = dt.shape
    g, n = B.shape[2], B.shape[3]
    p = d // g
    Ag, h0 = A.view(g, p, n), h.view(b, g, p, n)
    hs, dAs, hg = [], [], h0
    for t in range(T):
        dA = torch.exp(dt[t].view(b, g, p, 1) * Ag)
        hg = dA * hg + dtu[t].view(b, g, p, 1) * B[t].view(b, g, 1, n)
        hs.append(hg)
        dAs.append(dA)
    G, gA = carry.view(b, g, p, n), torch.zeros_like(Ag)
    y, g_dtA_A, g_dtu, gB, gC = [None] * T, [None] * T, [None] * T, [None] * T, [None] * T
    for t in range(T - 1, -1, -1):
        Ct, gyt = C[t].view(b, g, 1, n), gy[t].view(b, g, p, 1)
        y[t] = (hs[t] * Ct).sum(-1)
        G = G + gyt * Ct                                                   # g_t
        gdtA = G * dAs[t] * (hs[t - 1] if t > 0 else h0)
        g_dtA_A[t] = (gdtA * Ag).sum(-1)
        gA = gA + (gdtA * dt[t].view(b, g, p, 1)).sum(0)
        g_dtu[t] = (G * B[t].view(b, g, 1, n)).sum(-1)
        gB[t] = (G * dtu[t].view(b, g, p, 1)).sum(2)
        gC[t] = (gyt * hs[t]).sum(2)
        G = dAs[t] * G                                                     # what step t-1 gains
    stack = lambda xs: torch.stack(xs).view(T, b, d)  # noqa: E731
    return (stack(y), stack(g_dtA_A), stack(g_dtu), gA.view(d, n), torch.stack(gB), torch.stack(gC),
            G.reshape(b, d, n))


def _compiled(name):
    """The compiled twin of `_block_forward_unrolled` / `_block_backward_unrolled`, made once."""
    if name not in _compiled_fns:
        fn = _block_forward_unrolled if name == "forward" else _block_backward_unrolled
        _compiled_fns[name] = torch.compile(fn, dynamic=False)
    return _compiled_fns[name]


def _pad_time(x, T):
    """x (t, ...) padded with zeros to (T, ...) along time: with Δ' = 0 and Δ'u = 0 a step is the identity
    (exp(0 A) = 1, nothing added), so padded steps change neither the state nor the gradients."""
    return x if x.shape[0] == T else torch.cat([x, x.new_zeros(T - x.shape[0], *x.shape[1:])])


def _scan_compiled_forward(dt_t, dtu_t, Af, Bt, Ct, h0, T, fn=None):
    """`_scan_blocked_forward` with each block one compiled function (fn: its eager twin in tests)."""
    fn = fn or _compiled("forward")
    l, b, d = dt_t.shape
    h = h0 if h0 is not None else dt_t.new_zeros(b, d, Af.shape[1])
    y_t, starts = dt_t.new_empty(l, b, d), []
    for s, e in _blocks(l, T):
        starts.append(h)
        y, h = fn(_pad_time(dt_t[s:e], T), _pad_time(dtu_t[s:e], T), Af, _pad_time(Bt[s:e], T),
                  _pad_time(Ct[s:e], T), h)
        y_t[s:e] = y[:e - s]
    return y_t, starts, h


def _scan_compiled_backward(dt_t, dtu_t, Af, Bt, Ct, gy_t, glast, starts, T, fn=None):
    """`_scan_blocked_backward` with each block one compiled function (fn: its eager twin in tests)."""
    fn = fn or _compiled("backward")
    l, b, d = dt_t.shape
    g, n = Bt.shape[2], Bt.shape[3]
    y_t, g_dtA_A, g_dtu = dt_t.new_empty(l, b, d), dt_t.new_empty(l, b, d), dt_t.new_empty(l, b, d)
    gB, gC, gA = Bt.new_empty(l, b, g, n), Bt.new_empty(l, b, g, n), Af.new_zeros(d, n)
    carry = glast.float() if glast is not None else dt_t.new_zeros(b, d, n)
    blocks = _blocks(l, T)
    for k in range(len(blocks) - 1, -1, -1):
        s, e = blocks[k]
        m = e - s
        y, a, u_, gA_k, gB_k, gC_k, carry = fn(
            _pad_time(dt_t[s:e], T), _pad_time(dtu_t[s:e], T), Af, _pad_time(Bt[s:e], T), _pad_time(Ct[s:e], T),
            starts[k], _pad_time(gy_t[s:e], T), carry)
        y_t[s:e], g_dtA_A[s:e], g_dtu[s:e], gB[s:e], gC[s:e] = y[:m], a[:m], u_[:m], gB_k[:m], gC_k[:m]
        gA += gA_k
    return y_t, g_dtA_A, g_dtu, gA, gB, gC, carry


class _SelectiveScanFn(torch.autograd.Function):
    """The selective scan with a hand-written backward that saves only the inputs and recomputes the
    (l, b, d, n) tensors, as mamba-ssm's kernel does (no autograd graph over the big tensors).

    Forward:  Δ' = softplus(Δ + Δ_bias);  h_t = exp(Δ'_t A) h_{t-1} + Δ'_t u_t B_t;
              y_t = C_t . h_t + D u_t;  out = y * silu(z)
    Backward: gy = gout * silu(z);  gh_t = gy_t C_t (+ glast at t = l-1);
              g_t = gh_t + exp(Δ'_{t+1} A) g_{t+1}  (the adjoint scan);
              d/d(Δ'A)_t = g_t h_{t-1} exp(Δ'_t A);  d/d(Δ'u)_t = g_t . B_t;  d/dB_t = Σ_d g_t Δ'_t u_t;
              dh0 = exp(Δ'_0 A) g_0
    method "blocked" (CPU) runs both in cache-sized time blocks of `chunk_size` steps, keeping each
    block's starting state from the forward (l / T states of (b, d, n)).
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, chunk_size, method):
        b, d, l = u.shape
        _, dt = _softplus_delta(delta, delta_bias, delta_softplus)
        dt_t = dt.permute(2, 0, 1).contiguous()                            # (l, b, d) time-major
        dtu_t = (dt * u.float()).permute(2, 0, 1).contiguous()
        Af, Bt, Ct = A.float(), _bc_time_major(B, d), _bc_time_major(C, d)
        h0 = initial_state.float() if initial_state is not None else None
        ctx.starts = None
        if method == "compiled":
            y_t, ctx.starts, last = _scan_compiled_forward(dt_t, dtu_t, Af, Bt, Ct, h0, chunk_size)
        elif method == "blocked":
            y_t, ctx.starts, last = _scan_blocked_forward(dt_t, dtu_t, Af, Bt, Ct, h0, chunk_size)
        else:
            _, hs = _block_states(dt_t, dtu_t, Af, Bt, h0, chunk_size, method)
            y_t, last = _contract_n(hs, Ct), hs[-1].clone()
        y = y_t.permute(1, 2, 0)                                           # (b, d, l)
        if D is not None:
            y = y + u.float() * D.float()[:, None]
        if z is not None:
            y = y * F.silu(z.float())
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state)
        ctx.options = (delta_softplus, chunk_size, method)
        return y.to(u.dtype), last

    @staticmethod
    def backward(ctx, gout, glast):
        with torch.autocast(ctx.saved_tensors[0].device.type, enabled=False):  # fp32 math
            return _SelectiveScanFn._backward(ctx, gout, glast)

    @staticmethod
    def _backward(ctx, gout, glast):
        u, delta, A, B, C, D, z, delta_bias, h0 = ctx.saved_tensors
        delta_softplus, chunk_size, method = ctx.options
        b, d, l = u.shape
        uf, Af = u.float(), A.float()
        pre, dt = _softplus_delta(delta, delta_bias, delta_softplus)
        dt_t = dt.permute(2, 0, 1).contiguous()                            # (l, b, d)
        dtu_t = (dt * uf).permute(2, 0, 1).contiguous()
        Bt, Ct = _bc_time_major(B, d), _bc_time_major(C, d)                  # (l, b, g, n)

        gout = gout.float() if gout is not None else torch.zeros_like(uf)
        gy = gout
        if z is not None:
            zf = z.float()
            sig = torch.sigmoid(zf)
            gy = gout * zf * sig                                             # dL/dy before the gate
        gy_t = gy.permute(2, 0, 1).contiguous()                              # (l, b, d)
        if method == "compiled":
            y_t, g_dtA_A, g_dtu, gA, gB, gC, gh0 = _scan_compiled_backward(
                dt_t, dtu_t, Af, Bt, Ct, gy_t, glast, ctx.starts, chunk_size)
        elif method == "blocked":
            y_t, g_dtA_A, g_dtu, gA, gB, gC, gh0 = _scan_blocked_backward(
                dt_t, dtu_t, Af, Bt, Ct, gy_t, glast, ctx.starts, chunk_size, need_y=z is not None)
        else:
            y_t, g_dtA_A, g_dtu, gA, gB, gC, gh0 = _scan_whole_backward(
                dt_t, dtu_t, Af, Bt, Ct, gy_t, glast, None if h0 is None else h0.float(), chunk_size, method,
                need_y=z is not None)
        gz = None
        if z is not None:
            y = y_t.permute(1, 2, 0)
            if D is not None:
                y = y + uf * D.float()[:, None]
            gz = (gout * y * sig * (1 + zf * (1 - sig))).to(z.dtype)         # d silu(z)/dz = σ(1 + z(1-σ))
        gD = (gy * uf).sum((0, 2)).to(D.dtype) if D is not None else None
        gu = gy * D.float()[:, None] if D is not None else torch.zeros_like(uf)
        g_dtu = g_dtu.permute(1, 2, 0)                                       # (b, d, l)
        gdt = g_dtA_A.permute(1, 2, 0) + g_dtu * uf
        gu = gu + g_dtu * dt
        gpre = gdt * torch.sigmoid(pre) if delta_softplus else gdt
        gbias = gpre.sum((0, 2)).to(delta_bias.dtype) if delta_bias is not None else None
        gh0 = gh0.to(h0.dtype) if h0 is not None else None

        def to_layout(grad, like):  # (l, b, g, n) -> like's (b, n, l) or (b, g, n, l)
            grad = grad.permute(1, 2, 3, 0)
            return (grad.squeeze(1) if like.dim() == 3 else grad).to(like.dtype)

        return (gu.to(u.dtype), gpre.to(delta.dtype), gA.to(A.dtype), to_layout(gB, B), to_layout(gC, C),
                gD, gz, gbias, gh0, None, None, None)


def selective_scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           return_last_state=False, initial_state=None, chunk_size=64, method="auto"):
    """Selective scan in PyTorch with a memory-lean hand-written backward; same contract as the ref.

    method: "auto" = "blocked" on CPU, "chunked" on GPU. "blocked": the in-place time loop in cache-sized
    blocks of time (forward, and backward recomputed block by block in reverse), no (l, b, d, n) tensor;
    with "auto" its block length is `cpu_block_length(...)`, with "blocked" it is `chunk_size`.
    "loop": the same time loop over whole (l, b, d, n) tensors. "chunked": all chunks of `chunk_size`
    steps scanned at once, then the state carried across chunks (GPU: l/chunk + chunk steps, not l).
    Only the inputs (and, blocked, l/T block-start states) are kept for backward (`_SelectiveScanFn`).
    """
    if u.shape[2] == 0:
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                  return_last_state, initial_state)
    if method == "auto" and _pick(method, u) == "blocked":
        if _cpu_scan == "compiled":
            method, chunk_size = "compiled", _COMPILED_T
        else:
            method, chunk_size = "blocked", cpu_block_length(u.shape[0], u.shape[1], A.shape[1], u.shape[2])
    elif method != "compiled":
        _pick(method, u)   # validates the name
    with torch.autocast(u.device.type, enabled=False):  # fp32 math, also for the matmuls inside
        try:
            out, last = _SelectiveScanFn.apply(u, delta, A, B, C, D, z, delta_bias, initial_state,
                                               delta_softplus, chunk_size, method)
        except Exception as e:  # noqa: BLE001 - torch.compile failed (no C++ compiler...): eager, and say so
            if method != "compiled" or _compiled_fns.get("failed"):
                raise
            _compiled_fns["failed"] = True
            print(f"WARNING: compiling the CPU scan failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                  "using the eager blocked scan")
            set_cpu_scan("eager")
            return selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                          return_last_state, initial_state)
    return (out, last) if return_last_state else out


def _scan_cuda_with_initial_state(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                  return_last_state, initial_state, state_grad=False):
    """mamba_ssm's kernel (which starts from zero) plus the decayed initial state, exact by linearity.

    h_t = h_t(h0=0) + exp(Σ_{s<=t} Δ'_s A) h0, so y_t gains C_t . (exp(S_t) h0) before the gate.
    initial_state may be None (then only the gate runs here). state_grad: the last state is
    differentiated (a carried state inside a window), so it is read out through the kernel
    (`_scan_with_state_readout`); otherwise the kernel's last state carries no gradient.
    """
    if state_grad:
        out0, last0 = _scan_with_state_readout(_ss_cuda, u, delta, A, B, C, D, delta_bias, delta_softplus)
    else:
        out0, last0 = _ss_cuda(u, delta, A, B, C, D, None, delta_bias, delta_softplus, True)
    with torch.autocast(u.device.type, enabled=False):
        return _add_initial_state(out0, last0, u, delta, A, C, z, delta_bias, delta_softplus,
                                  return_last_state, initial_state)


def _scan_with_state_readout(scan, u, delta, A, B, C, D, delta_bias, delta_softplus):
    """A zero-initial-state scan whose last state h_l is differentiable, through a scan that drops the
    gradient of its last_state output (mamba_ssm's SelectiveScanFn: `backward(ctx, dout, *args)`).

    N read-out steps are appended: u = 0, B = 0, Δ' = 0 (so exp(Δ'A) = 1 and the state stays h_l) and
    C = e_k at step l + k, so out[:, :, l + k] = h_l[:, :, k]: the read-out is an ordinary output, and
    its gradient goes through the scan's own backward. The value returned is the scan's float32 last
    state; only its gradient comes from the read-out (whose dtype is u's). Δ' = 0 needs Δ = -1e4 with
    softplus, and Δ = -Δ_bias without (exact for the zero Δ_bias the clamped multi-track Δ passes).
    scan: selective_scan_fn's signature with z=None. Returns (out (b, d, l) ungated, last (b, d, n) fp32).
    """
    b, d, l = u.shape
    n = A.shape[1]
    pad = lambda t, fill: torch.cat([t, t.new_full((*t.shape[:-1], n), fill)], dim=-1)   # noqa: E731
    if delta_softplus:
        delta_ext = pad(delta, -1e4)
    else:
        fill = torch.zeros(d, n, device=u.device) if delta_bias is None else -delta_bias.float()[:, None].expand(d, n)
        delta_ext = torch.cat([delta, fill.to(delta.dtype).expand(b, d, n)], dim=-1)
    eye = torch.eye(n, device=C.device, dtype=C.dtype)                       # C at step l + k reads h[k]
    C_ext = torch.cat([C, eye.expand(*C.shape[:-2], n, n)], dim=-1)
    y_ext, last0 = scan(pad(u, 0), delta_ext, A, pad(B, 0), C_ext.contiguous(), D, None, delta_bias,
                        delta_softplus, True)
    readout = y_ext[:, :, l:].float()                                        # (b, d, n) = h_l
    return y_ext[:, :, :l], last0.float().detach() + (readout - readout.detach())


def _add_initial_state(out0, last0, u, delta, A, C, z, delta_bias, delta_softplus, return_last_state,
                       initial_state):
    y = out0.float()
    if initial_state is not None:
        args = (delta, A, C, initial_state, delta_bias, delta_softplus)
        if torch.is_grad_enabled():
            # recomputed in backward: autograd would otherwise keep two (l, b, d, n) float32 tensors per
            # layer (about 1 GB per row and layer at l = 4096, d = 1792), where the scan kernel keeps none
            y_h0, last_h0 = torch.utils.checkpoint.checkpoint(_initial_state_terms, *args, use_reentrant=False)
        else:
            y_h0, last_h0 = _initial_state_terms(*args)
        y, last0 = y + y_h0, last0.float() + last_h0
    if z is not None:
        y = y * F.silu(z.float())
    out = y.to(u.dtype)
    return (out, last0.float()) if return_last_state else out


def _initial_state_terms(delta, A, C, initial_state, delta_bias, delta_softplus):
    """What the initial state h0 adds, by linearity: y_t += C_t . (exp(S_t) h0) and h_l += exp(S_l) h0,
    S_t = Σ_{s<=t} Δ'_s A. Returns (y (b, d, l), last (b, d, n)) float32."""
    d = initial_state.shape[1]
    _, dt = _softplus_delta(delta, delta_bias, delta_softplus)
    decay = torch.exp(torch.cumsum(dt.permute(2, 0, 1).unsqueeze(-1) * A.float(), dim=0))   # (l, b, d, n)
    carried = decay * initial_state.float()                                                # (l, b, d, n)
    return _contract_n(carried, _bc_time_major(C, d)).permute(1, 2, 0), carried[-1]


_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _scan_kernel_supports(u, A) -> bool:
    """What mamba_ssm's selective_scan_cuda.fwd accepts (csrc/selective_scan/selective_scan.cpp):
    u in fp32/fp16/bf16, real or complex-float A, d_state <= 256."""
    return u.dtype in _KERNEL_DTYPES and A.shape[-1] <= 256 and A.dtype in (torch.float32, torch.float64)


def _scan_kernel_dtypes(u, delta, A, B, C, D, z, delta_bias):
    """Cast to the dtypes selective_scan_cuda.fwd checks (TORCH_CHECKs in selective_scan.cpp): delta,
    (input-dependent) B and C, and z in u's dtype; A, D and delta_bias float32. No-ops when they already
    are (mamba-ssm's Mamba passes them so); under autocast a caller's float32 Δ would otherwise fail."""
    dtype = u.dtype
    return (u, delta.to(dtype), A.float(), B.to(dtype), C.to(dtype), None if D is None else D.float(),
            None if z is None else z.to(dtype), None if delta_bias is None else delta_bias.float())


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, initial_state=None, chunk_size=64, last_state_grad=None):
    """Fast selective scan: mamba_ssm's CUDA kernel when available, else `selective_scan_chunked`.

    Shapes as `selective_scan_ref`. `chunk_size` only affects the PyTorch path. last_state_grad:
    None = the last state is differentiable when an input requires grad; False = it is returned
    detached (cheaper on the kernel path: no read-out steps).
    """
    # mamba_ssm's SelectiveScanFn drops the gradient w.r.t. its last_state output: when that state
    # may be differentiated (a carried state inside a window, mamba_lm/stateful.py), it is read out
    # through the kernel (`_scan_with_state_readout`), exact. last_state_grad=False: the caller
    # promises not to differentiate it (truncated BPTT detaches it), and it comes back detached.
    grad_through_state = return_last_state and torch.is_grad_enabled() and last_state_grad is not False and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, D, z, delta_bias, initial_state))
    if _use(_ss_cuda, u, delta) and _scan_kernel_supports(u, A):
        u, delta, A, B, C, D, z, delta_bias = _scan_kernel_dtypes(u, delta, A, B, C, D, z, delta_bias)
        if initial_state is None and not grad_through_state:
            return _ss_cuda(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
        return _scan_cuda_with_initial_state(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                             return_last_state, initial_state, grad_through_state)
    if _use(_ss_cuda, u, delta):
        note_fallback("selective_scan", f"dtype {u.dtype} / d_state {A.shape[-1]} not taken by mamba_ssm")
    if return_last_state and last_state_grad is False:
        out, last = selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, True,
                                           initial_state, chunk_size)
        return out, last.detach()
    return selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                  return_last_state, initial_state, chunk_size)


def fused_mamba_inner_available(x: torch.Tensor) -> bool:
    """True when mamba_ssm's fused `mamba_inner_fn` (conv + projections + scan + out_proj) can run on x."""
    return _use(_mamba_inner_cuda, x) and _conv_cuda is not None


def mamba_inner(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                out_proj_bias, A, D, delta_bias):
    """mamba_ssm's fused training path (call only when `fused_mamba_inner_available`).

    xz: (b, 2 d_inner, l); conv1d_weight: (d_inner, 1, w); returns (b, l, d_model).
    """
    # mamba_inner_fn(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
    #                out_proj_bias, A, B=None, C=None, D=None, delta_bias=None, ..., delta_softplus=True)
    return _mamba_inner_cuda(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                             out_proj_weight, out_proj_bias, A.float(), None, None,
                             None if D is None else D.float(),
                             delta_bias=None if delta_bias is None else delta_bias.float(), delta_softplus=True)


# ----------------------------------------------------------------------------------------------
# single-token state update (generation)

def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One recurrent step of the selective SSM, updating `state` in place.

    state: (b, d, n); x, dt, z: (b, d); A: (d, n); B, C: (b, n) or (b, g, n); D, dt_bias: (d,)
    returns y: (b, d) in x's dtype

    With grouped B/C, channel c reads group c // (d / g) (the layout of the grouped scan). On CUDA
    both forms go to mamba-ssm's Triton kernel in one launch; the grouped one as its multi-head form,
    g heads of d / g channels each, head h reading group h (`_ssu_triton_grouped`).
    """
    b, d = x.shape
    if B.dim() == 3 and d % B.shape[1] != 0:
        raise ValueError(f"channels d={d} must be divisible by the number of B/C groups g={B.shape[1]}")
    if _use(_ssu_triton, state, x) and (B.dim() == 2 or state.is_contiguous()):
        # mamba_ssm 2.3.2's wrapper unpacks D.stride() and dt_bias.stride() unconditionally (a None
        # crashes it): pass zeros instead, which change nothing
        zeros = None if D is not None and dt_bias is not None else torch.zeros(
            x.shape[1], device=x.device, dtype=torch.float32)
        D, dt_bias = (zeros if D is None else D), (zeros if dt_bias is None else dt_bias)
        if B.dim() == 3:
            return _ssu_triton_grouped(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
        return _ssu_triton(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)
    dt = _f32(dt)
    if dt_bias is not None:
        dt = dt + _f32(dt_bias)
    if dt_softplus:
        dt = F.softplus(dt)
    xf = _f32(x)
    g = 1 if B.dim() == 2 else B.shape[1]
    n = A.shape[1]
    # channel c reads group c // (d/g): view (b, d, n) as (b, g, d/g, n) and broadcast B, C over the
    # d/g channels of a group (no repeat_interleave); update in place when the state is float32
    h = state if state.dtype == torch.float32 else state.float()
    hg = h.unflatten(1, (g, d // g))                                       # a view (b, g, d/g, n)
    dA = (dt.unsqueeze(-1) * _f32(A)).exp_()                               # exp(Δ A)        (b, d, n)
    hg.mul_(dA.view(b, g, d // g, n))
    hg.addcmul_((dt * xf).view(b, g, d // g, 1), _f32(B).view(b, g, 1, n))  # + Δ x B       (b, g, d/g, n)
    if h is not state:
        state.copy_(h)
    y = torch.matmul(hg, _f32(C).view(b, g, n, 1)).view(b, d)              # C . h           (b, d)
    if D is not None:
        y = torch.addcmul(y, xf, _f32(D))
    if z is not None:
        y = y * F.silu(_f32(z))
    return y if y.dtype == x.dtype else y.to(x.dtype)


def _ssu_triton_grouped(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    """Grouped B/C (b, g, n) through the Triton kernel's multi-head form (nheads = ngroups = g).

    The (b, d, n) state is viewed, not copied, as (b, g, d/g, n), so the kernel updates the caller's
    state in place; x, dt, z (b, d) -> (b, g, d/g); A (d, n) -> (g, d/g, n); D, dt_bias (d,) -> (g, d/g).
    """
    b, d = x.shape
    g, n = B.shape[1], B.shape[2]                      # d % g == 0: checked by selective_state_update
    p = d // g
    y = _ssu_triton(state.view(b, g, p, n), x.reshape(b, g, p), dt.reshape(b, g, p), A.reshape(g, p, n), B, C,
                    D=D.reshape(g, p), z=None if z is None else z.reshape(b, g, p), dt_bias=dt_bias.reshape(g, p),
                    dt_softplus=dt_softplus)
    return y.reshape(b, d)


# ----------------------------------------------------------------------------------------------
# layout

def linear_channels_first(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (B, L, D_in) -> (B, D_out, L) as W·xᵀ: the projection and the transpose in one matmul.

    mamba-ssm's layout for in_proj and dt_proj: the result is a view with unit stride along L, which
    the conv and selective-scan kernels take as it is, where x @ Wᵀ followed by a transpose would need
    a contiguous copy for each of x, z and Δ (and one more in backward).
    """
    b, l, _ = x.shape
    out = (weight @ x.reshape(b * l, -1).t()).view(-1, b, l).transpose(0, 1)
    return out if bias is None else out + bias.to(out.dtype).unsqueeze(-1)


_STEP_BLOCKS = 8           # row blocks of the weight in linear_step's batched product
_STEP_MAX_ROWS = 4         # linear_step takes the blocked form up to this many rows (measured: slower at 8)
_STEP_MIN_WEIGHT = 1 << 16  # ... and for weights of at least this many elements (smaller: F.linear's fewer ops win)
_STEP_OPAQUE_WEIGHT = 3 << 19  # inside torch.compile: weights of this many elements (6 MiB fp32) stay ATen's bmm


def linear_step(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for the few rows of a decode step: x (b, d_in) -> (b, d_out).

    At batch 1-4 a decode step is bound by reading the weights once per token. On the CPU, MKL's
    matrix-vector product reads a row-major (d_out, d_in) weight at about half the rate the machine
    streams memory (measured on the 2-core EPYC VM, one thread: 13 GB/s vs 25 GB/s for a plain sum;
    2 rows through sgemm: 4-6 GB/s), whereas a batched product over `_STEP_BLOCKS` row blocks of the same
    weight, (k, d_out/k, d_in) @ (k, d_in, b), reads it at 23-26 GB/s: the same products, summed in a
    different order (results equal to F.linear up to float rounding, tested). Same weights, no copy;
    any other case (CUDA, more rows, small or non-contiguous weights, d_out not a multiple of k) is F.linear.
    Inside torch.compile (a compiled decode step) inductor turns the batched product into its own
    reduction loop, fused with its neighbours: better for cache-sized weights (small-cpu's 4 MiB LM head),
    ~30% slower for large ones (130M's 6.4 MiB out_proj, 12.8 MiB in_proj, 180 MB LM head), which
    therefore go through `_linear_blocked_op`, opaque to inductor.
    """
    b, d_in = x.shape
    d_out = weight.shape[0]
    if (x.is_cuda or b > _STEP_MAX_ROWS or d_out % _STEP_BLOCKS or weight.numel() < _STEP_MIN_WEIGHT
            or not weight.is_contiguous() or x.dtype != weight.dtype):
        return F.linear(x, weight, bias)
    if torch.compiler.is_compiling() and weight.numel() >= _STEP_OPAQUE_WEIGHT and not torch.is_grad_enabled():
        return _linear_blocked_op(x, weight, bias)
    return _linear_blocked(x, weight, bias)


def _linear_blocked(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """linear_step's batched product over row blocks: x (b, d_in), weight (d_out, d_in) -> (b, d_out)."""
    k = _STEP_BLOCKS
    b, d_in = x.shape
    d_out = weight.shape[0]
    w = weight.view(k, d_out // k, d_in)
    xt = x.t().expand(k, d_in, b)
    if bias is None:
        y = torch.bmm(w, xt)                                                 # (k, d_out/k, b)
    else:
        y = torch.baddbmm(bias.to(x.dtype).view(k, d_out // k, 1), w, xt)
    return y.permute(2, 0, 1).reshape(b, d_out)                              # a view at b = 1


@torch.library.custom_op("mamba_lm::linear_blocked", mutates_args=())
def _linear_blocked_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`_linear_blocked` as one op that torch.compile calls as it is (no autograd: decode only)."""
    return _linear_blocked(x, weight, bias).contiguous()   # row-major as the fake below (a no-op at b = 1)


@_linear_blocked_op.register_fake
def _(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


# ----------------------------------------------------------------------------------------------
# causal depthwise conv1d

def _activate(x, activation):
    if activation is None:
        return x
    if activation in ("silu", "swish"):
        return F.silu(x)
    raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")


def causal_conv1d_ref(x, weight, bias=None, activation=None, initial_states=None, return_final_states=False):
    """Causal depthwise conv as an explicit sum over taps: out_t = sum_k w[:, k] x_{t-(w-1)+k} (+ bias).

    x: (b, d, l); weight: (d, w); bias: (d,); initial_states / final_states: (b, d, w-1), the w-1
    inputs before / at the end of x (zeros when None). Returns out (b, d, l) in x's dtype.
    """
    dtype_in = x.dtype
    b, d, l = x.shape
    w = weight.shape[1]
    if initial_states is None:
        initial_states = torch.zeros(b, d, w - 1, device=x.device, dtype=torch.float32)
    xp = torch.cat([initial_states.float(), x.float()], dim=2)             # (b, d, w-1+l)
    out = torch.zeros(b, d, l, device=x.device, dtype=torch.float32)
    for k in range(w):
        out = out + weight[:, k].float()[:, None] * xp[:, :, k:k + l]
    if bias is not None:
        out = out + bias.float()[:, None]
    out = _activate(out, activation).to(dtype_in)
    if not return_final_states:
        return out
    return out, xp[:, :, xp.shape[2] - (w - 1):].to(dtype_in)


def _conv_kernel_supports(x, weight) -> bool:
    """What causal_conv1d's kernels accept: fp32/fp16/bf16 input and weight, width 2..4."""
    return x.dtype in _KERNEL_DTYPES and weight.dtype in _KERNEL_DTYPES and 2 <= weight.shape[-1] <= 4


def causal_conv1d(x, weight, bias=None, activation=None, initial_states=None, return_final_states=False):
    """Causal depthwise conv: causal_conv1d's kernel on CUDA (zero initial state), else F.conv1d.

    Shapes as `causal_conv1d_ref`.
    """
    if _use(_conv_cuda, x) and _conv_kernel_supports(x, weight):
        if initial_states is None and not return_final_states:
            # as mamba-ssm's Mamba: the weight in its own dtype (the kernel takes mixed input/weight
            # dtypes), the bias in the weight's dtype (TORCH_CHECK in causal_conv1d.cpp)
            return _conv_cuda(x, weight, bias.to(weight.dtype) if bias is not None else None, activation=activation)
        note_fallback("causal_conv1d", "a carried conv state (causal_conv1d takes initial states only in "
                                       "the channel-last layout); F.conv1d runs, depthwise and cheap")
    b, d, l = x.shape
    w = weight.shape[1]
    weight, bias = weight.unsqueeze(1).to(x.dtype), bias.to(x.dtype) if bias is not None else None
    if initial_states is None and not return_final_states:
        # as mamba-ssm's Mamba without causal-conv1d: pad inside the conv and drop the w-1 trailing
        # outputs, so that no padded copy of x is made (and kept for backward)
        return _activate(F.conv1d(x, weight, bias, padding=w - 1, groups=d)[..., :l], activation)
    if initial_states is None:
        xp = F.pad(x, (w - 1, 0))
    else:
        xp = torch.cat([initial_states.to(x.dtype), x], dim=2)             # (b, d, w-1+l)
    out = _activate(F.conv1d(xp, weight, bias, groups=d), activation)
    if not return_final_states:
        return out
    return out, xp[:, :, xp.shape[2] - (w - 1):]


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None):
    """One step of the causal conv; conv_state (b, d, w) holds the last w inputs and is rolled in place.

    x: (b, d); weight: (d, w); returns (b, d) in x's dtype.
    """
    if _use(_conv_update_cuda, x, conv_state) and conv_state.dtype == x.dtype and _conv_kernel_supports(x, weight):
        # causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, ...): with a
        # (b, d, w) state it uses state[..., 1:] and x, and shifts x in, exactly as below
        return _conv_update_cuda(x, conv_state, weight, bias.to(weight.dtype) if bias is not None else None,
                                 activation)
    x_new = x.unsqueeze(-1) if x.dtype == conv_state.dtype else x.unsqueeze(-1).to(conv_state.dtype)
    window = torch.cat([conv_state[:, :, 1:], x_new], dim=-1)              # the last w inputs (b, d, w)
    conv_state.copy_(window)
    out = torch.linalg.vecdot(_f32(window), _f32(weight))                  # Σ_k w[:, k] window[:, :, k]
    if bias is not None:
        out = out + _f32(bias)
    out = _activate(out, activation)
    return out if out.dtype == x.dtype else out.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# RMSNorm with fused residual add

def rms_norm(x, weight, eps=1e-5, residual=None, prenorm=False, residual_in_fp32=False):
    """RMSNorm(x + residual) * weight, mamba-ssm's `rms_norm_fn` semantics.

    x, residual: (..., D); weight: (D,). The sum x + residual is the new residual stream (float32 when
    residual_in_fp32). Returns out in x's dtype, and (out, residual) when prenorm.
    """
    if _use(_rms_norm_triton, x):
        return _rms_norm_triton(x, weight, None, residual=residual, eps=eps, prenorm=prenorm,
                                residual_in_fp32=residual_in_fp32)
    dtype_in = x.dtype
    total = _f32(x) if residual is None else _f32(x) + _f32(residual)
    out_dtype = dtype_in if residual is None else residual.dtype
    residual_out = total if residual_in_fp32 or out_dtype == torch.float32 else total.to(out_dtype)
    out = F.rms_norm(total, (total.shape[-1],), _f32(weight), eps)        # total * rsqrt(mean(total²) + eps) * w
    out = out if out.dtype == dtype_in else out.to(dtype_in)
    return (out, residual_out) if prenorm else out


class RMSNorm(nn.Module):
    """RMSNorm with a learned scale `weight` (D,), initialised to ones."""

    def __init__(self, d: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))

    def forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
        """x: (..., D) -> (..., D), or (out, residual) when prenorm."""
        return rms_norm(x, self.weight, self.eps, residual, prenorm, residual_in_fp32)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
