"""The plot clock: the plot track's state decays and is written only at narrative boundaries.

A selective SSM channel with step Δ_t updates h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t. Multiplying
the plot track's Δ by a boundary gate g_t in [0, 1] before the scan,

    Δ_t(plot) = g_t softplus(dt_proj(x_t) + Δ_bias)        (g_t = 0: exp(0 A) = 1, nothing written)

holds its state unchanged between boundaries, so a chapter of ~2,400 tokens becomes ~50 state
updates (one per paragraph) instead of 2,400 decays; the track still reads its state through C_t at
every token. This is the coarse clock of the Block-Recurrent Transformer (state updated once per
block; arXiv 2203.07852) and of SpaceByte's boundary-triggered global blocks (arXiv 2404.14408),
clocked on the text's own boundaries. Two gates:

    "signals"  g_t = 1 if any of the configured narrative features (paragraph_break, heading,
               scene_mark, ...; multitrack/narrative.py) is on at t, else 0. No parameters.
    "learned"  g_t = σ(w_s · s_t + w_u · u_t + b) per layer, s_t the narrative features, u_t the
               block input; initialised at the rule: w_s = 2 m on the configured features, b = -m,
               w_u = 0, so g ≈ σ(m) at a boundary and σ(-m) elsewhere (m = INIT_MARGIN).

Δ, gate included, is computed before the kernel (softplus first), so the whole mixer stays one
grouped selective-scan call and the decode step (`selective_state_update` with dt_softplus off) is
the same arithmetic (multitrack/triple_track.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from multitrack.narrative import FEATURE_NAMES

INIT_MARGIN = 5.0     # learned gate at init: σ(5) = 0.993 at a boundary, σ(-5) = 0.007 elsewhere


def feature_index(signals: tuple[str, ...]) -> list[int]:
    """Columns of the narrative features (FEATURE_NAMES) that open the clock."""
    return [FEATURE_NAMES.index(name) for name in signals]


def boundary_gate(features: torch.Tensor, signals: tuple[str, ...]) -> torch.Tensor:
    """The rule: features (..., F) 0/1 -> g (...,) float, 1 where any configured feature is on."""
    return features[..., feature_index(signals)].amax(-1)


class LearnedPlotClock(nn.Module):
    """g = σ(w_s · s + w_u · u + b): u (..., D), s (..., F) -> (...,) float32, one gate per layer.

    `signal_proj` (w_s, b) of all layers are applied in one matmul by MultiTrackLM (as the routers'
    signal terms); `forward(u, signal_term)` then adds w_u · u. `reference(u, features)` is the
    plain formula (tested equal)."""

    def __init__(self, d_model: int, n_features: int, signals: tuple[str, ...], device=None, dtype=None):
        super().__init__()
        self.proj = nn.Linear(d_model, 1, bias=False, device=device, dtype=dtype)            # w_u
        self.signal_proj = nn.Linear(n_features, 1, bias=True, device=device, dtype=dtype)  # w_s, b
        with torch.no_grad():
            self.proj.weight.zero_()
            self.signal_proj.weight.zero_()
            self.signal_proj.weight[0, feature_index(signals)] = 2 * INIT_MARGIN
            self.signal_proj.bias.fill_(-INIT_MARGIN)
        for p in (self.signal_proj.weight, self.signal_proj.bias):
            p._no_reinit = True                   # init_lm_weights zeroes Linear biases: keep the rule

    def forward(self, u: torch.Tensor, signal_term: torch.Tensor) -> torch.Tensor:
        """u: (..., D), signal_term (...,) = w_s · s + b -> g (...,) float32."""
        logit = signal_term.float() + (u @ self.proj.weight[0]).float()
        return torch.sigmoid(logit)

    def reference(self, u: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.signal_proj(features.to(self.proj.weight.dtype))[..., 0].float()
                             + self.proj(u)[..., 0].float())
