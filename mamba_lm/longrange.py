"""Long-range evaluation of whole books: recurring names by distance, loss deep into a book, chapter ranking.

A book is read as the training stream reads it: inputs x = eos + book[:-1], targets y = book, so the
target at index j is book[j] after j tokens of the book. A recurrent LM reads it window by window, either
with the state **carried** from each window into the next (one pass over the whole book, equal to one long
forward) or **reset** to zero at the start of every window (what a model trained on `window`-token
sequences sees; the control). Nothing here holds more than one window of logits; a book's ids stay a
uint16 memmap view until a window needs them, and its text is decoded once (a few MB) for the heuristics.

Recurring-name loss by distance
    A name mention is a capitalised word (`Name`, possessive stripped) that is not sentence-initial and
    not in `metrics.NAME_STOPWORDS` (the heuristic of `metrics.capitalised_names`). Its previous mention
    is the latest earlier occurrence of the same word in the book as a capitalised word, sentence-initial
    ones included (a known name that starts a sentence is still a mention the model could remember).
    Every token overlapping a mention (a multi-token name counts all its tokens) is a target in the
    bucket of the token distance first_token(mention) - first_token(previous): < 256, 256-1k, 1k-4k,
    4k-16k, >= 16k; mentions without a previous one form the reference row "first mention".
Per-position loss deep into a book
    Mean loss of the targets at positions 0 .. position_tokens-1 of each book, by log2 buckets
    (0, 1, 2-3, ..., 32768-65535).
Next-chapter ranking (ChapterBreak, Sun et al. 2022, arXiv 2204.10878)
    Chapter headings are paragraphs that open with a heading word (`gutenberg.is_heading_word`:
    CHAPTER, Chapter, BOOK, PART, ... ) followed by a numeral or nothing, at most `MAX_HEADING_CHARS`
    long, or a bare numeral alone on its paragraph ("IV", "XII.", "7."); headings that are only a title
    ("THE CAREW MURDER CASE") are not detected. Consecutive heading paragraphs ("BOOK II" / "CHAPTER I") and title-case title lines right after
    a heading form one break. The break's context ends before its first heading; the chapter's opening
    is the first `c` tokens after its last heading / title line. At each break after the first, the true
    opening is ranked against the openings of up to `k - 1` chapters that come later in the same book
    (not yet read, so neither mode can have seen them), by mean log-likelihood per token given the
    context: carried = the whole book so far; reset = the last `window - c` tokens before the break from
    the zero state (context and candidate fill one training window). rank 1 = the true opening scores
    highest (ties count in its favour); accuracy = share of rank 1.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from mamba_lm import metrics as M
from mamba_lm.generation import cache_tensors
from mamba_lm.gutenberg import is_heading_word

NAME_FORMAT = "names/1"               # bump when the name heuristic changes (the resume cache key holds it)
CHAPTER_FORMAT = "chapters/1"         # bump when the chapter detection or the scoring changes
NAME_DISTANCE_EDGES = (256, 1024, 4096, 16384)
NAME_BUCKETS = ("<256", "256-1k", "1k-4k", "4k-16k", ">=16k", "first mention")
FIRST_MENTION = len(NAME_BUCKETS) - 1
NOT_A_NAME = -1
MAX_HEADING_CHARS = 200


# ----------------------------------------------------------------------------------------------
# token ids -> text with the character offset of every token


def token_bytes_table(tokenizer) -> list[bytes]:
    """The bytes each token id decodes to (the eos id: none), for `book_text`."""
    table = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
    if tokenizer.eos_id is not None:
        table[tokenizer.eos_id] = b""
    return table


def book_text(ids, table: list[bytes]) -> tuple[str, np.ndarray]:
    """Text of a token sequence and the character offset where each token starts.

    ids: (T,) token ids; table: bytes per id (`token_bytes_table`). Returns (text, starts) with
    starts (T + 1,) int64, text[starts[k]:starts[k+1]] the characters of token k (starts[T] = len(text)).
    Bytes that are not valid UTF-8 become one character each (surrogateescape), so offsets never drift;
    a token that ends inside a multi-byte character owns the character it starts in.
    """
    pieces = [table[i] for i in np.asarray(ids).tolist()]
    data = b"".join(pieces)
    text = data.decode("utf-8", errors="surrogateescape")
    byte_starts = np.zeros(len(pieces) + 1, dtype=np.int64)
    np.cumsum([len(p) for p in pieces], out=byte_starts[1:])
    codes = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
    char_bytes = np.where(codes < 0x80, 1, np.where(codes < 0x800, 2, np.where(codes < 0x10000, 3, 4)))
    char_bytes[(codes >= 0xDC80) & (codes <= 0xDCFF)] = 1          # an escaped invalid byte
    char_starts = np.zeros(len(text) + 1, dtype=np.int64)
    np.cumsum(char_bytes, out=char_starts[1:])
    starts = np.searchsorted(char_starts, byte_starts, side="right") - 1
    return text, starts.astype(np.int64)


def char_span_tokens(starts: np.ndarray, a: int, b: int) -> tuple[int, int]:
    """Token index range [i, j) of the tokens overlapping characters [a, b) (starts from `book_text`)."""
    token_starts = starts[:-1]
    return int(np.searchsorted(token_starts, a, side="right") - 1), int(np.searchsorted(token_starts, b, side="left"))


# ----------------------------------------------------------------------------------------------
# recurring names


def distance_bucket(distance: int) -> int:
    """Index into NAME_BUCKETS of a token distance to the previous mention."""
    return int(np.searchsorted(NAME_DISTANCE_EDGES, distance, side="right"))


def name_mentions(text: str, stopwords: frozenset = M.NAME_STOPWORDS) -> list[tuple[int, int, str, int | None]]:
    """Name mentions of a book, in text order: (start, end, name, start of the previous occurrence or None).

    Mentions: capitalised, not sentence-initial, not stop words. Previous occurrence: the latest earlier
    capitalised occurrence of the same word, sentence-initial ones included (character offsets).
    """
    words = M.capitalised_words(text)
    names = {w for _, _, w, initial in words if not initial and w not in stopwords}
    last, mentions = {}, []
    for a, b, w, initial in words:
        if w not in names:
            continue
        if not initial:
            mentions.append((a, b, w, last.get(w)))
        last[w] = a
    return mentions


def name_targets(text: str, starts: np.ndarray, stopwords: frozenset = M.NAME_STOPWORDS) -> np.ndarray:
    """The name bucket of every target of a book: (T,) int8, NOT_A_NAME (-1) for other tokens, else an
    index into NAME_BUCKETS (distance buckets by tokens between first tokens of the two mentions, or
    FIRST_MENTION). text, starts: `book_text` of the book."""
    targets = np.full(len(starts) - 1, NOT_A_NAME, dtype=np.int8)
    for a, b, _name, prev in name_mentions(text, stopwords):
        i, j = char_span_tokens(starts, a, b)
        if prev is None:
            targets[i:j] = FIRST_MENTION
        else:
            targets[i:j] = distance_bucket(i - char_span_tokens(starts, prev, prev + 1)[0])
    return targets


# ----------------------------------------------------------------------------------------------
# per-position buckets


def position_buckets(positions: np.ndarray) -> np.ndarray:
    """log2 bucket index of target positions (the buckets of metrics.log2_buckets): 0 -> 0, 1 -> 1,
    2-3 -> 2, 4-7 -> 3, ..."""
    positions = np.asarray(positions, dtype=np.int64)
    out = np.zeros(positions.shape, dtype=np.int64)
    pos = positions > 0
    out[pos] = np.floor(np.log2(positions[pos])).astype(np.int64) + 1
    return out


# ----------------------------------------------------------------------------------------------
# chapters

_NUMERAL = re.compile(r"(?:\d+|[IVXLCDM]+|[ivxlcdm]+|the\s+\w+|one|two|three|four|five|six|seven|eight|nine|"
                      r"ten|eleven|twelve|first|second|third|fourth|fifth|last)\b[.:]?", re.I)
_PARAGRAPH = re.compile(r"[^\n]+(?:\n[^\n]+)*")
QUOTES = ('"', "\u201c", "\u201d")


_BARE_NUMERAL = re.compile(r"[IVXLC]+\.?|\d{1,3}\.")


def _is_heading_paragraph(par: str) -> bool:
    if len(par) > MAX_HEADING_CHARS:
        return False
    if _BARE_NUMERAL.fullmatch(par.strip()):            # "IV", "XII.", "7." alone on their paragraph
        return True
    first, _, rest = par.strip().partition(" ")
    word = first.rstrip(".:")
    if not is_heading_word(word):
        return False
    rest = rest.strip()
    return not rest or word.upper() in ("PROLOGUE", "EPILOGUE") or _NUMERAL.match(rest) is not None


def _is_title_line(par: str) -> bool:
    """A short title line after a heading ("The Storm", "THE EVE OF THE WAR."): one line of at most 80
    characters, no quotes, and either all upper case or every word longer than three letters capitalised
    (at least one such word)."""
    if len(par) > 80 or "\n" in par.strip() or any(q in par for q in QUOTES):
        return False
    letters = [c for c in par if c.isalpha()]
    words = [w for w in re.findall(r"[A-Za-z']+", par) if len(w) > 3]
    return (len(letters) >= 2 and all(c.isupper() for c in letters)) or (
        bool(words) and all(w[0].isupper() for w in words))


def chapter_breaks(text: str) -> list[tuple[int, int]]:
    """Chapter breaks of a book text: [(heading start, opening start)] in character offsets.

    heading start: first character of the break's first heading paragraph; opening start: first
    character of the first paragraph after its heading paragraphs and (at most one per heading) title line.
    """
    breaks = []
    group_start, title_taken = None, False        # group_start: first heading paragraph of the current break
    for m in _PARAGRAPH.finditer(text):
        par = m.group(0)
        if _is_heading_paragraph(par):
            group_start = m.start() if group_start is None else group_start
            title_taken = False
        elif group_start is not None:
            if not title_taken and _is_title_line(par):
                title_taken = True
            else:
                breaks.append((group_start, m.start()))
                group_start = None
    return breaks


def chapter_openings(text: str, starts: np.ndarray, opening_tokens: int) -> list[tuple[int, int]]:
    """Chapter breaks in tokens: [(p, o)] with p = first token of the heading (the context is targets
    < p) and o = first token of the opening; only chapters whose opening has `opening_tokens` tokens
    before the next break (or the book's end). text, starts: `book_text` of the book."""
    T = len(starts) - 1
    token_starts = starts[:-1]
    spans = [(char_span_tokens(starts, a, a + 1)[0], int(np.searchsorted(token_starts, b, side="left")))
             for a, b in chapter_breaks(text)]
    out = []
    for k, (p, o) in enumerate(spans):
        end = spans[k + 1][0] if k + 1 < len(spans) else T
        if o + opening_tokens <= end:
            out.append((p, o))
    return out


def choose_distractors(n_chapters: int, true_index: int, k: int, seed: int, book_index: int) -> list[int]:
    """Indices of up to k - 1 chapters after `true_index` (a deterministic sample when there are more)."""
    later = list(range(true_index + 1, n_chapters))
    if len(later) <= k - 1:
        return later
    rng = np.random.default_rng([seed, book_index, true_index])
    return sorted(rng.choice(later, size=k - 1, replace=False).tolist())


def rank_of_true(scores, true_index: int = 0) -> int:
    """1-based rank of the true candidate by score (higher = more likely); ties count in its favour."""
    scores = np.asarray(scores, dtype=np.float64)
    return int((scores > scores[true_index]).sum()) + 1


def summarize_ranks(records: list[list[int]]) -> dict:
    """Accuracy, mean rank and chance levels of [rank, candidates] records."""
    if not records:
        return {"breaks": 0, "accuracy": float("nan"), "mean_rank": float("nan"),
                "chance_accuracy": float("nan"), "chance_rank": float("nan"), "candidates": float("nan")}
    r = np.asarray(records, dtype=np.float64)
    return {"breaks": len(records), "accuracy": float((r[:, 0] == 1).mean()), "mean_rank": float(r[:, 0].mean()),
            "chance_accuracy": float((1.0 / r[:, 1]).mean()), "chance_rank": float(((r[:, 1] + 1) / 2).mean()),
            "candidates": float(r[:, 1].mean())}


# ----------------------------------------------------------------------------------------------
# streaming a model through books


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


def stream_nll(model, books: list[np.ndarray], eos: int, vocab_size: int, window: int, carry: bool, amp, dev):
    """Per-token NLL of a group of books read window by window: yields (start, nll, mask) per window.

    nll: (B, w) float64 numpy of targets [start, start + w), mask (B, w) bool numpy (False past a book's
    end). carry=True: one cache goes through the whole group (each window starts from the state the
    previous one left); carry=False: every window starts from the zero state. Memory: one window of logits.
    """
    T = max(len(b) for b in books)
    cache = model.allocate_cache(len(books), device=dev) if carry else None
    for s in range(0, T, window):
        x, y, mask = stream_tensors(books, eos, s, min(s + window, T))
        with torch.no_grad(), amp():
            nll = M.token_nll(model, x.to(dev), y.to(dev), vocab_size, cache=cache)
        yield s, nll.double().cpu().numpy() * mask.numpy(), mask.numpy()


def feed(model, cache, book: np.ndarray, eos: int, start: int, end: int, window: int, amp, dev) -> None:
    """Run inputs x[start:end] of one book (x = eos + book[:-1]) through `cache` (batch 1), in windows."""
    for s in range(start, end, window):
        x, _, _ = stream_tensors([book], eos, s, min(s + window, end))
        with torch.no_grad(), amp():
            model(x.to(dev), cache=cache)


def score_openings(model, cache, last_token: int, openings: torch.Tensor, vocab_size: int, amp) -> np.ndarray:
    """Mean log-likelihood per token of each candidate opening given the state in `cache` (batch 1, left
    unchanged) followed by `last_token` (the last context token, whose logits predict an opening's first).

    openings: (K, c) int64 on the model's device. Returns (K,) float64.
    """
    K, c = openings.shape
    state = model.allocate_cache(K, device=openings.device)
    for dst, src in zip(cache_tensors(state), cache_tensors(cache), strict=True):
        dst.copy_(src.expand_as(dst))                   # every cache tensor is (batch, ...): batch 1 -> K
    x = torch.cat([torch.full((K, 1), last_token, dtype=torch.long, device=openings.device), openings[:, :-1]], 1)
    with torch.no_grad(), amp():
        nll = M.token_nll(model, x, openings, vocab_size, cache=state)          # (K, c)
    return -nll.double().mean(1).cpu().numpy()
