"""The triple-track selective-SSM mixer and its block wrapper.

Three selective SSMs ("tracks": scene, character, plot) see the same input and keep state at
different timescales. They are one Mamba mixer whose d_inner channels are split into G groups:

    u (B, L, D) --in_proj--> x, z (B, Di, L)          shared, as Mamba
    x --causal conv1d + SiLU--> x                      shared depthwise conv
    x --x_proj--> Δ_low (R), B_g, C_g (N each, g = 1..G)  per-track input-dependent B, C
    Δ = dt_proj(Δ_low) + Δ_bias                        Δ_bias of track g initialised in its own range
    y = selective_scan(x, Δ, A, B, C, D, z)           ONE call, B/C of shape (B, G, N, L): channel c
                                                       of track g = c // d_track uses B_g, C_g
    y (B, G, d_track, L) --cross-track attention-->    tracks read each other (multitrack/cross_track.py),
                                                       in the scan's layout: no transposed copies
    y_g *= G w_g                                       narrative router weights (multitrack/router.py)
    out = out_proj(y)                                  (B, L, D)

Track g's channels have Δ initialised log-uniform in [dt_min_g, dt_max_g]; the slowest state of a
channel (A_1 = -1) forgets with time constant 1/Δ tokens, the fastest (A_N = -N) with 1/(N Δ). With
one track (the ablation) B and C are shared (B, N, L) exactly as in Mamba and the Δ range spans all
tracks' ranges.

Two optional mechanisms give the slow tracks a job of their own (research_plan.md):

    plot clock (`plot_clock`)     the plot track's Δ is multiplied by a boundary gate g_t before the
                                  scan (multitrack/plot_clock.py): Δ = softplus(...) computed here,
                                  the kernel gets delta_softplus=False, still one grouped scan call
    character memory (`char_memory`)  the character track runs a gated delta rule
                                  (multitrack/char_memory.py) instead of the scan. Its channels are
                                  placed last in x and z ("scan channels first"): the scan reads the
                                  first Ds = Di - d_track channels as views, the memory the rest, and
                                  one cat puts the outputs back in track order for the mixing

Notation as mamba_lm/mamba.py: D = d_model, Di = d_inner, N = d_state, R = dt_rank, G = tracks,
G' = B/C groups of the scan (G, or G - 1 with the memory), Ds = scan channels (Di, or Di - d_track).
Parameter names follow mamba-ssm's mixer (in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj) plus
`router.*`, `cross.*`, `memory.*` and `clock.*`.
"""

from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

from mamba_lm import ops
from mamba_lm.mamba import ssm_A
from multitrack.char_memory import CharacterMemory
from multitrack.cross_track import CrossTrackAttention
from multitrack.multitrack_config import MultiTrackConfig
from multitrack.narrative import N_FEATURES
from multitrack.plot_clock import LearnedPlotClock
from multitrack.router import NarrativeRouter


class TripleTrackMixer(nn.Module):
    """Multi-track selective SSM mixer. forward: (B, L, D) -> ((B, L, D), router weights (B, L, G) | None,
    plot-clock gate (B, L) | None)."""

    def __init__(self, config: MultiTrackConfig, layer_idx: int, device=None, dtype=None):
        super().__init__()
        c = config
        kw = {"device": device, "dtype": dtype}
        self.layer_idx = layer_idx
        self.tracks, self.d_track = c.tracks, c.d_track
        self.d_inner, self.d_state, self.d_conv, self.dt_rank = c.d_inner, c.d_state, c.d_conv, c.dt_rank
        self.d_scan = c.d_scan                                   # Ds: channels of the selective scan
        # B/C groups of the scan (0: shared as (B, N, L), like Mamba, with one track)
        self.groups = len(c.scan_tracks) if c.tracks > 1 else 0
        n_bc = max(1, self.groups) * c.d_state
        self.in_proj = nn.Linear(c.d_model, 2 * c.d_inner, bias=c.bias, **kw)
        self.conv1d = nn.Conv1d(c.d_inner, c.d_inner, kernel_size=c.d_conv, groups=c.d_inner,
                                padding=c.d_conv - 1, bias=c.conv_bias, **kw)
        self.x_proj = nn.Linear(c.d_inner, c.dt_rank + 2 * n_bc, bias=False, **kw)
        self.dt_proj = nn.Linear(c.dt_rank, self.d_scan, bias=True, **kw)
        self.out_proj = nn.Linear(c.d_inner, c.d_model, bias=c.bias, **kw)
        A = torch.arange(1, c.d_state + 1, dtype=torch.float32, device=device).repeat(self.d_scan, 1)
        self.A_log = nn.Parameter(torch.log(A))                                  # (Ds, N), fp32, S4D-real
        self.D = nn.Parameter(torch.ones(self.d_scan, device=device))            # (Ds,), fp32
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True
        self.router = (NarrativeRouter(c.d_model, c.tracks, N_FEATURES, learned=True,
                                       use_signals=c.use_signals, **kw) if c.use_router else None)
        self.cross = (CrossTrackAttention(c.tracks, c.d_track, c.cross_heads, c.cross_head_dim,
                                          eps=c.norm_epsilon, **kw) if c.use_cross else None)
        self.memory_track = c.memory_track if c.use_char_memory else None
        self.memory = (CharacterMemory(c.d_track, c.mem_heads, c.mem_head_dim, c.dt_ranges[c.memory_track],
                                       eps=c.norm_epsilon, **kw) if c.use_char_memory else None)
        self.clock_mode = c.plot_clock if c.use_plot_clock else "off"           # plot track = last scan group
        self.clock = (LearnedPlotClock(c.d_model, N_FEATURES, c.plot_clock_signals, **kw)
                      if self.clock_mode == "learned" else None)
        lo, hi = self._track_dt_bounds(c, device)
        self._init_dt(c, lo, hi)
        self.clamp = c.dt_clamp_factor > 0
        # not persistent: derived from the config, so checkpoints stay strict-loadable
        self.register_buffer("dt_zero_bias", torch.zeros_like(lo), persistent=False)
        if self.clamp:
            f = c.dt_clamp_factor
            self.register_buffer("dt_lo", lo / f, persistent=False)
            self.register_buffer("dt_hi", hi * f, persistent=False)

    def _track_dt_bounds(self, c: MultiTrackConfig, device):
        """Per-channel (Ds,) Δ range of the scan channel's track (a clocked plot track: per boundary)."""
        ranges = [c.dt_ranges[g] for g in c.scan_tracks] if c.tracks > 1 else c.dt_ranges
        per = self.d_scan // len(ranges)
        lo = torch.tensor([r[0] for r in ranges], device=device).repeat_interleave(per)
        hi = torch.tensor([r[1] for r in ranges], device=device).repeat_interleave(per)
        return lo, hi

    @torch.no_grad()
    def _init_dt(self, c: MultiTrackConfig, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """mamba-ssm's Δ init per track: weight U(-R^-0.5, R^-0.5); bias = softplus^-1(Δ0), Δ0 log-uniform
        in the channel's track range [lo, hi]."""
        std = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        r = torch.rand(self.d_scan, device=lo.device)
        dt = torch.exp(r * (torch.log(hi) - torch.log(lo)) + torch.log(lo)).clamp(min=c.dt_init_floor)
        inv_dt = dt + torch.log(-torch.expm1(-dt))                               # inverse of softplus
        self.dt_proj.bias.copy_(inv_dt)
        self.dt_proj.bias._no_reinit = True

    # ------------------------------------------------------------------------------------------
    def _clock_gate(self, u: torch.Tensor, clock: torch.Tensor | None) -> torch.Tensor | None:
        """The plot-clock gate g: u (B, [L,] D), clock (B, [L]) = the rule's gate ("signals") or this
        layer's signal term w_s s + b ("learned", computed for all layers by MultiTrackLM) -> (B, [L]) | None."""
        if self.clock_mode == "off":
            return None
        return clock.float() if self.clock is None else self.clock(u, clock)

    def _to_track_order(self, y_scan: torch.Tensor, y_memory: torch.Tensor | None) -> torch.Tensor:
        """Scan output (B, Ds, ...) and memory output (B, d_track, ...) -> (B, Di, ...) in track order."""
        if y_memory is None:
            return y_scan
        cut = self.memory_track * self.d_track
        return torch.cat([y_scan[:, :cut], y_memory, y_scan[:, cut:]], dim=1)

    def _split_bc(self, x_dbl: torch.Tensor):
        """x_dbl: (..., R + 2 G' N) -> Δ_low (..., R), B, C (..., G, N) or (..., N) with one track."""
        n_bc = max(1, self.groups) * self.d_state
        dt, B, C = torch.split(x_dbl, [self.dt_rank, n_bc, n_bc], dim=-1)
        if self.groups:
            B = B.unflatten(-1, (self.groups, self.d_state))
            C = C.unflatten(-1, (self.groups, self.d_state))
        return dt, B, C

    def _delta(self, dt: torch.Tensor, gate: torch.Tensor | None = None, biased: bool = False):
        """Δ (before the kernel) and the kernel's (delta_bias, delta_softplus). dt: (B, Ds, L) or (B, Ds)
        (channels on dim 1); gate: the plot clock's g, (B, L) or (B,), or None; biased: dt already holds
        the bias (the fp32 decode step's dt_proj; the kernel's delta_bias is then None).

        Without clamp or clock the kernel adds the bias and applies softplus. Otherwise Δ is final here:
        softplus(dt + bias), clamped to the track ranges (dt_clamp_factor), the plot track's channels
        (the last scan group) multiplied by g. The final Δ goes back to dt's dtype: mamba-ssm's
        selective_scan_cuda requires Δ in u's dtype (TORCH_CHECK(delta.scalar_type() == input_type);
        bf16 under autocast). Its bias is a zero vector, not None: the Triton selective_state_update of
        mamba-ssm 2.3.2 unpacks dt_bias.stride() and fails on None.
        """
        if not self.clamp and gate is None:
            return dt, None if biased else self.dt_proj.bias.float(), True
        shape = [1] * dt.dim()
        shape[1] = -1
        delta = F.softplus(dt if biased else dt.float() + self.dt_proj.bias.float().view(shape))
        if self.clamp:
            delta = torch.minimum(torch.maximum(delta, self.dt_lo.view(shape)), self.dt_hi.view(shape))
        if gate is not None:                     # scale (B, G', 1, ...): 1 for the other tracks, g for plot
            groups = max(1, self.groups)
            scale = torch.cat([gate.new_ones(gate.shape[0], groups - 1, *gate.shape[1:]), gate.unsqueeze(1)], 1)
            delta = (delta.unflatten(1, (groups, self.d_track)) * scale.unsqueeze(2)).flatten(1, 2)
        return (delta if delta.dtype == dt.dtype else delta.to(dt.dtype)), None if biased else self.dt_zero_bias.float(), False

    def _mix_tracks(self, y: torch.Tensor, u: torch.Tensor, signal_logits: torch.Tensor | None):
        """The decode step's mixing: y (B, Di) scan output, u (B, D) block input, signal_logits (B, G) |
        None -> (mixed y (B, Di), weights (B, G) | None). The cross-track attention's fused one-position path."""
        if self.tracks == 1:
            return y, None
        y = y.unflatten(-1, (self.tracks, self.d_track))                        # (B, G, d_track)
        if self.cross is not None:
            y = self.cross.step(y)
        weights = None
        if self.router is not None:
            weights = self.router(u, None, signal_logits)                        # (B, G) float32
            scale = self.tracks * weights
            y = y * (scale if scale.dtype == y.dtype else scale.to(y.dtype)).unsqueeze(-1)
        return y.flatten(-2), weights

    def _mix_tracks_channels_first(self, y: torch.Tensor, u: torch.Tensor, signal_logits: torch.Tensor | None):
        """The parallel forward's mixing, in the scan's layout: y (B, Di, L) scan output, u (B, L, D) block
        input, signal_logits (B, L, G) | None (this layer's W_s s + b, computed for all layers at once by
        MultiTrackLM.forward) -> (mixed y (B, Di, L), weights (B, L, G) | None).

        Token-major (y as (B, L, G, d_track)) the same math costs strided copies of the (B, L, Di)
        activations in forward and backward; here y stays (B, G, d_track, L) and the router weights are
        broadcast along d_track. Equal to the token-major reference (tested)."""
        if self.tracks == 1:
            return y, None
        b, _, l = y.shape
        y = y.reshape(b, self.tracks, self.d_track, l)                           # (B, G, d_track, L), a view
        if self.cross is not None:
            y = self.cross.forward_channels_first(y)
        weights = None
        if self.router is not None:
            weights = self.router(u, None, signal_logits)                        # (B, L, G) float32
            y = y * (self.tracks * weights).to(y.dtype).transpose(1, 2).unsqueeze(2)   # (B, G, 1, L)
        return y.reshape(b, self.d_inner, l), weights

    def _conv(self, x: torch.Tensor, conv_state: torch.Tensor | None):
        """Causal depthwise conv + SiLU. x: (B, Di, L); conv_state (B, Di, d_conv) | None -> (out (B, Di, L),
        the new conv state (the last d_conv inputs) | None)."""
        weight = self.conv1d.weight.squeeze(1)                                   # (Di, d_conv)
        if conv_state is None:
            return ops.causal_conv1d(x, weight, self.conv1d.bias, activation="silu"), None
        out = ops.causal_conv1d(x, weight, self.conv1d.bias, activation="silu",
                                initial_states=conv_state[:, :, 1:])
        history = torch.cat([conv_state, x.to(conv_state.dtype)], dim=2)
        return out, history[:, :, history.shape[2] - self.d_conv:]

    def forward(self, u: torch.Tensor, signal_logits: torch.Tensor | None = None, cache=None,
                clock: torch.Tensor | None = None):
        """u: (B, L, D), signal_logits (B, L, G) | None (this layer's router term W_s s + b), clock (B, L) |
        None (the plot clock's input, see `_clock_gate`) -> (out (B, L, D), weights (B, L, G) | None,
        gate (B, L) | None).

        With a cache (multitrack_model.MultiTrackCache): start from the layer's state and leave the final one.
        """
        A = -torch.exp(self.A_log.float())                                       # (Ds, N)
        x, z = ops.linear_channels_first(u, self.in_proj.weight, self.in_proj.bias).chunk(2, dim=1)  # (B, Di, L)
        x, new_conv_state = self._conv(x, None if cache is None else cache.conv_states[self.layer_idx])
        x_dbl = self.x_proj(x.transpose(1, 2))                                   # (B, L, R + 2 G' N)
        dt, B, C = self._split_bc(x_dbl)
        dt = ops.linear_channels_first(dt, self.dt_proj.weight)                  # (B, Ds, L), bias later
        B = B.movedim(1, -1).contiguous()                                        # (B, G', N, L) or (B, N, L)
        C = C.movedim(1, -1).contiguous()
        gate = self._clock_gate(u, clock)
        delta, delta_bias, softplus = self._delta(dt, gate)
        ssm_state = None if cache is None else cache.ssm_states[self.layer_idx]
        xs, zs = (x, z) if self.memory is None else (x[:, :self.d_scan], z[:, :self.d_scan])   # views
        y = ops.selective_scan(xs, delta, A, B, C, self.D.float(), z=zs, delta_bias=delta_bias,
                               delta_softplus=softplus, return_last_state=cache is not None,
                               initial_state=ssm_state,
                               last_state_grad=None if cache is None or cache.state_grad else False)
        if cache is not None:
            y, last_state = y
            cache.set_layer_state(self.layer_idx, new_conv_state, last_state)
        y_memory = None
        if self.memory is not None and cache is None:
            y_memory = self.memory(x[:, self.d_scan:], z[:, self.d_scan:])
        elif self.memory is not None:
            y_memory, last_memory = self.memory(x[:, self.d_scan:], z[:, self.d_scan:],
                                                cache.mem_states[self.layer_idx], return_final_state=True)
            cache.set_state("mem_states", self.layer_idx, last_memory)
        y = self._to_track_order(y, y_memory)                                    # (B, Di, L)
        y, weights = self._mix_tracks_channels_first(y, u, signal_logits)
        return self.out_proj(y.transpose(1, 2)), weights, gate

    def step(self, u: torch.Tensor, signal_logits: torch.Tensor | None, cache, clock: torch.Tensor | None = None):
        """One token: u (B, D), signal_logits (B, G) | None (this layer's W_s s + b, computed for all layers
        at once by MultiTrackLM.step), clock (B,) | None -> (out (B, D), weights (B, G) | None, gate (B,) |
        None); updates cache."""
        x, z = ops.linear_step(u, self.in_proj.weight, self.in_proj.bias).chunk(2, dim=-1)   # (B, Di) each
        x = ops.causal_conv1d_update(x, cache.conv_states[self.layer_idx], self.conv1d.weight.squeeze(1),
                                     self.conv1d.bias, activation="silu")
        dt, B, C = self._split_bc(ops.linear_step(x, self.x_proj.weight))       # B, C: (B, G', N) | (B, N)
        biased = dt.dtype == torch.float32                                       # Δ + bias in one addmm (exact in fp32)
        dt = ops.linear_step(dt, self.dt_proj.weight, self.dt_proj.bias if biased else None)   # (B, Ds)
        gate = self._clock_gate(u, clock)
        delta, dt_bias, softplus = self._delta(dt, gate, biased)
        state = cache.ssm_states[self.layer_idx]                                 # (B, Ds, N)
        xs, zs = (x, z) if self.memory is None else (x[:, :self.d_scan], z[:, :self.d_scan])
        # grouped B/C (B, G', N): one update for all scan tracks (on CUDA one Triton launch, G' heads);
        # A = -exp(A_log) kept between tokens (mamba.ssm_A)
        y = ops.selective_state_update(state, xs, delta, ssm_A(self), B, C, self.D, z=zs, dt_bias=dt_bias,
                                       dt_softplus=softplus)
        y_memory = None
        if self.memory is not None:
            y_memory = self.memory.step(x[:, self.d_scan:], z[:, self.d_scan:], cache.mem_states[self.layer_idx])
        y, weights = self._mix_tracks(self._to_track_order(y, y_memory), u, signal_logits)
        return ops.linear_step(y, self.out_proj.weight, self.out_proj.bias), weights, gate


class MultiTrackBlock(nn.Module):
    """Pre-norm residual block (mamba-ssm's Block): residual = x + residual; x = mixer(norm(residual))."""

    def __init__(self, config: MultiTrackConfig, layer_idx: int, device=None, dtype=None):
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = ops.RMSNorm(config.d_model, eps=config.norm_epsilon, device=device, dtype=dtype)
        self.mixer = TripleTrackMixer(config, layer_idx, device=device, dtype=dtype)

    def forward(self, hidden_states, residual=None, signal_logits=None, cache=None, clock=None):
        """hidden_states, residual: (B, L, D) -> (mixer output, new residual, router weights | None,
        plot-clock gate | None)."""
        normed, residual = self.norm(hidden_states, residual=residual, prenorm=True,
                                     residual_in_fp32=self.residual_in_fp32)
        out, weights, gate = self.mixer(normed, signal_logits, cache=cache, clock=clock)
        return out, residual, weights, gate

    def step(self, hidden_states, residual, signal_logits, cache, clock=None):
        """hidden_states, residual: (B, D), signal_logits (B, G) | None, clock (B,) | None -> (mixer output,
        new residual, router weights | None, plot-clock gate | None)."""
        normed, residual = self.norm(hidden_states, residual=residual, prenorm=True,
                                     residual_in_fp32=self.residual_in_fp32)
        out, weights, gate = self.mixer.step(normed, signal_logits, cache, clock)
        return out, residual, weights, gate
