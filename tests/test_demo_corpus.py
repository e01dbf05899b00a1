"""Tests for mamba_lm/demo_corpus.py: determinism, structure and the long-range recall probes."""

import json
import re

from mamba_lm.demo_corpus import books_for_source, generate_book, generate_books, recall_probes
from mamba_lm.gutenberg import clean_book


def test_deterministic_in_seed():
    """Same seed -> identical books; another seed -> different books."""
    a = generate_books(3, seed=7, words_per_book=1500)
    b = generate_books(3, seed=7, words_per_book=1500)
    c = generate_books(3, seed=8, words_per_book=1500)
    assert [x["TEXT"] for x in a] == [x["TEXT"] for x in b]
    assert a[0]["TEXT"] != c[0]["TEXT"]
    assert len({x["id"] for x in a}) == 3


def test_rows_look_like_parquet_rows():
    """Rows carry TEXT, SOURCE and a METADATA JSON string with text_id, title, authors, language."""
    book = generate_book(0, seed=1, words_per_book=800)
    meta = json.loads(book["METADATA"])
    assert meta["text_id"] == book["id"] and meta["title"] == book["title"] and meta["language"] == "en"
    assert isinstance(book["SOURCE"], str) and len(book["TEXT"].split()) >= 800


def test_structure_chapters_dialogue_paragraphs():
    """Books have numbered chapter headings, quoted dialogue and blank-line separated paragraphs."""
    text = generate_book(1, seed=2, words_per_book=3000)["TEXT"]
    assert re.search(r"^CHAPTER I\. ", text, re.M) and re.search(r"^CHAPTER III\. ", text, re.M)
    assert re.search(r'^"[A-Z][^"]+[,?]" [a-z]+ [A-Z][a-z]+\.$', text, re.M)
    assert "\n\n\n" not in text and text.count("\n\n") > 50


def test_probes_point_at_answers_far_from_their_introduction():
    """Each probe's answer is at char_offset, was introduced at intro_offset, and distance is their gap."""
    book = generate_book(2, seed=3, words_per_book=6000)
    text, probes = book["TEXT"], recall_probes(book)
    assert len(probes) > 20
    for p in probes:
        assert text[p["char_offset"]:p["char_offset"] + len(p["answer"])] == p["answer"]
        assert text[p["intro_offset"]:p["intro_offset"] + len(p["answer"])] == p["answer"]
        assert p["distance_chars"] == p["char_offset"] - p["intro_offset"] > 0
        assert p["book_id"] == book["id"]
    far = recall_probes(book, min_distance=10000)
    assert far and all(p["distance_chars"] >= 10000 for p in far)
    assert {p["kind"] for p in probes} >= {"town", "prof", "pet", "eyes"}


def test_traits_stay_stable():
    """A character's trait is the same at every mention: all probes of one (intro, kind) share the answer."""
    book = generate_book(4, seed=9, words_per_book=6000)
    answers = {}
    for p in recall_probes(book):
        answers.setdefault((p["intro_offset"], p["kind"]), set()).add(p["answer"])
    assert answers and all(len(v) == 1 for v in answers.values())


def test_demo_text_is_already_clean():
    """clean_book leaves demo text unchanged, so probe offsets hold in the prepared data."""
    for book in generate_books(3, seed=11, words_per_book=1000):
        text, report = clean_book(book["TEXT"])
        assert text == book["TEXT"] and report.head == report.tail == "precleaned"


def test_books_for_source_regenerates():
    """books_for_source rebuilds the books of a demo data dir from its meta.json source entry."""
    src = {"kind": "demo", "num_books": 2, "seed": 5, "words_per_book": 500}
    assert [b["TEXT"] for b in books_for_source(src)] == [b["TEXT"] for b in generate_books(2, 5, 500)]
