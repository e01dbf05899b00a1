"""Narrative signal tables (multitrack/narrative.py) on real BPE and byte-level vocabularies, and the
parallel dialogue-parity / paragraph-break logic against a sequential definition."""

from __future__ import annotations

import random

import pytest
import torch

from multitrack.narrative import (COL, FEATURE_NAMES, SIGNAL_COLUMNS, TOKEN_TYPES, NarrativeState,
                                  build_signal_tables, dialogue_parity, narrative_entry, narrative_features,
                                  narrative_step, narrative_transitions, token_signals)
from mamba_lm.tokenizer import load_tokenizer, train_demo_bpe

F = {name: i for i, name in enumerate(FEATURE_NAMES)}

STORY = ("CHAPTER I\n\nThe Beginning\n\n"
         "“Where are you going?” asked Mr. Holt. He waited.\n\n"
         "\"To the river,\" she said. \"Come with me!\"\n\n"
         "* * *\n\n"
         "CHAPTER II\n\nNight fell. The fire was low, and the wind rose over the hills.\n\n")


@pytest.fixture(scope="module")
def bpe():
    """A real byte-level BPE trained on crafted fiction-like text (so '\\n\\n', '“', 'CHAPTER' are whole tokens)."""
    return train_demo_bpe([STORY] * 50, vocab_size=400)


def _ids_of(tok, text):
    ids = tok.encode(text)
    assert len(ids) == 1, f"{text!r} is not a single token here: {ids}"
    return ids[0]


def test_bpe_table_flags_key_tokens(bpe):
    """Guards the per-token table on a trained BPE: paragraph breaks, quotes, headings, sentence ends."""
    table = build_signal_tables(bpe)
    assert table.shape == (bpe.vocab_size, len(SIGNAL_COLUMNS)) and table.dtype == torch.uint8
    row = lambda text: table[_ids_of(bpe, text)]                                  # noqa: E731
    assert row("\n\n")[COL["double_newline"]] == 1 and row("\n\n")[COL["newline"]] == 1
    assert row("“")[COL["quote_count"]] == 1 and row('"')[COL["quote_count"]] == 1
    assert row("CHAPTER")[COL["heading"]] == 1
    assert row("The")[COL["heading"]] == 0 and row("The")[COL["quote_count"]] == 0
    assert row(".")[COL["sentence_end"]] == 1
    assert table[bpe.eos_id, COL["doc_boundary"]] == 1 and table[:, COL["doc_boundary"]].sum() == 1
    # every id containing a double newline is flagged, nothing else is
    for i in range(bpe.vocab_size):
        assert table[i, COL["double_newline"]] == int(b"\n\n" in bpe.token_bytes(i))


def test_token_signals_rules():
    """Guards the byte rules: abbreviations are not sentence ends, scene marks, heading prefixes, newlines."""
    assert token_signals(b" Mr.")[COL["sentence_end"]] == 0
    assert token_signals(b' end."')[COL["sentence_end"]] == 1
    assert token_signals(b"?\xe2\x80\x9d")[COL["sentence_end"]] == 1          # ?”
    assert token_signals(b" * * *")[COL["scene_mark"]] == 1
    assert token_signals(b" *")[COL["scene_mark"]] == 1 and token_signals(b"a*")[COL["scene_mark"]] == 0
    assert token_signals(b" CHAP")[COL["heading"]] == 1 and token_signals(b" CH")[COL["heading"]] == 0
    assert token_signals(b" part")[COL["heading"]] == 0
    assert token_signals(b"\n \n")[COL["starts_newline"]] == 1
    assert token_signals(b".\n")[COL["ends_newline"]] == 1 and token_signals(b".\n")[COL["starts_newline"]] == 0
    assert token_signals(b"\xe2\x80")[COL["quote_count"]] == 0                 # a partial UTF-8 piece
    assert token_signals(b"", is_eos=True)[COL["doc_boundary"]] == 1


def test_byte_level_table_and_split_paragraph_break():
    """Guards byte-level vocabularies: '\\n' '\\n' (two tokens) is a paragraph break via the carried flag."""
    tok = load_tokenizer("byte")
    table = build_signal_tables(tok)
    assert table.shape == (257, len(SIGNAL_COLUMNS))
    assert table[ord('"'), COL["quote_count"]] == 1 and table[ord("\n"), COL["ends_newline"]] == 1
    assert table[256, COL["doc_boundary"]] == 1
    ids = torch.tensor([tok.encode("Hi.\n\nYes")])
    feats, types, _ = narrative_features(table[ids])
    breaks = feats[0, :, F["paragraph_break"]].tolist()
    assert breaks == [0, 0, 0, 0, 1, 0, 0, 0]                                   # the second "\n"
    assert feats[0, :, F["paragraph_start"]].tolist() == [0, 0, 0, 0, 0, 1, 0, 0]
    assert feats[0, 2, F["sentence_end"]] == 1
    # the same break split across two chunks, carried by the state
    f1, _, s1 = narrative_features(table[ids[:, :4]])
    f2, _, _ = narrative_features(table[ids[:, 4:]], s1)
    assert torch.equal(torch.cat([f1, f2], 1), feats)


def _sequential_parity(quotes, resets, p0):
    out, p = [], p0
    for q, r in zip(quotes, resets):
        p = 0 if r else (p + q) % 2
        out.append(p)
    return out


def test_dialogue_parity_matches_sequential_definition():
    """Guards the parallel cumsum/cummax parity against a token-by-token loop, with resets and carry-in."""
    rng = random.Random(0)
    for _ in range(20):
        b, l = 3, rng.randint(1, 40)
        quotes = torch.tensor([[rng.choice([0, 0, 0, 1, 2]) for _ in range(l)] for _ in range(b)])
        resets = torch.tensor([[rng.random() < 0.15 for _ in range(l)] for _ in range(b)])
        p0 = torch.tensor([rng.randint(0, 1) for _ in range(b)])
        got = dialogue_parity(quotes, resets, p0)
        for i in range(b):
            assert got[i].tolist() == _sequential_parity(quotes[i].tolist(), resets[i].tolist(), int(p0[i]))


def test_inside_dialogue_on_crafted_story(bpe):
    """Guards the dialogue flag on real text: quoted words are dialogue, narration between quotes is not,
    and an unclosed quote does not leak past the paragraph break."""
    table = build_signal_tables(bpe)
    text = 'He said, "Run now." Then he left.\n\n"Wait\n\nThe end.'
    ids = bpe.encode(text)
    feats, types, state = narrative_features(table[torch.tensor([ids])])
    inside = feats[0, :, F["in_dialogue"]].tolist()
    pieces = [bpe.decode([i]) for i in ids]
    dialogue_text = "".join(p for p, d in zip(pieces, inside) if d)
    narration_text = "".join(p for p, d in zip(pieces, inside) if not d)
    assert "Run" in dialogue_text and "now" in dialogue_text and "Wait" in dialogue_text
    assert "said" in narration_text and "left" in narration_text and "end" in narration_text
    assert types[0, :, TOKEN_TYPES.index("dialogue")].tolist() == inside
    assert int(state.parity[0]) == 0                                             # reset by the last break
    # stopping right after the unclosed quote: parity 1 is carried, the next token is dialogue
    cut = len(bpe.encode('He said, "Run now." Then he left.\n\n"'))
    _, _, mid = narrative_features(table[torch.tensor([ids[:cut]])])
    assert int(mid.parity[0]) == 1
    f2, _, _ = narrative_features(table[torch.tensor([ids[cut:cut + 1]])], mid)
    assert f2[0, 0, F["in_dialogue"]] == 1


def test_narrative_state_chunked_equals_full():
    """Guards carrying NarrativeState across chunk boundaries at every split point (incl. length-1 steps)."""
    tok = load_tokenizer("byte")
    table = build_signal_tables(tok)
    ids = torch.tensor([tok.encode(STORY)[:120], tok.encode(STORY)[40:160]])
    full, full_types, full_state = narrative_features(table[ids])
    for cut in (1, 17, 63, 119):
        f1, t1, s = narrative_features(table[ids[:, :cut]], NarrativeState.zeros(2))
        f2, t2, s2 = narrative_features(table[ids[:, cut:]], s)
        assert torch.equal(torch.cat([f1, f2], 1), full) and torch.equal(torch.cat([t1, t2], 1), full_types)
        assert torch.equal(s2.parity, full_state.parity)


@pytest.mark.parametrize("vocab", ["byte", "bpe"])
def test_narrative_step_equals_chunk_features(vocab, bpe):
    """Guards the decode-step fast path: narrative_step, token by token, gives the same features and
    the same carried state as narrative_features over the whole chunk (byte-level and BPE vocabularies)."""
    tok = load_tokenizer("byte") if vocab == "byte" else bpe
    table = build_signal_tables(tok)
    story = STORY + '"Still talking\n\n"and again," he said.\n"Ends'
    ids = tok.encode(story)
    ids = torch.tensor([ids[:100], ids[-100:]])                                  # (2, 100), different contexts
    full, _, full_state = narrative_features(table[ids])
    state = NarrativeState.zeros(2)
    steps = torch.stack([narrative_step(table[ids[:, t]], state) for t in range(ids.shape[1])], dim=1)
    assert steps.dtype == torch.float32 and torch.equal(steps, full)
    assert full[..., F["in_dialogue"]].any() and full[..., F["paragraph_break"]].any()
    for name in ("parity", "prev_ends_newline", "prev_reset"):
        assert torch.equal(getattr(state, name), getattr(full_state, name)), name


@pytest.mark.parametrize("vocab", ["byte", "bpe"])
def test_narrative_lookup_equals_narrative_step(vocab, bpe):
    """Guards the decode step's state machine (narrative_transitions + narrative_entry): token by token,
    from a nonzero start state and over random ids rich in signal tokens, its features and carried state
    equal the reference narrative_step's, and the table holds one row class per distinct table row."""
    tok = load_tokenizer("byte") if vocab == "byte" else bpe
    table = build_signal_tables(tok)
    transitions = narrative_transitions(table)
    classes = torch.unique(table, dim=0).shape[0]
    assert transitions.features.shape == (8 * classes, len(FEATURE_NAMES)) and classes > 5
    assert torch.equal(table.unique(dim=0)[transitions.token_class], table)      # class k = the k-th distinct row
    gen = torch.Generator().manual_seed(0)
    signal_ids = (table.sum(1) > 0).nonzero().squeeze(1)
    ids = torch.where(torch.rand(3, 400, generator=gen) < 0.6,
                      signal_ids[torch.randint(len(signal_ids), (3, 400), generator=gen)],
                      torch.randint(table.shape[0], (3, 400), generator=gen))
    start = dict(parity=torch.tensor([1, 0, 1]), prev_ends_newline=torch.tensor([True, True, False]),
                 prev_reset=torch.tensor([False, True, True]))
    ref = NarrativeState(**{k: v.clone() for k, v in start.items()})
    fast = NarrativeState(**{k: v.clone() for k, v in start.items()})
    parities = set()
    for t in range(ids.shape[1]):
        expected = narrative_step(table[ids[:, t]], ref)
        parities.update(ref.parity.tolist())
        entry = narrative_entry(ids[:, t], fast, transitions)
        assert torch.equal(transitions.features[entry], expected), t
        for name in start:
            assert torch.equal(getattr(fast, name), getattr(ref, name)), (t, name)
            assert getattr(fast, name).dtype == start[name].dtype
    assert parities == {0, 1}                                                     # in and out of dialogue


def test_plot_clock_boundary_rule_on_a_story(bpe):
    """Guards the plot clock's rule (multitrack/plot_clock.boundary_gate): on a BPE-tokenised story it opens
    exactly at the tokens carrying a configured feature (paragraph breaks, the heading words, the scene
    mark), nowhere inside sentences or dialogue, and the set of features is a switch (headings only)."""
    from multitrack.plot_clock import boundary_gate

    ids = torch.tensor([bpe.encode(STORY)])
    features = narrative_features(build_signal_tables(bpe)[ids])[0]
    gate = boundary_gate(features, ("paragraph_break", "heading", "scene_mark"))
    opened = [bpe.decode([i]) for i, g in zip(ids[0].tolist(), gate[0].tolist()) if g]
    assert gate.dtype == torch.float32 and set(gate.unique().tolist()) == {0.0, 1.0}
    assert opened.count("CHAPTER") == 2 and any("*" in t for t in opened)
    assert sum("\n" in t for t in opened) == STORY.count("\n\n")              # one per paragraph break
    assert all("\n" in t or t == "CHAPTER" or set(t.strip()) == {"*"} for t in opened), opened
    headings = boundary_gate(features, ("heading",))
    assert headings.sum() == 2 and (headings <= gate).all()
