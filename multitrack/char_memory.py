"""The character track as a content-addressable memory: a gated delta rule over the track's channels.

Characters are recall: a name, a trait, a place bound to a person thousands of tokens earlier.
Zoology (arXiv 2312.04927) traces 82% of the attention-vs-recurrent quality gap to associative
recall; the gated delta rule (Gated DeltaNet, arXiv 2412.06464) gives a recurrent layer a key-value
memory with constant state. Here it replaces the selective scan of the character track only:

    x (B, d_track, L)  the track's channels after the shared conv + SiLU (its input, as the scan's u)
    [q, k, a, b] = x W                       W: (d_track, 2 H d_k + 2 H), per head h = 1..H
    q, k <- q / |q|, k / |k|                 L2-normalised per head (as Gated DeltaNet)
    v = x split into H heads of d_v = d_track / H     (the channels themselves, no projection)
    α = exp(g), g = -exp(A_log) softplus(a + Δ_bias)   decay per head (Mamba-2 style; A = 1 and
                                                       Δ_bias log-uniform in the track's Δ range at
                                                       init, so the memory starts at the character
                                                       track's 100-1,000-token timescale)
    β = σ(b)                                  write strength
    o = gated delta rule (multitrack/delta_rule.py), S_t = α_t S_{t-1}(I - β_t k_t k_tᵀ) + β_t v_t k_tᵀ
    y = RMSNorm_head(o) * w * silu(z)         gated output norm (GDN's o_norm; z is the mixer's gate)

State per sequence and layer: (H, d_k, d_v) float32, carried in the generation cache (`step`).
Parameters: d_track (2 H d_k + 2 H) + 2 H + d_track.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from multitrack import delta_rule


class CharacterMemory(nn.Module):
    """forward: x, z (B, d_track, L) channels-first -> y (B, d_track, L); step: (B, d_track) -> (B, d_track)."""

    def __init__(self, d_track: int, n_heads: int, head_dim: int, dt_range: tuple[float, float],
                 eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.n_heads, self.head_dim, self.v_dim, self.eps = n_heads, head_dim, d_track // n_heads, eps
        self.proj = nn.Linear(d_track, 2 * n_heads * head_dim + 2 * n_heads, bias=False, device=device, dtype=dtype)
        self.A_log = nn.Parameter(torch.zeros(n_heads, device=device))                   # A = 1, fp32
        lo, hi = dt_range
        dt = torch.exp(torch.linspace(math.log(lo), math.log(hi), n_heads, device=device))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))                   # softplus^-1(Δ0)
        self.norm_weight = nn.Parameter(torch.ones(d_track, device=device, dtype=dtype))
        for p in (self.A_log, self.dt_bias, self.norm_weight):
            p._no_weight_decay = True
        delta_rule.log_kernel_once()

    def state_shape(self) -> tuple[int, int, int]:
        """(H, d_k, d_v): the memory of one sequence."""
        return self.n_heads, self.head_dim, self.v_dim

    def _inputs(self, x: torch.Tensor):
        """x (..., d_track) token-major -> q, k (..., H, d_k) unit norm, v (..., H, d_v), g, β (..., H)."""
        h, dk = self.n_heads, self.head_dim
        q, k, a, b = self.proj(x).split([h * dk, h * dk, h, h], dim=-1)
        q = F.normalize(q.unflatten(-1, (h, dk)).float(), dim=-1)
        k = F.normalize(k.unflatten(-1, (h, dk)).float(), dim=-1)
        g = -torch.exp(self.A_log.float()) * F.softplus(a.float() + self.dt_bias.float())
        return q, k, x.unflatten(-1, (h, self.v_dim)), g, torch.sigmoid(b.float())

    def _output(self, o: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """o (..., H, d_v), z (..., d_track) -> RMSNorm per head * w * silu(z): (..., d_track) in z's dtype."""
        o = F.rms_norm(o.float(), (self.v_dim,), eps=self.eps).flatten(-2) * self.norm_weight.float()
        return (o * F.silu(z.float())).to(z.dtype)

    def forward(self, x: torch.Tensor, z: torch.Tensor, state: torch.Tensor | None = None,
                return_final_state: bool = False):
        """x, z: (B, d_track, L); state (B, H, d_k, d_v) float32 | None: start from it and leave the final one
        there (in place), or, with return_final_state, return (y, final state) and leave `state` as it was
        (the model's cache stores it: under autograd the old state may be saved for backward)."""
        q, k, v, g, beta = self._inputs(x.transpose(1, 2))                           # (B, L, H, ·)
        o, last = delta_rule.gated_delta_rule(q, k, v, g, beta, initial_state=state,
                                              output_final_state=state is not None or return_final_state)
        y = self._output(o, z.transpose(1, 2)).transpose(1, 2)                        # (B, d_track, L)
        if return_final_state:
            return y, last
        if state is not None:
            state.copy_(last)
        return y

    def step(self, x: torch.Tensor, z: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """One token: x, z (B, d_track); state (B, H, d_k, d_v) updated in place -> y (B, d_track)."""
        q, k, v, g, beta = self._inputs(x)
        return self._output(delta_rule.gated_delta_rule_step(q, k, v, g, beta, state), z)
