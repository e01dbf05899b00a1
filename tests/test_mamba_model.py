"""Tests of mamba_lm/mamba.py and mamba_lm/models.py on tiny CPU configs."""

import math

import pytest
import torch
import torch.nn.functional as F

from mamba_lm import models, ops
from mamba_lm.errors import UserError
from mamba_lm.mamba import PRESETS, MambaConfig, MambaLMHeadModel, mamba_config, ssm_A

VOCAB = 101  # padded to 104


def _tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    return MambaLMHeadModel(mamba_config("tiny", vocab_size=VOCAB, **overrides)).eval()


def _ids(b, l, seed=1):
    return torch.randint(0, VOCAB, (b, l), generator=torch.Generator().manual_seed(seed))


def _mamba_ssm_keys(n_layer):
    """The state_dict keys of mamba-ssm's MambaLMHeadModel (rms_norm=True, bias=False, conv_bias=True)."""
    keys = ["backbone.embedding.weight"]
    for i in range(n_layer):
        p = f"backbone.layers.{i}."
        keys += [p + "mixer.A_log", p + "mixer.D", p + "mixer.in_proj.weight", p + "mixer.conv1d.weight",
                 p + "mixer.conv1d.bias", p + "mixer.x_proj.weight", p + "mixer.dt_proj.weight",
                 p + "mixer.dt_proj.bias", p + "mixer.out_proj.weight", p + "norm.weight"]
    return keys + ["backbone.norm_f.weight", "lm_head.weight"]


@pytest.mark.parametrize("overrides", [{}, {"d_state": 8, "expand": 1}, {"dt_rank": 3, "d_conv": 2},
                                       {"bias": True, "conv_bias": False}])
def test_forward_shapes(overrides):
    """forward: (B, L) ids -> (B, L, padded vocab) for several mixer shapes; padded vocab is a multiple of 8."""
    model = _tiny(**overrides)
    assert model.config.padded_vocab_size == 104
    logits = model(_ids(3, 13))
    assert logits.shape == (3, 13, 104)
    assert torch.isfinite(logits).all()


def test_forward_backward_reaches_every_parameter():
    """A backward pass gives a finite, nonzero gradient to every parameter (nothing detached)."""
    model = _tiny().train()
    ids = _ids(2, 19)
    loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("batch,blocked_linear", [(2, False), (2, True), (1, True)])
def test_step_matches_parallel_forward(monkeypatch, batch, blocked_linear):
    """Teacher-forced step() token by token gives the logits of one parallel forward (fp32); also with
    every projection of the step through ops.linear_step's blocked product (which the tiny model's small
    weights otherwise skip)."""
    if blocked_linear:
        monkeypatch.setattr(ops, "_STEP_MIN_WEIGHT", 0)
    model = _tiny()
    ids = _ids(batch, 29)
    with torch.no_grad():
        full = model(ids)
        cache = model.allocate_cache(batch)
        steps = torch.stack([model.step(ids[:, t], cache) for t in range(ids.shape[1])], dim=1)
    diff = (steps - full).abs().max().item()
    print(f"step vs parallel max |diff| = {diff:.2e}")
    assert diff < 1e-4


def test_decode_keeps_A_until_A_log_changes():
    """step() reuses -exp(A_log) between tokens (not recomputed per layer per token) but follows an in-place
    change of A_log (an optimizer step, load_state_dict): the logits after the change are those of a fresh
    model with the changed weights."""
    torch.manual_seed(0)
    cfg = mamba_config("tiny", vocab_size=64)
    model = MambaLMHeadModel(cfg).eval()
    ids = torch.tensor([3, 7])
    with torch.inference_mode():
        cache = model.allocate_cache(2)
        model.step(ids, cache)
        A_first = ssm_A(model.backbone.layers[0].mixer)
        assert ssm_A(model.backbone.layers[0].mixer) is A_first                  # kept
    with torch.no_grad():
        for layer in model.backbone.layers:
            layer.mixer.A_log.add_(0.5)
    fresh = MambaLMHeadModel(cfg).eval()
    fresh.load_state_dict(model.state_dict())
    with torch.inference_mode():
        cache, cache_fresh = model.allocate_cache(2), fresh.allocate_cache(2)
        for _ in range(3):
            out, out_fresh = model.step(ids, cache), fresh.step(ids, cache_fresh)
        assert ssm_A(model.backbone.layers[0].mixer) is not A_first
    torch.testing.assert_close(out, out_fresh, atol=0, rtol=0)


def test_chunked_forward_with_cache_equals_full_forward():
    """forward over chunks with a carried cache == one long forward, and leaves the same state as step()."""
    model = _tiny()
    ids = _ids(2, 45)
    with torch.no_grad():
        full = model(ids)
        cache = model.allocate_cache(2)
        parts = [model(ids[:, a:b], cache=cache) for a, b in [(0, 1), (1, 18), (18, 20), (20, 45)]]
        chunked = torch.cat(parts, dim=1)
        step_cache = model.allocate_cache(2)
        for t in range(ids.shape[1]):
            model.step(ids[:, t], step_cache)
    print(f"chunked vs full max |diff| = {(chunked - full).abs().max():.2e}")
    torch.testing.assert_close(chunked, full, atol=1e-4, rtol=1e-4)
    for a, b in zip(cache.ssm_states + cache.conv_states, step_cache.ssm_states + step_cache.conv_states):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # continuing by step from the chunked cache == continuing from the step cache
    nxt = _ids(2, 1, seed=5)[:, 0]
    with torch.no_grad():
        torch.testing.assert_close(model.step(nxt, cache), model.step(nxt, step_cache), atol=1e-4, rtol=1e-4)
    cache.reset()
    assert cache.batch_size == 2 and all(s.abs().sum() == 0 for s in cache.ssm_states + cache.conv_states)


def test_parameter_counts_of_presets():
    """mamba-130m has exactly 126,924,672 parameters (as measured with mamba-ssm), the public
    state-spaces/mamba-130m layout 129,135,360; counted on the real module built on the meta device."""
    assert MambaLMHeadModel(mamba_config("mamba-130m"), device="meta").num_params() == 126_924_672
    assert MambaLMHeadModel(mamba_config("mamba-130m-ssm"), device="meta").num_params() == 129_135_360
    c = PRESETS["mamba-130m"]
    per_layer = (c.d_model * 2 * c.d_inner + c.d_inner * c.d_conv + c.d_inner
                 + c.d_inner * (c.dt_rank + 2 * c.d_state) + c.dt_rank * c.d_inner + c.d_inner
                 + c.d_inner * c.d_state + c.d_inner + c.d_inner * c.d_model + c.d_model)
    assert c.padded_vocab_size == 50280 and c.dt_rank == 56 and c.d_inner == 1792
    assert c.padded_vocab_size * c.d_model + c.n_layer * per_layer + c.d_model == 126_924_672


def test_state_dict_keys_match_mamba_ssm():
    """state_dict keys and shapes are mamba-ssm's MambaLMHeadModel's, the LM head tied to the embedding."""
    model = _tiny()
    sd = model.state_dict()
    assert sorted(sd) == sorted(_mamba_ssm_keys(2))
    assert sd["backbone.layers.0.mixer.conv1d.weight"].shape == (128, 1, 4)
    assert sd["backbone.layers.0.mixer.x_proj.weight"].shape == (4 + 32, 128)
    assert model.lm_head.weight is model.backbone.embedding.weight
    reloaded = _tiny(seed=7)
    reloaded.load_state_dict(sd, strict=True)
    torch.testing.assert_close(reloaded(_ids(1, 5)), model(_ids(1, 5)))


def test_initialisation_follows_mamba_ssm():
    """A_log = log(1..N), D = 1, softplus(dt bias) in [dt_min, dt_max], zero biases, small out_proj."""
    model = _tiny(bias=True)
    c = model.config
    mixer = model.backbone.layers[0].mixer
    torch.testing.assert_close(mixer.A_log, torch.log(torch.arange(1, 17.0)).repeat(c.d_inner, 1))
    assert torch.all(mixer.D == 1)
    dt = F.softplus(mixer.dt_proj.bias)
    assert dt.min() >= c.dt_init_floor * 0.999 and dt.max() <= c.dt_max * 1.001 and dt.min() < 0.01
    assert torch.all(mixer.in_proj.bias == 0) and torch.all(mixer.out_proj.bias == 0)
    bound = 1 / math.sqrt(c.d_inner) / math.sqrt(c.n_layer)  # kaiming_uniform(a=sqrt(5)) / sqrt(n_layer)
    assert mixer.out_proj.weight.abs().max() <= bound + 1e-6
    assert abs(model.backbone.embedding.weight.std().item() - 0.02) < 0.003
    assert mixer.A_log._no_weight_decay and mixer.D._no_weight_decay


def test_matches_transformers_mamba():
    """Same weights as transformers' MambaForCausalLM (its PyTorch reference path) -> same logits."""
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.MambaConfig(
        hidden_size=64, num_hidden_layers=2, state_size=16, expand=2, conv_kernel=4, time_step_rank=4,
        vocab_size=104, use_bias=False, use_conv_bias=True, residual_in_fp32=True, layer_norm_epsilon=1e-5,
        tie_word_embeddings=True)
    torch.manual_seed(0)
    hf = transformers.MambaForCausalLM(hf_config).eval()
    with torch.no_grad():  # HF inits A_log/D like us; perturb everything so the test sees every weight
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ours = _tiny()
    sd = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in hf.state_dict().items()}
    ours.load_state_dict(sd, strict=True)
    ids = _ids(2, 21)
    with torch.no_grad():
        theirs = hf(ids).logits
        mine = ours(ids)
    diff = (mine - theirs).abs().max().item()
    print(f"ours vs transformers max |diff| = {diff:.2e}")
    assert diff < 1e-4


def test_bf16_autocast_forward():
    """Under bf16 autocast on CPU the forward runs, keeps the residual in fp32, and stays near fp32 logits."""
    model = _tiny()
    ids = _ids(2, 17)
    with torch.no_grad():
        ref = model(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(ids)
    assert torch.isfinite(low.float()).all()
    assert (low.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_build_model_roundtrip_and_errors():
    """build_model(model_type, model_config_dict(m)) rebuilds an identical architecture (strict load);
    bad presets, fields and model types are one-line UserErrors."""
    model = _tiny()
    cfg = models.model_config_dict(model)
    assert cfg["d_inner"] == 128 and cfg["padded_vocab_size"] == 104
    rebuilt = models.build_model("mamba", cfg)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    assert rebuilt.config == model.config
    assert isinstance(models.build_model("mamba", model.config), MambaLMHeadModel)
    with pytest.raises(UserError):
        models.build_model("transformer", cfg)
    with pytest.raises(UserError):
        models.build_model("mamba", {**cfg, "n_heads": 4})
    with pytest.raises(UserError):
        mamba_config("mamba-7b")
    with pytest.raises(UserError):
        mamba_config("tiny", d_modle=3)
    assert mamba_config("tiny", d_model=128).dt_rank == 8
    assert isinstance(mamba_config("small-cpu"), MambaConfig)


def test_overfits_one_batch():
    """Training sanity: on one fixed batch the loss falls far below its initial value within 80 AdamW steps."""
    torch.manual_seed(0)
    model = MambaLMHeadModel(mamba_config("tiny", vocab_size=32)).train()
    ids = torch.randint(0, 32, (4, 33), generator=torch.Generator().manual_seed(3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(80):
        loss = F.cross_entropy(model(ids[:, :-1])[..., :32].flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < 0.2 * losses[0]


@pytest.mark.filterwarnings("ignore:MultiTrackLM. the narrative signal table is empty")
@pytest.mark.parametrize("model_type", ["mamba", "multitrack"])
def test_kernels_get_mamba_ssm_layout_without_copies(monkeypatch, model_type):
    """Guards the training path's layout (mamba-ssm's Mamba: in_proj and dt_proj as W·xᵀ): the conv and
    scan kernels receive x, z and Δ as (B, C, L) views with unit stride along L, not contiguous copies,
    and the model's logits and gradients equal the PyTorch path's. Stand-in kernels compute with the
    references and record what they were handed."""
    from mamba_lm import ops

    seen = {}

    def scan(u, delta, A, B, C, D, z, delta_bias, softplus, return_last_state):
        seen["scan"] = {"unit stride": (delta.stride(-1), z.stride(-1)) == (1, 1),
                        "views": not delta.is_contiguous() and not z.is_contiguous()}
        return ops.selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, softplus, return_last_state=return_last_state)

    def conv(x, weight, bias, activation=None):
        seen["conv"] = {"unit stride": x.stride(-1) == 1, "views": not x.is_contiguous()}
        return ops.causal_conv1d_ref(x, weight, bias, activation)

    if model_type == "mamba":
        model = _tiny(seed=3)
    else:
        from multitrack.multitrack_config import multitrack_config
        model = models.build_model("multitrack", multitrack_config("tiny", vocab_size=100))
    ids = torch.randint(0, 100, (2, 23), generator=torch.Generator().manual_seed(0))

    def logits_and_grads():
        model.zero_grad(set_to_none=True)
        logits = model(ids[:, :-1])
        F.cross_entropy(logits[..., :100].flatten(0, 1), ids[:, 1:].flatten()).backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters()]

    ref_logits, ref_grads = logits_and_grads()
    monkeypatch.setattr(ops, "_ss_cuda", scan)
    monkeypatch.setattr(ops, "_conv_cuda", conv)
    monkeypatch.setattr(ops, "_use", lambda kernel, *tensors: kernel in (scan, conv))
    logits, grads = logits_and_grads()
    assert seen["scan"] == seen["conv"] == {"unit stride": True, "views": True}
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
