"""Cross-track attention: at each position, every track reads the other tracks' outputs.

Per token the G track outputs y_g (d_track channels each) are G "tokens"; a tiny multi-head attention
runs over them (a G x G score matrix per head, G = 3), so the cost is linear in sequence length, there
is no L x L attention, and the recurrent step is the same computation on one position (no cache).

    ŷ_g   = y_g / rms(y_g)                                        parameter-free, keeps logits O(1)
    q_g, k_g, v_g = ŷ_g W_qkv[g]                                  W_qkv[g]: (d_track, 3 H dh), per track
    a_gj  = softmax_j(q_g . k_j / sqrt(dh))   per head            (..., H, G, G)
    y_g  <- y_g + (sum_j a_gj v_j) W_o[g]                         W_o[g]: (H dh, d_track), zero at init

Per-track projections (block-diagonal over tracks) give each track its own identity, so no track
embedding is needed; the zero-initialised output makes the module the identity at initialisation.
Parameters: 4 d_inner H dh. The value path goes through H dh << d_track dimensions: tracks exchange
a summary, they do not copy each other's channels.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class CrossTrackAttention(nn.Module):
    """y: (..., G, d_track) -> (..., G, d_track), attention across the G axis only."""

    def __init__(self, n_tracks: int, d_track: int, n_heads: int, head_dim: int, eps: float = 1e-5,
                 device=None, dtype=None):
        super().__init__()
        self.n_tracks, self.n_heads, self.head_dim, self.eps = n_tracks, n_heads, head_dim, eps
        self.scale = 1.0 / math.sqrt(head_dim)
        inner = n_heads * head_dim
        self.qkv = nn.Parameter(torch.empty(n_tracks, d_track, 3 * inner, device=device, dtype=dtype))
        self.out = nn.Parameter(torch.zeros(n_tracks, inner, d_track, device=device, dtype=dtype))
        nn.init.normal_(self.qkv, std=d_track ** -0.5)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """y: (..., G, d_track) -> same shape; y + cross-track read.

        Written with broadcast products over the tiny G x G axis instead of batched matmuls: the same
        math with about half the kernel launches, which is what a one-token decode step pays for.
        """
        h, dh = self.n_heads, self.head_dim
        yn = F.rms_norm(y, (y.shape[-1],), eps=self.eps)                       # parameter-free RMS norm
        qkv = torch.einsum("...gc,gcf->...gf", yn, self.qkv)                    # (..., G, 3 H dh)
        q, k, v = qkv.unflatten(-1, (3, h, dh)).unbind(-3)                     # (..., G, H, dh) each
        scores = (q.unsqueeze(-3) * k.unsqueeze(-4)).sum(-1) * self.scale     # (..., G_query, G_key, H)
        attn = torch.softmax(scores, dim=-2)                                   # over the key tracks
        read = (attn.unsqueeze(-1) * v.unsqueeze(-4)).sum(-3)                  # (..., G, H, dh)
        return y + torch.einsum("...gf,gfc->...gc", read.flatten(-2), self.out)

    def step(self, y: torch.Tensor) -> torch.Tensor:
        """One position per sequence (the decode step): y (B, G, d_track) -> same; equals forward (tested).

        The G x G attention is one fused `scaled_dot_product_attention` call instead of six broadcast
        ops: fewer kernels per generated token. (forward keeps the broadcast form, whose backward is
        plain autograd on every device.)
        """
        h, dh = self.n_heads, self.head_dim
        yn = F.rms_norm(y, (y.shape[-1],), eps=self.eps)
        qkv = torch.einsum("bgc,gcf->bgf", yn, self.qkv)                       # (B, G, 3 H dh)
        q, k, v = qkv.unflatten(-1, (3, h, dh)).permute(2, 0, 3, 1, 4)        # (3, B, H, G, dh)
        read = F.scaled_dot_product_attention(q, k, v, scale=self.scale)       # (B, H, G, dh)
        read = read.transpose(1, 2).flatten(-2)                                # (B, G, H dh)
        return y + torch.einsum("bgf,gfc->bgc", read, self.out)
