"""The gated delta rule (multitrack/delta_rule.py) and the character memory built on it
(multitrack/char_memory.py): the chunked WY/UT form against the per-step recurrence (outputs, final
state, gradients, odd lengths, nonzero initial state), the decode step, what the memory stores, and
flash-linear-attention's own references where fla is installed."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from multitrack import delta_rule
from multitrack.char_memory import CharacterMemory
from multitrack.delta_rule import (gated_delta_rule, gated_delta_rule_chunked, gated_delta_rule_ref,
                                   gated_delta_rule_step)

ROOT = Path(__file__).resolve().parents[1]


def inputs(b=2, t=37, h=3, dk=8, dv=5, dtype=torch.float64, seed=0):
    """Random q, k (unit norm), v, g = log α < 0, β in (0, 1), initial state: the model's input ranges."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)                     # noqa: E731
    return dict(q=F.normalize(r(b, t, h, dk), dim=-1), k=F.normalize(r(b, t, h, dk), dim=-1), v=r(b, t, h, dv),
                g=-torch.rand(b, t, h, generator=gen, dtype=dtype) * 0.5,
                beta=torch.rand(b, t, h, generator=gen, dtype=dtype),
                initial_state=r(b, h, dk, dv))


def run_with_grads(fn, data, **kwargs):
    leaves = {k: v.clone().requires_grad_() for k, v in data.items()}
    o, last = fn(**leaves, output_final_state=True, **kwargs)
    probe_o = torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)
    probe_s = torch.linspace(1, -1, last.numel(), dtype=last.dtype).view_as(last)
    ((o * probe_o).sum() + (last * probe_s).sum()).backward()
    return o, last, {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("t, chunk", [(37, 16), (1, 16), (5, 16), (32, 16), (64, 64), (7, 3)])
@pytest.mark.parametrize("with_state", [True, False])
def test_chunked_equals_recurrence(t, chunk, with_state):
    """Guards the CPU training path: the chunked WY/UT-transform form equals the per-step recurrence in
    output, final state and the gradients of q, k, v, g, β and the initial state (float64), for lengths
    that are not a multiple of the chunk, shorter than it, one token, and with or without a start state."""
    data = inputs(t=t)
    if not with_state:
        data.pop("initial_state")
    o_ref, s_ref, g_ref = run_with_grads(gated_delta_rule_ref, data)
    o, s, g = run_with_grads(gated_delta_rule_chunked, data, chunk_size=chunk)
    print(f"t={t} chunk={chunk}: max |Δo| {(o - o_ref).abs().max():.1e}, |Δstate| {(s - s_ref).abs().max():.1e}")
    torch.testing.assert_close(o, o_ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(s, s_ref, rtol=1e-9, atol=1e-10)
    for name in data:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-8, atol=1e-9, msg=name)
        if not (name == "g" and t == 1 and not with_state):                     # decay of an empty state
            assert g_ref[name].abs().sum() > 0, f"no gradient reaches {name}"


def test_fast_path_on_cpu_is_the_chunked_twin():
    """Guards the dispatcher: on CPU tensors `gated_delta_rule` runs the PyTorch chunked form (the fla
    kernel is for CUDA tensors only), float32 in and out, state float32."""
    data = {k: v.float() for k, v in inputs(t=19).items()}
    o, s = gated_delta_rule(**data, output_final_state=True, chunk_size=8)
    o_ref, s_ref = gated_delta_rule_chunked(**data, output_final_state=True, chunk_size=8)
    assert o.dtype == torch.float32 and s.dtype == torch.float32
    assert torch.equal(o, o_ref) and torch.equal(s, s_ref)


def test_step_equals_recurrence():
    """Guards decoding: `gated_delta_rule_step` token by token (state updated in place) gives the
    recurrence's outputs and final state."""
    data = inputs(t=11)
    o_ref, s_ref = gated_delta_rule_ref(**data, output_final_state=True)
    state = data["initial_state"].clone()
    outs = [gated_delta_rule_step(data["q"][:, t], data["k"][:, t], data["v"][:, t], data["g"][:, t],
                                  data["beta"][:, t], state) for t in range(11)]
    torch.testing.assert_close(torch.stack(outs, 1), o_ref)
    torch.testing.assert_close(state, s_ref)


def test_memory_stores_and_overwrites_a_key():
    """Guards what the rule means (and the orientation of S): with α = 1 and β = 1, writing v at a unit key
    k makes the read-out at k equal v; writing v' at the same key replaces v (the delta rule corrects,
    it does not add); a key orthogonal to k reads what was there before (zero)."""
    dk, dv = 4, 3
    e = torch.eye(dk, dtype=torch.float64)
    v1, v2 = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), torch.tensor([-1.0, 0.5, 0.0], dtype=torch.float64)
    k = torch.stack([e[0], e[0], e[0], e[1]])[None, :, None]                      # (1, 4, 1, dk)
    q = k * dk ** 0.5                                                            # scale d_k^-1/2 undone
    v = torch.stack([v1, v2, v2, v2])[None, :, None]
    v = v.clone()
    v[0, 2:] = 0                                                                 # β = 0 below: nothing written
    g = torch.zeros(1, 4, 1, dtype=torch.float64)
    beta = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64)[None, :, None]
    o, _ = gated_delta_rule_ref(q, k, v, g, beta)
    torch.testing.assert_close(o[0, 0, 0], v1)                                   # stored
    torch.testing.assert_close(o[0, 1, 0], v2)                                   # overwritten, not v1 + v2
    torch.testing.assert_close(o[0, 2, 0], v2)                                   # β = 0: kept
    torch.testing.assert_close(o[0, 3, 0], torch.zeros(dv, dtype=torch.float64))  # orthogonal key: empty


def _fla_naive():
    """fla's own naive references, loaded from the installed fla-core file (its package __init__ needs
    triton, which the CPU environment does not have); None when fla-core is not installed."""
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "ops" / "gated_delta_rule" / "naive.py"
    module_spec = importlib.util.spec_from_file_location("fla_gdn_naive", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_twins_match_fla_naive_references():
    """Guards that our rule is flash-linear-attention's (the GPU kernels' definition): the recurrence and
    the chunked form equal fla's naive_recurrent_gated_delta_rule and naive_chunk_gated_delta_rule
    (outputs and final state, nonzero initial state, an odd length)."""
    naive = _fla_naive()
    if naive is None:
        pytest.skip("fla-core is not installed (requirements.txt installs it)")
    data = {k: v.float() for k, v in inputs(t=37).items()}
    q, k, v, g, beta, h0 = (data[n] for n in ("q", "k", "v", "g", "beta", "initial_state"))
    o_ref, s_ref = gated_delta_rule_ref(**data, output_final_state=True)
    o_chk, s_chk = gated_delta_rule_chunked(**data, output_final_state=True, chunk_size=16)
    o_nr, s_nr = naive.naive_recurrent_gated_delta_rule(q, k, v, beta, g, initial_state=h0, output_final_state=True)
    o_nc, s_nc = naive.naive_chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=16, initial_state=h0,
                                                    output_final_state=True)
    for ours in (o_ref, o_chk):
        for theirs in (o_nr, o_nc):
            torch.testing.assert_close(ours, theirs.float(), rtol=1e-4, atol=1e-5)
    for ours in (s_ref, s_chk):
        for theirs in (s_nr, s_nc):
            torch.testing.assert_close(ours, theirs.float(), rtol=1e-4, atol=1e-5)


FLA_INTERPRET_CHECK = r"""
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch, torch.nn.functional as F
from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule
from multitrack.delta_rule import gated_delta_rule_ref
torch.manual_seed(0)
b, t, h, dk, dv = 1, 9, 2, 16, 16
q, k = (F.normalize(torch.randn(b, t, h, dk), dim=-1) for _ in range(2))
v, g, beta, h0 = torch.randn(b, t, h, dv), -torch.rand(b, t, h) * 0.5, torch.rand(b, t, h), torch.randn(b, h, dk, dv)
o_ref, s_ref = gated_delta_rule_ref(q, k, v, g, beta, initial_state=h0, output_final_state=True)
o, s = fused_recurrent_gated_delta_rule(q, k, v, g, beta=beta, initial_state=h0, output_final_state=True)
print(max((o - o_ref).abs().max().item(), (s - s_ref).abs().max().item()))
"""


def test_fla_fused_recurrent_kernel_under_triton_interpreter():
    """Guards the decode kernel's definition on CPU: fla's Triton fused_recurrent_gated_delta_rule, run by
    the Triton interpreter (TRITON_INTERPRET=1), equals our recurrence. Needs triton and fla (not in the
    CPU requirements: skipped there; tests/test_gpu.py checks both fla kernels on a GPU). fla's chunked
    kernel cannot run under the interpreter (its autotuner needs a GPU driver)."""
    if importlib.util.find_spec("triton") is None or importlib.util.find_spec("fla") is None:
        pytest.skip("triton or fla is not installed")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", FLA_INTERPRET_CHECK], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    diff = float(r.stdout.strip().splitlines()[-1])
    print(f"fla fused recurrent (interpreted) vs our recurrence: max diff {diff:.1e}")
    assert diff < 1e-4


def test_character_memory_step_and_carried_state_equal_forward():
    """Guards the memory track as the model uses it: forward over two windows with the (B, H, d_k, d_v)
    state carried equals one forward, step() token by token equals forward, and the state is not left
    at zero (the memory writes)."""
    torch.manual_seed(0)
    mem = CharacterMemory(d_track=12, n_heads=3, head_dim=4, dt_range=(1e-3, 1e-2))
    x, z = torch.randn(2, 12, 13), torch.randn(2, 12, 13)                        # (B, d_track, L)
    with torch.no_grad():
        full = mem(x, z)
        state = torch.zeros(2, *mem.state_shape())
        parts = torch.cat([mem(x[..., :6], z[..., :6], state), mem(x[..., 6:], z[..., 6:], state)], dim=-1)
        step_state = torch.zeros(2, *mem.state_shape())
        steps = torch.stack([mem.step(x[..., t], z[..., t], step_state) for t in range(13)], dim=-1)
    assert full.shape == (2, 12, 13) and mem.state_shape() == (3, 4, 4)
    torch.testing.assert_close(parts, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(steps, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(step_state, state, rtol=1e-5, atol=1e-6)
    assert state.abs().sum() > 0


def test_character_memory_initial_decay_in_track_range():
    """Guards the memory's timescale at init: A = 1 and softplus(Δ_bias) spans the track's Δ range, so the
    per-token decay α = exp(-Δ) keeps a written value for 1/Δ = 100-1,000 tokens (the character track)."""
    mem = CharacterMemory(d_track=16, n_heads=4, head_dim=4, dt_range=(1e-3, 1e-2))
    dt = F.softplus(mem.dt_bias.detach())
    torch.testing.assert_close(dt.min(), torch.tensor(1e-3), rtol=1e-4, atol=0)
    torch.testing.assert_close(dt.max(), torch.tensor(1e-2), rtol=1e-4, atol=0)
    assert torch.equal(mem.A_log.detach(), torch.zeros(4))
    assert delta_rule.KERNEL in ("fla-triton", "pytorch-chunked")
