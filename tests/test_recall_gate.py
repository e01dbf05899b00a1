"""The recall gate (mamba_lm/recall_gate.py): dial validation, the bookkeeping of statements, questions,
distances and answer token positions on hand-built and generated cases, and the scoring."""

import pytest

from mamba_lm import recall_gate as G
from mamba_lm.errors import UserError
from mamba_lm.tokenizer import load_tokenizer


def small_dial(**kw):
    base = dict(bindings=3, distractors=1, candidates=8, characters=8, kinds="place", distances="16:48",
                weights="1:1", probe_distances="16:48", filler="none", chars_per_token=1.0, num_books=2,
                episodes_per_book=4, probe_episodes=3, seed=5)
    return G.GateDial(**{**base, **kw})


def test_hand_built_book_offsets_and_distance():
    """Guards the statement/question bookkeeping on a hand-built book: the answer offsets, the distance in
    characters, and that the first mention is a statement (no probe) and the second a question."""
    book = G._Book(1)
    fact = {"stated": None, "target": 64, "candidates": ["Corfe", "Dover"]}
    book.add([("Abel", "place", "Corfe", "", fact)])
    book.add(["Some filler."])
    book.add([("Abel", "place", "Corfe", "Later,", fact)])
    assert book.text == "Abel lived in Corfe.\n\nSome filler.\n\nLater, Abel lived in Corfe."
    (p,) = book.probes
    assert p["intro_offset"] == 14 and p["char_offset"] == 57 and p["distance_chars"] == 43
    assert book.text[p["char_offset"]:p["char_offset"] + 5] == "Corfe" == book.text[14:19]
    assert p["candidates"] == ["Corfe", "Dover"] and p["target_distance"] == 64


def test_generated_books_bookkeeping():
    """Guards every generated probe: the answer stands at both offsets, is one of its candidates, each episode
    asks exactly `bindings` facts, and the training distances follow the dial."""
    dial = small_dial(kinds="trait:object:place:relation", filler="demo", chars_per_token=3.5)
    books = G.generate_books(dial)
    assert len(books) == 2
    for b in books:
        assert len(b["probes"]) == dial.episodes_per_book * dial.bindings
        for p in b["probes"]:
            t, a = b["TEXT"], p["answer"]
            assert t[p["char_offset"]:p["char_offset"] + len(a)] == a == t[p["intro_offset"]:p["intro_offset"] + len(a)]
            assert p["distance_chars"] == p["char_offset"] - p["intro_offset"] > 0
            assert a in p["candidates"] and p["target_distance"] in (16, 48)
            if p["kind"] != "relation":
                assert p["candidates"] == G.VALUES[p["kind"]][:dial.candidates]
    assert G.generate_books(dial)[0]["TEXT"] == books[0]["TEXT"]            # deterministic


def test_probe_set_token_positions_with_bytes():
    """Guards the probe set's token bookkeeping: with byte ids (1 char = 1 token, place names with distinct
    first letters) each answer span decodes to the answer, the distance equals the character distance, the
    statement's answer sits `distance` tokens earlier, and the candidate ids are the first bytes."""
    dial = small_dial()
    tok = load_tokenizer("byte")
    ps = G.build_probe_set(dial, tok)
    assert ps["dropped"] == 0 and len(ps["docs"]) == 2
    books = G.probe_books(dial)
    for doc, book in zip(ps["docs"], books):
        assert len(doc["probes"]) == dial.probe_episodes * dial.bindings == len(book["probes"])
        for p, raw in zip(doc["probes"], book["probes"]):
            ids = doc["ids"]
            answer = tok.decode(ids[p["a"]:p["b"]])
            assert answer == raw["answer"] and p["distance"] == raw["distance_chars"]
            s = p["a"] - p["distance"]
            assert tok.decode(ids[s:s + p["b"] - p["a"]]) == answer
            assert p["candidates"][p["answer"]] == ids[p["a"]] == ord(answer[0])
    assert {p["target_distance"] for p in ps["docs"][1]["probes"]} == {48}


def test_dial_errors_are_one_line():
    """Guards the dial's validation: unknown preset/key, candidates beyond the vocabulary, too many facts."""
    for spec in ("nope", "cpu,colour=3", "cpu,candidates=99", "cpu,candidates=x", "cpu,bindings=60,characters=4"):
        with pytest.raises(UserError):
            G.parse_dial(spec)
    d = G.parse_dial("cpu,candidates=16,distances=64:512,weights=2:1")
    assert d.candidates == 16 and d.distance_list == [64, 512] and d.weight_list == [2.0, 1.0]


def test_score_gate_carried_equals_one_forward_and_reset_control(tiny_model):
    """Guards the scoring: with the state carried, windows of 7 tokens give the same log-probs as one window
    over the whole book; reset equals carried when one window covers the book; chance = 1/candidates."""
    dial = small_dial(num_books=1, probe_episodes=2, probe_distances="16")
    tok = load_tokenizer("byte")
    ps = G.build_probe_set(dial, tok)
    model = tiny_model(vocab_size=257)
    n = max(len(d["ids"]) for d in ps["docs"])
    short = G.score_gate(model, ps, 7, 257, tok.eos_id)
    whole = G.score_gate(model, ps, n + 1, 257, tok.eos_id)
    assert short["logprob"] == pytest.approx(whole["logprob"], abs=1e-4)
    assert short["accuracy"] == whole["accuracy"]
    assert whole["reset_logprob"] == pytest.approx(whole["logprob"], abs=1e-6)
    assert whole["chance"] == pytest.approx(1 / 8) and whole["probes"] == 2 * dial.bindings
    assert list(whole["buckets"]) == ["16"] and 0 <= whole["accuracy"] <= 1


def test_prepare_data_source_recall_gate(tmp_path):
    """Guards the data source: prepare_data.py --source=recall-gate writes a normal data dir (BPE trained on the
    gate text) plus gate_probes.json built with that tokenizer, whose answer spans hold the answers."""
    import prepare_data
    from mamba_lm.data import load_meta

    out = tmp_path / "gate"
    prepare_data.main(["--source=recall-gate", "--gate=cpu,num_books=4,episodes_per_book=30,probe_episodes=4",
                       "--seq_len=64", f"--out_dir={out}", "--demo_vocab_size=400"])
    meta = load_meta(out)
    assert meta["source"]["kind"] == "recall-gate" and meta["splits"]["train"]["tokens"] > 0
    probes = G.load_probe_set(out)
    assert probes["tokenizer_sha256"] == meta["tokenizer"]["sha256"]
    tok = load_tokenizer(str(out))
    for doc in probes["docs"]:
        assert doc["probes"]
        for p in doc["probes"]:
            assert doc["ids"][p["a"]] == p["candidates"][p["answer"]]
            assert tok.decode(doc["ids"][p["a"]:p["b"]]).strip() in G.VALUES[p["kind"]]
