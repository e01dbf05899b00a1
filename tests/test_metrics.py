"""Evaluation metrics (mamba_lm/metrics.py): hand-checkable numbers, crafted texts, carried state."""

import math
import random

import numpy as np
import pytest
import torch

from mamba_lm import metrics as M


class UniformModel(torch.nn.Module):
    """A fake LM: uniform over the first `vocab` logits, huge logits on the padding rows (must be ignored)."""

    def __init__(self, vocab: int, padded: int):
        super().__init__()
        self.vocab, self.padded = vocab, padded

    def forward(self, x, cache=None):
        logits = torch.zeros(*x.shape, self.padded)
        logits[..., self.vocab:] = 100.0
        return logits


def test_bits_per_byte_and_word_perplexity_hand_checked():
    """Uniform over 4 tokens -> ln 4 nats = 2 bits per token; 6 tokens of 12 bytes and 3 words give
    bpb = 12 bits / 12 bytes = 1.0, word ppl = exp(6 ln4 / 3) = 16, token ppl = 4 (padding logits ignored)."""
    x = torch.tensor([[1, 2, 3, 0, 1, 2]])
    nll = M.token_nll(UniformModel(4, 8), x, x, vocab_size=4)
    assert nll.shape == (1, 6)
    assert torch.allclose(nll, torch.full((1, 6), math.log(4)))
    s = M.loss_summary(float(nll.sum()), 6, num_bytes=12, num_words=3)
    assert s["loss"] == pytest.approx(math.log(4))
    assert s["ppl"] == pytest.approx(4.0)
    assert s["bits_per_byte"] == pytest.approx(1.0)
    assert s["word_ppl"] == pytest.approx(16.0)
    assert s["bytes_per_token"] == pytest.approx(2.0)
    assert math.isnan(M.bits_per_byte(1.0, 0)) and math.isnan(M.perplexity(1.0, 0))


def test_token_byte_lengths_sum_to_utf8_length():
    """Summing token_bytes over the ids of a text gives its exact UTF-8 length (byte and BPE tokenizers,
    multi-byte characters split across ids); eos counts 0 bytes."""
    from mamba_lm.tokenizer import load_tokenizer, train_demo_bpe

    text = "Café au lait — naïve Zoë said, \u201cno\u201d. The the the café."
    for tok in (load_tokenizer("byte"), train_demo_bpe([text * 3, "plain words here"], vocab_size=300)):
        lengths = M.token_byte_lengths(tok, skip_ids=[tok.eos_id])
        ids = tok.encode(text) + [tok.eos_id]
        assert int(lengths[ids].sum()) == len(text.encode("utf-8"))
        assert lengths[tok.eos_id] == 0


def test_count_words_over_arbitrary_pieces():
    """Words of a text cut into random pieces equal len(text.split()): a word split by a cut counts once."""
    rng = random.Random(0)
    text = "  It was the best of times,\nit was the  worst of times; \n\nit was the age of wisdom. "
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(text)), 6))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        assert M.count_words(pieces) == len(text.split())
    assert M.count_words(["ld and more"], continues_word=True) == 2      # "ld" finishes a counted word
    assert M.count_words([" and"], continues_word=True) == 1


def test_count_words_chained_over_groups_with_ends_in_word():
    """Counting a text group by group (as evaluate.py counts consecutive sequences), passing
    ends_in_word of the groups so far as continues_word, gives len(text.split()); empty and
    whitespace-only pieces leave / end a word correctly."""
    rng = random.Random(1)
    text = "Call me Ishmael. Some years ago -- never mind\n\nhow long precisely --  having little money "
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(text)), 9))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        groups = [pieces[:3], [], pieces[3:4] + [""], pieces[4:]]
        words, inside = 0, False
        for g in groups:
            words += M.count_words(g, continues_word=inside)
            inside = M.ends_in_word(g, inside)
        assert words == len(text.split())
    assert M.ends_in_word(["", "ab", ""], False) and not M.ends_in_word(["ab", "  "], True)
    assert M.ends_in_word([], True) and not M.ends_in_word([""], False)


def test_position_buckets_and_means():
    """log2 buckets of 1024 positions are 0,1,2-3,...,512-1023, and bucket means are token-weighted."""
    buckets = M.log2_buckets(1024)
    assert [M.bucket_label(*b) for b in buckets][:4] == ["0", "1", "2-3", "4-7"]
    assert buckets[-1] == (512, 1024) and len(buckets) == 11
    assert M.log2_buckets(6) == [(0, 1), (1, 2), (2, 4), (4, 6)]
    nll_sum = np.array([1.0, 2.0, 3.0, 5.0, 8.0, 10.0])
    count = np.array([1, 1, 1, 3, 2, 2])
    rows = M.bucket_means(nll_sum, count, M.log2_buckets(6))
    assert [r["loss"] for r in rows] == pytest.approx([1.0, 2.0, 8.0 / 4, 18.0 / 4])
    assert [r["tokens"] for r in rows] == [1, 1, 4, 4]


def test_per_position_loss_matches_manual_computation():
    """token_nll at each position equals -log_softmax(logits)[target] computed by hand."""
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 8)

    class Fixed(torch.nn.Module):
        def forward(self, x, cache=None):
            return logits

    y = torch.randint(0, 6, (2, 5))
    nll = M.token_nll(Fixed(), y, y, vocab_size=6)
    manual = torch.empty(2, 5)
    for b in range(2):
        for t in range(5):
            manual[b, t] = -torch.log_softmax(logits[b, t, :6], -1)[y[b, t]]
    assert torch.allclose(nll, manual, atol=1e-6)


def test_distinct_and_seq_rep():
    """distinct-n and seq-rep-n on sequences whose n-gram counts are known."""
    seq = [1, 2, 3, 1, 2, 3]                       # bigrams: 12 23 31 12 23 -> 3 unique of 5
    assert M.distinct_n(seq, 1) == pytest.approx(3 / 6)
    assert M.distinct_n(seq, 2) == pytest.approx(3 / 5)
    assert M.seq_rep_n(seq, 2) == pytest.approx(1 - 3 / 5)
    assert M.seq_rep_n(list(range(10)), 4) == 0.0
    assert M.seq_rep_n([7] * 10, 4) == pytest.approx(1 - 1 / 7)
    assert M.distinct_n([[1, 2], [1, 2, 3]], 2) == pytest.approx(2 / 3)   # corpus level, no cross-sequence gram
    assert math.isnan(M.seq_rep_n([1, 2], 4))


def test_rep_l_with_and_without_context():
    """rep/l counts tokens seen within the previous l tokens, looking back into the prompt when given."""
    assert M.rep_l([1, 2, 1, 3], window=2) == pytest.approx(1 / 3)   # only the second 1 repeats (within 2)
    assert M.rep_l([1, 2, 3, 1], window=2) == 0.0                       # the 1 is 3 tokens back
    assert M.rep_l([1, 2, 3, 1], window=3) == pytest.approx(1 / 3)
    assert M.rep_l([5, 6], window=4, context=[6, 5]) == 1.0            # both already in the prompt


def test_first_loop_position():
    """The loop detector finds the first start of >= repeats back-to-back copies of a block >= min_period."""
    assert M.first_loop_position([5, 1, 2, 1, 2, 1, 2], min_period=2, repeats=3) == 1
    assert M.first_loop_position([5, 1, 2, 1, 2, 9], min_period=2, repeats=3) == 6       # only 2 copies
    seq = list(range(20)) + [7, 8, 9, 10] * 3 + [99]
    assert M.first_loop_position(seq, min_period=4, repeats=3) == 20
    assert M.first_loop_position(seq, min_period=5, repeats=3) == len(seq)              # block too short
    assert M.first_loop_position([1, 2, 3] + [4] * 12, min_period=4, repeats=3) == 3    # period 1 via period 4
    assert M.loop_fraction([5, 1, 2, 1, 2, 1, 2], min_period=2, repeats=3) == pytest.approx(6 / 7)


def test_capitalised_names_heuristic():
    """Names are capitalised words not at a sentence/paragraph start, minus the stop list; possessives stripped."""
    text = ("Once upon a time, Tom met Mary in London. \"Hello,\" said Tom. Mr Brown's dog barked at Tom's cat.\n\n"
            "Harold came. She saw Jane on Monday and I waved.")
    assert M.capitalised_names(text) == ["Tom", "Mary", "Tom", "Brown", "Tom", "Jane"]


def test_name_consistency_counts():
    """Reused vs invented names: mentions and distinct names counted exactly."""
    prompt = "The letter was for Anna. It said that Anna and Boris had gone north with Clara."
    cont = "Later that week Anna wrote to Boris, and Anna met Zed. Then Boris laughed with Yuri."
    r = M.name_consistency(prompt, cont)
    assert r["prompt_names"] == 3                      # Anna, Boris, Clara
    assert r["reused_names"] == 2 and r["new_names"] == 2
    assert r["reused_mentions"] == 4 and r["new_mentions"] == 2   # Anna x2, Boris x2 | Zed, Yuri
    assert r["consistency"] == pytest.approx(4 / 6)
    assert r["prompt_name_recall"] == pytest.approx(2 / 3)
    empty = M.name_consistency("no names here.", "none here either.")
    assert math.isnan(empty["consistency"]) and math.isnan(empty["prompt_name_recall"])


def test_generation_metrics_and_means():
    """generation_metrics bundles every metric; mean_metrics averages numeric keys ignoring nan."""
    row = M.generation_metrics([1, 2], [3, 4, 3, 4, 3, 4, 3, 4], "A Tom b.", "x Tom y.", loop_min_period=2,
                               loop_repeats=3)
    assert row["first_loop"] == 0 and row["looped"] == 1.0
    assert row["distinct_1"] == pytest.approx(2 / 8)
    assert row["names_consistency"] == 1.0
    mean = M.mean_metrics([{"a": 1.0, "b": float("nan")}, {"a": 3.0, "b": 2.0}])
    assert mean == {"a": 2.0, "b": 2.0}


def test_answer_scores():
    """The answer's first token is scored by argmax and rank; mean log-prob averages all answer tokens."""
    lp = torch.log_softmax(torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]]), -1)
    s = M.answer_scores(lp, [1, 0])
    assert s["first_correct"] == 1.0 and s["first_rank"] == 0
    assert s["mean_logprob"] == pytest.approx(float((lp[0, 1] + lp[1, 0]) / 2))
    s = M.answer_scores(lp, [2, 0])
    assert s["first_correct"] == 0.0 and s["first_rank"] == 1


def test_carried_state_equals_one_long_forward():
    """Tiny Mamba: NLL with the cache carried over 3 windows equals one forward over the whole sequence
    (within 1e-5); resetting the state per window equals independent forwards of each window."""
    from mamba_lm.mamba import MambaLMHeadModel, mamba_config

    torch.manual_seed(0)
    model = MambaLMHeadModel(mamba_config("tiny", vocab_size=61, d_model=32)).eval()
    x = torch.randint(0, 61, (2, 3 * 16 - 5))                 # 3 windows of 16, the last one short
    y = torch.roll(x, -1, dims=1)
    with torch.no_grad():
        full = M.token_nll(model, x, y, 61)
        carried = M.windowed_nll(model, x, y, 16, 61, carry_state=True)
        reset = M.windowed_nll(model, x, y, 16, 61, carry_state=False, max_rows=4)
        second = M.token_nll(model, x[:, 16:32], y[:, 16:32], 61)
        last = M.token_nll(model, x[:, 32:], y[:, 32:], 61)
    print("max |carried - full| =", float((carried - full).abs().max()))
    assert carried.shape == reset.shape == (2, 43)
    assert torch.allclose(carried, full, atol=1e-5)
    assert torch.allclose(reset[:, 16:32], second, atol=1e-5)
    assert torch.allclose(reset[:, 32:], last, atol=1e-5)
    assert not torch.allclose(reset[:, 16:], full[:, 16:], atol=1e-3)   # the state does matter


def test_probe_token_spans_locate_answers_in_the_whole_text_encoding():
    """Demo-story probes: segment-wise encoding equals the whole-text encoding (demo BPE), every span
    decodes to the probe's answer, and distances are positive token counts back to the introduction."""
    from mamba_lm.demo_corpus import generate_book, recall_probes
    from mamba_lm.tokenizer import load_tokenizer, train_demo_bpe

    book = generate_book(0, seed=3, words_per_book=1500)
    probes = recall_probes(book)
    assert probes
    for tok in (train_demo_bpe([book["TEXT"]], vocab_size=400), load_tokenizer("byte")):
        ids, spans = M.probe_token_spans(book["TEXT"], probes, tok)
        assert ids == tok.encode(book["TEXT"])
        assert len(spans) == len(probes)
        for (a, b, dist, kind), p in zip(spans, probes):
            assert tok.decode(ids[a:b]).strip() == p["answer"] and kind == p["kind"]
            assert 0 < dist <= p["distance_chars"]
        if tok.kind == "byte":                                     # one byte per char: distance in chars
            assert [s[2] for s in spans] == [p["distance_chars"] for p in probes]


def test_summarize_recall_groups_by_distance_and_kind():
    """Accuracy and log-prob are averaged per distance bucket (ordered by distance) and per kind."""
    carried = [{"distance": 10, "kind": "town", "first_correct": 1.0, "mean_logprob": -1.0},
               {"distance": 3000, "kind": "town", "first_correct": 0.0, "mean_logprob": -3.0},
               {"distance": 3500, "kind": "pet", "first_correct": 1.0, "mean_logprob": -2.0}]
    reset = [dict(r, first_correct=0.0) for r in carried]
    out = M.summarize_recall(carried, reset, [0, 1024, 4096])
    assert list(out["buckets"]) == ["0-1023", "1024-4095"]
    assert out["buckets"]["1024-4095"] == {"probes": 2, "accuracy": 0.5, "mean_logprob": -2.5, "reset_accuracy": 0.0}
    assert out["accuracy"] == pytest.approx(2 / 3) and out["reset_accuracy"] == 0.0
    assert out["by_kind"] == {"pet": 1.0, "town": 0.5}


def test_carried_state_equals_one_long_forward_multitrack():
    """Tiny multi-track model (narrative-signal state included): NLL with the cache carried over windows
    equals one forward over the whole text (within 1e-5), as the books and recall stages assume."""
    from multitrack.multitrack_config import multitrack_config
    from multitrack.multitrack_model import MultiTrackLM
    from multitrack.narrative import build_signal_tables
    from mamba_lm.tokenizer import load_tokenizer

    tok = load_tokenizer("byte")
    torch.manual_seed(0)
    model = MultiTrackLM(multitrack_config("tiny", vocab_size=257, d_model=32, n_layer=2))
    model.set_signal_table(build_signal_tables(tok))
    with torch.no_grad():                               # move zero-initialised parts off zero
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.eval()
    text = 'CHAPTER I\n\nHe said, "Run now, before the rain." Then he left.\n\n"Wait," she called. "Wait!"\n\nNight.'
    ids = torch.tensor([tok.encode(text)])[:, :90]
    x, y = ids[:, :-1], ids[:, 1:]                      # window 16: a quote spans a window boundary
    with torch.no_grad():
        full = M.token_nll(model, x, y, 257)
        carried = M.windowed_nll(model, x, y, 16, 257, carry_state=True)
        reset = M.windowed_nll(model, x, y, 16, 257, carry_state=False)
    print("max |carried - full| =", float((carried - full).abs().max()))
    assert torch.allclose(carried, full, atol=1e-5)
    assert not torch.allclose(reset[:, 16:], full[:, 16:], atol=1e-4)
