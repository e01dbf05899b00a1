"""GPU-only equivalence tests: the CUDA kernels (mamba-ssm, causal-conv1d) against the pure-PyTorch paths
and against mamba-ssm's own model. Skipped on machines without CUDA (CI); run on a GPU with
`python -m pytest tests/test_gpu.py -q` after `./setup.sh` built the kernels (bench/gpu_runs.sh verify).
"""

import pytest
import torch
import torch.nn.functional as F

from mamba_lm import ops
from mamba_lm.mamba import mamba_config
from mamba_lm.models import build_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_scan_kernel = pytest.mark.skipif(ops.KERNELS["selective_scan"] != "mamba_ssm",
                                       reason="mamba_ssm's selective scan kernel is not installed")
VOCAB = 1000


def rel(a, b) -> float:
    """Largest difference relative to the reference's scale."""
    return ((a.float() - b.float()).abs().max() / (b.float().abs().max() + 1e-6)).item()


def scan_inputs(groups=None, l=101):
    g = torch.Generator(device="cuda").manual_seed(0)
    b, d, n = 2, 24, 8
    bc = (b, n, l) if groups is None else (b, groups, n, l)
    r = lambda *s: torch.randn(*s, generator=g, device="cuda")
    return dict(u=r(b, d, l), delta=r(b, d, l), A=-torch.rand(d, n, generator=g, device="cuda") - 0.5,
                B=r(*bc), C=r(*bc), D=r(d), z=r(b, d, l), delta_bias=r(d), initial_state=r(b, d, n))


@needs_scan_kernel
@pytest.mark.parametrize("groups", [None, 3])
@pytest.mark.parametrize("with_initial_state", [False, True])
def test_scan_kernel_matches_reference(groups, with_initial_state):
    """mamba_ssm's selective_scan_fn (grouped B/C too, and with our initial-state extension) == the
    sequential reference in output and every input gradient (fp32; mamba-ssm's own test tolerances)."""
    inputs = scan_inputs(groups)
    if not with_initial_state:
        inputs.pop("initial_state")
    results = []
    for fn in (ops.selective_scan, ops.selective_scan_ref):
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        out = fn(**leaves, delta_softplus=True)
        out.square().sum().backward()
        results.append([out] + [leaves[k].grad for k in inputs])
    worst = max(rel(a, b) for a, b in zip(*results))
    print(f"max relative difference {worst:.2e}")
    assert worst < 3e-3


@needs_scan_kernel
def test_scan_kernel_last_state_value():
    """The kernel's last state (plus the decayed initial state) == the reference's, without gradients."""
    inputs = scan_inputs(3)
    with torch.no_grad():
        _, last = ops.selective_scan(**inputs, delta_softplus=True, return_last_state=True)
        _, last_ref = ops.selective_scan_ref(**inputs, delta_softplus=True, return_last_state=True)
    assert rel(last, last_ref) < 1e-4


@needs_scan_kernel
@pytest.mark.parametrize("groups", [None, 3])
def test_scan_kernel_grad_through_last_state(groups):
    """A carried state inside a window (stateful training): the last state's gradient goes through
    mamba_ssm's kernel via the read-out steps (`_scan_with_state_readout`), equal to the reference's in
    output, last state and every input gradient (fp32), and the kernel really runs (not PyTorch)."""
    inputs = scan_inputs(groups)
    calls = []
    kernel = ops._ss_cuda
    ops._ss_cuda = lambda *a, **k: calls.append(1) or kernel(*a, **k)
    try:
        results = []
        for fn in (ops.selective_scan, ops.selective_scan_ref):
            leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
            out, last = fn(**leaves, delta_softplus=True, return_last_state=True)
            (out.square().sum() + (last * 3).sin().sum()).backward()
            results.append([out, last] + [leaves[k].grad for k in inputs])
    finally:
        ops._ss_cuda = kernel
    assert calls == [1]
    worst = max(rel(a, b) for a, b in zip(*results))
    print(f"max relative difference {worst:.2e}")
    assert worst < 3e-3


@pytest.mark.parametrize("model_type", ["mamba", "multitrack"])
def test_stateful_window_on_kernels_matches_pytorch_path(model_type):
    """forward_with_resets (carried state + a reset inside the window) on the kernels == on the PyTorch
    path: logits, final states and gradients (fp32)."""
    from mamba_lm.stateful import forward_with_resets
    from multitrack.multitrack_config import multitrack_config
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    config = (mamba_config("tiny", vocab_size=VOCAB) if model_type == "mamba" else
              multitrack_config("tiny", vocab_size=VOCAB))
    model = build_model(model_type, config).cuda()
    ids = torch.randint(0, VOCAB, (2, 96), device="cuda")
    resets = torch.zeros(2, 48, dtype=torch.bool)
    resets[1, 20] = True
    results = []
    for pytorch in (False, True):
        model.zero_grad()
        cache = model.allocate_cache(2)
        ctx = ops.force_pytorch() if pytorch else torch.enable_grad()
        with ctx:
            with torch.no_grad():
                forward_with_resets(model, ids[:, :48], cache)
            logits, _ = forward_with_resets(model, ids[:, 48:], cache, resets, state_grad=False)
            logits.float().square().mean().backward()
        results.append([logits] + [t.float() for t in cache.state_tensors()] +
                       [p.grad for p in model.parameters() if p.grad is not None])
    worst = max(rel(a, b) for a, b in zip(*results))
    print(f"max relative difference {worst:.2e}")
    assert worst < 3e-3


@pytest.mark.parametrize("model_type", ["mamba", "multitrack"])
def test_kernels_match_pytorch_path_in_the_model(model_type):
    """Whole model on the kernels == the same weights on the PyTorch path: logits and gradients (fp32)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    if model_type == "mamba":
        config = mamba_config("tiny", vocab_size=VOCAB)
    else:
        from multitrack.multitrack_config import multitrack_config
        config = multitrack_config("tiny", vocab_size=VOCAB)
    model = build_model(model_type, config, device="cuda")
    ids = torch.randint(0, VOCAB, (2, 67), device="cuda")

    def run():
        model.zero_grad(set_to_none=True)
        logits = model(ids[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    logits_k, grads_k = run()
    with ops.force_pytorch():
        logits_p, grads_p = run()
    assert rel(logits_k, logits_p) < 1e-4
    assert max(rel(a, b) for a, b in zip(grads_k, grads_p)) < 1e-2


@pytest.mark.parametrize("model_type", ["mamba", "multitrack"])
def test_step_matches_forward_on_cuda(model_type):
    """Teacher-forced recurrent step() == parallel forward on the GPU path (kernels where installed)."""
    torch.manual_seed(0)
    if model_type == "mamba":
        config = mamba_config("tiny", vocab_size=VOCAB)
    else:
        from multitrack.multitrack_config import multitrack_config
        config = multitrack_config("tiny", vocab_size=VOCAB)
    model = build_model(model_type, config, device="cuda").eval()
    ids = torch.randint(0, VOCAB, (2, 33), device="cuda")
    with torch.no_grad():
        full = model(ids)
        cache = model.allocate_cache(2, device="cuda")
        stepped = torch.stack([model.step(ids[:, t], cache) for t in range(ids.shape[1])], dim=1)
    diff = (full - stepped).abs().max().item()
    print(f"max |step - forward| = {diff:.2e}")
    assert diff < 1e-3


def test_same_logits_as_mamba_ssm_model():
    """Our MambaLMHeadModel == mamba_ssm.models.mixer_seq_simple.MambaLMHeadModel with the same weights."""
    pytest.importorskip("mamba_ssm.models.mixer_seq_simple")
    from mamba_lm.convert import mamba_ssm_model
    torch.manual_seed(0)
    config = mamba_config("tiny", vocab_size=VOCAB)
    ours = build_model("mamba", config, device="cuda").eval()
    theirs = mamba_ssm_model(config, device="cuda", fused_add_norm=True).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    ids = torch.randint(0, VOCAB, (2, 64), device="cuda")
    with torch.no_grad():
        diff = rel(ours(ids), theirs(ids).logits)
    print(f"relative logit difference vs mamba-ssm: {diff:.2e}")
    assert diff < 1e-3


@pytest.mark.skipif(ops.KERNELS["selective_state_update"] == "pytorch", reason="mamba_ssm's Triton state update is not installed")
@pytest.mark.parametrize("groups", [1, 3])
def test_state_update_kernel_matches_pytorch_path(groups):
    """mamba-ssm's Triton selective_state_update (grouped B/C as its multi-head form, the multi-track decode
    step) == the PyTorch update: output and in-place state, fp32, 3 steps from a random state."""
    g = torch.Generator(device="cuda").manual_seed(1)
    b, d, n = 2, 3 * 40, 16
    r = lambda *s: torch.randn(*s, generator=g, device="cuda")
    A, D, bias = -torch.rand(d, n, generator=g, device="cuda") - 0.5, r(d), r(d)
    state_k = r(b, d, n)
    state_p = state_k.clone()
    for _ in range(3):
        x, dt, z = r(b, d), r(b, d), r(b, d)
        B, C = (r(b, groups, n), r(b, groups, n)) if groups > 1 else (r(b, n), r(b, n))
        y_k = ops.selective_state_update(state_k, x, dt, A, B, C, D, z=z, dt_bias=bias, dt_softplus=True)
        with ops.force_pytorch():
            y_p = ops.selective_state_update(state_p, x, dt, A, B, C, D, z=z, dt_bias=bias, dt_softplus=True)
        assert rel(y_k, y_p) < 1e-4 and rel(state_k, state_p) < 1e-4


needs_fla = pytest.mark.skipif(__import__("multitrack.delta_rule", fromlist=["KERNEL"]).KERNEL != "fla-triton",
                               reason="flash-linear-attention's kernels are not installed or not opted in (MAMBA_NARRATIVE_FLA=1)")


@needs_fla
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fla_gated_delta_rule_kernels_match_twins(dtype):
    """flash-linear-attention's chunk_gated_delta_rule (training) and fused_recurrent_gated_delta_rule
    (decode step) == our PyTorch twins on the GPU: outputs, final state and the gradients of q, k, v, g, β
    and the initial state, an odd length, a nonzero start state (fp32 tight, bf16 loose)."""
    from multitrack.delta_rule import gated_delta_rule, gated_delta_rule_chunked, gated_delta_rule_step

    gen = torch.Generator(device="cuda").manual_seed(0)
    b, t, h, dk, dv = 2, 101, 4, 32, 48
    r = lambda *s: torch.randn(*s, generator=gen, device="cuda")                  # noqa: E731
    data = dict(q=F.normalize(r(b, t, h, dk), dim=-1), k=F.normalize(r(b, t, h, dk), dim=-1), v=r(b, t, h, dv),
                g=-torch.rand(b, t, h, generator=gen, device="cuda") * 0.3,
                beta=torch.rand(b, t, h, generator=gen, device="cuda"), initial_state=r(b, h, dk, dv))
    results = []
    for fn in (gated_delta_rule, gated_delta_rule_chunked):
        leaves = {k: (v.to(dtype) if k in ("q", "k", "v") else v).clone().requires_grad_() for k, v in data.items()}
        o, last = fn(**leaves, output_final_state=True)
        (o.float().square().sum() + last.square().sum()).backward()
        results.append([o, last] + [leaves[k].grad for k in data])
    worst = max(rel(a, b) for a, b in zip(*results))
    print(f"{dtype}: chunk kernel vs twin, max relative difference {worst:.2e}")
    assert worst < (2e-3 if dtype == torch.float32 else 5e-2)
    state = data["initial_state"].clone()
    with torch.no_grad():
        o_ref, s_ref = gated_delta_rule_chunked(**data, output_final_state=True)
        steps = torch.stack([gated_delta_rule_step(*(data[n][:, i] for n in ("q", "k", "v", "g", "beta")), state)
                             for i in range(t)], dim=1)
    print(f"fused recurrent kernel vs twin: {rel(steps, o_ref):.2e} / state {rel(state, s_ref):.2e}")
    assert rel(steps, o_ref) < 2e-3 and rel(state, s_ref) < 2e-3


@needs_fla
def test_multitrack_revised_step_matches_forward_on_gpu():
    """The revised multi-track model (plot clock + delta-rule memory) on the GPU kernels: teacher-forced
    step() (fused recurrent kernel, grouped Triton state update) == forward() (chunk kernel, grouped scan),
    fp32, and the same logits as the PyTorch paths."""
    from multitrack.multitrack_model import variant_config

    torch.manual_seed(0)
    cfg = variant_config("tiny", "revised", vocab_size=VOCAB)
    model = build_model("multitrack", cfg).cuda().eval()
    ids = torch.randint(0, VOCAB, (2, 67), device="cuda")
    ids[:, ::9] = 10                                                             # byte "\n" rows: no table,
    with torch.no_grad():                                                        # so set one boundary rule
        table = torch.zeros(VOCAB, model.signal_table.shape[1], dtype=torch.uint8)
        table[10, 1] = 1                                                         # double_newline column
        model.set_signal_table(table)
        full = model(ids)
        cache = model.allocate_cache(2)
        steps = torch.stack([model.step(ids[:, i], cache) for i in range(ids.shape[1])], dim=1)
        with ops.force_pytorch():
            ref = model(ids)
    print(f"step vs forward {rel(steps, full):.2e}, kernels vs PyTorch {rel(full, ref):.2e}")
    assert rel(steps, full) < 2e-3 and rel(full, ref) < 2e-3
