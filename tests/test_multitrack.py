"""The multi-track LM (multitrack/multitrack_model.py and its parts): shapes and gradients for every
ablation, parameter matching to the Mamba baseline, recurrent step == parallel forward, chunked
forward == full forward, router statistics, checkpoint round trip, and an overfit-one-batch run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mamba_lm import models, ops
from mamba_lm.errors import UserError
from mamba_lm.mamba import MambaLMHeadModel, mamba_config
from multitrack.multitrack_model import (VARIANTS, MultiTrackConfig, MultiTrackLM, baseline_params, count_params,
                                         multitrack_config)
from multitrack.narrative import FEATURE_NAMES, N_FEATURES, TOKEN_TYPES, build_signal_tables
from mamba_lm.tokenizer import load_tokenizer

TEXT = ('CHAPTER I\n\nHe said, "Run now." Then he left the house.\n\n"Wait," she called. "Wait for me!"\n\n'
        "* * *\n\nNight fell over the hills, and the wind rose.\n\n\"Who's there?\n\n\"Only me.\"")

ABLATIONS = VARIANTS                # every variant and ablation switch (multitrack_config.VARIANTS)
NEW_MECHANISMS = ["plot-clock", "plot-clock-learned", "char-memory", "revised", "revised-learned-clock"]


def tiny(**overrides) -> MultiTrackConfig:
    """Tiny byte-level config: d_model 32, 2 layers, parameter-matched d_inner."""
    base = dict(vocab_size=257, d_model=32, n_layer=2)
    return multitrack_config("tiny", **{**base, **overrides})


@pytest.fixture(scope="module")
def byte_table():
    return build_signal_tables(load_tokenizer("byte"))


@pytest.fixture(scope="module")
def story_ids():
    tok = load_tokenizer("byte")
    ids = tok.encode(TEXT)
    end = TEXT.index("Wait for") + 3                  # row 0 ends inside a quote: dialogue parity 1
    return torch.tensor([ids[end - 64:end], ids[40:104]])                        # (2, 64)


def make_model(config, table, seed=0, perturb=True):
    """A model with the byte signal table; zero-initialised parts perturbed so every path is exercised."""
    torch.manual_seed(seed)
    model = MultiTrackLM(config)
    model.set_signal_table(table)
    if perturb:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "router" in name or name.endswith("cross.out"):
                    p.normal_(std=0.3)
    return model


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_forward_backward_every_ablation(name, byte_table, story_ids):
    """Guards each ablation switch: logits shape/finite, and every parameter receives a finite, nonzero grad."""
    model = make_model(tiny(**ABLATIONS[name]), byte_table)
    logits = model(story_ids)
    assert logits.shape == (2, 64, model.config.padded_vocab_size)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), story_ids[:, 1:].reshape(-1))
    aux = model.aux_loss()
    if model.config.use_router:
        assert aux is not None and aux.item() >= 0
        loss = loss + aux
    else:
        assert aux is None
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"no gradient reaches {pname}"
    has = lambda part: any(part in n for n, _ in model.named_parameters())  # noqa: E731
    cfg = model.config
    assert has("router.proj") == (name not in ("one-track", "uniform-router")) == cfg.use_router
    assert has("router.signal_proj") == (name not in ("one-track", "uniform-router", "no-signals"))
    assert has("cross.qkv") == (name not in ("one-track", "no-cross"))
    assert has("memory.proj") == ("memory" in name or name.startswith("revised")) == cfg.use_char_memory
    assert has("clock.signal_proj") == (name in ("plot-clock-learned", "revised-learned-clock"))
    assert cfg.use_plot_clock == (name.startswith(("plot-clock", "revised")))


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_parameter_matching_to_baseline(name):
    """Guards the fair comparison: every variant and ablation of the multitrack-130m, tiny and small-cpu
    presets is within 1% of the Mamba baseline preset of the same size (mamba-130m: 126,924,672
    parameters; built on the meta device, counts printed)."""
    for preset, base_preset, tol in (("multitrack-130m", "mamba-130m", 0.01), ("tiny", "tiny", 0.01),
                                     ("small-cpu", "small-cpu", 0.01)):
        cfg = multitrack_config(preset, **ABLATIONS[name])
        n = MultiTrackLM(cfg, device="meta").num_params()
        base = MambaLMHeadModel(mamba_config(base_preset), device="meta").num_params()
        print(f"{preset} [{name}]: {n:,} vs {base_preset}: {base:,} ({100 * (n - base) / base:+.3f}%), "
              f"d_inner={cfg.d_inner}")
        assert n == count_params(cfg) and base == baseline_params(cfg)
        assert abs(n - base) / base < tol
    assert MambaLMHeadModel(mamba_config("mamba-130m"), device="meta").num_params() == 126_924_672


def test_track_dt_initialisation_ranges():
    """Guards the timescale separation: each track's initial Δ = softplus(dt_bias) lies in its own range,
    and one track spans the union of the ranges (multi-timescale init only)."""
    cfg = tiny(d_model=64)
    mixer = MultiTrackLM(cfg).backbone.layers[0].mixer
    dt = F.softplus(mixer.dt_proj.bias.detach()).view(cfg.tracks, cfg.d_track)
    for g, (lo, hi) in enumerate(cfg.dt_ranges):
        assert dt[g].min() >= lo * 0.999 and dt[g].max() <= hi * 1.001, cfg.track_names[g]
    one = tiny(d_model=64, tracks=1)
    dt1 = F.softplus(MultiTrackLM(one).backbone.layers[0].mixer.dt_proj.bias.detach())
    assert one.dt_ranges == [(1e-4, 1e-1)]
    assert dt1.min() < 1e-3 and dt1.max() > 1e-2                               # spread over 3 decades


@pytest.mark.parametrize("name,blocked_linear", [(name, False) for name in ABLATIONS]
                         + [("full", True), ("revised", True)])
def test_step_matches_parallel_forward(monkeypatch, name, blocked_linear, byte_table, story_ids):
    """Guards generation: teacher-forced step() equals forward() logits (fp32, < 1e-4), the cache carries
    the dialogue parity exactly as the parallel pass computes it, and every recurrent state (conv, scan,
    delta-rule memory) ends equal; once with every step projection through ops.linear_step's blocked
    product (which the tiny model's small weights otherwise skip)."""
    if blocked_linear:
        monkeypatch.setattr(ops, "_STEP_MIN_WEIGHT", 0)
    model = make_model(tiny(**ABLATIONS[name]), byte_table).eval()
    with torch.no_grad():
        ref_cache = model.allocate_cache(2)
        full = model(story_ids, cache=ref_cache)
        cache = model.allocate_cache(2)
        steps = torch.stack([model.step(story_ids[:, t], cache) for t in range(story_ids.shape[1])], dim=1)
    diff = (steps - full).abs().max().item()
    print(f"max |step - forward| = {diff:.2e}")
    assert diff < 1e-4
    assert torch.equal(cache.narrative.parity, ref_cache.narrative.parity)
    assert cache.narrative.parity.tolist() == [1, 0]                           # row 0 stopped inside a quote
    assert len(cache.mem_states) == (model.config.n_layer if model.config.use_char_memory else 0)
    for a, b in zip(cache.ssm_states + cache.conv_states + cache.mem_states,
                    ref_cache.ssm_states + ref_cache.conv_states + ref_cache.mem_states):
        assert torch.allclose(a, b, atol=1e-5)


def test_decode_follows_a_new_signal_table(byte_table, story_ids):
    """Guards the decode step's kept lookup tables (narrative state machine, router and plot-clock terms
    per entry): after set_signal_table installs another table, step() reads the new one (its logits
    equal forward's with that table), not the tables built for the old one."""
    model = make_model(tiny(**ABLATIONS["plot-clock-learned"]), byte_table).eval()
    ids = story_ids[:, :40]
    shuffled = byte_table[torch.randperm(byte_table.shape[0], generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        cache = model.allocate_cache(2)
        before = torch.stack([model.step(ids[:, t], cache) for t in range(ids.shape[1])], dim=1)
        model.set_signal_table(shuffled)
        cache = model.allocate_cache(2)
        after = torch.stack([model.step(ids[:, t], cache) for t in range(ids.shape[1])], dim=1)
        full = model(ids)
    assert (after - full).abs().max() < 1e-4
    assert (before - after).abs().max() > 1e-3                                   # the table does matter here


def test_decode_tables_follow_a_state_dict_loaded_by_assignment(byte_table, story_ids):
    """Guards the decode step's kept tables against new Parameter objects: after load_state_dict(assign=True)
    of other router and plot-clock weights (new objects, and a new signal-table buffer), step() gives the
    logits of forward with those weights, not of the tables built before."""
    config = tiny(**ABLATIONS["plot-clock-learned"])
    model = make_model(config, byte_table).eval()
    ids = story_ids[:, :12]
    other = make_model(config, byte_table)
    with torch.no_grad():
        for name, p in other.named_parameters():
            if "router" in name or "clock" in name:
                p.add_(torch.randn_like(p))
        cache = model.allocate_cache(2)
        for t in range(3):
            model.step(ids[:, t], cache)                                        # tables built for the old weights
        model.load_state_dict(other.state_dict(), assign=True)
        cache = model.allocate_cache(2)
        steps = torch.stack([model.step(ids[:, t], cache) for t in range(ids.shape[1])], dim=1)
        full = other(ids)
    assert (steps - full).abs().max() < 1e-4


def test_decode_keeps_derived_weights_until_they_change(byte_table, story_ids):
    """step() keeps what it derives from parameters between tokens (A = -exp(A_log), the stacked router and
    plot-clock signal weights) and follows in-place changes of them (an optimizer step): after the change
    its logits equal a fresh model's with the changed weights."""
    config = tiny(**ABLATIONS["plot-clock-learned"])
    model = make_model(config, byte_table).eval()
    ids = story_ids[:, :6]
    with torch.no_grad():
        cache = model.allocate_cache(2)
        for t in range(3):
            model.step(ids[:, t], cache)
        for name, p in model.named_parameters():
            if name.endswith(("A_log", "signal_proj.weight", "proj.bias")):
                p.add_(0.1)
        fresh = MultiTrackLM(config)
        fresh.load_state_dict(model.state_dict())
        fresh.set_signal_table(byte_table)
        c1, c2 = model.allocate_cache(2), fresh.allocate_cache(2)
        for t in range(6):
            out, out_fresh = model.step(ids[:, t], c1), fresh.step(ids[:, t], c2)
    torch.testing.assert_close(out, out_fresh, atol=0, rtol=0)


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_chunked_forward_with_cache_equals_full_forward(name, byte_table, story_ids):
    """Guards chunked processing of long books (carried state across windows): forward in pieces with a
    carried cache == one forward, for every variant; reset() zeroes every state."""
    model = make_model(tiny(**ABLATIONS[name]), byte_table).eval()
    with torch.no_grad():
        full = model(story_ids)
        cache = model.allocate_cache(2)
        parts = [model(story_ids[:, a:b], cache=cache) for a, b in ((0, 13), (13, 40), (40, 41), (41, 64))]
    diff = (torch.cat(parts, 1) - full).abs().max().item()
    print(f"max |chunked - full| = {diff:.2e}")
    assert diff < 1e-4
    cache.reset()
    assert all(not t.any() for t in cache.ssm_states + cache.mem_states) and not cache.narrative.parity.any()


def test_router_weights_and_stats(byte_table, story_ids):
    """Guards the router statistics: uniform at init, weights sum to 1 per token type, keys present,
    dialogue share matches the narrative features, reset_stats clears, record_stats=False records nothing,
    and by default ("train") eval-mode forwards (the trainer's val passes) are not recorded."""
    fresh = make_model(tiny(), byte_table, perturb=False).eval()
    assert fresh.record_stats == "train"
    with torch.no_grad():
        fresh(story_ids)
    assert fresh.stats() == {}                                                 # eval forward: not recorded
    fresh.record_stats = True
    with torch.no_grad():
        fresh(story_ids)
    st = fresh.stats()
    assert all(abs(st[f"router/all/{t}"] - 1 / 3) < 1e-6 for t in fresh.config.track_names)

    model = make_model(tiny(), byte_table).eval()
    model.record_stats = True
    with torch.no_grad():
        model(story_ids)
        model(story_ids[:1])
    st = model.stats()
    assert st["router/tokens"] == 3 * 64 and st["router/frac/all"] == 1.0
    for ttype in ("all", "narration", "dialogue", "paragraph_start"):
        total = sum(st[f"router/{ttype}/{t}"] for t in model.config.track_names)
        assert abs(total - 1) < 1e-6, ttype
    assert abs(st["router/frac/narration"] + st["router/frac/dialogue"] - 1) < 1e-9
    assert 0.1 < st["router/frac/dialogue"] < 0.9
    assert st["router/dialogue/scene"] != st["router/narration/scene"]         # signals move the router
    assert {f"router/layer{k}/plot" for k in range(2)} <= set(st)
    assert set(TOKEN_TYPES) == {k.split("/")[2] for k in st if k.startswith("router/frac/")}
    model.reset_stats()
    assert model.stats() == {}
    model.train()
    model(story_ids)
    assert model.stats()["router/tokens"] == 2 * 64                            # training forwards count too
    model.reset_stats()
    model.record_stats = False
    model(story_ids)
    assert model.stats() == {}
    uniform = make_model(tiny(router="uniform"), byte_table).eval()
    uniform.record_stats = True
    with torch.no_grad():
        uniform(story_ids)
    assert uniform.stats() == {} and uniform.aux_loss() is None


def test_build_model_roundtrip_restores_signal_table(byte_table, story_ids):
    """Guards checkpoints: build_model("multitrack", config dict) + strict load reproduces the logits,
    including the narrative table (a buffer in the state dict)."""
    model = make_model(tiny(), byte_table).eval()
    cfg = models.model_config_dict(model)
    assert cfg["d_inner"] == model.config.d_inner
    clone = models.build_model("multitrack", cfg)
    assert not clone.signal_table.any()
    clone.load_state_dict(model.state_dict(), strict=True)
    clone.eval()
    assert torch.equal(clone.signal_table, model.signal_table)
    with torch.no_grad():
        assert torch.equal(clone(story_ids), model(story_ids))
    assert models.MODEL_TYPES["multitrack"] == (MultiTrackConfig, MultiTrackLM)


def test_config_errors_are_user_errors():
    """Guards the one-line errors for bad configs: unknown preset/field, mismatched dt ranges, bad router."""
    with pytest.raises(UserError):
        multitrack_config("huge")
    with pytest.raises(UserError):
        multitrack_config("tiny", trakcs=3)
    with pytest.raises(UserError):
        multitrack_config("tiny", tracks=2)                                      # 3 ranges for 2 tracks
    with pytest.raises(UserError):
        multitrack_config("tiny", router="softmax")
    with pytest.raises(UserError):
        MultiTrackLM(tiny()).set_signal_table(torch.zeros(10, 3, dtype=torch.uint8))
    two = multitrack_config("tiny", tracks=2, track_dt_min=(1e-2, 1e-4), track_dt_max=(1e-1, 1e-3))
    assert two.d_inner % 2 == 0 and two.track_names == ("track0", "track1")


@pytest.mark.parametrize("name", ["full", "plot-clock-learned", "revised"])
def test_overfits_one_batch(name, byte_table, story_ids):
    """Guards that the whole model learns, with each new mechanism too (the learned plot clock; the rule's
    clock with the delta-rule memory): 100 Adam steps on one batch drive the loss far below its start."""
    torch.manual_seed(0)
    model = make_model(tiny(**ABLATIONS[name]), byte_table, perturb=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = story_ids[:, :-1], story_ids[:, 1:]
    losses = []
    for _ in range(100):
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad()
        (loss + model.aux_loss()).backward()
        opt.step()
        losses.append(loss.item())
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[0] > 0.8 * math.log(257) and losses[-1] < 0.25 * losses[0]


def test_train_multitrack_script_end_to_end(demo_data_dir, tmp_path):
    """Guards train_multitrack.py: trains through the shared trainer, logs router stats to metrics.jsonl,
    writes router_stats.jsonl and router_usage.png, and its checkpoint rebuilds the model (strict load)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from mamba_lm.checkpoint import model_from_checkpoint

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    args = ["--preset=tiny", f"--data_dir={demo_data_dir}", f"--out_dir={out}", "--max_steps=4",
            "--eval_interval=2", "--eval_batches=1", "--batch_size=2", "--device=cpu", "--tensorboard=False",
            "--d_model=32", "--eval_max_batches=1"]
    r = subprocess.run([sys.executable, str(root / "train_multitrack.py"), *args], cwd=root, env=env,
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "multitrack params" in r.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [row for row in rows if row.get("kind") == "eval"]
    # every eval step logs router stats (a second eval at the same step, at the epoch end, has none left)
    with_stats = {row["step"] for row in evals if "router/all/plot" in row and "router/dialogue/scene" in row}
    assert with_stats == {row["step"] for row in evals} == {2, 4}
    assert (out / "router_usage.png").stat().st_size > 1000
    stat_rows = [json.loads(line) for line in (out / "router_stats.jsonl").read_text().splitlines()]
    # one row per eval step: the epoch-end val pass at step 4 is not recorded (eval-mode forwards)
    assert [row["step"] for row in stat_rows] == [2, 4]
    assert stat_rows[0]["router/tokens"] == stat_rows[1]["router/tokens"]       # 2 training steps each
    model, ckpt = model_from_checkpoint(out / "ckpt_latest.pt")
    assert ckpt["model_type"] == "multitrack" and model.signal_table.any()
    bad = subprocess.run([sys.executable, str(root / "train_multitrack.py"), *args, "--track_dt=1e-2"],
                         cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:") and "Traceback" not in bad.stderr


def test_clamped_delta_meets_kernel_dtype_contract():
    """Guards dt_clamp_factor on GPU: mamba-ssm's selective_scan_cuda requires Δ in u's dtype (bf16 under
    autocast) and fp32 delta_bias, and its Triton step kernel cannot take dt_bias=None; the clamped Δ is
    returned in dt's dtype with a float32 zero bias, clamped to each track's widened range."""
    cfg = tiny(dt_clamp_factor=2.0)
    mixer = MultiTrackLM(cfg).backbone.layers[0].mixer
    dt = torch.randn(2, cfg.d_inner, 5).mul(20).to(torch.bfloat16)             # (B, Di, L), extreme values
    delta, bias, softplus = mixer._delta(dt)
    assert delta.dtype == torch.bfloat16 and not softplus
    assert bias is not None and bias.dtype == torch.float32 and not bias.any()
    lo = torch.tensor([r[0] for r in cfg.dt_ranges]).repeat_interleave(cfg.d_track) / 2
    hi = torch.tensor([r[1] for r in cfg.dt_ranges]).repeat_interleave(cfg.d_track) * 2
    d = delta.float()
    assert (d >= lo[:, None] * 0.99).all() and (d <= hi[:, None] * 1.01).all()
    free = MultiTrackLM(tiny()).backbone.layers[0].mixer._delta(dt)
    assert free[0] is dt and free[1].dtype == torch.float32 and free[2]      # unclamped: the kernel applies softplus


def test_cross_track_step_equals_forward():
    """Guards the fused decode path of the cross-track attention: step (one SDPA call) equals forward
    (broadcast form) on the same positions, and is not the identity once the output projection is trained."""
    from multitrack.cross_track import CrossTrackAttention

    torch.manual_seed(0)
    cross = CrossTrackAttention(n_tracks=3, d_track=12, n_heads=2, head_dim=4)
    with torch.no_grad():
        cross.out.normal_(std=0.5)
    y = torch.randn(5, 3, 12)                                                    # (B, G, d_track)
    full = cross(y[:, None])[:, 0]                                               # as (B, L=1, G, d_track)
    step = cross.step(y)
    print(f"max |step - forward| = {(step - full).abs().max().item():.2e}")
    assert torch.allclose(step, full, atol=1e-6) and not torch.allclose(step, y, atol=1e-3)


@pytest.mark.parametrize("l", [1, 7])
@pytest.mark.parametrize("name", ["full", "no-cross", "uniform-router", "plot-clock", "char-memory", "revised"])
def test_channels_first_mixing_equals_token_major_reference(name, l):
    """Guards the training path of the track mixing: in the scan's (B, Di, L) layout (cross-track attention
    on (B, G, d_track, L), RMS scale moved onto q/k/v, router weights broadcast along d_track, the router's
    signal term precomputed and added in one addmm) it gives the same output and the same gradients (y, u,
    features, every parameter) as the token-major reference: CrossTrackAttention.forward on
    (B, L, G, d_track), the router from u and the features, then y_g * G w_g. Odd and one-token lengths."""
    torch.manual_seed(0)
    cfg = tiny(**ABLATIONS[name])
    mixer = MultiTrackLM(cfg).backbone.layers[0].mixer.double()
    with torch.no_grad():                          # trained-like: non-zero output projection and router
        for p_name, p in mixer.named_parameters():
            if p_name.startswith(("cross.out", "router.")):
                p.normal_(std=0.3)
    b, di, g = 2, cfg.d_inner, cfg.tracks
    y = torch.randn(b, di, l, dtype=torch.float64, requires_grad=True)           # scan output (B, Di, L)
    u = torch.randn(b, l, cfg.d_model, dtype=torch.float64, requires_grad=True)
    features = torch.rand(b, l, N_FEATURES, dtype=torch.float64, requires_grad=True)

    def reference():
        yt = y.transpose(1, 2).unflatten(-1, (g, cfg.d_track))                   # (B, L, G, d_track)
        if mixer.cross is not None:
            yt = mixer.cross(yt)
        w = None if mixer.router is None else mixer.router(u, features)
        if w is not None:
            yt = yt * (g * w).unsqueeze(-1)
        return yt.flatten(-2).transpose(1, 2), w

    params = [p for p_name, p in mixer.named_parameters() if p_name.startswith(("cross.", "router."))]
    inputs = [y, u, features] + params
    out_ref, w_ref = reference()
    router = mixer.router
    signal = (F.linear(features, router.signal_proj.weight, router.proj.bias)     # as MultiTrackLM computes it
              if router is not None and router.signal_proj is not None else None)
    out, w = mixer._mix_tracks_channels_first(y, u, signal)
    assert out.shape == (b, di, l) and (w is None) == (w_ref is None) == (mixer.router is None)
    torch.testing.assert_close(out, out_ref)
    if w is not None:
        torch.testing.assert_close(w, w_ref)
    probe = torch.randn_like(out)
    g_ref = torch.autograd.grad((out_ref * probe).sum(), inputs, allow_unused=True)
    g_new = torch.autograd.grad((out * probe).sum(), inputs, allow_unused=True)
    for a, c in zip(g_ref, g_new):
        assert (a is None) == (c is None)
        if a is not None:
            torch.testing.assert_close(c, a)
    assert params and all(a is not None and a.abs().sum() > 0 for a in g_ref[3:])  # every parameter learns


def test_step_on_the_grouped_triton_update_matches_forward(monkeypatch, byte_table, story_ids):
    """Guards the CUDA decode path: with the Triton selective_state_update (its multi-head form, stood in
    for by tests/test_ops.py's heads_form_update) the 3-track step() still equals forward(), and each
    layer's step makes one kernel call for all tracks."""
    from mamba_lm import ops
    from test_ops import heads_form_update

    calls = []

    def kernel(state, *args, **kwargs):
        calls.append(tuple(state.shape))
        return heads_form_update(state, *args, **kwargs)

    model = make_model(tiny(), byte_table).eval()
    with torch.no_grad():
        full = model(story_ids)
        monkeypatch.setattr(ops, "_ssu_triton", kernel)
        monkeypatch.setattr(ops, "_use", lambda k, *tensors: k is kernel)
        cache = model.allocate_cache(2)
        steps = torch.stack([model.step(story_ids[:, t], cache) for t in range(story_ids.shape[1])], dim=1)
    assert (steps - full).abs().max().item() < 1e-4
    c = model.config
    assert len(calls) == c.n_layer * story_ids.shape[1]
    assert set(calls) == {(2, c.tracks, c.d_inner // c.tracks, c.d_state)}


def test_mean_balance_loss_equals_per_layer_mean():
    """Guards the router's load-balancing loss as the model computes it (one pass over all layers'
    weights): equal to the mean over layers of balance_loss, in value and gradient; 0 for uniform
    weights and G - 1 when one track takes everything."""
    from multitrack.router import balance_loss, mean_balance_loss

    torch.manual_seed(0)
    logits = torch.randn(4, 2, 7, 3, dtype=torch.float64, requires_grad=True)   # (n_layer, B, L, G)
    w = torch.softmax(logits, -1)
    fused = mean_balance_loss(w)
    looped = torch.stack([balance_loss(w[k]) for k in range(4)]).mean()
    torch.testing.assert_close(fused, looped)
    (g_fused,) = torch.autograd.grad(fused, logits, retain_graph=True)
    (g_looped,) = torch.autograd.grad(looped, logits)
    torch.testing.assert_close(g_fused, g_looped)
    assert g_fused.abs().sum() > 0
    assert abs(mean_balance_loss(torch.full((2, 1, 5, 3), 1 / 3)).item()) < 1e-6
    assert mean_balance_loss(F.one_hot(torch.zeros(2, 1, 5, dtype=torch.long), 3).float()).item() == pytest.approx(2.0)


def test_variants_enumerate_every_switch():
    """Guards the variant table other tests iterate over: each new mechanism has a variant that switches it
    on alone, the revised design has both, unknown names fail with a UserError, and with one track both
    are off (nothing to clock or to replace)."""
    from multitrack.multitrack_config import variant_config

    assert VARIANTS["plot-clock"] == {"plot_clock": "signals"} and VARIANTS["char-memory"] == {"char_memory": True}
    revised = variant_config("tiny", "revised")
    assert revised.use_plot_clock and revised.use_char_memory and revised.scan_tracks == [0, 2]
    assert revised.d_scan == 2 * revised.d_track and revised.d_track % revised.mem_heads == 0
    one = variant_config("tiny", "revised", tracks=1)
    assert not one.use_plot_clock and not one.use_char_memory
    with pytest.raises(UserError):
        variant_config("tiny", "no-such-variant")
    with pytest.raises(UserError):
        multitrack_config("tiny", plot_clock="sometimes")
    with pytest.raises(UserError):
        multitrack_config("tiny", plot_clock="signals", plot_clock_signals=("chapter",))
    with pytest.raises(UserError):                                               # both on the same track
        multitrack_config("tiny", tracks=2, track_dt_min=(1e-2, 1e-4), track_dt_max=(1e-1, 1e-3),
                          plot_clock="signals", char_memory=True)
    cli = multitrack_config("tiny", plot_clock="signals", plot_clock_signals="paragraph_break,doc_boundary")
    assert cli.plot_clock_signals == ("paragraph_break", "doc_boundary")


def test_plot_clock_holds_plot_state_between_boundaries(byte_table):
    """Guards the plot clock's meaning: with the boundary rule, a stretch of text without paragraph breaks,
    headings or scene marks leaves the plot track's scan state exactly unchanged (Δ = 0: no decay, no
    write) while the other tracks' states move; a paragraph break changes it. The clocked plot track's
    Δ starts in its per-boundary range."""
    tok = load_tokenizer("byte")
    model = make_model(tiny(plot_clock="signals"), byte_table).eval()
    c = model.config
    plot = slice(c.d_scan - c.d_track, c.d_scan)                                  # the last scan group
    cache = model.allocate_cache(1)
    with torch.no_grad():
        model(torch.tensor([tok.encode("The night was long.\n\n")]), cache=cache)
        before = [s.clone() for s in cache.ssm_states]
        model(torch.tensor([tok.encode("He walked on and on, and the road went on")]), cache=cache)
        held = [s.clone() for s in cache.ssm_states]
        model(torch.tensor([tok.encode(".\n\nMorning")]), cache=cache)
    for b, h, after in zip(before, held, cache.ssm_states):
        assert b[:, plot].abs().sum() > 0                                         # written at the break
        assert torch.equal(h[:, plot], b[:, plot])                                # held: bit for bit
        assert not torch.equal(h[:, :plot.start], b[:, :plot.start])              # the fast tracks move
        assert not torch.equal(after[:, plot], h[:, plot])                        # the next break writes
    dt = F.softplus(model.backbone.layers[0].mixer.dt_proj.bias.detach())[plot]
    assert dt.min() >= c.plot_clock_dt_min * 0.999 and dt.max() <= c.plot_clock_dt_max * 1.001


def test_learned_clock_starts_at_the_rule_and_equals_its_reference(byte_table, story_ids):
    """Guards the learned gate g = σ(w_s·s + w_u·u + b): at init it is near the boundary rule (> 0.99 at
    rule boundaries, < 0.01 elsewhere); the model's fused form (all layers' w_s s + b in one matmul, then
    + w_u·u) equals the plain formula, in value and gradient."""
    from multitrack.narrative import narrative_features
    from multitrack.plot_clock import boundary_gate

    model = make_model(tiny(plot_clock="learned"), byte_table)
    features = narrative_features(model.signal_table[story_ids])[0]
    rule = boundary_gate(features, model.config.plot_clock_signals)
    assert 0 < rule.sum() < rule.numel()
    clock = model.backbone.layers[1].mixer.clock
    u = torch.randn(2, story_ids.shape[1], model.config.d_model, requires_grad=True)
    fused = clock(u, model._clock_inputs(features)[1])
    assert fused[rule > 0].min() > 0.99 and fused[rule == 0].max() < 0.01
    with torch.no_grad():
        clock.proj.weight.normal_(std=0.5)
    fused, ref = clock(u, model._clock_inputs(features)[1]), clock.reference(u, features)
    torch.testing.assert_close(fused, ref)
    params = [u, clock.proj.weight, clock.signal_proj.weight, clock.signal_proj.bias]
    for a, b in zip(torch.autograd.grad(fused.sum(), params), torch.autograd.grad(ref.sum(), params)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", ["plot-clock", "revised-learned-clock"])
def test_clock_stats_open_rate_by_token_type(name, byte_table, story_ids):
    """Guards the plot-clock statistics: open rate per token type and per layer; with the rule it is 1 at
    boundary tokens and 0 elsewhere; the router statistics still cover every track (the memory track too)."""
    model = make_model(tiny(**ABLATIONS[name]), byte_table).eval()
    model.record_stats = True
    with torch.no_grad():
        model(story_ids)
    st = model.stats()
    assert st["clock/tokens"] == 2 * 64 and {f"clock/layer{k}" for k in range(2)} <= set(st)
    assert {"clock/all", "clock/boundary", "clock/non_boundary", "clock/dialogue"} <= set(st)
    if name == "plot-clock":
        assert st["clock/boundary"] == 1.0 and st["clock/non_boundary"] == 0.0
    else:
        assert st["clock/boundary"] > 0.9 and st["clock/non_boundary"] < 0.1
    for track in model.config.track_names:
        assert f"router/all/{track}" in st
    model.reset_stats()
    assert model.stats() == {}


def test_clock_stats_without_router(byte_table, story_ids):
    """Guards the statistics when the router is uniform but the clock is on: clock keys only, no router keys."""
    model = make_model(tiny(router="uniform", plot_clock="signals"), byte_table).eval()
    model.record_stats = True
    with torch.no_grad():
        model(story_ids)
    st = model.stats()
    assert "clock/all" in st and not any(k.startswith("router/") for k in st)


def test_router_usage_plot_covers_the_plot_clock(byte_table, story_ids, tmp_path):
    """Guards router_usage.png with the new mechanisms: router + plot-clock panels for the revised model
    (memory track included), the clock panels alone when the router is uniform, None without statistics."""
    from mamba_lm.report import plot_router_usage

    def rows_of(name):
        model = make_model(tiny(**ABLATIONS[name]), byte_table).eval()
        model.record_stats = True
        rows = []
        for step in (2, 4):
            with torch.no_grad():
                model(story_ids)
            rows.append({"step": step, **model.stats()})
            model.reset_stats()
        return rows, model.config.track_names

    for name, overrides in (("revised-learned-clock", {}), ("uniform-clock", None)):
        if overrides is None:
            model = make_model(tiny(router="uniform", plot_clock="signals"), byte_table).eval()
            model.record_stats = True
            with torch.no_grad():
                model(story_ids)
            rows, names = [{"step": 1, **model.stats()}], model.config.track_names
            assert not any(k.startswith("router/") for k in rows[0])
        else:
            rows, names = rows_of(name)
        png = plot_router_usage(rows, tmp_path / f"{name}.png", names, TOKEN_TYPES)
        assert png is not None and open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert plot_router_usage([{"step": 1}], tmp_path / "none.png", ("a",), TOKEN_TYPES) is None


def reference_mixer(mixer, u, features, gate_rule):
    """TripleTrackMixer's forward written token-major from the slow twins (the obviously correct form):
    in_proj, the explicit-sum causal conv, per-track Δ = softplus(dt_proj(.) + bias) (clamped, the plot
    track's times the clock gate g: the rule's, or σ(w_s·s + w_u·u + b) via LearnedPlotClock.reference),
    the sequential selective_scan_ref over the scan channels, the per-step gated delta rule for the
    memory track, the token-major cross-track attention and router, out_proj. u (B, L, D) -> (B, L, D)."""
    from mamba_lm import ops
    from multitrack.delta_rule import gated_delta_rule_ref

    m = mixer
    ds, dt_, g = m.d_scan, m.d_track, m.tracks
    x, z = F.linear(u, m.in_proj.weight, m.in_proj.bias).chunk(2, dim=-1)        # (B, L, Di) each
    x = ops.causal_conv1d_ref(x.transpose(1, 2), m.conv1d.weight.squeeze(1), m.conv1d.bias,
                              activation="silu").transpose(1, 2)
    dt, B, C = m._split_bc(F.linear(x, m.x_proj.weight))                         # token-major
    delta = F.softplus(F.linear(dt, m.dt_proj.weight, m.dt_proj.bias))          # (B, L, Ds)
    if m.clamp:
        delta = torch.minimum(torch.maximum(delta, m.dt_lo), m.dt_hi)
    if m.clock_mode != "off":
        gate = gate_rule if m.clock is None else m.clock.reference(u, features)    # (B, L)
        plot = torch.zeros(ds, dtype=torch.bool)
        plot[ds - dt_:] = True
        delta = torch.where(plot, delta * gate[..., None], delta)
    bc = (lambda t: t.permute(0, 2, 3, 1)) if m.groups else (lambda t: t.transpose(1, 2))  # (B, G', N, L)
    y = ops.selective_scan_ref(x[..., :ds].transpose(1, 2), delta.transpose(1, 2), -torch.exp(m.A_log),
                               bc(B), bc(C), m.D, z=z[..., :ds].transpose(1, 2)).transpose(1, 2)  # (B, L, Ds)
    if m.memory is not None:
        q, k, v, lg, beta = m.memory._inputs(x[..., ds:])
        o, _ = gated_delta_rule_ref(q, k, v, lg, beta)
        y_mem = m.memory._output(o, z[..., ds:])                                 # (B, L, d_track)
        cut = m.memory_track * dt_
        y = torch.cat([y[..., :cut], y_mem, y[..., cut:]], dim=-1)
    if g > 1:
        yt = y.unflatten(-1, (g, dt_))                                           # (B, L, G, d_track)
        if m.cross is not None:
            yt = m.cross(yt)
        if m.router is not None:
            yt = yt * (g * m.router(u, features)).unsqueeze(-1)
        y = yt.flatten(-2)
    return F.linear(y, m.out_proj.weight, m.out_proj.bias)


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_mixer_forward_equals_token_major_reference(name):
    """Guards the whole channels-first fast path of the mixer for every variant (one grouped chunked scan
    on channel views, Δ gated before the kernel, the chunked delta rule on the memory channels, one cat
    back to track order, the channels-first mixing) against the token-major reference built from the
    slow twins: outputs and the gradients of the input and of every parameter (odd length; float64
    parameters, but both scans compute in float32, hence float32 tolerances)."""
    torch.manual_seed(0)
    cfg = tiny(**ABLATIONS[name])
    mixer = MultiTrackLM(cfg).backbone.layers[1].mixer.double()
    with torch.no_grad():                            # trained-like: every zero-initialised part perturbed
        for p_name, p in mixer.named_parameters():
            if p_name.startswith(("cross.out", "router.", "clock.proj")):
                p.normal_(std=0.3)
    b, l = 2, 13
    u = torch.randn(b, l, cfg.d_model, dtype=torch.float64, requires_grad=True)
    features = (torch.rand(b, l, N_FEATURES) < 0.3).double()
    gate_rule = None
    if cfg.use_plot_clock:
        from multitrack.plot_clock import boundary_gate
        gate_rule = boundary_gate(features, cfg.plot_clock_signals)
        assert 0 < gate_rule.sum() < gate_rule.numel()
    router = mixer.router
    signal = (F.linear(features, router.signal_proj.weight, router.proj.bias)
              if router is not None and router.signal_proj is not None else None)
    clock = None
    if cfg.use_plot_clock:
        clock = gate_rule if mixer.clock is None else mixer.clock.signal_proj(features)[..., 0]
    out, _, _ = mixer(u, signal, clock=clock)
    ref = reference_mixer(mixer, u, features, gate_rule)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    params = [p for _, p in mixer.named_parameters()]
    probe = torch.randn_like(out)
    g_out = torch.autograd.grad((out * probe).sum(), [u] + params, allow_unused=True)
    g_ref = torch.autograd.grad((ref * probe).sum(), [u] + params, allow_unused=True)
    for (p_name, _), a, c in zip([("u", u)] + list(mixer.named_parameters()), g_out, g_ref):
        assert a is not None and c is not None, p_name
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5, msg=p_name)
        assert c.abs().sum() > 0, f"no gradient reaches {p_name}"
