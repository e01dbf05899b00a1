"""Carried state across windows with per-row resets: the model side of stateful (streaming) training.

Each of the B rows of a batch reads its own token stream, window after window (mamba_lm/streams.py);
the recurrent state of every row (SSM and conv states of every layer, and whatever else the model's
cache holds, e.g. the multi-track narrative state) is carried from one window into the next, and is
zeroed where the row's stream starts afresh.

Reset convention (exact): `resets` (B, L) bool, resets[b, t] = True zeroes row b's state *before*
token t, so row b's outputs from t on, and its final state, equal those of a fresh forward over
input_ids[b, t:] (tested). The reset token is the first token of the next stream. In the prepared
data every book ends with eos, and streams.py puts the reset AT that eos: the eos is read with a fresh
state and acts as the next book's BOS (its target is the book's first token), while the target eos of
a book's last token is predicted from that book's own state. A reset at t = 0 zeroes the state
carried in from the previous window.

How: the window is split at every position where any row resets, and the segments run one after
another through `model(ids, cache=cache)`, zeroing the resetting rows' state in between
(`MambaCache.reset_rows_`). Under grad mode the cache holds the autograd graph, so gradients flow
across the segments of a window; `cache.detach_()` between optimizer steps truncates backpropagation
at the window start (truncated BPTT). A window without inner resets is one forward.

    logits, aux = forward_with_resets(model, x, cache, resets, state_grad=False)
    loss = cross_entropy(logits, y) + aux        # then backward, optimizer step, cache.detach_()
"""

from __future__ import annotations

import torch


def reset_positions(resets: torch.Tensor) -> list[int]:
    """Positions t in [1, L) where any row resets: the window's split points. resets: (B, L) bool."""
    return (resets[:, 1:].any(0).nonzero().flatten() + 1).tolist()


def forward_with_resets(model, input_ids: torch.Tensor, cache, resets: torch.Tensor | None = None, *,
                        state_grad: bool = True, aux_from=None):
    """One window from the state in `cache`, with per-row resets; leaves the final state in `cache`.

    model: any LM of this repository (forward(input_ids, cache=...) -> logits, allocate_cache);
    input_ids: (B, L) long; cache: the model's cache for these B rows (updated: rebound under grad
    mode, in place otherwise); resets: (B, L) bool or None (see the module docstring for the
    convention). state_grad=False: the window's final state will be detached (truncated BPTT), which
    lets the last segment's scan skip making it differentiable. aux_from: the module whose `aux_loss()` is
    read after each segment (default: model; pass the bare model when `model` is a DDP / FSDP wrapper).

    Returns (logits (B, L, V_pad), aux): aux is the model's `aux_loss()` (router balance) averaged
    over the segments weighted by their length, or None when the model has none. The segments' own
    aux terms are each what one forward of that segment gives, so aux differs from one forward's
    over the whole window when the window is split (the balance loss is not linear in tokens);
    logits and states are exact.
    """
    b, l = input_ids.shape
    if resets is None:
        resets = torch.zeros(b, l, dtype=torch.bool)
    if resets.shape != (b, l):
        raise ValueError(f"resets must have the shape of input_ids {(b, l)}, got {tuple(resets.shape)}")
    resets = resets.to("cpu", torch.bool)
    bounds = [0, *reset_positions(resets), l]
    logits, aux_terms = [], []
    aux_from = model if aux_from is None else aux_from
    try:
        for start, end in zip(bounds[:-1], bounds[1:]):
            if resets[:, start].any():
                cache.reset_rows_(resets[:, start])
            cache.state_grad = state_grad if end == l else True
            logits.append(model(input_ids[:, start:end], cache=cache))
            aux = aux_from.aux_loss() if hasattr(aux_from, "aux_loss") else None
            if aux is not None:
                aux_terms.append(aux * ((end - start) / l))
    finally:
        cache.state_grad = True
    out = logits[0] if len(logits) == 1 else torch.cat(logits, dim=1)
    return out, (sum(aux_terms) if aux_terms else None)
