"""Prepared token data: meta.json, memory-mapped uint16 splits, batching and epoch order.

A data dir (written by prepare_data.py) holds `train.bin`, `val.bin`, `test.bin`: flat `np.uint16` token
streams (books concatenated, `eos_id` after every book), plus `meta.json`, `tokenizer.json` and `report.md`.
Sequence k of a split (L = seq_len):

    x = tokens[k*L : k*L + L]        y = tokens[k*L + 1 : k*L + L + 1]
    num_sequences = (len(tokens) - 1) // L

so every token is stored and the remainder after the last full sequence only serves as a target.
Sequences are contiguous windows of the stream: a window can span a book boundary (the eos token marks it).

A recall-gate data dir (prepare_data.py --source=recall-gate) also holds `{split}.answers.bin`: one
`np.uint8` per token, 1 where the token belongs to the answer of a question (mamba_lm/recall_gate.py).
`TokenSplit(..., loss_on="answers")` scores only those: every other target becomes `IGNORE`, which the
loss skips (`F.cross_entropy`'s ignore_index), the objective MQAR-style recall tasks train on.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from mamba_lm.errors import UserError

DATA_FORMAT = "mamba-narrative-data/1"
SPLITS = ("train", "val", "test")
IGNORE = -100                  # a target the loss skips (F.cross_entropy's default ignore_index)
LOSS_ON = ("all", "answers")   # which targets are scored: every token, or only a gate's answer tokens
META_KEYS = ("format", "seq_len", "dtype", "tokenizer", "fingerprint", "source", "options", "splits")


def num_sequences(n_tokens: int, seq_len: int) -> int:
    """Full (x, y) windows in a stream of n_tokens: (n_tokens - 1) // seq_len (0 for an empty stream)."""
    return max(0, (n_tokens - 1) // seq_len)


def load_meta(data_dir) -> dict:
    """meta.json of a prepared data dir; UserError (saying how to prepare it) if missing or incomplete."""
    hint = f"run: python prepare_data.py --out_dir={data_dir}  (or --source=demo for the offline demo corpus)"
    path = os.path.join(str(data_dir), "meta.json")
    if not os.path.isfile(path):
        raise UserError(f"no prepared data in {data_dir} (meta.json missing); {hint}")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path} ({e}); re-create it with prepare_data.py --force=True") from None
    missing = [k for k in META_KEYS if k not in meta]
    if missing or meta.get("format") != DATA_FORMAT:
        raise UserError(f"{path} is incomplete or of another format (missing {missing or 'format ' + DATA_FORMAT}); "
                        f"re-create it: python prepare_data.py --out_dir={data_dir} --force=True")
    for split in SPLITS:
        bin_path = os.path.join(str(data_dir), f"{split}.bin")
        expected = meta["splits"].get(split, {}).get("tokens")
        if expected is None or not os.path.isfile(bin_path) or os.path.getsize(bin_path) != 2 * expected:
            raise UserError(f"{bin_path} is missing or truncated (meta.json says {expected} tokens); "
                            f"re-create it: python prepare_data.py --out_dir={data_dir} --force=True")
    return meta


def answers_path(data_dir, split: str) -> str:
    """The answer mask of a split: `{split}.answers.bin` (np.uint8 per token; recall-gate data dirs only)."""
    return os.path.join(str(data_dir), f"{split}.answers.bin")


def windows_to_device(rows: np.ndarray, device="cpu", scored: np.ndarray | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token windows rows: (B, L + 1) -> inputs x = rows[:, :-1] and targets y = rows[:, 1:], (B, L) int64 each,
    on `device` (pinned + non_blocking on CUDA). scored: (B, L + 1) bool, or None for all: a target whose
    token is not scored becomes IGNORE."""
    xy = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64))
    x, y = xy[:, :-1].contiguous(), xy[:, 1:].contiguous()
    if scored is not None:                          # (a (1, L) slice is already contiguous: y would alias x)
        y = y.clone()
        y[~torch.from_numpy(np.asarray(scored, dtype=bool)[:, 1:].copy())] = IGNORE
    if str(device).startswith("cuda"):
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


class TokenSplit:
    """One split of a data dir, memory-mapped.

    tokens: np.memmap (N,) uint16; seq_len: L; num_sequences: (N - 1) // L; meta: the dir's meta.json.
    A `seq_len` other than meta's re-windows the same stream (e.g. longer contexts for evaluation).
    loss_on: "all" (every target scored) or "answers" (only a recall gate's answer tokens; `scored` is then
    the split's answer mask, np.memmap (N,) uint8, else None).
    """

    def __init__(self, data_dir, split: str, seq_len: int | None = None, loss_on: str = "all"):
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        if loss_on not in LOSS_ON:
            raise UserError(f"--loss_on={loss_on!r}: choose one of {', '.join(LOSS_ON)}")
        self.meta = load_meta(data_dir)
        self.data_dir, self.split = str(data_dir), split
        self.seq_len = int(seq_len or self.meta["seq_len"])
        path = os.path.join(self.data_dir, f"{split}.bin")
        n = self.meta["splits"][split]["tokens"]
        self.tokens = np.memmap(path, dtype=np.uint16, mode="r", shape=(n,)) if n else np.zeros(0, np.uint16)
        self.num_sequences = num_sequences(n, self.seq_len)
        self.loss_on, self.scored = loss_on, None
        if loss_on == "answers":
            mask = answers_path(self.data_dir, split)
            if not os.path.isfile(mask) or os.path.getsize(mask) != n:
                raise UserError(f"--loss_on=answers needs the recall gate's answer mask {mask} ({n} bytes), which is "
                                f"missing or truncated: prepare the data with prepare_data.py --source=recall-gate, "
                                f"or train with --loss_on=all")
            self.scored = np.memmap(mask, dtype=np.uint8, mode="r", shape=(n,)) if n else np.zeros(0, np.uint8)

    def __len__(self):
        return self.num_sequences

    def get_batch(self, seq_indices, device="cpu"):
        """(x, y) int64 tensors of shape (B, L) for sequence indices (B,); pinned + non_blocking on CUDA; targets
        that are not scored (loss_on="answers") are IGNORE."""
        idx = np.asarray(seq_indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_sequences):
            raise IndexError(f"sequence index out of range [0, {self.num_sequences}) in split {self.split}")
        L = self.seq_len
        rows = np.stack([np.asarray(self.tokens[k * L: k * L + L + 1], dtype=np.int64) for k in idx]) \
            if idx.size else np.zeros((0, L + 1), np.int64)
        scored = None
        if self.scored is not None:
            scored = np.stack([np.asarray(self.scored[k * L: k * L + L + 1], dtype=bool) for k in idx]) \
                if idx.size else np.zeros((0, L + 1), bool)
        return windows_to_device(rows, device, scored)

    def book_spans(self) -> list[tuple]:
        """[(book_id, start_token, n_tokens)] in stream order; n_tokens includes the book's trailing eos."""
        return [tuple(s) for s in self.meta["splits"][self.split]["book_spans"]]


def epoch_order(num_sequences: int, epoch: int, seed: int) -> np.ndarray:
    """Deterministic permutation of range(num_sequences) for (seed, epoch): resumable mid-epoch."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(int(num_sequences))


def batch_indices(order: np.ndarray, batch_size: int, step_in_epoch: int) -> np.ndarray:
    """The sequence indices of batch `step_in_epoch` of an epoch: order[s*B : (s+1)*B].

    An epoch has len(order) // batch_size full batches; asking beyond that raises IndexError.
    """
    start = step_in_epoch * batch_size
    if step_in_epoch < 0 or start + batch_size > len(order):
        raise IndexError(f"step {step_in_epoch} is past the end of the epoch "
                         f"({len(order) // batch_size} batches of {batch_size})")
    return order[start: start + batch_size]


def check_tokenizer_match(meta_tokenizer: dict, ckpt_tokenizer: dict):
    """UserError if a data dir's tokenizer and a checkpoint's differ (sha256, vocab_size or eos_id)."""
    for key in ("sha256", "vocab_size", "eos_id"):
        a, b = meta_tokenizer.get(key), ckpt_tokenizer.get(key)
        if a != b:
            raise UserError(f"tokenizer mismatch: data uses {meta_tokenizer.get('name')!r} and the checkpoint "
                            f"{ckpt_tokenizer.get('name')!r} ({key}: {a!r} vs {b!r}); prepare the data with the "
                            f"checkpoint's tokenizer (prepare_data.py --tokenizer=...)")
