"""Tests for mamba_lm/tokenizer.py: byte and BPE tokenizers, (de)serialisation, hub errors."""

import pickle

import pytest

from mamba_lm import tokenizer as tkmod
from mamba_lm.demo_corpus import generate_books
from mamba_lm.errors import UserError
from mamba_lm.tokenizer import TextTokenizer, load_tokenizer, tokenizer_from_dict, train_demo_bpe

SAMPLE = "Mara said, “Don’t go to Eldham” — café, naïve.\n\nNew paragraph 42."


@pytest.fixture(scope="module")
def bpe():
    texts = [b["TEXT"] for b in generate_books(3, seed=5, words_per_book=800)]
    return train_demo_bpe(texts, vocab_size=600)


def test_byte_tokenizer_roundtrip_and_ids():
    """Byte tokenizer: ids are the UTF-8 bytes, eos is 256 and is skipped by decode."""
    tok = load_tokenizer("byte")
    ids = tok.encode(SAMPLE)
    assert ids == list(SAMPLE.encode("utf-8"))
    assert (tok.vocab_size, tok.eos_id, tok.kind, tok.sha256) == (257, 256, "byte", "byte-v1")
    assert tok.decode(ids + [tok.eos_id]) == SAMPLE
    assert b"".join(tok.token_bytes(i) for i in ids) == SAMPLE.encode("utf-8")
    assert tok.token_bytes(256) == b""


def test_demo_bpe_deterministic_and_lossless(bpe):
    """train_demo_bpe gives the same tokenizer for the same texts, and encode/decode is lossless."""
    texts = [b["TEXT"] for b in generate_books(3, seed=5, words_per_book=800)]
    again = train_demo_bpe(texts, vocab_size=600)
    assert again.sha256 == bpe.sha256
    assert bpe.eos_id == 0 and bpe.id_to_token(0) == "<|endoftext|>"
    assert 256 < bpe.vocab_size <= 600
    ids = bpe.encode(SAMPLE)
    assert bpe.decode(ids) == SAMPLE
    assert bpe.encode_batch([SAMPLE, "abc"]) == [ids, bpe.encode("abc")]


def test_token_bytes_concatenate_to_utf8(bpe):
    """token_bytes of a BPE encoding concatenate to the text's UTF-8 bytes (needed for bits-per-byte)."""
    ids = bpe.encode(SAMPLE)
    assert b"".join(bpe.token_bytes(i) for i in ids) == SAMPLE.encode("utf-8")
    assert bpe.token_bytes(bpe.eos_id) == b""


def test_pickle_and_dict_roundtrip(bpe):
    """A tokenizer survives pickling (worker processes) and to_dict/tokenizer_from_dict (checkpoints)."""
    clone = pickle.loads(pickle.dumps(bpe))
    assert clone.encode(SAMPLE) == bpe.encode(SAMPLE)
    d = bpe.to_dict()
    assert set(d) == {"name", "kind", "vocab_size", "eos_id", "sha256", "json"}
    back = tokenizer_from_dict(d)
    assert (back.name, back.vocab_size, back.eos_id, back.sha256) == (bpe.name, bpe.vocab_size, bpe.eos_id, bpe.sha256)
    assert tokenizer_from_dict(load_tokenizer("byte").to_dict()).encode("hé") == list("hé".encode())
    with pytest.raises(UserError, match="does not match"):
        tokenizer_from_dict({**d, "sha256": "0" * 64})


def test_load_from_path_and_folder(tmp_path, bpe):
    """load_tokenizer accepts a tokenizer.json path and a folder holding one; the sha ignores JSON formatting."""
    (tmp_path / "tokenizer.json").write_text(bpe.json, encoding="utf-8")
    a = load_tokenizer(str(tmp_path / "tokenizer.json"))
    b = load_tokenizer(str(tmp_path))
    assert a.sha256 == b.sha256 == bpe.sha256
    import json
    (tmp_path / "pretty.json").write_text(json.dumps(json.loads(bpe.json), indent=4), encoding="utf-8")
    assert load_tokenizer(str(tmp_path / "pretty.json")).sha256 == bpe.sha256
    with pytest.raises(UserError, match="not found"):
        load_tokenizer(str(tmp_path / "missing.json"))


def test_hub_offline_is_user_error(monkeypatch):
    """An unreachable hub gives a one-line UserError that names the local tokenizer.json alternative."""
    def offline(repo_id):
        raise ConnectionError("no network")
    monkeypatch.setattr(tkmod, "_download_from_hub", offline)
    with pytest.raises(UserError) as e:
        load_tokenizer("EleutherAI/gpt-neox-20b")
    assert "--tokenizer=" in str(e.value) and "\n" not in str(e.value)


def test_unknown_kind_rejected():
    """Only 'hf' and 'byte' kinds exist."""
    with pytest.raises(UserError):
        TextTokenizer("x", "sentencepiece")


def test_vocab_size_is_the_id_space_not_the_token_count():
    """A tokenizer with 3 tokens whose ids are 0, 1 and 70,000 has vocab_size 70,001 (largest id + 1), so
    every check against vocab_size (uint16 .bin files, embedding rows) sees its real ids; dense tokenizers
    keep their count (byte 257, BPE <= its target)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    wl = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "[UNK]": 1, "the": 70000}, unk_token="[UNK]"))
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    assert wl.get_vocab_size(with_added_tokens=True) == 3
    tok = TextTokenizer("sparse", "hf", wl.to_str())
    assert tok.vocab_size == 70001 and max(tok.encode("the the x")) == 70000
    assert tokenizer_from_dict(tok.to_dict()).vocab_size == 70001


def test_json_that_is_no_tokenizer_is_a_user_error(tmp_path):
    """A readable JSON file that is not a tokenizers definition ({} or a list) is a one-line UserError
    naming it, not the library's bare Exception with a traceback."""
    for text in ("{}", "[1, 2]"):
        (tmp_path / "t.json").write_text(text)
        with pytest.raises(UserError, match="is not a tokenizer.json") as e:
            load_tokenizer(str(tmp_path / "t.json"))
        assert "\n" not in str(e.value)
