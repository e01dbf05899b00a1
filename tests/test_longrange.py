"""Long-range metrics (mamba_lm/longrange.py and the longrange / chapters stages of mamba_lm/evaluation.py)
on hand-built books with known answers: distance buckets, the name heuristic, chapter detection, chapter
ranking with a stub model whose likelihoods we set, carried vs reset plumbing, and resume."""

import json
import math
from contextlib import nullcontext

import numpy as np
import pytest
import torch

from mamba_lm import evaluation as E
from mamba_lm import longrange as LR
from mamba_lm import metrics as M
from mamba_lm.tokenizer import load_tokenizer, train_demo_bpe

BYTE = load_tokenizer("byte")


def amp():
    return nullcontext()


class Books:
    """The slice of mamba_lm.data.TokenSplit the stages read: `tokens` (books + eos) and `book_spans()`."""

    def __init__(self, texts, tokenizer=BYTE):
        ids, self.spans = [], []
        for k, text in enumerate(texts):
            book = tokenizer.encode(text) + [tokenizer.eos_id]
            self.spans.append((k, len(ids), len(book)))
            ids += book
        self.tokens = np.asarray(ids, dtype=np.uint16)

    def book_spans(self):
        return self.spans


def config(**overrides):
    cfg = {"split": "test", "longrange_books": 0, "longrange_tokens": 0, "position_tokens": 65536,
           "book_batch_size": 2, "chapter_tokens": 8, "chapter_candidates": 6, "seed": 1}
    cfg.update(overrides)
    return cfg


# ----------------------------------------------------------------------------------------------
# pure pieces


def test_distance_buckets_edges():
    """Distances fall in <256, 256-1k, 1k-4k, 4k-16k, >=16k with the edges in the upper bucket."""
    cases = {0: 0, 1: 0, 255: 0, 256: 1, 1023: 1, 1024: 2, 4095: 2, 4096: 3, 16383: 3, 16384: 4, 10**6: 4}
    for distance, bucket in cases.items():
        assert LR.distance_bucket(distance) == bucket, distance
    assert LR.NAME_BUCKETS[:5] == ("<256", "256-1k", "1k-4k", "4k-16k", ">=16k")


def test_position_buckets_match_log2_buckets():
    """position_buckets puts every position in the log2 bucket metrics.log2_buckets lists for it."""
    buckets = M.log2_buckets(70000)
    positions = np.arange(70000)
    got = LR.position_buckets(positions)
    for k, (lo, hi) in enumerate(buckets):
        assert (got[lo:hi] == k).all(), (lo, hi)


def test_book_text_offsets_with_multibyte_characters():
    """book_text decodes ids to the exact text, and each token's characters are text[starts[k]:starts[k+1]]
    (byte tokenizer splitting é and “ into several ids, and a BPE tokenizer)."""
    text = "Zoë said “hello” to Renée.\n\nCHAPTER II\n\nThe café was closed."
    for tok in (BYTE, train_demo_bpe([text * 3, "plain words here"], vocab_size=300)):
        ids = tok.encode(text)
        decoded, starts = LR.book_text(ids, LR.token_bytes_table(tok))
        assert decoded == text and starts[0] == 0 and starts[-1] == len(text) and len(starts) == len(ids) + 1
        assert (np.diff(starts) >= 0).all()
        whole = [k for k in range(len(ids)) if tok.token_bytes(ids[k]).decode("utf-8", "ignore")
                 == tok.token_bytes(ids[k]).decode("utf-8", "replace")]            # tokens of whole characters
        for k in whole[:40]:
            if starts[k + 1] > starts[k]:
                assert text[starts[k]:starts[k + 1]].encode() == tok.token_bytes(ids[k])


def test_name_heuristic_hand_checked():
    """Sentence-initial words are not mentions (but count as a previous occurrence), stop words are never
    names, possessives are stripped, and each mention points at the latest earlier occurrence."""
    text = "Tom met Anna. Anna smiled at Tom's dog, and Mr Brown came. Then Brown left with Anna."
    got = [(text[a:b], name, None if prev is None else text[prev:prev + len(name)] + f"@{prev}")
           for a, b, name, prev in LR.name_mentions(text)]
    assert got == [("Anna", "Anna", None),                        # "Tom" opens the text: not a mention
                   ("Tom", "Tom", "Tom@0"),                       # possessive stripped; previous: the initial Tom
                   ("Brown", "Brown", None),                      # "Mr" is a stop word
                   ("Brown", "Brown", f"Brown@{text.index('Brown')}"),
                   ("Anna", "Anna", f"Anna@{text.index('Anna. ') + 6}")]   # latest: the sentence-initial Anna
    assert "Then" not in {n for _, _, n, _ in LR.name_mentions(text)}


def test_name_targets_count_every_token_of_a_name_and_bucket_by_distance():
    """With the byte tokenizer a name of n letters is n targets; a repeat 300 tokens later lands in
    256-1k, one 20 tokens later in <256, the first mention in 'first mention'; other tokens are -1."""
    filler = "the cat sat on a mat. " * 13                     # 286 bytes, no capitalised word mid-sentence
    text = "we saw Eliza there. " + filler + "and Eliza came, and Eliza went."
    ids = BYTE.encode(text)
    targets = LR.name_targets(*LR.book_text(ids, LR.token_bytes_table(BYTE)))
    first, second, third = [i for i in range(len(text)) if text.startswith("Eliza", i)]
    assert (targets[first:first + 5] == LR.FIRST_MENTION).all()
    assert (targets[second:second + 5] == 1).all()             # 256-1k
    assert (targets[third:third + 5] == 0).all()               # <256
    assert (targets >= 0).sum() == 15


def test_multi_token_name_with_bpe():
    """With a BPE tokenizer a name split into several tokens marks every token overlapping it."""
    tok = train_demo_bpe(["the cat sat on the mat " * 30, "a dog ran far away " * 30], vocab_size=300)
    text = "the cat saw Zebedee. the dog saw Zebedee again."
    ids = tok.encode(text)
    decoded, starts = LR.book_text(ids, LR.token_bytes_table(tok))
    targets = LR.name_targets(decoded, starts)
    a = text.rindex("Zebedee")
    i, j = LR.char_span_tokens(starts, a, a + len("Zebedee"))
    assert j - i >= 2                                           # the rare name is several tokens
    assert (targets[i:j] == 0).all() and (targets[j:] == -1).all()
    assert "".join(tok.decode([t]) for t in ids[i:j]).strip() == "Zebedee"


def test_chapter_breaks_on_a_toy_book():
    """Headings with numerals (CHAPTER I, Chapter 2., CHAP. III) and a bare numeral (IV.) are breaks; a
    BOOK + CHAPTER pair and its title line (title case or upper case) form one break; 'chapter' and 'PART'
    in prose and a quoted first line after a heading are not."""
    text = ("THE TITLE\n\nCHAPTER I\n\nThe Storm Begins\n\nIt rained in the chapter of our lives.\n\n"
            "Chapter 2.\n\n\"Hello,\" she said.\n\nBOOK II\n\nCHAP. III. The Return\n\nThey came home.\n\n"
            "PART of the crowd went away.\n\nIV.\n\nTHE EVE OF THE WAR.\n\nNo one would have believed it.")
    breaks = LR.chapter_breaks(text)
    assert [(text[h:h + 9], text[o:o + 9]) for h, o in breaks] == [
        ("CHAPTER I", "It rained"), ("Chapter 2", "\"Hello,\" "), ("BOOK II\n\n", "They came"),
        ("IV.\n\nTHE ", "No one wo")]


# ----------------------------------------------------------------------------------------------
# chapter ranking with a stub model


class SeenCache:
    def __init__(self, batch, vocab, device=None):
        self.seen = torch.zeros(batch, vocab, device=device)

    def reset(self):
        self.seen.zero_()


class SeenLM(torch.nn.Module):
    """A stub recurrent LM: logit[v] = prior[v] + 5 * (v occurred among the inputs so far). The state (the
    set of tokens seen) is carried in the cache, so the likelihoods depend on what was read and when."""

    def __init__(self, prior: torch.Tensor):
        super().__init__()
        self.prior = prior

    def allocate_cache(self, batch_size, device=None):
        return SeenCache(batch_size, len(self.prior), device)

    def forward(self, x, cache=None):
        onehot = torch.nn.functional.one_hot(x, len(self.prior)).float()          # (B, L, V)
        start = cache.seen if cache is not None else torch.zeros(x.size(0), len(self.prior))
        seen = (start[:, None] + onehot.cumsum(1)).clamp(max=1)
        if cache is not None:
            cache.seen.copy_(seen[:, -1])
        return self.prior + 5 * seen


def toy_chapter_book():
    """Four chapters; the opening of chapter II ('bcdfghjk') is spelled out early in chapter I, far more
    than one window before chapter II; chapters III and IV open with letters never read before."""
    filler = " a" * 150 + ".\n\n"
    return ("CHAPTER I\n\n12345678 bcdfghjk" + filler + "CHAPTER II\n\nbcdfghjk" + filler
            + "CHAPTER III\n\nlmnpqrst" + filler + "CHAPTER IV\n\nuvwxyzei" + filler)


def test_chapter_ranking_carried_vs_reset_with_a_stub_model():
    """Known answer: the prior favours chapter IV's letters (+2) over III's (+1) over II's (0); reading
    chapter I gives II's letters +5. Break II: carried ranks the true opening 1st, reset (only the last
    window) 3rd; break III: both rank the true opening 2nd (IV's prior wins)."""
    prior = torch.zeros(BYTE.vocab_size)
    prior[list(b"lmnpqrst")] = 1.0
    prior[list(b"uvwxyzei")] = 2.0
    data = Books([toy_chapter_book()])
    res = E.eval_chapters(SeenLM(prior), BYTE, data, config(), amp, win=64)
    assert res["records"] == {"carried": [[1, 3], [2, 2]], "reset": [[3, 3], [2, 2]]}
    assert res["carried"]["accuracy"] == 0.5 and res["reset"]["accuracy"] == 0.0
    assert res["carried"]["mean_rank"] == 1.5 and res["reset"]["mean_rank"] == 2.5
    assert res["carried"]["chance_accuracy"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert res["books_with_breaks"] == 1


def test_rank_of_true_and_distractors():
    """rank_of_true is 1-based with ties in the true candidate's favour; distractors come only from later
    chapters, at most k - 1, deterministically."""
    assert LR.rank_of_true([0.5, 0.1, 0.9]) == 2 and LR.rank_of_true([0.5, 0.5]) == 1
    assert LR.rank_of_true([0.1, 0.2, 0.3], true_index=2) == 1
    assert LR.choose_distractors(10, 3, 6, seed=0, book_index=0) == LR.choose_distractors(10, 3, 6, 0, 0)
    picked = LR.choose_distractors(10, 3, 3, seed=0, book_index=0)
    assert len(picked) == 2 and all(p > 3 for p in picked)
    assert LR.choose_distractors(5, 3, 6, 0, 0) == [4]


# ----------------------------------------------------------------------------------------------
# carried vs reset plumbing on a real (tiny) Mamba, and resume


def story(seed: int, words: int = 500) -> str:
    from mamba_lm.demo_corpus import generate_books
    return generate_books(1, seed=seed, words_per_book=words)[0]["TEXT"]


def test_longrange_carried_equals_one_long_forward_and_reset_equals_windows(tiny_model):
    """The longrange stage's carried numbers equal one forward over each whole book, its reset numbers a
    forward per window from the zero state; name rows are means over exactly the name_targets tokens."""
    model = tiny_model(d_model=16, n_layer=1).eval()
    texts = [story(1), story(2, 300)]
    data = Books(texts)
    win = 128
    res = E.eval_longrange(model, BYTE, data, config(position_tokens=512), amp, win)
    sums = {"carried": np.zeros(6), "reset": np.zeros(6)}
    counts, totals, n_tokens = np.zeros(6), {"carried": 0.0, "reset": 0.0}, 0
    pos = {"carried": 0.0, "reset": 0.0}
    for text in texts:
        ids = torch.tensor([BYTE.encode(text)])
        x = torch.cat([torch.full((1, 1), BYTE.eos_id), ids[:, :-1]], 1)
        with torch.no_grad():
            carried = M.token_nll(model, x, ids, BYTE.vocab_size)[0].double().numpy()
            reset = torch.cat([M.token_nll(model, x[:, s:s + win], ids[:, s:s + win], BYTE.vocab_size)
                               for s in range(0, ids.size(1), win)], 1)[0].double().numpy()
        targets = LR.name_targets(*LR.book_text(ids[0].numpy(), LR.token_bytes_table(BYTE)))
        for mode, nll in (("carried", carried), ("reset", reset)):
            totals[mode] += nll.sum()
            pos[mode] += nll[256:512].sum()
            sums[mode] += np.bincount(targets[targets >= 0], weights=nll[targets >= 0], minlength=6)
        counts += np.bincount(targets[targets >= 0], minlength=6)
        n_tokens += ids.size(1)
    assert res["tokens"] == n_tokens
    assert res["carried_loss"] == pytest.approx(totals["carried"] / n_tokens, abs=1e-5)
    assert res["reset_loss"] == pytest.approx(totals["reset"] / n_tokens, abs=1e-5)
    assert abs(res["carried_loss"] - res["reset_loss"]) > 1e-6          # the control differs from carried
    for k, row in enumerate(res["names"]):
        assert row["targets"] == counts[k]
        if counts[k]:
            assert row["carried"] == pytest.approx(sums["carried"][k] / counts[k], abs=1e-5)
            assert row["reset"] == pytest.approx(sums["reset"][k] / counts[k], abs=1e-5)
    last = res["positions"][-1]
    assert (last["lo"], last["hi"], last["tokens"]) == (256, 512, 512)
    assert last["carried"] == pytest.approx(pos["carried"] / 512, abs=1e-5)
    assert last["reset"] == pytest.approx(pos["reset"] / 512, abs=1e-5)
    first_window = [r for r in res["positions"] if r["hi"] <= win]
    assert all(r["carried"] == pytest.approx(r["reset"], abs=1e-5) for r in first_window)


class Crash(Exception):
    pass


@pytest.mark.parametrize("stage", ["longrange", "chapters"])
def test_new_stages_resume_from_partial_sums(tiny_model, stage):
    """A longrange / chapters stage killed after its second partial save continues from the saved
    accumulators and gives exactly the numbers of an uninterrupted run."""
    model = tiny_model(d_model=16, n_layer=1).eval()
    texts = [story(s, 700) for s in range(3)]
    data = Books(texts)
    cfg = config(book_batch_size=1, chapter_tokens=16)
    run = E.eval_longrange if stage == "longrange" else E.eval_chapters
    full = run(model, BYTE, data, cfg, amp, 128)
    saves = []

    def save_then_crash(acc):
        saves.append(json.loads(json.dumps(acc)))                  # as the state file holds it
        if len(saves) == 2:
            raise Crash

    with pytest.raises(Crash):
        run(model, BYTE, data, cfg, amp, 128, E.Progress(None, save_then_crash, every=0))
    assert saves[-1]["next"] == 2
    resumed = run(model, BYTE, data, cfg, amp, 128, E.Progress(saves[-1], None))
    assert json.dumps(resumed, sort_keys=True) == json.dumps(full, sort_keys=True)      # nan-safe, bit-exact
    if stage == "chapters":
        assert full["carried"]["breaks"] > 0 and math.isfinite(full["carried"]["mean_rank"])
