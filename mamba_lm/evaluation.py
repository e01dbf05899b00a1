"""The stages of evaluate.py and their resumable accumulators: one function per stage, one resume cache.

A stage is `eval_<stage>(model, tokenizer, ..., cfg, amp, progress) -> dict` (JSON-safe): it reads the
settings it needs from `cfg` (evaluate.py's config dict: the script's constants after --key=value), runs
its forwards under `amp()` (the autocast context of the chosen dtype) and, when it scores many
sequences or books, hands its running sums to `progress` so an interrupted run can continue.

    loss        token loss, bits per byte, word perplexity, per-position loss, loss by narrative token type
    books       loss by window index into each book, the recurrent state carried vs reset per window
    generation  degeneration and name-consistency metrics of samples from held-out book openings
    recall      long-range recall probe on procedural demo stories
    longrange   recurring-name loss by distance and per-position loss to 64k tokens, carried vs reset
    chapters    next-chapter ranking (ChapterBreak), carried vs reset
(the last two read whole books; mamba_lm/longrange.py holds their definitions).

Resume cache (`state_dir/<key>.json`, key = checkpoint file identity + data fingerprint + split):
    {"format", "checkpoint", "data_dir", "fingerprint", "split",
     "stages":  {stage: {"settings": stage_settings(...), "result": {...}}},     # finished stages
     "partial": {stage: {"settings": ..., "progress": {...}}}}                    # the running one
A finished stage is reused when its settings match; a partial one is continued from its accumulators.
Sums are float64 and JSON round-trips floats exactly, so a resumed stage gives the same numbers as an
uninterrupted one. Metric definitions: mamba_lm/metrics.py and mamba_lm/longrange.py.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mamba_lm import demo_corpus
from mamba_lm import longrange as LR
from mamba_lm import metrics as M
from mamba_lm.errors import UserError
from mamba_lm.generation import generate
from mamba_lm.runtime import atomic_write_json

STAGES = ("loss", "books", "generation", "recall", "longrange", "chapters")
STATE_FORMAT = "mamba-narrative-eval-state/1"


# ---------------------------------------------------------------------------------------------
# resume cache and the accumulators of a running stage


def file_identity(path: str) -> dict:
    """Cheap identity of a checkpoint file or folder: resolved path, sizes and mtimes."""
    p = Path(path).resolve()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    return {"path": str(p), "files": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]}


def state_path(state_dir: str, ckpt_identity: dict, data_fingerprint: str, split: str) -> Path:
    """The resume-cache file of one checkpoint on one data split."""
    key = hashlib.sha256(json.dumps([ckpt_identity, data_fingerprint, split], sort_keys=True).encode()).hexdigest()
    return Path(state_dir) / f"{key[:24]}.json"


def empty_state() -> dict:
    return {"format": STATE_FORMAT, "stages": {}}


def load_state(path: Path, resume: bool) -> dict:
    """The cached stages of `path` when resuming (an unreadable or foreign file: start afresh)."""
    if not (resume and path.exists()):
        return empty_state()
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        print(f"warning: unreadable partial results {path}; recomputing")
        return empty_state()
    return state if state.get("format") == STATE_FORMAT else empty_state()


def save_state(path: Path, state: dict) -> None:
    """Write a JSON file atomically (runtime.atomic_write_json); numpy numbers become JSON numbers."""
    atomic_write_json(path, state, indent=1, default=_json_default)


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def stage_settings(stage: str, cfg: dict, L: int, win: int) -> dict:
    """The settings a stage's numbers depend on (its cache key)."""
    common = {"dtype": cfg["dtype"]}
    if stage == "loss":
        return {**common, "seq_len": L, "max_sequences": cfg["max_sequences"]}
    if stage == "books":
        return {**common, "book_tokens": cfg["book_tokens"], "window": win, "max_books": cfg["max_books"]}
    if stage == "generation":
        return {**common, **{k: cfg[k] for k in ("num_prompts", "prompt_tokens", "gen_tokens", "temperature", "top_k",
                                                 "top_p", "min_p", "repetition_penalty", "seed", "loop_min_period",
                                                 "loop_repeats")}}
    if stage == "recall":
        return {**common, "recall_stories": cfg["recall_stories"], "recall_story_words": cfg["recall_story_words"],
                "recall_seed": cfg["recall_seed"], "edges": cfg["recall_distance_edges"], "window": win}
    if stage == "longrange":
        return {**common, "window": win, **{k: cfg[k] for k in ("longrange_books", "longrange_tokens",
                                                                "position_tokens")}, "names": LR.NAME_FORMAT}
    if stage == "chapters":
        return {**common, "window": win, **{k: cfg[k] for k in ("longrange_books", "longrange_tokens", "chapter_tokens",
                                                                "chapter_candidates", "seed")},
                "chapters": LR.CHAPTER_FORMAT}
    raise ValueError(f"unknown stage {stage!r}")


class Progress:
    """Resumable accumulators of a running stage: `saved` (a JSON dict from an interrupted run, or None)
    seeds them; `tick(make)` hands `make()` (the current accumulators, JSON-safe) to `save` at most every
    `every` seconds (0: at every tick)."""

    def __init__(self, saved: dict | None = None, save=None, every: float = 60.0):
        self.saved, self.save, self.every, self.last = saved, save, every, time.time()

    def tick(self, make) -> None:
        if self.save is not None and time.time() - self.last >= self.every:
            self.save(make())
            self.last = time.time()


# ---------------------------------------------------------------------------------------------
# shared data helpers


def target_pieces(row: np.ndarray, tokenizer) -> list[str]:
    """Text of a row of target ids as pieces; an end-of-text id becomes a paragraph break (book boundary)."""
    pieces, seg = [], []
    for t in row.tolist():
        if t == tokenizer.eos_id:
            if seg:
                pieces.append(tokenizer.decode(seg))
            pieces.append("\n\n")
            seg = []
        else:
            seg.append(t)
    if seg:
        pieces.append(tokenizer.decode(seg))
    return pieces


def book_arrays(data, eos: int, cap: int, min_len: int, limit: int) -> list[np.ndarray]:
    """Token arrays of the split's books (trailing eos dropped), each cut to `cap` tokens (0 = whole
    book); books shorter than `min_len` are skipped; at most `limit` books (0 = all), in split order.
    The arrays are uint16 views of the memory-mapped split: nothing is read before a batch needs it."""
    books = []
    for _book_id, start, n in data.book_spans():
        toks = data.tokens[start:start + n]
        if len(toks) and toks[-1] == eos:
            toks = toks[:-1]
        if len(toks) < min_len:
            continue
        books.append(toks[:cap] if cap else toks)
        if limit and len(books) >= limit:
            break
    return books


def model_device(model) -> torch.device:
    """The device of a model's parameters (cpu for a model without any)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def require_cache(model, what: str) -> None:
    if not hasattr(model, "allocate_cache"):
        raise UserError(f"model has no allocate_cache(); {what} needs the recurrent cache API")


# ---------------------------------------------------------------------------------------------
# stage: token loss, bits per byte, word perplexity, per-position loss


def eval_loss(model, tokenizer, data, cfg: dict, amp, progress: Progress | None = None,
              token_types=None) -> dict:
    """Token loss, bits per byte, word perplexity and per-position loss over (a cap of) the split's sequences.

    token_types: optional (type names, types_of) with types_of(x, y) -> (B, L, n_types) bool, the types
    of the targets y (evaluate.py passes multitrack.narrative's; the core does not import that package);
    with it the loss is also reported by token type.
    cfg: split, data_dir, batch_size, max_sequences. Memory: one batch of logits (batch_size, L, V) at a
    time plus (L,) position sums. `progress`: partial sums are saved and a re-run continues from them.
    """
    dev = model_device(model)
    L, V = data.seq_len, tokenizer.vocab_size
    n = data.num_sequences
    if n == 0:
        raise UserError(f"split {cfg['split']!r} of {cfg['data_dir']} has no full sequence of {L} tokens")
    max_sequences, batch_size = cfg["max_sequences"], cfg["batch_size"]
    if max_sequences and max_sequences < n:
        indices = np.unique(np.linspace(0, n - 1, max_sequences).round().astype(np.int64))
    else:
        indices = np.arange(n)
    byte_len = M.token_byte_lengths(tokenizer, skip_ids=[tokenizer.eos_id])
    type_names, types_of = token_types if token_types is not None else ((), None)
    type_sum, type_count = np.zeros(len(type_names)), np.zeros(len(type_names))
    pos_sum, pos_count = np.zeros(L), np.zeros(L)
    total_nll, total_bytes, total_words = 0.0, 0, 0
    prev_index, prev_in_word = None, False
    start = 0
    progress = progress or Progress()
    if progress.saved:                              # continue an interrupted run of the same settings
        p = progress.saved
        start, total_nll, total_bytes, total_words = p["next"], p["total_nll"], p["total_bytes"], p["total_words"]
        prev_index, prev_in_word = p["prev_index"], p["prev_in_word"]
        pos_sum, pos_count = np.array(p["pos_sum"]), np.array(p["pos_count"])
        type_sum, type_count = np.array(p["type_sum"]), np.array(p["type_count"])
        print(f"   loss: continuing from sequence {start:,} of {len(indices):,} (partial results)")
    bar = tqdm(total=len(indices) * L, initial=start * L, unit="tok", unit_scale=True, desc="loss",
               dynamic_ncols=True)
    for b in range(start, len(indices), batch_size):
        batch = indices[b:b + batch_size]
        x, y = data.get_batch(batch, device=dev)
        with torch.no_grad(), amp():
            nll = M.token_nll(model, x, y, V)                                  # (B, L)
        nll64 = nll.double().cpu().numpy()
        pos_sum += nll64.sum(0)
        pos_count += len(batch)
        total_nll += float(nll64.sum())
        if types_of is not None:
            types = types_of(x, y).double()                                    # (B, L, n_types)
            type_sum += torch.einsum("bl,blt->t", nll.double(), types).cpu().numpy()
            type_count += types.sum((0, 1)).cpu().numpy()
        y_np = y.cpu().numpy()
        total_bytes += int(byte_len[y_np].sum())
        for k, row in zip(batch.tolist(), y_np):
            pieces = target_pieces(row, tokenizer)
            contiguous = prev_index is not None and k == prev_index + 1
            total_words += M.count_words(pieces, continues_word=contiguous and prev_in_word)
            prev_index, prev_in_word = k, M.ends_in_word(pieces, contiguous and prev_in_word)
        bar.update(len(batch) * L)
        bar.set_postfix(loss=f"{total_nll / (pos_count[0] * L):.4f}")
        progress.tick(lambda: {"next": b + len(batch), "total_nll": total_nll, "total_bytes": total_bytes,
                               "total_words": total_words, "prev_index": prev_index, "prev_in_word": prev_in_word,
                               "pos_sum": pos_sum.tolist(), "pos_count": pos_count.tolist(),
                               "type_sum": type_sum.tolist(), "type_count": type_count.tolist()})
    bar.close()
    summary = M.loss_summary(total_nll, int(pos_count.sum()), total_bytes, total_words)
    summary["sequences"] = int(len(indices))
    summary["of_sequences"] = int(n)
    summary["position_loss"] = (pos_sum / np.maximum(pos_count, 1)).tolist()
    summary["position_buckets"] = M.bucket_means(pos_sum, pos_count, M.log2_buckets(L))
    summary["token_types"] = {t: {"tokens": int(c), "loss": s / c if c else float("nan")}
                              for t, s, c in zip(type_names, type_sum, type_count)}
    return summary


# ---------------------------------------------------------------------------------------------
# stage: beyond the training length (carried vs reset state over windows of a whole book)


def eval_books(model, tokenizer, data, cfg: dict, amp, win: int, progress: Progress | None = None) -> dict:
    """Loss by window index into each book, state carried across windows vs reset at each window.

    cfg: split, book_tokens, max_books, book_batch_size. Memory: `book_batch_size` books of at most
    `book_tokens` tokens (ids and per-token losses) and one window of logits at a time. `progress`:
    per-window sums are saved after each group of books.
    """
    require_cache(model, "the carried-state evaluation")
    dev = model_device(model)
    eos, V = tokenizer.eos_id, tokenizer.vocab_size
    book_batch_size = cfg["book_batch_size"]
    books = book_arrays(data, eos, cfg["book_tokens"], win + 1, cfg["max_books"])
    if not books:
        return {"skipped": f"no book of the {cfg['split']} split is longer than one window ({win} tokens)"}
    books.sort(key=len, reverse=True)                 # similar lengths share a batch: little padding
    n_win = math.ceil(len(books[0]) / win)
    sums = {"carried": np.zeros(n_win), "reset": np.zeros(n_win)}
    counts, book_counts = np.zeros(n_win), np.zeros(n_win, dtype=np.int64)
    start = 0
    progress = progress or Progress()
    if progress.saved:                              # continue an interrupted run of the same settings
        p = progress.saved
        start, counts, book_counts = p["next"], np.array(p["counts"]), np.array(p["book_counts"], dtype=np.int64)
        sums = {mode: np.array(v) for mode, v in p["sums"].items()}
        print(f"   books: continuing from book {start:,} of {len(books):,} (partial results)")
    bar = tqdm(total=2 * sum(len(b) for b in books), initial=2 * sum(len(b) for b in books[:start]), unit="tok",
               unit_scale=True, desc="books", dynamic_ncols=True)
    for b in range(start, len(books), book_batch_size):
        group = books[b:b + book_batch_size]
        T = len(group[0])
        x, y, mask = LR.stream_tensors(group, eos, 0, T)
        x, y = x.to(dev), y.to(dev)
        maskf = mask.double().numpy()
        for mode in ("carried", "reset"):
            with torch.no_grad(), amp():
                nll = M.windowed_nll(model, x, y, win, V, carry_state=(mode == "carried"), max_rows=book_batch_size)
            nll64 = nll.double().cpu().numpy() * maskf
            for w in range(math.ceil(T / win)):
                sums[mode][w] += nll64[:, w * win:(w + 1) * win].sum()
            bar.update(int(mask.sum()))
        for w in range(math.ceil(T / win)):
            c = maskf[:, w * win:(w + 1) * win]
            counts[w] += c.sum()
            book_counts[w] += int((c.sum(1) > 0).sum())
        progress.tick(lambda: {"next": b + len(group), "counts": counts.tolist(), "book_counts": book_counts.tolist(),
                               "sums": {mode: v.tolist() for mode, v in sums.items()}})
    bar.close()
    rows = [{"window": w, "first_token": w * win, "books": int(book_counts[w]), "tokens": int(counts[w]),
             "carried": sums["carried"][w] / counts[w], "reset": sums["reset"][w] / counts[w]}
            for w in range(n_win) if counts[w] > 0]
    beyond = counts[1:].sum()
    return {"window_len": win, "books": len(books), "tokens": int(counts.sum()), "rows": rows,
            "carried_loss": sums["carried"].sum() / counts.sum(), "reset_loss": sums["reset"].sum() / counts.sum(),
            "carried_beyond": sums["carried"][1:].sum() / beyond if beyond else float("nan"),
            "reset_beyond": sums["reset"][1:].sum() / beyond if beyond else float("nan")}


# ---------------------------------------------------------------------------------------------
# stage: generation metrics on samples from held-out book openings


def eval_generation(model, tokenizer, data, cfg: dict, amp) -> dict:
    """Sample continuations of book openings; degeneration and name-consistency metrics, with the
    books' real continuations scored the same way as a reference.

    cfg: split, num_prompts, prompt_tokens, gen_tokens, gen_batch_size, the sampling settings
    (temperature, top_k, top_p, min_p, repetition_penalty, seed), loop_min_period, loop_repeats."""
    dev = model_device(model)
    eos = tokenizer.eos_id
    prompt_tokens, gen_tokens = cfg["prompt_tokens"], cfg["gen_tokens"]
    books = book_arrays(data, eos, prompt_tokens + gen_tokens, prompt_tokens + gen_tokens, cfg["num_prompts"])
    if not books:
        return {"skipped": f"no book of the {cfg['split']} split has {prompt_tokens + gen_tokens} tokens"}
    gen = torch.Generator(device=dev).manual_seed(cfg["seed"])
    model_rows, human_rows, samples = [], [], []
    kw = dict(ns=(1, 2, 3, 4), loop_min_period=cfg["loop_min_period"], loop_repeats=cfg["loop_repeats"])
    bar = tqdm(total=len(books) * gen_tokens, unit="tok", unit_scale=True, desc="generate", dynamic_ncols=True)
    for b in range(0, len(books), cfg["gen_batch_size"]):
        group = books[b:b + cfg["gen_batch_size"]]
        prompts = torch.tensor(np.stack([np.concatenate([[eos], g[:prompt_tokens]]) for g in group]), device=dev)
        with torch.no_grad(), amp():
            ids = generate(model, prompts, gen_tokens, temperature=cfg["temperature"], top_k=cfg["top_k"],
                           top_p=cfg["top_p"], min_p=cfg["min_p"], repetition_penalty=cfg["repetition_penalty"],
                           eos_id=None, generator=gen, vocab_size=tokenizer.vocab_size, cuda_graph=True)
        ids = ids[:, prompts.size(1):].cpu().tolist()
        for g, cont in zip(group, ids):
            if eos in cont:                                   # the model ended the book: score up to there
                cont = cont[:cont.index(eos)]
            prompt_ids = g[:prompt_tokens].tolist()
            prompt_text = tokenizer.decode(prompt_ids)
            text = tokenizer.decode(cont)
            model_rows.append(M.generation_metrics(prompt_ids, cont, prompt_text, text, **kw))
            real = g[prompt_tokens:prompt_tokens + gen_tokens].tolist()
            human_rows.append(M.generation_metrics(prompt_ids, real, prompt_text, tokenizer.decode(real), **kw))
            if len(samples) < 2:
                samples.append({"prompt": prompt_text, "continuation": text})
        bar.update(len(group) * gen_tokens)
    bar.close()
    return {"prompts": len(books), "model": M.mean_metrics(model_rows), "human": M.mean_metrics(human_rows),
            "per_sample": model_rows, "samples": samples}


# ---------------------------------------------------------------------------------------------
# stage: long-range recall probe on procedural demo stories


def recall_books(meta: dict, cfg: dict) -> tuple[list[dict], str]:
    """Demo stories for the probe: the held-out split's books when the data is the demo corpus
    (regenerated from meta's source), else `recall_stories` fresh stories (seed `recall_seed`)."""
    split, n = cfg["split"], cfg["recall_stories"]
    source = meta.get("source") or {}
    if source.get("kind") == "demo":
        held_out = set(meta["splits"][split].get("book_ids", []))
        books = [b for b in demo_corpus.books_for_source(source) if b["id"] in held_out][:n]
        if books:
            return books, f"{len(books)} demo books of the {split} split"
    books = demo_corpus.generate_books(n, seed=cfg["recall_seed"], words_per_book=cfg["recall_story_words"])
    return books, (f"{len(books)} fresh demo stories (seed {cfg['recall_seed']}, ~{cfg['recall_story_words']} "
                   "words each)")


def distance_edges(spec: str) -> list[int]:
    """The sorted bucket edges of --recall_distance_edges; UserError unless comma-separated integers."""
    try:
        return sorted(int(e) for e in spec.split(","))
    except ValueError:
        raise UserError(f"--recall_distance_edges={spec!r}: expected comma-separated integers") from None


def eval_recall(model, tokenizer, meta: dict, cfg: dict, amp, win: int) -> dict:
    """Long-range recall: for each probe of the demo stories, is the answer's first token the argmax
    after the cue, and what is the mean log-prob of the answer tokens? Grouped by the token distance
    between the fact's introduction and the cue; state carried over windows of `win` tokens, and
    (control) reset at every window. cfg: split, recall_*, book_batch_size."""
    require_cache(model, "the recall probe (it carries the recurrent state over windows)")
    dev = model_device(model)
    books, where = recall_books(meta, cfg)
    eos, V = tokenizer.eos_id, tokenizer.vocab_size
    edges = distance_edges(cfg["recall_distance_edges"])
    per_mode = {"carried": [], "reset": []}
    n_tokens = 0
    for book in tqdm(books, desc="recall", unit="book", dynamic_ncols=True):
        ids, spans = M.probe_token_spans(book["TEXT"], demo_corpus.recall_probes(book), tokenizer)
        n_tokens += len(ids)
        if not spans:
            continue
        y = torch.tensor([ids], device=dev)                              # (1, T)
        x = torch.cat([torch.full((1, 1), eos, device=dev), y[:, :-1]], dim=1)
        for mode in per_mode:
            rows = recall_logprobs(model, x, win, V, [(a, b) for a, b, _, _ in spans], mode == "carried", amp,
                                   cfg["book_batch_size"])
            for (a, b, dist, kind), lp in zip(spans, rows):
                per_mode[mode].append({"distance": dist, "kind": kind, **M.answer_scores(lp, y[0, a:b].tolist())})
    if not per_mode["carried"]:
        return {"skipped": "the demo stories produced no recall probe"}
    return {"stories": where, "tokens": n_tokens, **M.summarize_recall(per_mode["carried"], per_mode["reset"], edges)}


def recall_logprobs(model, x, win: int, vocab_size: int, spans: list[tuple[int, int]], carry_state: bool, amp,
                    rows_per_forward: int) -> list:
    """Log-softmax rows at the answer positions of one book, read in windows of `win` tokens.

    x: (1, T) inputs (eos + book[:-1]); spans: [(a, b)] target index ranges of the answers (row j of
    the logits predicts target j). Returns one (b - a, V) float32 tensor per span.
    """
    wanted = sorted({j for a, b in spans for j in range(a, b)})
    T = x.size(1)
    starts = list(range(0, T, win))
    rows = {}
    cache = model.allocate_cache(1, device=x.device) if carry_state else None
    group = 1 if carry_state else max(1, rows_per_forward)       # reset: independent windows share a forward
    xp = torch.nn.functional.pad(x[0], (0, win))                  # (T + win,): room for a short last window
    with torch.no_grad():
        for g in range(0, len(starts), group):
            chunk = starts[g:g + group]
            xs = torch.stack([xp[s:s + win] for s in chunk])             # (n, win)
            with amp():
                logits = model(xs, cache=cache) if cache is not None else model(xs)
            for i, s in enumerate(chunk):
                here = [j for j in wanted if s <= j < min(s + win, T)]
                if here:
                    sel = logits[i, [j - s for j in here], :vocab_size].float().log_softmax(-1)   # (n, V)
                    rows.update({j: sel[k] for k, j in enumerate(here)})
    return [torch.stack([rows[j] for j in range(a, b)]) for a, b in spans]


# ---------------------------------------------------------------------------------------------
# stage: recurring-name loss by distance and per-position loss deep into whole books (carried vs reset)


def eval_longrange(model, tokenizer, data, cfg: dict, amp, win: int, progress: Progress | None = None) -> dict:
    """Loss on recurring proper names by token distance to their previous mention, and loss by position
    up to `position_tokens` into each book, with the state carried through the whole book vs reset every
    `win` tokens (definitions: mamba_lm/longrange.py).

    cfg: split, longrange_books, longrange_tokens, position_tokens, book_batch_size. Memory: one window of
    logits for `book_batch_size` books, and each book's ids, text and per-token name bucket (int8).
    `progress`: the sums are saved after each group of books.
    """
    require_cache(model, "the long-range evaluation (it carries the state through whole books)")
    dev = model_device(model)
    eos, V, batch = tokenizer.eos_id, tokenizer.vocab_size, cfg["book_batch_size"]
    books = book_arrays(data, eos, cfg["longrange_tokens"], 2, cfg["longrange_books"])
    if not books:
        return {"skipped": f"the {cfg['split']} split has no book"}
    books.sort(key=len, reverse=True)                 # similar lengths share a batch: little padding
    position_rows = M.log2_buckets(cfg["position_tokens"])
    n_names, n_pos = len(LR.NAME_BUCKETS), len(position_rows)
    acc = {"next": 0, "tokens": 0, "total": {"carried": 0.0, "reset": 0.0}, "name_count": [0] * n_names,
           "name_sum": {"carried": [0.0] * n_names, "reset": [0.0] * n_names},
           "pos_count": [0] * n_pos, "pos_sum": {"carried": [0.0] * n_pos, "reset": [0.0] * n_pos}}
    progress = progress or Progress()
    if progress.saved:                              # continue an interrupted run of the same settings
        acc = progress.saved
        print(f"   longrange: continuing from book {acc['next']:,} of {len(books):,} (partial results)")
    name_count, pos_count = np.array(acc["name_count"], np.int64), np.array(acc["pos_count"], np.int64)
    name_sum = {m: np.array(v) for m, v in acc["name_sum"].items()}
    pos_sum = {m: np.array(v) for m, v in acc["pos_sum"].items()}
    total, tokens = dict(acc["total"]), acc["tokens"]
    table = LR.token_bytes_table(tokenizer)
    bar = tqdm(total=2 * sum(len(b) for b in books), initial=2 * sum(len(b) for b in books[:acc["next"]]),
               unit="tok", unit_scale=True, desc="longrange", dynamic_ncols=True)
    for b in range(acc["next"], len(books), batch):
        group = books[b:b + batch]
        names = [LR.name_targets(*LR.book_text(book, table)) for book in group]        # (T,) int8 each
        for mode in ("carried", "reset"):
            for s, nll, mask in LR.stream_nll(model, group, eos, V, win, mode == "carried", amp, dev):
                for i, book in enumerate(group):
                    n = int(mask[i].sum())
                    if n == 0:
                        continue
                    row, bucket = nll[i, :n], names[i][s:s + n]
                    named = bucket >= 0
                    name_sum[mode] += np.bincount(bucket[named], weights=row[named], minlength=n_names)
                    positions = np.arange(s, s + n)
                    deep = positions < cfg["position_tokens"]
                    where = LR.position_buckets(positions[deep])
                    pos_sum[mode] += np.bincount(where, weights=row[deep], minlength=n_pos)
                    total[mode] += float(row.sum())
                    if mode == "carried":
                        name_count += np.bincount(bucket[named], minlength=n_names)
                        pos_count += np.bincount(where, minlength=n_pos)
                bar.update(int(mask.sum()))
        tokens += sum(len(book) for book in group)
        progress.tick(lambda: {"next": b + len(group), "tokens": tokens, "total": total,
                               "name_count": name_count.tolist(), "pos_count": pos_count.tolist(),
                               "name_sum": {m: v.tolist() for m, v in name_sum.items()},
                               "pos_sum": {m: v.tolist() for m, v in pos_sum.items()}})
    bar.close()

    def mean(s, c):
        return float(s / c) if c else float("nan")

    names_rows = [{"bucket": label, "targets": int(name_count[k]),
                   "carried": mean(name_sum["carried"][k], name_count[k]),
                   "reset": mean(name_sum["reset"][k], name_count[k])} for k, label in enumerate(LR.NAME_BUCKETS)]
    pos_rows = [{"lo": lo, "hi": hi, "label": M.bucket_label(lo, hi), "tokens": int(pos_count[k]),
                 "carried": mean(pos_sum["carried"][k], pos_count[k]),
                 "reset": mean(pos_sum["reset"][k], pos_count[k])}
                for k, (lo, hi) in enumerate(position_rows) if pos_count[k] > 0]
    recurring = name_count[:LR.FIRST_MENTION].sum()
    return {"books": len(books), "tokens": int(tokens), "window": win, "longest_book": int(len(books[0])),
            "carried_loss": mean(total["carried"], tokens), "reset_loss": mean(total["reset"], tokens),
            "name_targets": int(recurring),
            "recurring_carried": mean(name_sum["carried"][:LR.FIRST_MENTION].sum(), recurring),
            "recurring_reset": mean(name_sum["reset"][:LR.FIRST_MENTION].sum(), recurring),
            "names": names_rows, "positions": pos_rows}


# ---------------------------------------------------------------------------------------------
# stage: next-chapter ranking (ChapterBreak)


def eval_chapters(model, tokenizer, data, cfg: dict, amp, win: int, progress: Progress | None = None) -> dict:
    """Next-chapter ranking: at each chapter break after a book's first, the true opening of the next
    chapter against the openings of up to chapter_candidates - 1 later chapters of the same book, by mean
    log-likelihood given the book so far (carried) or the last `win - chapter_tokens` tokens (reset).

    cfg: split, longrange_books, longrange_tokens, chapter_tokens, chapter_candidates, seed. Memory: one
    window of logits, and the candidates' (chapter_candidates, chapter_tokens) logits.
    `progress`: the ranks are saved after each book.
    """
    require_cache(model, "the chapter ranking (it carries the state through whole books)")
    dev = model_device(model)
    eos, V = tokenizer.eos_id, tokenizer.vocab_size
    c, k = cfg["chapter_tokens"], cfg["chapter_candidates"]
    books = book_arrays(data, eos, cfg["longrange_tokens"], 2, cfg["longrange_books"])
    acc = {"next": 0, "books_with_breaks": 0, "records": {"carried": [], "reset": []}}
    progress = progress or Progress()
    if progress.saved:                              # continue an interrupted run of the same settings
        acc = progress.saved
        print(f"   chapters: continuing from book {acc['next']:,} of {len(books):,} (partial results)")
    records = acc["records"]
    table = LR.token_bytes_table(tokenizer)
    bar = tqdm(total=sum(len(b) for b in books), initial=sum(len(b) for b in books[:acc["next"]]), unit="tok",
               unit_scale=True, desc="chapters", dynamic_ncols=True)
    for i in range(acc["next"], len(books)):
        book = books[i]
        chapters = LR.chapter_openings(*LR.book_text(book, table), c)
        breaks = list(range(1, len(chapters) - 1))     # a previous chapter for context, a later one to rank against
        acc["books_with_breaks"] += bool(breaks)
        cache, fed = model.allocate_cache(1, device=dev), 0
        for j in breaks:
            p = chapters[j][0]
            chosen = [j] + LR.choose_distractors(len(chapters), j, k, cfg["seed"], i)
            openings = torch.tensor(np.stack([np.asarray(book[chapters[m][1]:chapters[m][1] + c], dtype=np.int64)
                                              for m in chosen]), device=dev)                      # (K, c)
            last = int(book[p - 1])
            LR.feed(model, cache, book, eos, fed, p, win, amp, dev)
            fed = p
            records["carried"].append([LR.rank_of_true(LR.score_openings(model, cache, last, openings, V, amp)),
                                       len(chosen)])
            local = model.allocate_cache(1, device=dev)
            LR.feed(model, local, book, eos, max(0, p - (win - c) + 1), p, win, amp, dev)
            records["reset"].append([LR.rank_of_true(LR.score_openings(model, local, last, openings, V, amp)),
                                     len(chosen)])
        bar.update(len(book))
        acc["next"] = i + 1
        progress.tick(lambda: acc)
    bar.close()
    if not records["carried"]:
        return {"skipped": f"no book of the first {len(books)} of the {cfg['split']} split has three chapter "
                           f"headings with openings of {c} tokens"}
    return {"books": len(books), "books_with_breaks": acc["books_with_breaks"], "chapter_tokens": c,
            "window": win, "carried": LR.summarize_ranks(records["carried"]),
            "reset": LR.summarize_ranks(records["reset"]), "records": records}
