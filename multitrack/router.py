"""The narrative-aware router: per-token mixing weights over the SSM tracks.

For token t with block input u_t (B, L, D) and narrative features s_t (B, L, F) (multitrack/narrative.py):

    w_t = softmax(W_h u_t + W_s s_t + b)            (B, L, G), sums to 1 over the G tracks

The mixer multiplies track g's output channels by G * w_t[g], so uniform weights are the identity and
the initial model (W_h = W_s = b = 0) is the un-routed multi-track SSM. The router reads out the tracks;
it does not gate what enters their state (that is Δ's job, as in Mamba), so every track keeps its
timescale whatever the router does. Router mode "uniform" (an ablation) has no parameters and
returns w = 1/G.

Load balancing: `balance_loss(w) = G * sum_g (mean_t w_t[g])^2 - 1`, 0 when the tracks are used
equally on average and G - 1 when one track takes everything; per-token routing stays free.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class NarrativeRouter(nn.Module):
    """w = softmax(W_h u + W_s s + b): (B, L, D), (B, L, F) -> (B, L, G) float32."""

    def __init__(self, d_model: int, n_tracks: int, n_features: int, learned: bool = True,
                 use_signals: bool = True, device=None, dtype=None):
        super().__init__()
        self.n_tracks = n_tracks
        self.learned = learned
        self.proj = nn.Linear(d_model, n_tracks, bias=True, device=device, dtype=dtype) if learned else None
        self.signal_proj = (nn.Linear(n_features, n_tracks, bias=False, device=device, dtype=dtype)
                            if learned and use_signals else None)
        if learned:
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)
        if self.signal_proj is not None:
            nn.init.zeros_(self.signal_proj.weight)

    def forward(self, u: torch.Tensor, features: torch.Tensor | None = None,
                signal_logits: torch.Tensor | None = None) -> torch.Tensor:
        """u: (..., D), features: (..., F) or None -> weights (..., G) float32, summing to 1.

        signal_logits (..., G): W_s s + b precomputed by the caller (`MultiTrackLM` does it for all
        layers in one matmul, in forward and in the decode step); the logits are then one addmm.
        """
        if not self.learned:
            return u.new_full((*u.shape[:-1], self.n_tracks), 1.0 / self.n_tracks, dtype=torch.float32)
        if signal_logits is not None:                   # one addmm over all positions
            g = self.n_tracks
            logits = torch.addmm(signal_logits.reshape(-1, g), u.reshape(-1, u.shape[-1]), self.proj.weight.t())
            return torch.softmax(logits.view(*u.shape[:-1], g), dim=-1, dtype=torch.float32)
        logits = self.proj(u)
        if self.signal_proj is not None and features is not None:
            logits = logits + self.signal_proj(features.to(self.signal_proj.weight.dtype))
        return torch.softmax(logits, dim=-1, dtype=torch.float32)


def balance_loss(weights: torch.Tensor) -> torch.Tensor:
    """G * sum_g (mean over tokens of w[..., g])^2 - 1 >= 0. weights: (B, L, G) -> scalar."""
    g = weights.shape[-1]
    mean = weights.reshape(-1, g).mean(0)
    return g * (mean * mean).sum() - 1.0


def mean_balance_loss(weights: torch.Tensor) -> torch.Tensor:
    """Mean over layers of `balance_loss`, in one pass: weights (n_layer, B, L, G) -> scalar.

    Equal to mean_k balance_loss(weights[k]) (tested); a handful of ops for the whole stack instead of
    five per layer (the training step is launch-bound at small batch)."""
    n_layer, g = weights.shape[0], weights.shape[-1]
    mean = weights.reshape(n_layer, -1, g).mean(1)                           # (n_layer, G)
    return g * mean.square().sum() / n_layer - 1.0
