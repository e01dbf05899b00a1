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


def plot_router_usage(rows: list[dict], path, track_names, token_types) -> str | None:
    """PNG of router statistics (rows: MultiTrackLM.stats() dicts, each with a "step").

    Left: mean track weight by token type at the last row, as the difference from uniform mixing
    (1/G), so that small preferences are visible (grouped bars, token share under each group).
    Middle: mean weight of each track over all tokens across training steps. Right: per-layer mean
    weights at the last row. Returns the path, or None when there is nothing to plot.
    """
    by_step = {r["step"]: r for r in rows if "router/tokens" in r}          # a repeated step: keep the last
    rows = [by_step[s] for s in sorted(by_step)]
    if not rows:
        return None
    from mamba_lm.report import pyplot, save_figure

    plt = pyplot()
    if plt is None:
        return None
    from matplotlib.ticker import MaxNLocator

    last = rows[-1]
    n = len(track_names)
    uniform = 1 / n
    types = [t for t in token_types if f"router/{t}/{track_names[0]}" in last]
    colors = [f"C{g}" for g in range(n)]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), dpi=110, gridspec_kw={"width_ratios": [1.6, 1, 1]})
    width = 0.8 / n
    for g, track in enumerate(track_names):
        axes[0].bar([i + (g - (n - 1) / 2) * width for i in range(len(types))],
                    [last[f"router/{t}/{track}"] - uniform for t in types], width=width, label=track,
                    color=colors[g])
    axes[0].axhline(0, color="gray", lw=0.8)
    axes[0].set_xticks(range(len(types)))

    def share(t):
        f = 100 * last.get(f"router/frac/{t}", 0)
        return f"{f:.0f}%" if f >= 10 or f == 0 else f"{f:.1f}%"

    axes[0].set_xticklabels([f"{t.replace('_', chr(10))}\n({share(t)})" for t in types], fontsize=9)
    axes[0].set_ylabel(f"mean router weight - 1/{n} (uniform)")
    axes[0].set_title(f"track usage by token type, step {last['step']} (share of tokens in brackets)", fontsize=10)
    axes[0].legend(fontsize=9, ncol=n, loc="best")
    steps = [r["step"] for r in rows]
    for g, track in enumerate(track_names):
        axes[1].plot(steps, [r[f"router/all/{track}"] for r in rows], marker=".", label=track, color=colors[g])
    axes[1].axhline(uniform, color="gray", lw=0.8, ls="--")
    axes[1].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("mean router weight")
    axes[1].set_title("track usage over training (all tokens)", fontsize=10)
    axes[1].legend(fontsize=9)
    layers = sorted({int(k.split("/")[1][5:]) for k in last if k.startswith("router/layer")})
    for g, track in enumerate(track_names):
        axes[2].plot(layers, [last[f"router/layer{k}/{track}"] for k in layers], marker="o", label=track,
                     color=colors[g])
    axes[2].axhline(uniform, color="gray", lw=0.8, ls="--")
    axes[2].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[2].set_xlabel("layer")
    axes[2].set_ylabel("mean router weight")
    axes[2].set_title(f"track usage by layer, step {last['step']}", fontsize=10)
    axes[2].legend(fontsize=9)
    return str(save_figure(fig, path))
