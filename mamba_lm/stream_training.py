"""The trainer's stateful mode (`--stateful=True`) and the carried-state val loss.

Stateful (streaming) training, the training condition of the comparisons (research_plan.md): each of
the R = batch_size * grad_accum rows of the global batch reads its own books, window after window
(`streams.BookStreams`), and each row's recurrent state is carried from one optimizer step into the
next, detached (truncated backpropagation through time, one window deep); a row whose book ends inside
a window restarts from a zero state at the book's eos (`stateful.forward_with_resets`). As in the reset
mode, rank k of W takes rows [k R/W, (k+1) R/W) and runs them in micro-batches of at most batch_size
rows, so the global batch and the order do not depend on W or grad_accum; each micro-batch keeps its
own cache.

    carried = CarriedTraining(raw_model, train_split, global_batch, batch_size, seq_len, seed, dist, device)
    for x, y, weight, carry in carried.micro_batches():        # carry: (cache, resets)
        logits, aux = forward_with_resets(model, x, carry.cache, carry.resets, state_grad=False, aux_from=raw)
    ...; optimizer step; carried.detach_()
    checkpoint["carried"] = carried.state_dict()             # all ranks call it (a gather); exact resume

`carried_val_loss` is the eval's counterpart: consecutive val windows, books in stored order, with the
state carried through them, and the same windows each from a zero state; the gap between the two is
what the carried state is worth to the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mamba_lm.data import IGNORE
from mamba_lm.errors import UserError
from mamba_lm.runtime import autocast
from mamba_lm.stateful import forward_with_resets
from mamba_lm.streams import BookStreams


@dataclass
class Carry:
    """What a micro-batch of a stateful run adds to (x, y): its rows' cache and reset mask (b, l) bool."""
    cache: object
    resets: torch.Tensor


class CarriedTraining:
    """This rank's part of stateful training: the train streams (every row's position, as all ranks keep
    them) and one carried cache per micro-batch of this rank's rows."""

    def __init__(self, raw_model, train_split, global_batch: int, batch_size: int, seq_len: int, seed: int,
                 dist, device):
        self.streams = BookStreams(train_split.tokens, train_split.book_spans(), rows=global_batch,
                                   seq_len=seq_len, seed=seed, scored=train_split.scored)
        self.dist, self.device = dist, device
        share = global_batch // dist.world
        self.rows = range(dist.rank * share, (dist.rank + 1) * share)         # this rank's rows
        self.micro = [(i, min(i + batch_size, share)) for i in range(0, share, batch_size)]
        self.caches = [raw_model.allocate_cache(end - start, device=device) for start, end in self.micro]

    def describe(self) -> str:
        s = self.streams
        return (f"stateful: {s.rows} rows each read whole books in order ({len(s.spans):,} train books), state "
                f"carried between steps (truncated BPTT, {s.seq_len} tokens), reset at each book's eos")

    def micro_batches(self) -> list[tuple[torch.Tensor, torch.Tensor, float, Carry]]:
        """The next window of this rank's rows as micro-batches [(x (b, l), y (b, l), weight, Carry)]."""
        x, y, resets = self.streams.next_window(rows=self.rows, device=self.device)
        total = self.streams.rows
        return [(x[a:b], y[a:b], (b - a) / total, Carry(cache, resets[a:b]))
                for (a, b), cache in zip(self.micro, self.caches)]

    def detach_(self) -> None:
        """After the optimizer step: the carried state no longer holds the step's graph."""
        for cache in self.caches:
            cache.detach_()

    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Stream position and the carried state of all R rows (gathered over ranks; every rank must call)."""
        per_cache = [c.state_tensors() for c in self.caches]
        rows = []
        for k in range(len(per_cache[0])):
            local = torch.cat([tensors[k] for tensors in per_cache]).detach()
            rows.append(_gather_rows(local, self.dist).cpu())
        return {"streams": self.streams.state_dict(), "state": rows}

    def load_state_dict(self, saved: dict) -> None:
        """Restore a `state_dict` (of a run with the same global batch; any number of ranks)."""
        self.streams.load_state_dict(saved["streams"])
        for (a, b), cache in zip(self.micro, self.caches):
            start = self.rows.start
            cache.load_state_tensors_([t[start + a:start + b].to(self.device) for t in saved["state"]])


def _gather_rows(local: torch.Tensor, dist) -> torch.Tensor:
    """Concatenate every rank's (share, ...) rows in rank order (gloo and NCCL: sent as float64 / the float)."""
    if not dist.enabled:
        return local
    send = local if local.is_floating_point() else local.to(torch.int64)
    parts = [torch.empty_like(send) for _ in range(dist.world)]
    torch.distributed.all_gather(parts, send.contiguous())
    return torch.cat(parts).to(local.dtype)


@torch.no_grad()
def carried_val_loss(model, raw_model, val_split, *, rows: int, windows: int, dist, device, dtype,
                     vocab_size: int) -> dict | None:
    """Mean token CE on `windows` consecutive windows of `rows` val streams (books in stored order),
    with the state carried across windows (reset at each book's eos), and on the same windows each from
    a zero state. Rows are split over ranks (each rank the same number; FSDP needs every rank in every
    forward). Returns {"val_loss_carried", "val_loss_window_reset", "val_carried_tokens"}, or None when the
    split has fewer books than ranks."""
    books = len(val_split.book_spans())
    per_rank = max(1, min(rows, books) // dist.world)
    if per_rank * dist.world > books:
        return None
    streams = BookStreams(val_split.tokens, val_split.book_spans(), rows=per_rank * dist.world,
                          seq_len=val_split.seq_len, shuffle=False, scored=val_split.scored)
    mine = range(dist.rank * per_rank, (dist.rank + 1) * per_rank)
    was_training = model.training
    model.eval()
    cache = raw_model.allocate_cache(per_rank, device=device)
    sums = torch.zeros(3, dtype=torch.float64)                                  # carried, reset, tokens
    for _ in range(windows):
        x, y, resets = streams.next_window(rows=mine, device=device)
        with autocast(device, dtype):
            carried, _ = forward_with_resets(model, x, cache, resets)
            fresh = model(x)
        for i, logits in enumerate((carried, fresh)):
            sums[i] += torch.nn.functional.cross_entropy(          # IGNORE targets (loss_on="answers") skipped
                logits[..., :vocab_size].float().flatten(0, 1), y.flatten(), reduction="sum").item()
        sums[2] += int((y != IGNORE).sum())
    model.train(was_training)
    total = [dist.all_sum(float(v)) for v in sums]
    if total[2] == 0:
        raise UserError("the carried-state evaluation covered zero tokens; raise --eval_batches")
    return {"val_loss_carried": total[0] / total[2], "val_loss_window_reset": total[1] / total[2],
            "val_carried_tokens": int(total[2])}
