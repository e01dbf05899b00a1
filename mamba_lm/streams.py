"""Book streams for stateful training: each row of the global batch reads whole books, window after window.

Stateful (streaming) training carries every row's recurrent state from one window into the next
(mamba_lm/stateful.py), so a row must read its text in order. `BookStreams` gives each of the R rows of
the global batch its own stream:

* books are dealt from a queue: the epoch's deterministic book order (a permutation per (seed, epoch),
  or the stored order with shuffle=False), epoch after epoch. A row whose book ends takes the next book
  of the queue; rows are served in row order, so who reads what depends only on (seed, R, L, the books),
  not on the number of processes or micro-batches that share the rows;
* window k of row r is x = stream_r[kL : kL + L], y = stream_r[kL + 1 : kL + L + 1], where stream_r is
  the concatenation of the row's books (each book's tokens and its trailing eos, as stored in the split);
* `resets` (R, L) marks the positions where the row's state must be zeroed (mamba_lm/stateful.py's
  convention): a book's trailing eos starts the next book's stream, so resets[r, t] is True where x[r, t]
  is the eos that ends a book. (The row's first book starts from the zero state the cache starts with.)

Every token of the split is read once per epoch (each book of the epoch's order is dealt to exactly one
row and read through), two rows never read the same book of an epoch, and no token is dropped at epoch
ends: a row moves on to the next epoch's books while others finish theirs (`epoch` is the oldest epoch
still being read). The whole position (queue pointer, each row's books and offset) is a small JSON-able
dict (`state_dict` / `load_state_dict`) for exact resume.

    streams = BookStreams(split.tokens, split.book_spans(), rows=global_batch, seq_len=L, seed=seed)
    x, y, resets = streams.next_window(rows=range(lo, hi))   # this process's rows; all rows advance
"""

from __future__ import annotations

import numpy as np
import torch

from mamba_lm.data import windows_to_device
from mamba_lm.errors import UserError

STREAMS_FORMAT = "book-streams/1"


def book_order(num_books: int, epoch: int, seed: int, shuffle: bool = True) -> np.ndarray:
    """The order in which the books of an epoch are dealt: a permutation per (seed, epoch), or 0..n-1."""
    if not shuffle:
        return np.arange(num_books)
    return np.random.default_rng([int(seed), int(epoch), 1]).permutation(int(num_books))


class BookStreams:
    """R rows, each reading whole books in order; see the module docstring.

    tokens: the split's token stream (np.memmap uint16, books concatenated, eos after each);
    book_spans: [(book_id, start_token, n_tokens)] (n_tokens includes the trailing eos);
    rows: R, the global batch; seq_len: L; seed, shuffle: the book order; scored: None (every target scored) or
    the split's answer mask (np.uint8 per token, data.TokenSplit.scored): targets outside it become IGNORE.
    """

    def __init__(self, tokens, book_spans, rows: int, seq_len: int, seed: int = 0, shuffle: bool = True,
                 scored=None):
        spans = [(int(s), int(n)) for _, s, n in book_spans if int(n) > 0]
        if rows < 1 or seq_len < 1:
            raise UserError(f"book streams need rows >= 1 and seq_len >= 1 (got {rows}, {seq_len})")
        if len(spans) < rows:
            raise UserError(f"stateful training gives each of the {rows} rows of the global batch its own book, "
                            f"but the split has only {len(spans)} books; lower --batch_size*--grad_accum")
        self.tokens, self.spans, self.scored = tokens, spans, scored
        self.rows, self.seq_len, self.seed, self.shuffle = int(rows), int(seq_len), int(seed), bool(shuffle)
        self.num_tokens = sum(n for _, n in spans)
        self._orders: dict[int, np.ndarray] = {}
        self.queue = [0, 0]                        # [epoch, index into that epoch's order] of the next book
        self.row_books: list[list[list[int]]] = [[] for _ in range(self.rows)]   # per row: [[epoch, book], ...]
        self.offsets = [0] * self.rows             # position in the row's first book
        self.windows = 0                           # windows read so far

    # ------------------------------------------------------------------------------------------
    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = book_order(len(self.spans), epoch, self.seed, self.shuffle)
        return self._orders[epoch]

    def _deal(self, row: int) -> None:
        """Give `row` the next book of the queue."""
        epoch, i = self.queue
        self.row_books[row].append([epoch, int(self._order(epoch)[i])])
        self.queue = [epoch + 1, 0] if i + 1 == len(self.spans) else [epoch, i + 1]

    def _pieces(self, row: int, need: int) -> list[tuple[int, int, int]]:
        """The next `need` tokens of `row` as [(book, start, end)] within books (dealing books as needed)."""
        pieces, pos, k = [], self.offsets[row], 0
        while need > 0:
            if k == len(self.row_books[row]):
                self._deal(row)
            book = self.row_books[row][k][1]
            take = min(need, self.spans[book][1] - pos)
            pieces.append((book, pos, pos + take))
            need, pos, k = need - take, 0, k + 1
        return pieces

    def _advance(self, row: int) -> None:
        """Move `row` on by L tokens, dropping the books it has finished."""
        pos = self.offsets[row] + self.seq_len
        while pos >= self.spans[self.row_books[row][0][1]][1]:   # never empties: y's last token was dealt
            pos -= self.spans[self.row_books[row][0][1]][1]
            self.row_books[row].pop(0)
        self.offsets[row] = pos

    # ------------------------------------------------------------------------------------------
    def next_window(self, rows=None, device="cpu"):
        """The next window of `rows` (default all; a range or list of row indices), and advance every row.

        Returns x, y (len(rows), L) int64 on `device` and resets (len(rows), L) bool on the CPU. Every
        process must call this once per window (with its own rows) so that all keep the same position.
        """
        rows = range(self.rows) if rows is None else rows
        L = self.seq_len
        plans = [self._pieces(r, L + 1) for r in range(self.rows)]      # all rows: the deal order is global
        xy = np.empty((len(rows), L + 1), dtype=np.int64)
        resets = np.zeros((len(rows), L + 1), dtype=bool)
        scored = None if self.scored is None else np.zeros((len(rows), L + 1), dtype=bool)
        for i, r in enumerate(rows):
            at = 0
            for book, start, end in plans[r]:
                s0, n = self.spans[book]
                xy[i, at:at + end - start] = self.tokens[s0 + start:s0 + end]
                if scored is not None:
                    scored[i, at:at + end - start] = self.scored[s0 + start:s0 + end]
                if end == n:                                             # the book's eos: the next stream starts
                    resets[i, at + end - start - 1] = True
                at += end - start
        for r in range(self.rows):
            self._advance(r)
        self.windows += 1
        x, y = windows_to_device(xy, device, scored)
        return x, y, torch.from_numpy(resets[:, :-1].copy())

    @property
    def epoch(self) -> int:
        """The oldest epoch whose books are still being read (every book of earlier epochs is done)."""
        current = [books[0][0] for books in self.row_books if books]
        return min(current) if current else self.queue[0]

    @property
    def tokens_per_window(self) -> int:
        return self.rows * self.seq_len

    def windows_per_epoch(self) -> int:
        """Windows that read as many tokens as the split holds (the stream of an epoch, rounded down)."""
        return max(1, self.num_tokens // self.tokens_per_window)

    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The position (JSON-able ints and lists): resume with load_state_dict on equal streams."""
        return {"format": STREAMS_FORMAT, "rows": self.rows, "seq_len": self.seq_len, "seed": self.seed,
                "shuffle": self.shuffle, "num_books": len(self.spans), "queue": list(self.queue),
                "row_books": [[list(b) for b in books] for books in self.row_books],
                "offsets": list(self.offsets), "windows": self.windows}

    def load_state_dict(self, state: dict) -> None:
        """Restore a position saved by state_dict; UserError if it was saved for other streams."""
        mine = self.state_dict()
        for key in ("format", "rows", "seq_len", "seed", "shuffle", "num_books"):
            if state.get(key) != mine[key]:
                raise UserError(f"the saved stream position is for {key}={state.get(key)!r}, these streams have "
                                f"{mine[key]!r}; resume with the original --batch_size, --grad_accum, --seq_len, "
                                f"--seed and data")
        self.queue = [int(v) for v in state["queue"]]
        self.row_books = [[[int(e), int(b)] for e, b in books] for books in state["row_books"]]
        self.offsets = [int(v) for v in state["offsets"]]
        self.windows = int(state["windows"])
