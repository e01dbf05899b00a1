"""Long-range evaluation of whole books: streaming a book through a recurrent LM window by window.

A book is read as the training stream reads it: inputs x = eos + book[:-1], targets y = book, so the
target at index j is book[j] after j tokens of the book. Nothing here holds more than one window of
logits; a whole book's ids stay a uint16 memmap view until a window needs them.
"""

from __future__ import annotations

import numpy as np
import torch


def stream_tensors(books: list[np.ndarray], eos: int, start: int, end: int):
    """Inputs, targets and mask of target indices [start, end) of a group of books, as (B, end - start) tensors.

    x[i, j - start] = eos if j == 0 else books[i][j - 1]; y[i, j - start] = books[i][j]; positions past a
    book's end hold x = eos, y = 0, mask = False. x, y int64, mask bool (on the cpu).
    """
    B, n = len(books), end - start
    x = torch.full((B, n), eos, dtype=torch.long)
    y = torch.zeros((B, n), dtype=torch.long)
    mask = torch.zeros((B, n), dtype=torch.bool)
    for i, toks in enumerate(books):
        stop = min(end, len(toks))
        if stop <= start:
            continue
        y[i, :stop - start] = torch.from_numpy(np.asarray(toks[start:stop], dtype=np.int64))
        lo = max(start, 1)
        x[i, lo - start:stop - start] = torch.from_numpy(np.asarray(toks[lo - 1:stop - 1], dtype=np.int64))
        mask[i, :stop - start] = True
    return x, y, mask
