"""Tests of mamba_lm/ops.py: every fast path against its slow, obviously correct twin."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mamba_lm import ops

torch.manual_seed(0)


def _scan_inputs(b, d, n, l, groups, with_z, with_d, requires_grad=True, seed=0, positive_delta=False):
    """Random scan inputs; positive_delta for runs without softplus (Δ < 0 would make the scan explode)."""
    g = torch.Generator().manual_seed(seed)
    shape_bc = (b, n, l) if groups is None else (b, groups, n, l)
    t = {
        "u": torch.randn(b, d, l, generator=g),
        "delta": torch.rand(b, d, l, generator=g) * 0.5 if positive_delta else torch.randn(b, d, l, generator=g) * 0.5,
        "A": -torch.exp(torch.randn(d, n, generator=g) * 0.5),
        "B": torch.randn(*shape_bc, generator=g),
        "C": torch.randn(*shape_bc, generator=g),
        "D": torch.randn(d, generator=g) if with_d else None,
        "z": torch.randn(b, d, l, generator=g) if with_z else None,
        "delta_bias": torch.randn(d, generator=g) * 0.1,
        "initial_state": torch.randn(b, d, n, generator=g),
    }
    for v in t.values():
        if v is not None:
            v.requires_grad_(requires_grad)
    return t


def _grads(fn, t, softplus):
    out, last = fn(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"], softplus,
                   return_last_state=True, initial_state=t["initial_state"])
    g = torch.Generator().manual_seed(1)
    loss = (out * torch.randn(out.shape, generator=g)).sum() + (last * torch.randn(last.shape, generator=g)).sum()
    names = [k for k, v in t.items() if v is not None]
    grads = torch.autograd.grad(loss, [t[k] for k in names])
    return out, last, dict(zip(names, grads))


@pytest.mark.parametrize("l", [1, 7, 37, 130])
@pytest.mark.parametrize("groups,with_z,with_d,softplus", [
    (None, True, True, True), (None, False, False, False), (2, True, True, True), (4, False, True, False)])
def test_chunked_scan_matches_reference(l, groups, with_z, with_d, softplus):
    """Fast scans (chunked with chunk 64, 16 and 5, the time loop, the CPU's blocked loop with blocks of
    64, 16, 5 and 1 steps and at its automatic size) == sequential ref: outputs,
    last state and every gradient (incl. initial state), odd lengths across chunk boundaries, with/without
    z, D, softplus, grouped B/C."""
    t = _scan_inputs(2, 8, 4, l, groups, with_z, with_d, positive_delta=not softplus)
    out_r, last_r, g_r = _grads(ops.selective_scan_ref, t, softplus)
    for method, chunk in (("chunked", 64), ("chunked", 16), ("chunked", 5), ("loop", 64),
                          ("blocked", 64), ("blocked", 16), ("blocked", 5), ("blocked", 1), ("auto", 64)):
        fast = lambda *a, **k: ops.selective_scan_chunked(*a, **k, chunk_size=chunk, method=method)
        out_f, last_f, g_f = _grads(fast, t, softplus)
        print(f"l={l} {method} chunk={chunk} max|out diff|={(out_f - out_r).abs().max():.2e}")
        torch.testing.assert_close(out_f, out_r, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(last_f, last_r, atol=1e-5, rtol=1e-5)
        for k in g_r:
            torch.testing.assert_close(g_f[k], g_r[k], atol=1e-4, rtol=1e-4, msg=f"grad {k}")


@pytest.mark.parametrize("l,groups", [(1, None), (8, 2), (21, None), (37, 4)])
def test_compiled_cpu_scan_logic_matches_reference(monkeypatch, l, groups):
    """The compiled CPU scan's block loop (blocks of 8 steps, the last one padded with identity steps, the
    state and the adjoint carried across blocks), run with the eager unrolled block functions that
    torch.compile compiles: outputs, last state and every gradient == sequential ref, odd lengths."""
    monkeypatch.setattr(ops, "_compiled", lambda name: ops._block_forward_unrolled if name == "forward"
                        else ops._block_backward_unrolled)
    monkeypatch.setattr(ops, "_cpu_scan", "compiled")
    for softplus, with_z, with_d in ((True, True, True), (False, False, False)):
        t = _scan_inputs(2, 8, 4, l, groups, with_z, with_d, positive_delta=not softplus)
        out_r, last_r, g_r = _grads(ops.selective_scan_ref, t, softplus)
        out_f, last_f, g_f = _grads(ops.selective_scan_chunked, t, softplus)
        torch.testing.assert_close(out_f, out_r, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(last_f, last_r, atol=1e-5, rtol=1e-5)
        for k in g_r:
            torch.testing.assert_close(g_f[k], g_r[k], atol=1e-4, rtol=1e-4, msg=f"grad {k}")


def test_cpu_block_length_bounds_the_kept_states():
    """The CPU blocked scan keeps l/T block states of (b, d, n): T >= n keeps them within one (b, d, l)
    input's size even at the 130M shape (b 8, d 1792, l 1024), where a cache-sized block would be 1 step
    and the kept states the whole (l, b, d, n) tensor; small shapes get cache-sized blocks; T <= l."""
    assert ops.cpu_block_length(8, 1792, 16, 1024) == 16
    assert ops.cpu_block_length(1, 64, 4, 3) == 3
    assert ops.cpu_block_length(1, 64, 4, 4096) == (1 << 18) // 256
    for b, d, n, l in ((8, 1792, 16, 1024), (8, 512, 16, 256), (2, 8, 4, 37)):
        T = ops.cpu_block_length(b, d, n, l)
        assert -(-l // T) * b * d * n <= b * d * l + b * d * n


def test_scan_ref_matches_hand_written_recurrence():
    """The reference itself: one channel, one state, checked against the recurrence written out by hand."""
    u = torch.tensor([[[1.0, 2.0, -1.0]]])
    delta = torch.tensor([[[0.5, 1.0, 0.25]]])
    A = torch.tensor([[-1.0]])
    B = torch.tensor([[[1.0, 0.5, 2.0]]])
    C = torch.tensor([[[2.0, 1.0, -1.0]]])
    D = torch.tensor([0.5])
    h0 = torch.tensor([[[3.0]]])
    h, ys = 3.0, []
    for t in range(3):
        dt = delta[0, 0, t].item()
        h = torch.exp(torch.tensor(-dt)).item() * h + dt * B[0, 0, t].item() * u[0, 0, t].item()
        ys.append(C[0, 0, t].item() * h + 0.5 * u[0, 0, t].item())
    out, last = ops.selective_scan_ref(u, delta, A, B, C, D, return_last_state=True, initial_state=h0)
    torch.testing.assert_close(out[0, 0], torch.tensor(ys))
    assert abs(last.item() - h) < 1e-6


def test_scan_large_decay_is_finite():
    """Strong decay (Δ·A ≈ -50 per step) must not overflow the chunked scan (no exp(-cumsum) tricks)."""
    t = _scan_inputs(1, 4, 4, 100, None, False, True, requires_grad=False)
    delta = torch.full_like(t["delta"], 5.0)
    A = torch.full_like(t["A"], -10.0)
    ref = ops.selective_scan_ref(t["u"], delta, A, t["B"], t["C"], t["D"])
    for method in ("chunked", "loop"):
        fast = ops.selective_scan_chunked(t["u"], delta, A, t["B"], t["C"], t["D"], method=method)
        assert torch.isfinite(fast).all()
        torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


def test_scan_dispatch_is_pytorch_on_cpu():
    """On CPU `selective_scan` takes the PyTorch path and equals the reference; describe_kernels says so."""
    t = _scan_inputs(2, 4, 3, 9, None, True, True, requires_grad=False)
    args = (t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"], True)
    torch.testing.assert_close(ops.selective_scan(*args), ops.selective_scan_ref(*args), atol=1e-5, rtol=1e-5)
    assert "selective_scan=" in ops.describe_kernels()


def test_initial_state_by_linearity():
    """The CUDA-with-initial-state path (kernel from zero + decayed h0) is exact: checked on CPU with the
    chunked scan standing in for the kernel."""
    t = _scan_inputs(2, 6, 4, 23, 2, True, True, requires_grad=False)
    original = ops._ss_cuda
    ops._ss_cuda = lambda u, dl, A, B, C, D, z, db, sp, rls: ops.selective_scan_chunked(
        u, dl, A, B, C, D, z, db, sp, return_last_state=rls)
    try:
        out, last = ops._scan_cuda_with_initial_state(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"],
                                                      t["delta_bias"], True, True, t["initial_state"])
    finally:
        ops._ss_cuda = original
    out_r, last_r = ops.selective_scan_ref(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"],
                                           t["delta_bias"], True, True, t["initial_state"])
    torch.testing.assert_close(out, out_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last, last_r, atol=1e-5, rtol=1e-5)


def test_kernel_gives_exact_grad_through_last_state(monkeypatch):
    """mamba_ssm's SelectiveScanFn drops the gradient of its last_state output (seen on the H200:
    7.5e-3 relative error in the grads). When that state is differentiated, selective_scan reads it out
    through the kernel (N extra read-out steps, `_scan_with_state_readout`): still the kernel, exact
    gradient. last_state_grad=False returns it detached without read-out steps. A stand-in kernel that
    detaches last_state plays mamba_ssm here."""
    calls = []

    def lossy_kernel(u, dl, A, B, C, D, z, db, sp, rls):
        calls.append(rls)
        out = ops.selective_scan_chunked(u, dl, A, B, C, D, z, db, sp, return_last_state=rls)
        return (out[0], out[1].detach()) if rls else out

    monkeypatch.setattr(ops, "_ss_cuda", lossy_kernel)
    monkeypatch.setattr(ops, "_use", lambda kernel, *tensors: kernel is lossy_kernel)
    t = _scan_inputs(2, 4, 3, 9, None, True, True, requires_grad=True)
    args = (t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"], True)
    out, last = ops.selective_scan(*args, return_last_state=True)
    assert calls == [True] and last.requires_grad       # gradient through the state: the kernel, read out
    grad = torch.autograd.grad(last.sum(), t["u"])[0]
    ref_grad = torch.autograd.grad(ops.selective_scan_ref(*args, return_last_state=True)[1].sum(), t["u"])[0]
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-5)
    ops.selective_scan(*args)                            # no state requested: the kernel
    with torch.no_grad():
        ops.selective_scan(*args, return_last_state=True)  # no gradient: the kernel
    out, last = ops.selective_scan(*args, return_last_state=True, last_state_grad=False)
    assert not last.requires_grad and out.requires_grad
    assert calls == [True, False, True, True]


@pytest.mark.parametrize("l", [1, 2, 11])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_causal_conv_matches_reference(l, activation):
    """F.conv1d path == explicit tap sum, with initial states, final states, and gradients; also without
    an initial state (the training path)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, l, generator=g, requires_grad=True)
    w = torch.randn(5, 4, generator=g, requires_grad=True)
    bias = torch.randn(5, generator=g, requires_grad=True)
    s0 = torch.randn(2, 5, 3, generator=g, requires_grad=True)
    out_r, fin_r = ops.causal_conv1d_ref(x, w, bias, activation, initial_states=s0, return_final_states=True)
    out_f, fin_f = ops.causal_conv1d(x, w, bias, activation, initial_states=s0, return_final_states=True)
    torch.testing.assert_close(out_f, out_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fin_f, fin_r)
    expected_final = torch.cat([s0, x], dim=2)[:, :, -3:]
    torch.testing.assert_close(fin_r, expected_final)
    ga = torch.autograd.grad(out_r.sum(), [x, w, bias, s0])
    gb = torch.autograd.grad(out_f.sum(), [x, w, bias, s0])
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # no initial state == zero initial state, and causality: output t ignores inputs after t
    # (its own path: the padding inside the conv, output trimmed), with gradients
    out0 = ops.causal_conv1d(x, w, bias, activation)
    ref0 = ops.causal_conv1d_ref(x, w, bias, activation, torch.zeros_like(s0))
    torch.testing.assert_close(out0, ref0, atol=1e-5, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(ref0.sum(), [x, w, bias]), torch.autograd.grad(out0.sum(), [x, w, bias])):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_conv_update_matches_sequence_conv():
    """causal_conv1d_update token by token == causal_conv1d over the sequence; state holds the last w inputs."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 9, generator=g)
    w = torch.randn(5, 4, generator=g)
    bias = torch.randn(5, generator=g)
    full = ops.causal_conv1d(x, w, bias, "silu")
    state = torch.zeros(2, 5, 4)
    steps = torch.stack([ops.causal_conv1d_update(x[:, :, t], state, w, bias, "silu") for t in range(9)], dim=2)
    torch.testing.assert_close(steps, full, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(state, x[:, :, -4:])


@pytest.mark.parametrize("rows,d_out,bias,dtype", [
    (1, 64, False, torch.float32), (1, 64, True, torch.float32), (3, 48, True, torch.float32),
    (4, 40, False, torch.float32), (5, 64, True, torch.float32), (1, 36, True, torch.float32),
    (2, 64, True, torch.bfloat16)])
def test_linear_step_matches_linear(monkeypatch, rows, d_out, bias, dtype):
    """ops.linear_step (the decode step's projections: a batched product over row blocks of the weight
    on the CPU) == F.linear, with and without bias, 1-4 rows (blocked) and the cases that fall back
    (5 rows, d_out not a multiple of the blocks, bf16); the weight is neither copied nor changed."""
    monkeypatch.setattr(ops, "_STEP_MIN_WEIGHT", 0)            # tiny weights take the blocked form too
    g = torch.Generator().manual_seed(4)
    x = torch.randn(rows, 24, generator=g).to(dtype)
    w = torch.randn(d_out, 24, generator=g).to(dtype)
    b = torch.randn(d_out, generator=g) if bias else None
    before = w.clone()
    out = ops.linear_step(x, w, b)
    ref = F.linear(x, w, None if b is None else b.to(dtype))
    assert out.shape == (rows, d_out) and out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    assert torch.equal(w, before)


def test_linear_step_opaque_op_is_a_well_formed_custom_op():
    """The op a compiled decode step calls for large weights (ops._linear_blocked_op): torch.library.opcheck
    (fake tensor shapes and strides, schema, no aliasing of its inputs) at 1 and 3 rows, and equal to F.linear."""
    g = torch.Generator().manual_seed(5)
    w, b = torch.randn(128, 24, generator=g), torch.randn(128, generator=g)
    for x in (torch.randn(1, 24, generator=g), torch.randn(3, 24, generator=g)):
        torch.library.opcheck(ops._linear_blocked_op, (x, w, b))
        torch.testing.assert_close(ops._linear_blocked_op(x, w, None), F.linear(x, w), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("groups,with_z,with_d,with_bias,softplus", [
    (None, True, True, True, True), (2, True, True, True, True), (4, False, False, False, False),
    (None, False, True, False, True)])
def test_selective_state_update_matches_one_ref_step(groups, with_z, with_d, with_bias, softplus):
    """selective_state_update == a length-1 ref scan from the same state (output and new state, in place),
    with and without z, D, Δ bias and softplus, one or several B/C groups (broadcast, not repeated)."""
    t = _scan_inputs(3, 8, 4, 1, groups, with_z, with_d, requires_grad=False, positive_delta=not softplus)
    bias = t["delta_bias"] if with_bias else None
    state = t["initial_state"].clone()
    y = ops.selective_state_update(state, t["u"][..., 0], t["delta"][..., 0], t["A"], t["B"][..., 0], t["C"][..., 0],
                                   t["D"], z=None if t["z"] is None else t["z"][..., 0], dt_bias=bias,
                                   dt_softplus=softplus)
    out_r, last_r = ops.selective_scan_ref(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"],
                                           bias, softplus, True, t["initial_state"])
    torch.testing.assert_close(y, out_r[..., 0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(state, last_r, atol=1e-6, rtol=1e-6)


def test_selective_state_update_strided_and_low_precision_state():
    """The state is updated in place also when it is a strided view (a row of a larger cache) or held in
    bf16 (computed in fp32, stored rounded); bf16 inputs give a bf16 output equal to the fp32 step."""
    t = _scan_inputs(2, 8, 4, 1, 2, True, True, requires_grad=False)
    args = (t["u"][..., 0], t["delta"][..., 0], t["A"], t["B"][..., 0], t["C"][..., 0], t["D"])
    kw = dict(z=t["z"][..., 0], dt_bias=t["delta_bias"], dt_softplus=True)
    ref_state = t["initial_state"].clone()
    y_ref = ops.selective_state_update(ref_state, *args, **kw)
    big = torch.zeros(2, 8, 2 * 4)
    strided = big[:, :, ::2]                                                 # non-contiguous (b, d, n) view
    strided.copy_(t["initial_state"])
    torch.testing.assert_close(ops.selective_state_update(strided, *args, **kw), y_ref)
    torch.testing.assert_close(big[:, :, ::2], ref_state)
    assert big[:, :, 1::2].abs().max() == 0
    low = t["initial_state"].bfloat16()
    y_low = ops.selective_state_update(low, *(a.bfloat16() if a.dim() == 2 and a is not t["A"] else a for a in args),
                                       z=kw["z"].bfloat16(), dt_bias=t["delta_bias"], dt_softplus=True)
    assert y_low.dtype == torch.bfloat16 and low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref_state, atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(y_low.float(), y_ref, atol=5e-2, rtol=5e-2)


def test_rms_norm_with_residual_matches_formula():
    """rms_norm(x, w, residual, prenorm) == (x+r) / sqrt(mean((x+r)^2) + eps) * w, residual returned in fp32."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 16, generator=g).bfloat16()
    r = torch.randn(2, 3, 16, generator=g)
    w = torch.randn(16, generator=g)
    out, res = ops.rms_norm(x, w, eps=1e-5, residual=r, prenorm=True, residual_in_fp32=True)
    s = x.float() + r
    expected = s / torch.sqrt(s.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    assert out.dtype == torch.bfloat16 and res.dtype == torch.float32
    torch.testing.assert_close(res, s)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
    plain = ops.RMSNorm(16)(r)
    torch.testing.assert_close(plain, r / torch.sqrt(r.pow(2).mean(-1, keepdim=True) + 1e-5))


def test_scan_keeps_fp32_math_under_autocast():
    """Under bf16 autocast the PyTorch scan still computes in fp32 (its internal matmuls are not downcast)."""
    t = _scan_inputs(2, 8, 4, 33, 2, True, True, requires_grad=False)
    args = (t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"], True)
    plain = ops.selective_scan_chunked(*args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = ops.selective_scan_chunked(*args)
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, plain, atol=1e-6, rtol=1e-6)


def test_env_var_forces_pytorch_path():
    """MAMBA_NARRATIVE_KERNELS=pytorch is honoured at import and reported by describe_kernels()."""
    import os
    import subprocess
    import sys
    env = {**os.environ, "MAMBA_NARRATIVE_KERNELS": "pytorch"}
    code = "from mamba_lm import ops; print(ops.describe_kernels())"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, check=True)
    assert "selective_scan=pytorch-chunked" in out.stdout and "forced" in out.stdout
    with ops.force_pytorch():
        assert ops._pytorch_only
    assert not ops._pytorch_only


def test_kernel_dispatch_passes_the_dtypes_mamba_ssm_checks(monkeypatch):
    """The CUDA dispatch hands mamba_ssm / causal_conv1d / Triton kernels what their checks demand
    (selective_scan.cpp: Δ, B, C, z in u's dtype, A/D/Δ_bias fp32; causal_conv1d.cpp: bias dtype ==
    weight dtype; selective_state_update: D and dt_bias never None). Strict stand-in kernels raise like
    the real TORCH_CHECKs would, so a caller under autocast with a float32 Δ (the multi-track mixer) or
    without D / dt_bias cannot crash the GPU run."""
    seen = {}

    def strict_scan(u, dl, A, B, C, D, z, db, sp, rls):
        assert dl.dtype == B.dtype == C.dtype == z.dtype == u.dtype, "input-dtype mismatch"
        assert A.dtype == D.dtype == db.dtype == torch.float32, "weight-dtype mismatch"
        seen["scan"] = u.dtype
        return ops.selective_scan_ref(u, dl, A, B, C, D, z, db, sp, return_last_state=rls)

    def strict_conv(x, weight, bias, activation=None):
        assert bias.dtype == weight.dtype, "bias must have the weight's dtype"
        seen["conv"] = (x.dtype, weight.dtype)
        return ops.causal_conv1d_ref(x, weight, bias, activation)

    def strict_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
        D.stride(), dt_bias.stride()  # mamba_ssm 2.3.2 unpacks both strides unconditionally
        seen["update"] = True
        return _ssu_pytorch(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)

    monkeypatch.setattr(ops, "_ss_cuda", strict_scan)
    monkeypatch.setattr(ops, "_conv_cuda", strict_conv)
    monkeypatch.setattr(ops, "_ssu_triton", strict_update)
    kernels = (strict_scan, strict_conv, strict_update)
    monkeypatch.setattr(ops, "_use", lambda kernel, *tensors: kernel in kernels)
    t = _scan_inputs(2, 4, 3, 9, None, True, True, requires_grad=False)
    u16 = t["u"].bfloat16()
    out = ops.selective_scan(u16, t["delta"], t["A"].double(), t["B"], t["C"].bfloat16(), t["D"].bfloat16(),
                             t["z"], t["delta_bias"].bfloat16(), True)
    assert seen["scan"] == torch.bfloat16 and out.dtype == torch.bfloat16
    w, bias = torch.randn(4, 4), torch.randn(4).bfloat16()
    ops.causal_conv1d(u16, w, bias, "silu")
    assert seen["conv"] == (torch.bfloat16, torch.float32)   # weight kept in fp32, as mamba-ssm's Mamba
    # selective_state_update without D and dt_bias: zeros are passed, the result is the reference's
    state = torch.randn(2, 4, 3)
    state_ref = state.clone()
    x, dt, B, C = torch.randn(2, 4), torch.rand(2, 4), torch.randn(2, 3), torch.randn(2, 3)
    y = ops.selective_state_update(state, x, dt, t["A"], B, C)
    assert seen["update"]
    with monkeypatch.context() as m:
        m.setattr(ops, "_use", lambda kernel, *tensors: False)
        y_ref = ops.selective_state_update(state_ref, x, dt, t["A"], B, C)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(state, state_ref)


def _ssu_pytorch(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    """The PyTorch selective_state_update (the stand-in Triton kernel computes with it)."""
    original = ops._use
    ops._use = lambda kernel, *tensors: False
    try:
        return ops.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    finally:
        ops._use = original


@pytest.mark.parametrize("groups", [1, 2])
def test_cpu_scan_states_are_time_major_contiguous(groups):
    """The PyTorch scan's (l, b, d, n) tensors exp(Δ'A) and h are contiguous time-major: products with
    a permuted (b, d, l) view used to inherit its layout, so every scan step read a strided slice and
    the C . h / B contractions cloned the whole state (1.5-3x slower CPU training; no timing asserted)."""
    b, d, n, l = 2, 8, 4, 13
    u, dt = torch.randn(b, d, l), torch.rand(b, d, l)
    A, Bt = -torch.rand(d, n), torch.randn(l, b, groups, n)
    dA, hs = ops._forward_states(u, dt, A, Bt, torch.randn(b, d, n), 64, "loop")
    assert dA.shape == hs.shape == (l, b, d, n)
    assert dA.is_contiguous() and hs.is_contiguous()


def heads_form_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """Stand-in for mamba-ssm's Triton selective_state_update in its multi-head form, written from its
    docstring: state (b, h, p, n) updated in place; x, dt, z (b, h, p); A (h, p, n); B, C (b, g, n), head
    i reading group i // (h / g); D, dt_bias (h, p). Returns y (b, h, p)."""
    batch, h, p, n = state.shape                       # the shape checks of mamba-ssm 2.3.2's wrapper
    g = B.shape[1]
    assert x.shape == (batch, h, p) and dt.shape == x.shape and A.shape == (h, p, n)
    assert h % g == 0 and B.shape == (batch, g, n) and C.shape == B.shape
    assert D.shape == (h, p) and dt_bias.shape == (h, p)   # never None: the wrapper reads their strides
    assert z is None or z.shape == x.shape
    dt = dt.float() + (0 if dt_bias is None else dt_bias.float())
    dt = F.softplus(dt) if dt_softplus else dt
    Bh, Ch = (t.float().repeat_interleave(h // g, dim=1).unsqueeze(2) for t in (B, C))   # (b, h, 1, n)
    new = torch.exp(dt.unsqueeze(-1) * A.float()) * state.float() + (dt * x.float()).unsqueeze(-1) * Bh
    state.copy_(new)
    y = (new * Ch).sum(-1) + (0 if D is None else x.float() * D.float())
    return (y if z is None else y * F.silu(z.float())).to(x.dtype)


@pytest.mark.parametrize("with_z,with_d_bias,softplus", [(True, True, True), (False, False, False)])
def test_grouped_state_update_is_one_multi_head_kernel_call(monkeypatch, with_z, with_d_bias, softplus):
    """Grouped B/C (the multi-track mixer's decode step) goes to the Triton kernel once, as g heads of d/g
    channels viewing the caller's state: output and in-place state equal the PyTorch path (3 groups of 5
    channels, z / D / Δ bias present or absent)."""
    calls = []

    def kernel(state, *args, **kwargs):
        calls.append(tuple(state.shape))
        return heads_form_update(state, *args, **kwargs)

    monkeypatch.setattr(ops, "_ssu_triton", kernel)
    monkeypatch.setattr(ops, "_use", lambda k, *tensors: k is kernel)
    g = torch.Generator().manual_seed(3)
    b, d, n, groups = 2, 15, 4, 3
    r = lambda *s: torch.randn(*s, generator=g)
    state, x, dt, z = r(b, d, n), r(b, d), r(b, d), r(b, 2 * d)[:, ::2]          # z strided, as a chunk
    A, B, C = -torch.rand(d, n, generator=g) - 0.5, r(b, groups, n), r(b, groups, n)
    D, bias = (r(d), r(d)) if with_d_bias else (None, None)
    kw = dict(D=D, z=z if with_z else None, dt_bias=bias, dt_softplus=softplus)
    state_ref = state.clone()
    y = ops.selective_state_update(state, x, dt, A, B, C, **kw)
    assert calls == [(b, groups, d // groups, n)]
    y_ref = _ssu_pytorch(state_ref, x, dt, A, B, C, kw["D"], kw["z"], kw["dt_bias"], kw["dt_softplus"])
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(state, state_ref)


def _mamba_ssm_state_update_ref():
    """mamba-ssm's own selective_state_update_ref, read from the sdist (its module imports triton, so the
    function's source is executed alone, with torch, F and einops)."""
    import ast
    import tarfile

    import einops

    sdist = Path(__file__).resolve().parents[1] / ".sdist" / "mamba_ssm-2.3.2.post1.tar.gz"
    with tarfile.open(sdist) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("ops/triton/selective_state_update.py"))
        source = tar.extractfile(member).read().decode()
    fn = next(node for node in ast.parse(source).body
              if isinstance(node, ast.FunctionDef) and node.name == "selective_state_update_ref")
    namespace = {"torch": torch, "F": F, "rearrange": einops.rearrange, "repeat": einops.repeat}
    exec(compile(ast.Module([fn], []), "selective_state_update_ref", "exec"), namespace)
    return namespace["selective_state_update_ref"]


@pytest.mark.skipif(not (Path(__file__).resolve().parents[1] / ".sdist" / "mamba_ssm-2.3.2.post1.tar.gz").is_file(),
                    reason="needs the mamba-ssm sdist in .sdist/ (setup.sh)")
def test_heads_form_stand_in_matches_mamba_ssm_reference():
    """The stand-in above computes what mamba-ssm's selective_state_update_ref computes for the same
    multi-head call (so the test of the grouped dispatch holds for the real kernel's contract)."""
    ref = _mamba_ssm_state_update_ref()
    g = torch.Generator().manual_seed(4)
    r = lambda *s: torch.randn(*s, generator=g)
    b, h, p, n = 2, 3, 5, 4
    state = r(b, h, p, n)
    args = (r(b, h, p), r(b, h, p), -torch.rand(h, p, n, generator=g), r(b, h, n), r(b, h, n))
    kw = dict(D=r(h, p), z=r(b, h, p), dt_bias=r(h, p), dt_softplus=True)
    s1, s2 = state.clone(), state.clone()
    y_ref = ref(s1, *args, **kw)
    y = heads_form_update(s2, *args, **kw)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(s2, s1)
