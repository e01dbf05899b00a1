"""Evaluation metrics for long-form narrative: pure functions on numbers, token ids and strings.

Nothing here touches a model, so every function is checkable by hand (tests/test_metrics.py).
`evaluate.py` feeds them the per-token losses and the generated samples.

Glossary
    NLL        negative log-likelihood of a target token, in nats (natural log), as the LM loss
    L          context length of one evaluation sequence (the training `seq_len`, 1024)
    T          number of tokens in a generated continuation

Loss normalisations (so numbers compare across tokenizers and with published long-book results):
    token perplexity   exp(total NLL / number of target tokens)
    bits per byte      total NLL / ln 2 / number of UTF-8 bytes those target tokens decode to
                       (an end-of-text separator is scored but decodes to 0 bytes)
    word perplexity    exp(total NLL / number of whitespace-separated words of that text)
                       (the PG-19 convention, Rae et al. 2020)

Generation (degeneration) metrics, on token ids of one continuation (evaluate.py averages them
over the continuations):
    distinct-n     unique n-grams / total n-grams; higher = more diverse. Li et al. 2016 pool all
                   samples and divide by the number of generated tokens; per sample and over n-grams
                   is the common variant (for T-token samples the denominators differ by n - 1)
    seq-rep-n      1 - unique n-grams / total n-grams of the continuation (Welleck et al. 2019,
                   exactly their `pct_repeat_{n}grams`); higher = more repetitive
    rep/l          share of the continuation's tokens that already occur among the previous l tokens
                   (the prompt included). Welleck et al. 2019 apply this indicator to the greedy
                   next-token predictions under the true context; here it is applied to the sampled
                   tokens themselves (their code's `human_repeat_at_1` applied to a sample)
    first loop     first position where a block of >= k tokens repeats m times back to back
Name consistency, on strings: capitalised names of the prompt reused in the continuation vs new
capitalised names the model invents.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

LN2 = math.log(2.0)

# ----------------------------------------------------------------------------------------------
# loss normalisations


def perplexity(total_nll: float, num_tokens: int) -> float:
    """Token perplexity exp(total_nll / num_tokens); nan for no tokens, inf on overflow."""
    if num_tokens <= 0:
        return float("nan")
    mean = total_nll / num_tokens
    return math.exp(mean) if mean < 700 else float("inf")


def bits_per_byte(total_nll: float, num_bytes: int) -> float:
    """Bits per UTF-8 byte: total NLL in nats converted to bits, divided by the bytes of the text."""
    if num_bytes <= 0:
        return float("nan")
    return total_nll / LN2 / num_bytes


def word_perplexity(total_nll: float, num_words: int) -> float:
    """PG-19 word-level perplexity: exp(total NLL over all tokens / number of words of the text)."""
    return perplexity(total_nll, num_words)


def count_words(pieces: Iterable[str], continues_word: bool = False) -> int:
    """Whitespace-separated words (`str.split()`) of the text formed by concatenating `pieces`.

    The pieces are consecutive parts of one text, cut at arbitrary points (e.g. each evaluation
    sequence decoded on its own): a word cut in two by a piece boundary counts once. Equals
    `len("".join(pieces).split())` without building the whole string. `continues_word=True` says
    the text before the first piece (already counted) ended inside a word.
    """
    words = 0
    prev_ends_in_word = continues_word
    for piece in pieces:
        if not piece:
            continue
        n = len(piece.split())
        if n and prev_ends_in_word and not piece[0].isspace():
            n -= 1  # the first word continues the previous piece's last word
        words += n
        prev_ends_in_word = not piece[-1].isspace()
    return words


def ends_in_word(pieces: Sequence[str], continues_word: bool = False) -> bool:
    """Whether the text before and including `pieces` ends inside a word (the `continues_word` to pass
    to `count_words` for the pieces that follow); `continues_word` when every piece is empty."""
    for piece in reversed(pieces):
        if piece:
            return not piece[-1].isspace()
    return continues_word


def token_byte_lengths(tokenizer, skip_ids: Iterable[int] = ()) -> np.ndarray:
    """Bytes each token id decodes to: int64 array (vocab_size,), via `tokenizer.token_bytes(i)`.

    `skip_ids` (the end-of-text separator) count 0 bytes: they are not part of the text.
    For byte-level BPE an id may hold part of a multi-byte character; the sum over a token
    sequence is still the exact UTF-8 length of its decoded text.
    """
    lengths = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    for i in range(tokenizer.vocab_size):
        lengths[i] = len(tokenizer.token_bytes(i))
    for i in skip_ids:
        if i is not None and 0 <= i < len(lengths):
            lengths[i] = 0
    return lengths


def loss_summary(total_nll: float, num_tokens: int, num_bytes: int | None = None,
                 num_words: int | None = None) -> dict:
    """All normalisations of one total NLL (nats) in one dict (JSON-safe floats/ints)."""
    out = {"tokens": int(num_tokens), "loss": total_nll / num_tokens if num_tokens else float("nan"),
           "ppl": perplexity(total_nll, num_tokens)}
    if num_bytes is not None:
        out["bytes"] = int(num_bytes)
        out["bits_per_byte"] = bits_per_byte(total_nll, num_bytes)
        out["bytes_per_token"] = num_bytes / num_tokens if num_tokens else float("nan")
    if num_words is not None:
        out["words"] = int(num_words)
        out["word_ppl"] = word_perplexity(total_nll, num_words)
    return out


# ----------------------------------------------------------------------------------------------
# per-position bookkeeping


def log2_buckets(length: int) -> list[tuple[int, int]]:
    """Position buckets [lo, hi) of 0..length-1: [0,1), [1,2), [2,4), [4,8), ..., [2^k, length).

    length=1024 -> 0, 1, 2-3, 4-7, ..., 512-1023 (11 buckets).
    """
    buckets, lo = [], 0
    while lo < length:
        hi = 1 if lo == 0 else min(2 * lo, length)
        buckets.append((lo, hi))
        lo = hi
    return buckets


def bucket_label(lo: int, hi: int) -> str:
    """Human label of [lo, hi): '0', '2-3'."""
    return str(lo) if hi - lo == 1 else f"{lo}-{hi - 1}"


def bucket_means(nll_sum: Sequence[float], count: Sequence[float],
                 buckets: Sequence[tuple[int, int]]) -> list[dict]:
    """Token-weighted mean loss in each bucket of positions.

    nll_sum, count: (L,) sums of NLL and numbers of scored tokens at each position.
    Returns rows {"lo", "hi", "label", "tokens", "loss"} (loss nan where no token was scored).
    """
    nll_sum = np.asarray(nll_sum, dtype=np.float64)
    count = np.asarray(count, dtype=np.float64)
    rows = []
    for lo, hi in buckets:
        n = float(count[lo:hi].sum())
        s = float(nll_sum[lo:hi].sum())
        rows.append({"lo": lo, "hi": hi, "label": bucket_label(lo, hi), "tokens": int(n),
                     "loss": s / n if n > 0 else float("nan")})
    return rows


def distance_bucket(distance: int, edges: Sequence[int]) -> str:
    """Label of the bucket [edges[i], edges[i+1]) holding `distance`; last bucket is open ('>=e')."""
    for lo, hi in zip(edges[:-1], edges[1:]):
        if lo <= distance < hi:
            return f"{lo}-{hi - 1}"
    if distance >= edges[-1]:
        return f">={edges[-1]}"
    return f"<{edges[0]}"


# ----------------------------------------------------------------------------------------------
# generation metrics on token ids


def ngrams(tokens: Sequence, n: int) -> list[tuple]:
    """All contiguous n-grams of `tokens` as tuples (len(tokens) - n + 1 of them, or none)."""
    if n <= 0:
        raise ValueError(f"n must be >= 1, got {n}")
    tokens = list(tokens)
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(sequences: Sequence | Sequence[Sequence], n: int) -> float:
    """Distinct-n: unique n-grams / total n-grams (Li et al. 2016 divide by the number of tokens).

    `sequences` is one token sequence or a list of them (corpus level: n-grams pooled over all
    sequences, never spanning two). nan when there is no n-gram.
    """
    seqs = _as_sequences(sequences)
    grams = [g for s in seqs for g in ngrams(s, n)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def seq_rep_n(tokens: Sequence, n: int = 4) -> float:
    """seq-rep-n (Welleck et al. 2019) of one continuation: 1 - unique n-grams / total n-grams.

    0 for a continuation with no repeated n-gram; approaches 1 for a loop. nan if shorter than n.
    """
    grams = ngrams(tokens, n)
    return 1.0 - len(set(grams)) / len(grams) if grams else float("nan")


def rep_l(tokens: Sequence, window: int = 16, context: Sequence = ()) -> float:
    """rep/l: share of tokens that already occur among the previous `window` tokens.

    The indicator of Welleck et al. 2019's rep/l, applied to the tokens of a text (a sample or the
    reference) rather than to a model's greedy predictions.

    Scored positions are every token of `tokens`; the look-back may reach into `context` (the prompt).
    The very first token of a text with no context has nothing to look back on and is not scored.
    nan when nothing is scored.
    """
    full = list(context) + list(tokens)
    start = max(len(context), 1)
    hits = scored = 0
    for t in range(start, len(full)):
        scored += 1
        if full[t] in full[max(0, t - window):t]:
            hits += 1
    return hits / scored if scored else float("nan")


def first_loop_position(tokens: Sequence, min_period: int = 4, repeats: int = 3,
                        max_period: int = 128) -> int:
    """Length of a continuation before its first degenerate loop.

    Definition: a loop starts at position i if, for some period p with min_period <= p <= max_period,
    tokens[i : i + repeats*p] is `repeats` back-to-back copies of the block tokens[i : i + p]
    (equivalently tokens[j] == tokens[j + p] for all i <= j < i + (repeats-1)*p).
    Returns the smallest such i, or len(tokens) if the continuation never loops. A block with a
    shorter true period (one token repeated) is caught through a multiple of that period.
    Example: min_period=2, repeats=3: [5, 1,2, 1,2, 1,2] -> 1.
    """
    if min_period < 1 or repeats < 2:
        raise ValueError("need min_period >= 1 and repeats >= 2")
    x = np.asarray(list(tokens))
    n = len(x)
    best = n
    for p in range(min_period, min(max_period, n // repeats) + 1):
        need = (repeats - 1) * p                          # consecutive matches x[j] == x[j+p]
        eq = (x[:-p] == x[p:]).astype(np.int64)           # (n - p,); n - p >= need as p <= n // repeats
        csum = np.concatenate([[0], np.cumsum(eq)])
        window_sum = csum[need:] - csum[:-need]           # matches in eq[j : j + need]
        hits = np.nonzero(window_sum == need)[0]
        if len(hits):
            best = min(best, int(hits[0]))
    return best


def loop_fraction(tokens: Sequence, **kw) -> float:
    """Share of the continuation inside or after its first loop: 1 - first_loop_position / T."""
    n = len(tokens)
    return 1.0 - first_loop_position(tokens, **kw) / n if n else float("nan")


def _as_sequences(sequences) -> list[list]:
    seqs = list(sequences)
    if seqs and not isinstance(seqs[0], (list, tuple, np.ndarray)):
        return [seqs]
    return [list(s) for s in seqs]


# ----------------------------------------------------------------------------------------------
# character-name consistency on strings

NAME_STOPWORDS = frozenset("""
I I'm I'll I've I'd Mr Mrs Ms Miss Dr Sir Madam Madame Lady Lord Master Mistress Mister Monsieur
Captain Colonel General Doctor Professor Father Mother Brother Sister Uncle Aunt King Queen Prince
Princess Duke Saint St Rev Reverend Dame Don Herr Frau Mlle Mme
God Heaven Lord Christ Bible Christian Christmas Easter Sunday Monday Tuesday Wednesday Thursday
Friday Saturday January February March April May June July August September October November
December Chapter Book Part Volume Act Scene Letter Oh O Ah Yes No Well The A An And But Or
English England French France London Paris America American Europe Indian Latin Greek German
Project Gutenberg Ebook
""".split())

_WORD = re.compile(r"[A-Za-z][A-Za-z'\u2019-]*")
_NAME = re.compile(r"[A-Z][a-z]+(?:['\u2019][a-z]+)?")
_SENTENCE_END = set(".!?:;")
_OPENERS = set("\"'\u201c\u2018([{_*\u2014-")


def capitalised_names(text: str, stopwords: frozenset = NAME_STOPWORDS) -> list[str]:
    """Capitalised words that are not at a sentence start and not in `stopwords`, in text order.

    A heuristic for character/place names. A word counts as a name if it looks like `Name`
    (capital then lower case; all-caps headings do not) and the previous non-space, non-opening-
    quote character is not one of `. ! ? : ;` and not a paragraph break (a blank line), and the word
    is not the first of the text. Possessives are stripped ("Tom's" -> "Tom").
    """
    return [word for _, _, word, initial in capitalised_words(text) if not initial and word not in stopwords]


def capitalised_words(text: str) -> list[tuple[int, int, str, bool]]:
    """Every word that looks like `Name` (possessive stripped), in text order, as
    (start, end, word, sentence_initial): text[start:end] == word, and sentence_initial says whether it
    begins the text, a sentence or a paragraph (see `capitalised_names`)."""
    words = []
    for m in _WORD.finditer(text):
        word = _strip_possessive(m.group(0).rstrip("-"))
        if _NAME.fullmatch(word):
            words.append((m.start(), m.start() + len(word), word, _at_sentence_start(text, m.start())))
    return words


def _strip_possessive(word: str) -> str:
    for suffix in ("'s", "\u2019s", "'", "\u2019"):
        if word.endswith(suffix):
            return word[: -len(suffix)]
    return word


def _at_sentence_start(text: str, pos: int) -> bool:
    """True if the word at text[pos] begins the text, a sentence, or a paragraph."""
    j = pos - 1
    newlines = 0
    while j >= 0 and (text[j].isspace() or text[j] in _OPENERS):
        newlines += text[j] == "\n"
        j -= 1
    if j < 0 or newlines >= 2:
        return True
    return text[j] in _SENTENCE_END


def name_consistency(prompt: str, continuation: str, stopwords: frozenset = NAME_STOPWORDS) -> dict:
    """How a continuation uses the names of its prompt.

    Returns a dict:
        prompt_names        distinct names found in the prompt
        reused_names        distinct prompt names mentioned again in the continuation
        new_names           distinct names of the continuation not in the prompt (invented)
        reused_mentions     mentions (occurrences) in the continuation of prompt names
        new_mentions        mentions of new names
        consistency         reused_mentions / (reused + new mentions): share of name mentions that
                            refer to names already introduced (nan if the continuation names no one)
        prompt_name_recall  reused_names / prompt_names (nan if the prompt has no name)
    """
    prompt_set = set(capitalised_names(prompt, stopwords))
    mentions = Counter(capitalised_names(continuation, stopwords))
    reused = {n for n in mentions if n in prompt_set}
    new = {n for n in mentions if n not in prompt_set}
    reused_mentions = sum(mentions[n] for n in reused)
    new_mentions = sum(mentions[n] for n in new)
    total = reused_mentions + new_mentions
    return {
        "prompt_names": len(prompt_set),
        "reused_names": len(reused),
        "new_names": len(new),
        "reused_mentions": reused_mentions,
        "new_mentions": new_mentions,
        "consistency": reused_mentions / total if total else float("nan"),
        "prompt_name_recall": len(reused) / len(prompt_set) if prompt_set else float("nan"),
    }


def generation_metrics(prompt_ids: Sequence[int], continuation_ids: Sequence[int],
                       prompt_text: str, continuation_text: str, *, ns=(1, 2, 3, 4),
                       rep_windows=(16, 32, 128), loop_min_period: int = 4, loop_repeats: int = 3) -> dict:
    """Every generation metric of one continuation (token ids + decoded text) as a flat dict."""
    out = {"tokens": len(continuation_ids)}
    for n in ns:
        out[f"distinct_{n}"] = distinct_n(continuation_ids, n)
        out[f"seq_rep_{n}"] = seq_rep_n(continuation_ids, n)
    for w in rep_windows:
        out[f"rep_{w}"] = rep_l(continuation_ids, w, context=prompt_ids)
    out["first_loop"] = first_loop_position(continuation_ids, loop_min_period, loop_repeats)
    out["looped"] = float(out["first_loop"] < len(continuation_ids))
    names = name_consistency(prompt_text, continuation_text)
    out.update({f"names_{k}": v for k, v in names.items()})
    return out


def mean_metrics(rows: Sequence[dict]) -> dict:
    """Mean of each numeric key over rows, ignoring nan (nan if every row is nan)."""
    keys = [k for k in rows[0] if isinstance(rows[0][k], (int, float))] if rows else []
    out = {}
    for k in keys:
        vals = [float(r[k]) for r in rows if isinstance(r.get(k), (int, float)) and not math.isnan(r[k])]
        out[k] = sum(vals) / len(vals) if vals else float("nan")
    return out


# ----------------------------------------------------------------------------------------------
# long-range recall probe bookkeeping (probes of mamba_lm/demo_corpus.py)


def word_start(text: str, offset: int) -> int:
    """Move a cut point back over the spaces before `offset`, so a space stays with the next word's token."""
    while offset > 0 and text[offset - 1] == " ":
        offset -= 1
    return offset


def tokenize_with_marks(text: str, cuts: Iterable[int], tokenizer) -> tuple[list[int], dict[int, int]]:
    """Token ids of `text` encoded segment by segment between the char offsets `cuts`.

    With cuts at word boundaries (before the space of a word) the ids equal the whole-text encoding
    for byte-level BPE (GPT-2 / NeoX pre-tokenisation never merges across that boundary) and for bytes.
    Returns (ids, marks) with marks[cut] = index of the first token at or after that cut.
    """
    ids, marks, prev = [], {}, 0
    for c in sorted(set(cuts)) + [len(text)]:
        if c > prev:
            ids += tokenizer.encode(text[prev:c])
        marks[c] = len(ids)
        prev = c
    return ids, marks


def probe_token_spans(text: str, probes: Sequence[dict], tokenizer) -> tuple[list[int], list[tuple]]:
    """Tokenise a demo story and locate every probe's answer in the ids.

    probes: demo_corpus records {"char_offset", "answer", "intro_offset", "kind", ...}.
    Returns (ids, spans) with one (a, b, distance, kind) per probe whose answer has a token: the
    answer's tokens are ids[a:b] (a leading token that is only a space is context, not answer), and
    distance = a - (first token of the fact's introduction, counted the same way), in tokens.
    """
    cuts = []
    for p in probes:
        cuts += [word_start(text, p["char_offset"]), p["char_offset"] + len(p["answer"]),
                 word_start(text, p["intro_offset"])]
    ids, marks = tokenize_with_marks(text, cuts, tokenizer)
    def first_word_token(i: int) -> int:          # skip a token that is only the space before the word
        while i < len(ids) and not tokenizer.token_bytes(ids[i]).strip():
            i += 1
        return i

    spans = []
    for p in probes:
        a = first_word_token(marks[word_start(text, p["char_offset"])])
        b = marks[p["char_offset"] + len(p["answer"])]
        if b > a:
            spans.append((a, b, a - first_word_token(marks[word_start(text, p["intro_offset"])]), p["kind"]))
    return ids, spans


def summarize_recall(carried: Sequence[dict], reset: Sequence[dict], edges: Sequence[int]) -> dict:
    """Recall accuracy and mean answer log-prob, overall, by distance bucket and by kind of fact.

    carried, reset: per-probe records {"distance", "kind", "first_correct", "mean_logprob"} of the
    same probes, scored with the state carried across windows and reset at every window.
    """
    def mean(recs, key):
        return float(np.mean([r[key] for r in recs])) if recs else float("nan")

    groups = {}
    for rc, rr in zip(carried, reset):
        groups.setdefault(distance_bucket(rc["distance"], edges), []).append((rc, rr))
    buckets = {}
    for label, pairs in sorted(groups.items(), key=lambda kv: min(rc["distance"] for rc, _ in kv[1])):
        rc, rr = [p[0] for p in pairs], [p[1] for p in pairs]
        buckets[label] = {"probes": len(pairs), "accuracy": mean(rc, "first_correct"),
                          "mean_logprob": mean(rc, "mean_logprob"), "reset_accuracy": mean(rr, "first_correct")}
    kinds = sorted({r["kind"] for r in carried})
    return {"probes": len(carried), "accuracy": mean(carried, "first_correct"),
            "mean_logprob": mean(carried, "mean_logprob"), "reset_accuracy": mean(reset, "first_correct"),
            "buckets": buckets,
            "by_kind": {k: mean([r for r in carried if r["kind"] == k], "first_correct") for k in kinds}}


# ----------------------------------------------------------------------------------------------
# model-side accounting: per-token NLL of any LM with forward(input_ids, cache=None) -> logits
# (the repo's Mamba and multi-track models, HF / mamba-ssm models loaded by mamba_lm.weights)


def token_nll(model, x, y, vocab_size: int, cache=None):
    """Per-token NLL (nats) of targets y given inputs x, in float32.

    x, y: (B, L) int64. Logits beyond `vocab_size` (embedding padding) are ignored.
    With `cache`, the forward starts from its state and leaves the final state there.
    Returns (B, L) float32.
    """
    logits = model(x, cache=cache) if cache is not None else model(x)     # (B, L, V_pad)
    logits = logits[..., :vocab_size].float()
    nll = F.cross_entropy(logits.reshape(-1, vocab_size), y.reshape(-1), reduction="none")
    return nll.view(y.shape)


def windowed_nll(model, x, y, window: int, vocab_size: int, carry_state: bool, max_rows: int = 8):
    """Per-token NLL of a long sequence processed in windows of `window` tokens.

    x, y: (B, T) int64, T may exceed the training length. carry_state=True: one cache is
    allocated and each window's forward starts from the state the previous window left
    (equal to one forward over all T tokens, in bounded memory). carry_state=False: every
    window starts from the zero state (what a model trained on `window`-token sequences sees);
    the windows are then independent, so up to `max_rows` of them (over all B) share a forward.
    Returns (B, T) float32.
    """
    B, T = x.shape
    if carry_state:
        cache = model.allocate_cache(B, device=x.device)
        return torch.cat([token_nll(model, x[:, s:s + window], y[:, s:s + window], vocab_size, cache=cache)
                          for s in range(0, T, window)], dim=1)
    n_win = -(-T // window)
    pad = n_win * window - T
    xw = torch.nn.functional.pad(x, (0, pad)).reshape(B * n_win, window)      # (B*n_win, window)
    yw = torch.nn.functional.pad(y, (0, pad)).reshape(B * n_win, window)
    per = max(1, max_rows)
    nll = torch.cat([token_nll(model, xw[r:r + per], yw[r:r + per], vocab_size) for r in range(0, B * n_win, per)])
    return nll.reshape(B, n_win * window)[:, :T]


def answer_scores(logprobs, answer_ids: Sequence[int]) -> dict:
    """Score a teacher-forced answer from the log-probabilities at its positions.

    logprobs: (A, V) log-softmax rows; row i is the distribution over the i-th answer token
    (so row 0 is the model's prediction right after the cue). Returns
    {"first_correct": argmax of row 0 == answer_ids[0], "first_rank": rank of the answer's first
    token (0 = top), "mean_logprob": mean log-prob of all answer tokens}.
    """
    ids = torch.as_tensor(list(answer_ids), dtype=torch.long, device=logprobs.device)
    picked = logprobs[torch.arange(len(ids), device=logprobs.device), ids]        # (A,)
    first_rank = int((logprobs[0] > picked[0]).sum())
    return {"first_correct": float(first_rank == 0), "first_rank": first_rank,
            "mean_logprob": float(picked.mean())}
