"""Measure how long narrative units are, in tokens, on the real Gutenberg corpus.

The multi-track model (multitrack/multitrack_model.py) gives each SSM track a Δ (dt) initialisation
range; a channel with step Δ forgets with time constant ≈ 1/(Δ·|A_n|) tokens (A_1 = -1 for the
slowest state, S4D-real init). research_plan.md argues the per-track ranges from this script's output:

    tokens per sentence / paragraph / dialogue turn   -> scene track (fast)
    tokens between mentions of the same character       -> character track (medium)
    tokens per scene / chapter / book                   -> plot track (slow)

Books are cleaned exactly as prepare_data.py does (mamba_lm.gutenberg.clean_book: header/footer
removed, paragraphs unwrapped, one blank line between paragraphs) and tokenised with GPT-NeoX-20B.

Usage (from the repository root; ~1 minute on 2 cores for 40 books):
    .venv/bin/python bench/measure_narrative_units.py
    .venv/bin/python bench/measure_narrative_units.py --n_books=100 --seed=1
"""

import glob
import os
import re
import sys
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mamba_lm.configurator import apply_overrides  # noqa: E402
from mamba_lm.errors import UserError, user_errors  # noqa: E402
from mamba_lm.gutenberg import clean_book  # noqa: E402
from mamba_lm.tokenizer import load_tokenizer  # noqa: E402

# ----------------------------------------------------------------------------------------------
data_glob = "../shared/data/gutenberg/train-*.parquet"                      # parquet shards (TEXT column)
tokenizer = "../shared/data/tokenizers/gpt-neox-20b/tokenizer.json"         # tokenizer.json path
n_books = 40                                                                # books sampled uniformly at random [>=1]
seed = 0                                                                    # sampling seed [>=0]
min_name_mentions = 30                                                      # a "character" = capitalised word seen this often [>=1]
# ----------------------------------------------------------------------------------------------
config = apply_overrides(globals(), sys.argv[1:])

HEADING_RE = re.compile(r"^\s*(CHAPTER|Chapter|BOOK|Book|PART|Part|STAVE|Stave|CANTO|VOLUME)\b[^\n]{0,80}$"
                        r"|^\s*[IVXLC]{1,8}\.?\s*$")
SCENE_BREAK_RE = re.compile(r"^\s*([*#~·•]\s*){3,}$|^\s*[*#]\s+[*#]\s+[*#]")
QUOTE_SPAN_RE = re.compile(r"[\"“][^\"“”\n]{1,2000}[\"”]")
SENTENCE_RE = re.compile(r"(?<=[.!?])[\"”’)]*\s+(?=[\"“‘(]?[A-Z])")
WORD_RE = re.compile(r"\b[A-Za-z][a-z]+\b")


def sample_books(paths, n, rng):
    """n random books as (gutenberg id, raw TEXT) from the parquet shards."""
    counts = [pq.ParquetFile(p).metadata.num_rows for p in paths]
    total = sum(counts)
    picks = sorted(rng.choice(total, size=min(n, total), replace=False).tolist())
    books, start = [], 0
    for path, count in zip(paths, counts):
        rows = [i - start for i in picks if start <= i < start + count]
        if rows:
            table = pq.read_table(path, columns=["TEXT", "METADATA"])
            for r in rows:
                books.append((table["METADATA"][r].as_py(), table["TEXT"][r].as_py()))
        start += count
    return books


def quantiles(values) -> str:
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return "| n=0 | | | | | |"
    p10, p50, p90 = np.percentile(v, [10, 50, 90])
    return f"| {len(v):,} | {p10:,.0f} | {p50:,.0f} | {v.mean():,.0f} | {p90:,.0f} |"


def measure_book(text, tok):
    """Token lengths of every unit in one cleaned book (dict of lists)."""
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    para_tokens = np.array([len(ids) for ids in tok.encode_batch(paragraphs)]) + 1   # + the "\n\n" token
    offsets = np.concatenate([[0], np.cumsum(para_tokens)])                        # token offset of each paragraph
    out = {"book": [int(offsets[-1])], "paragraph": para_tokens.tolist()}
    sentences = [s for p in paragraphs[:2000] for s in SENTENCE_RE.split(p) if s.strip()]
    out["sentence"] = [len(ids) for ids in tok.encode_batch(sentences)]
    spans = [m.group(0) for p in paragraphs for m in QUOTE_SPAN_RE.finditer(p)]
    out["dialogue turn (quoted span)"] = [len(ids) for ids in tok.encode_batch(spans)] if spans else []
    dialogue_paras = sum(1 for p in paragraphs if QUOTE_SPAN_RE.search(p))
    out["_dialogue_para_frac"] = [dialogue_paras / max(1, len(paragraphs))]
    heads = [offsets[i] for i, p in enumerate(paragraphs) if HEADING_RE.match(p)]
    breaks = sorted(set(heads) | {offsets[i] for i, p in enumerate(paragraphs) if SCENE_BREAK_RE.match(p)})
    out["chapter (heading to heading)"] = np.diff(heads).tolist() if len(heads) >= 3 else []
    out["scene (break or heading to next)"] = np.diff(breaks).tolist() if len(breaks) >= 3 else []
    # characters: capitalised words that are (almost) never lower-case, seen often; gaps between mentions
    words = [(m.start(), m.group(0)) for m in WORD_RE.finditer(text)]
    capital = Counter(w for _, w in words if w[0].isupper())
    lower = Counter(w.lower() for _, w in words if w[0].islower())
    names = {w for w, c in capital.items() if c >= min_name_mentions and lower[w.lower()] < 0.05 * c and len(w) > 2}
    tokens_per_char = offsets[-1] / max(1, len(text))
    gaps = []
    last = {}
    for pos, w in words:
        if w in names:
            if w in last:
                gaps.append((pos - last[w]) * tokens_per_char)
            last[w] = pos
    out["same-character mention gap (approx.)"] = gaps
    return out


def main():
    paths = sorted(glob.glob(data_glob))
    if not paths:
        raise UserError(f"no parquet files match {data_glob!r}; pass --data_glob=...")
    tok = load_tokenizer(tokenizer)
    rng = np.random.default_rng(seed)
    books = sample_books(paths, n_books, rng)
    units: dict[str, list] = {}
    n_tokens = 0
    for _, raw in tqdm(books, desc="books", unit="book"):
        text, _ = clean_book(raw)
        if not text:
            continue
        for k, v in measure_book(text, tok).items():
            units.setdefault(k, []).extend(v)
        n_tokens += units["book"][-1]
    print(f"\n{len(units['book'])} books, {n_tokens:,} GPT-NeoX tokens after cleaning "
          f"(seed={seed}; {tokenizer})\n")
    print("| unit (tokens) | count | p10 | median | mean | p90 |")
    print("|---|---:|---:|---:|---:|---:|")
    for k, v in units.items():
        if not k.startswith("_"):
            print(f"| {k} {quantiles(v)}")
    frac = np.mean(units["_dialogue_para_frac"])
    print(f"\nparagraphs containing a quoted span: {frac:.1%} (mean over books)")
    print("\ntime constant τ = 1/Δ tokens for the slowest state (A_1 = -1); Δ range = [1/τ_max, 1/τ_min]")


if __name__ == "__main__":
    with user_errors():
        main()
