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

Three forms of the same computation (tested equal, outputs and gradients):
    forward(y)                 y (..., G, d_track), token-major: the reference, obviously the formulas above
    forward_channels_first(y)  y (B, G, d_track, L), the selective scan's own layout: the training path.
                               No transposed copies of the (B, L, d_inner) activations, forward or backward,
                               and the RMS scale is applied to the small q/k/v instead of to y
    step(y)                    y (B, G, d_track), one position: one fused SDPA call (the decode step)
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

    def forward_channels_first(self, y: torch.Tensor) -> torch.Tensor:
        """y: (B, G, d_track, L), the scan output viewed per track -> same shape; equals forward (tested).

        The layout of the selective scan (channels first) throughout: the per-track projections are
        batched matmuls W[g]ᵀ y[b, g] over (d_track, L) blocks, the G x G attention runs on (B, G, H, dh, L)
        tensors, and the result is added to y in place of layout. RMS-normalising y and then projecting
        equals projecting y and scaling the 3 H dh outputs by 1 / rms(y_g) (a per-position scalar), so the
        normalised copy of y is never formed.
        """
        b, g, c, l = y.shape
        h, dh = self.n_heads, self.head_dim
        acc = torch.promote_types(y.dtype, torch.float32)                          # bf16 y: summed in fp32
        sumsq = torch.linalg.vector_norm(y, dim=2, keepdim=True, dtype=acc).square()   # (B, G, 1, L)
        rstd = torch.rsqrt(sumsq / c + self.eps)
        qkv = torch.matmul(self.qkv.transpose(1, 2).to(y.dtype), y)                 # (B, G, 3 H dh, L)
        qkv = qkv * rstd.to(qkv.dtype)
        q, k, v = qkv.reshape(b, g, 3, h, dh, l).unbind(2)                         # (B, G, H, dh, L) each
        scores = (q.unsqueeze(2) * k.unsqueeze(1)).sum(-2) * self.scale           # (B, G_query, G_key, H, L)
        attn = torch.softmax(scores, dim=2)                                        # over the key tracks
        read = (attn.unsqueeze(-2) * v.unsqueeze(1)).sum(2)                        # (B, G, H, dh, L)
        return y + torch.matmul(self.out.transpose(1, 2).to(y.dtype), read.reshape(b, g, h * dh, l))

    def step(self, y: torch.Tensor) -> torch.Tensor:
        """One position per sequence (the decode step): y (B, G, d_track) -> same; equals forward (tested).

        The G x G attention is one fused `scaled_dot_product_attention` call instead of six broadcast
        ops, and the per-track projections are batched matmuls over the track axis (G, B, .), the output
        one and the residual add a single baddbmm: fewer kernels per generated token (half the CPU time
        of the einsum form). (forward keeps the broadcast form, whose backward is plain autograd on
        every device.)
        """
        b, g, _ = y.shape
        h, dh = self.n_heads, self.head_dim
        yn = F.rms_norm(y, (y.shape[-1],), eps=self.eps)
        qkv = torch.matmul(yn.transpose(0, 1), self.qkv)                        # (G, B, 3 H dh)
        q, k, v = qkv.unflatten(-1, (3, h, dh)).permute(2, 1, 3, 0, 4)         # (3, B, H, G, dh)
        read = F.scaled_dot_product_attention(q, k, v, scale=self.scale)       # (B, H, G, dh)
        read = read.permute(2, 0, 1, 3).reshape(g, b, h * dh)                  # (G, B, H dh)
        return torch.baddbmm(y.transpose(0, 1), read, self.out).transpose(0, 1)   # y + read W_out, (B, G, c)
