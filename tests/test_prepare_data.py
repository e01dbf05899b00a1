"""Tests for prepare_data.py and mamba_lm/data.py on tiny corpora made in tmp_path."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import prepare_data
from mamba_lm import sources
from mamba_lm.data import (TokenSplit, batch_indices, check_tokenizer_match, epoch_order, load_meta,
                             num_sequences)
from mamba_lm.demo_corpus import generate_books
from mamba_lm.errors import UserError
from mamba_lm.gutenberg import clean_book
from mamba_lm.tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRENCH = "Le forgeron posa son marteau et alla à la porte pour voir qui était là, mais il n'y avait personne. " * 40
FAST = ["--tokenizer=byte", "--num_workers=1", "--seq_len=64", "--min_chars=500"]


def pg_file(body: str, book_id: int, title="Test") -> str:
    """An original-style PG file around `body`: header, markers, license footer, CRLF line endings."""
    text = (f"The Project Gutenberg EBook of {title}\n\nRelease Date: May, 2004 [EBook #{book_id}]\n\n"
            f"*** START OF THIS PROJECT GUTENBERG EBOOK {title.upper()} ***\n\nProduced by A. Volunteer\n\n\n"
            + body + f"\n\n\nEnd of the Project Gutenberg EBook of {title}\n\n"
            f"*** END OF THIS PROJECT GUTENBERG EBOOK {title.upper()} ***\n\n" + "Project Gutenberg license. " * 30)
    return text.replace("\n", "\r\n")


def demo_bodies(n, words=400, seed=3):
    return [b["TEXT"] for b in generate_books(n, seed=seed, words_per_book=words)]


def write_parquet(path, rows, columns=("TEXT", "SOURCE", "METADATA")):
    table = pa.table({c: [r.get(c) for r in rows] for c in columns})
    pq.write_table(table, path, row_group_size=3)


def pg_rows(n=8, seed=3):
    return [{"TEXT": pg_file(t, 100 + i), "SOURCE": "Project Gutenberg",
             "METADATA": json.dumps({"text_id": 100 + i, "title": f"Book {i}", "language": "en",
                                     "authors": "Doe, Jane", "subjects": "Fiction"})}
            for i, t in enumerate(demo_bodies(n, seed=seed))]


def run(tmp_path, *args, name="out"):
    out = str(tmp_path / name)
    prepare_data.main([*FAST, f"--out_dir={out}", *args])
    return out


# ---- packing, splits, determinism ------------------------------------------------------------------
def test_packing_keeps_every_token(tmp_path):
    """Every book's tokens are stored once, followed by eos; spans tile each split; x/y are shifted by one."""
    write_parquet(tmp_path / "a.parquet", pg_rows(8))
    out = run(tmp_path, f"--source={tmp_path / 'a.parquet'}")
    meta = load_meta(out)
    tok = load_tokenizer("byte")
    bodies = {100 + i: clean_book(t)[0] for i, t in enumerate(demo_bodies(8))}
    total_books = 0
    for split in ("train", "val", "test"):
        ts = TokenSplit(out, split)
        spans = ts.book_spans()
        assert sum(n for _, _, n in spans) == len(ts.tokens) == meta["splits"][split]["tokens"]
        pos = 0
        for book_id, start, n in spans:
            assert start == pos
            pos += n
            stream = np.asarray(ts.tokens[start:start + n])
            assert stream[-1] == tok.eos_id and tok.eos_id not in stream[:-1]
            assert tok.decode(stream[:-1]) == bodies[book_id]
        total_books += len(spans)
        assert ts.num_sequences == (len(ts.tokens) - 1) // 64
        if ts.num_sequences:
            x, y = ts.get_batch([ts.num_sequences - 1, 0])
            assert x.shape == y.shape == (2, 64) and x.dtype == torch.int64
            assert torch.equal(x[1, 1:], y[1, :-1])
            k = ts.num_sequences - 1
            assert torch.equal(y[0], torch.from_numpy(np.asarray(ts.tokens[k * 64 + 1: k * 64 + 65], np.int64)))
    assert total_books == 8


def test_split_by_book_disjoint_and_nonempty(tmp_path):
    """No book is in two splits, and a tiny corpus still gets a val and a test book."""
    write_parquet(tmp_path / "a.parquet", pg_rows(6))
    meta = load_meta(run(tmp_path, f"--source={tmp_path / 'a.parquet'}"))
    ids = {s: set(meta["splits"][s]["book_ids"]) for s in ("train", "val", "test")}
    assert not (ids["train"] & ids["val"] or ids["train"] & ids["test"] or ids["val"] & ids["test"])
    assert all(ids[s] for s in ids) and sum(len(v) for v in ids.values()) == 6


def test_num_books_and_fiction_filter(tmp_path):
    """--num_books keeps the first N usable books (pool stopped early); --fiction_only drops non-fiction by metadata."""
    rows = pg_rows(6)
    rows[1]["METADATA"] = json.dumps({"text_id": 101, "language": "en", "subjects": "Cookery", "locc": "TX"})
    write_parquet(tmp_path / "a.parquet", rows)
    meta = load_meta(run(tmp_path, f"--source={tmp_path / 'a.parquet'}", "--num_books=4", "--fiction_only=True",
                         "--num_workers=2"))  # a pool stopped early must shut down cleanly
    ids = sorted(i for s in ("train", "val", "test") for i in meta["splits"][s]["book_ids"])
    assert ids == [100, 102, 103, 104] and meta["skipped"] == {"not fiction (metadata)": 1}
    assert prepare_data.is_fiction_metadata({"locc": "PR; PZ"}) is True
    assert prepare_data.is_fiction_metadata({"bookshelves": "Category: Novels"}) is True
    assert prepare_data.is_fiction_metadata({"title": "x"}) is None


def test_split_assignment_is_hash_of_id():
    """Split = sha256(str(id)) % 1000 thresholds: about 90/5/5 over many ids."""
    splits = [prepare_data.assign_split(i, 50, 50) for i in range(20000)]
    assert 0.04 < splits.count("val") / 20000 < 0.06 and 0.04 < splits.count("test") / 20000 < 0.06
    assert prepare_data.assign_split(12345, 50, 50) == prepare_data.assign_split(12345, 50, 50)


def test_deterministic_across_runs_and_worker_counts(tmp_path):
    """Two runs (1 worker and a 2-process pool) give identical .bin bytes and fingerprints."""
    write_parquet(tmp_path / "a.parquet", pg_rows(6))
    a = run(tmp_path, f"--source={tmp_path / 'a.parquet'}", name="a")
    b = run(tmp_path, f"--source={tmp_path / 'a.parquet'}", "--num_workers=2", name="b")
    for s in ("train", "val", "test"):
        assert open(os.path.join(a, f"{s}.bin"), "rb").read() == open(os.path.join(b, f"{s}.bin"), "rb").read()
    assert load_meta(a)["fingerprint"] == load_meta(b)["fingerprint"]


def test_demo_source_with_demo_bpe(tmp_path):
    """--source=demo trains the demo BPE, saves tokenizer.json, and the probes' answers survive tokenization."""
    out = str(tmp_path / "demo")
    prepare_data.main(["--source=demo", "--demo_num_books=5", "--demo_words_per_book=600", "--num_workers=1",
                       "--seq_len=128", f"--out_dir={out}", "--demo_vocab_size=512"])
    meta = load_meta(out)
    assert meta["tokenizer"]["name"] == "demo-bpe-512" and os.path.isfile(os.path.join(out, "tokenizer.json"))
    tok = load_tokenizer(os.path.join(out, "tokenizer.json"))
    assert tok.sha256 == meta["tokenizer"]["sha256"]
    book = generate_books(5, 1337, 600)[0]
    split = next(s for s in ("train", "val", "test") if book["id"] in meta["splits"][s]["book_ids"])
    ts = TokenSplit(out, split)
    _, start, n = next(sp for sp in ts.book_spans() if sp[0] == book["id"])
    assert tok.decode(ts.tokens[start:start + n]) == book["TEXT"]
    assert os.path.isfile(os.path.join(out, "report.md"))


# ---- reuse, force, atomicity -----------------------------------------------------------------------
def test_reuse_and_force(tmp_path, capsys):
    """Same options -> 'reusing'; different options -> UserError (nothing lost); --force=True rebuilds."""
    write_parquet(tmp_path / "a.parquet", pg_rows(5))
    src = f"--source={tmp_path / 'a.parquet'}"
    out = run(tmp_path, src)
    before = load_meta(out)["fingerprint"]
    capsys.readouterr()
    run(tmp_path, src)
    assert "reusing" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        run(tmp_path, src, "--seq_len=32")
    assert e.value.code == 2 and "seq_len" in capsys.readouterr().err
    assert load_meta(out)["fingerprint"] == before
    run(tmp_path, src, "--seq_len=32", "--force=True")
    meta = load_meta(out)
    assert meta["seq_len"] == 32 and meta["fingerprint"] != before
    assert not [d for d in os.listdir(tmp_path) if ".tmp-" in d or ".old-" in d]


def test_force_never_deletes_a_folder_that_is_not_a_data_dir(tmp_path):
    """--force=True replaces a prepared data dir, but refuses (UserError, files intact) a folder holding
    anything else, e.g. a mistyped --out_dir=data that holds other data dirs."""
    write_parquet(tmp_path / "a.parquet", pg_rows(4))
    src = f"--source={tmp_path / 'a.parquet'}"
    precious = tmp_path / "precious"
    (precious / "demo").mkdir(parents=True)
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit) as e:
        run(tmp_path, src, "--force=True", name="precious")
    assert e.value.code == 2
    assert (precious / "notes.txt").read_text() == "keep me" and (precious / "demo").is_dir()
    partial = tmp_path / "partial"  # an incomplete data dir (no meta.json) may be rebuilt with --force
    partial.mkdir()
    (partial / "train.bin").write_bytes(b"\0\0")
    with pytest.raises(SystemExit):
        run(tmp_path, src, name="partial")
    meta = load_meta(run(tmp_path, src, "--force=True", name="partial"))
    assert meta["splits"]["train"]["tokens"] > 1


def test_uint16_overflow_refused(tmp_path, monkeypatch):
    """A tokenizer whose ids do not fit uint16 is refused before anything is written."""
    class Huge:
        name, kind, vocab_size, eos_id, sha256 = "huge", "hf", 70000, 0, "x"
    monkeypatch.setattr(prepare_data, "load_tokenizer", lambda spec: Huge())
    write_parquet(tmp_path / "a.parquet", pg_rows(3))
    with pytest.raises(UserError, match="uint16"):
        prepare_data.prepare({**defaults(), "source": str(tmp_path / "a.parquet"), "tokenizer": "huge",
                              "out_dir": str(tmp_path / "o")})
    assert not os.path.exists(tmp_path / "o")


def defaults():
    from mamba_lm.configurator import config_keys
    return {k: getattr(prepare_data, k) for k in config_keys(vars(prepare_data))} | {"num_workers": 1}


# ---- bad input ---------------------------------------------------------------------------------------
def test_missing_text_column(tmp_path):
    """A parquet file without TEXT is a one-line UserError naming the expected columns."""
    write_parquet(tmp_path / "bad.parquet", [{"SOURCE": "x", "METADATA": "{}"}], columns=("SOURCE", "METADATA"))
    with pytest.raises(UserError, match="no TEXT column"):
        prepare_data.prepare({**defaults(), "source": str(tmp_path / "bad.parquet"), "tokenizer": "byte",
                              "out_dir": str(tmp_path / "o")})


def test_bad_books_are_skipped_and_counted(tmp_path):
    """Empty, non-English (metadata and stop-word check), duplicate-id and duplicate-text books are counted skips."""
    rows = pg_rows(5)
    rows.append({"TEXT": "", "SOURCE": "PG", "METADATA": json.dumps({"text_id": 1, "language": "en"})})
    rows.append({"TEXT": FRENCH, "SOURCE": "PG", "METADATA": json.dumps({"text_id": 2, "language": "fr"})})
    rows.append({"TEXT": FRENCH, "SOURCE": "PG", "METADATA": None})
    rows.append(dict(rows[0]))                                                         # same id
    rows.append({**rows[1], "METADATA": json.dumps({"text_id": 3, "language": "en"})})  # same text, new id
    write_parquet(tmp_path / "a.parquet", rows)
    meta = load_meta(run(tmp_path, f"--source={tmp_path / 'a.parquet'}"))
    assert meta["skipped"] == {"empty": 1, "non-English (metadata)": 1, "non-English (stop-word check)": 1,
                               "duplicate Gutenberg id": 1, "duplicate text": 1}
    assert sum(meta["splits"][s]["books"] for s in ("train", "val", "test")) == 5
    report = open(os.path.join(tmp_path / "out", "report.md"), encoding="utf-8").read()
    assert "non-English (metadata): 1" in report and "| 104 |" in report


def test_jsonl_and_txt_folder_sources(tmp_path):
    """jsonl files and folders of raw .txt books (utf-8, or latin-1 read byte by byte, counted) both work."""
    bodies = demo_bodies(4, seed=4)
    with open(tmp_path / "books.jsonl", "w", encoding="utf-8") as f:
        for i, t in enumerate(bodies):
            f.write(json.dumps({"TEXT": pg_file(t, 200 + i), "SOURCE": "PG",
                                "METADATA": json.dumps({"text_id": 200 + i, "language": "en"})}) + "\n")
        f.write("{not json\n")
    meta = load_meta(run(tmp_path, f"--source={tmp_path / 'books.jsonl'}", name="j"))
    assert sum(meta["splits"][s]["books"] for s in ("train", "val", "test")) == 4
    assert meta["skipped"] == {"bad json line": 1}
    txt = tmp_path / "txt"
    txt.mkdir()
    for i, t in enumerate(bodies[:3]):
        (txt / f"pg{300 + i}.txt").write_bytes(pg_file(t, 300 + i).encode("utf-8"))
    (txt / "book.txt").write_bytes(pg_file(bodies[3] + " Café déjà vu.", 303).encode("latin-1"))
    meta = load_meta(run(tmp_path, f"--source={txt}", name="t"))
    ids = sorted(i for s in ("train", "val", "test") for i in meta["splits"][s]["book_ids"])
    assert ids == [300, 301, 302, 303]
    assert "invalid UTF-8 bytes read as cp1252" in open(tmp_path / "t" / "report.md", encoding="utf-8").read()
    assert meta["notes"] == {"invalid UTF-8 bytes read as cp1252": 1, prepare_data.BAD_BYTES_TOTAL: 3}


def test_undecodable_bytes_are_kept_with_a_counted_note(tmp_path):
    """Non-UTF-8 bytes (a binary TEXT column, a jsonl line with invalid bytes) never vanish silently:
    the book is decoded (each bad byte as cp1252), kept, and counted in meta.json's "notes" and report.md."""
    rows = pg_rows(4)
    latin = pg_file(demo_bodies(1, seed=11)[0] + " Café déjà vu.", 150).encode("latin-1")
    table = pa.table({"TEXT": pa.array([r["TEXT"].encode() for r in rows] + [latin], pa.binary()),
                      "METADATA": [r["METADATA"] for r in rows] + [json.dumps({"text_id": 150, "language": "en"})]})
    pq.write_table(table, tmp_path / "b.parquet")
    meta = load_meta(run(tmp_path, f"--source={tmp_path / 'b.parquet'}", name="b"))
    assert sum(meta["splits"][s]["books"] for s in ("train", "val", "test")) == 5 and meta["skipped"] == {}
    assert meta["notes"] == {"invalid UTF-8 bytes read as cp1252": 1, prepare_data.BAD_BYTES_TOTAL: 3}
    split = next(s for s in ("train", "val", "test") if 150 in meta["splits"][s]["book_ids"])
    ts = TokenSplit(tmp_path / "b", split)
    _, start, n = next(sp for sp in ts.book_spans() if sp[0] == 150)
    assert "Café déjà vu." in load_tokenizer("byte").decode(ts.tokens[start:start + n])
    with open(tmp_path / "j.jsonl", "wb") as f:
        for r in rows[:3]:
            f.write(json.dumps(r).encode() + b"\n")
        f.write(json.dumps({"TEXT": demo_bodies(1, seed=12)[0] + " XY", "METADATA": json.dumps({"text_id": 160})})
                .encode().replace(b" XY", b" \xff\xfe") + b"\n")
    meta = load_meta(run(tmp_path, f"--source={tmp_path / 'j.jsonl'}", name="j"))
    assert sum(meta["splits"][s]["books"] for s in ("train", "val", "test")) == 4
    assert meta["notes"] == {"invalid UTF-8 bytes read as cp1252": 1, prepare_data.BAD_BYTES_TOTAL: 2}
    assert "Kept with a note: invalid UTF-8" in open(tmp_path / "j" / "report.md", encoding="utf-8").read()


def test_books_without_markers_are_kept_and_counted(tmp_path):
    """A pre-cleaned book (hub style: no PG markers, no PG text) is kept whole, and meta.json counts it."""
    rows = pg_rows(4)
    body = demo_bodies(1, seed=13)[0]
    rows.append({"TEXT": body, "SOURCE": "PG", "METADATA": json.dumps({"text_id": 170, "language": "en"})})
    write_parquet(tmp_path / "a.parquet", rows)
    meta = load_meta(run(tmp_path, f"--source={tmp_path / 'a.parquet'}"))
    assert meta["cleaning"]["head"] == {"marker": 4, "precleaned": 1, "heuristic": 0}
    assert meta["cleaning"]["tail"] == {"marker": 4, "precleaned": 1, "heuristic": 0}
    assert meta["cleaning"]["header_chars"] > 0 and meta["cleaning"]["footer_chars"] > 0
    split = next(s for s in ("train", "val", "test") if 170 in meta["splits"][s]["book_ids"])
    ts = TokenSplit(tmp_path / "out", split)
    _, start, n = next(sp for sp in ts.book_spans() if sp[0] == 170)
    assert load_tokenizer("byte").decode(ts.tokens[start:start + n - 1]) == clean_book(body)[0] == body


def test_interrupted_run_leaves_no_partial_output(tmp_path, monkeypatch, capsys):
    """Ctrl-C in the middle of a run: exit 130 with one line, no out_dir, no tmp dir; a --force rebuild
    that is interrupted leaves the previous data dir intact."""
    write_parquet(tmp_path / "a.parquet", pg_rows(6))
    src = f"--source={tmp_path / 'a.parquet'}"
    real, calls = prepare_data.process_book, []

    def interrupt_third(rec):
        calls.append(rec["id"])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(rec)
    monkeypatch.setattr(prepare_data, "process_book", interrupt_third)
    with pytest.raises(SystemExit) as e:
        run(tmp_path, src)
    assert e.value.code == 130 and "interrupted" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["a.parquet"]
    monkeypatch.setattr(prepare_data, "process_book", real)
    before = load_meta(run(tmp_path, src))["fingerprint"]
    monkeypatch.setattr(prepare_data, "process_book", interrupt_third)
    calls.clear()
    with pytest.raises(SystemExit):
        run(tmp_path, src, "--seq_len=32", "--force=True")
    meta = load_meta(tmp_path / "out")
    assert meta["fingerprint"] == before and meta["seq_len"] == 64
    assert sorted(os.listdir(tmp_path)) == ["a.parquet", "out"]


def test_hub_offline_is_user_error(tmp_path, monkeypatch):
    """--source=hub without network: one-line UserError that says how to pass a local path."""
    def offline(dataset_id):
        raise ConnectionError("no network")
    monkeypatch.setattr(sources, "load_hub_stream", offline)
    with pytest.raises(UserError, match="--source=") as e:
        prepare_data.prepare({**defaults(), "source": "hub", "tokenizer": "byte", "out_dir": str(tmp_path / "o")})
    assert "\n" not in str(e.value)


def test_too_few_books(tmp_path):
    """Fewer than 3 usable books cannot fill train/val/test: clear error, no output dir."""
    write_parquet(tmp_path / "a.parquet", pg_rows(2))
    with pytest.raises(UserError, match="at least 3"):
        prepare_data.prepare({**defaults(), "source": str(tmp_path / "a.parquet"), "tokenizer": "byte",
                              "min_chars": 500, "out_dir": str(tmp_path / "o")})
    assert not os.path.exists(tmp_path / "o") and not [d for d in os.listdir(tmp_path) if ".tmp-" in d]


def test_cli_error_exit_code(tmp_path):
    """The CLI prints one 'error: ...' line and exits 2 for a missing source (no traceback)."""
    r = subprocess.run([sys.executable, "prepare_data.py", f"--source={tmp_path / 'nope'}", "--tokenizer=byte"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: ") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# ---- mamba_lm/data.py ------------------------------------------------------------------------------
def test_load_meta_errors(tmp_path):
    """Missing dir/meta.json or a truncated .bin is a UserError telling how to (re)create the data."""
    with pytest.raises(UserError, match="prepare_data.py"):
        load_meta(tmp_path / "none")
    write_parquet(tmp_path / "a.parquet", pg_rows(4))
    out = run(tmp_path, f"--source={tmp_path / 'a.parquet'}")
    with open(os.path.join(out, "val.bin"), "r+b") as f:
        f.truncate(2)
    with pytest.raises(UserError, match="truncated"):
        load_meta(out)


def test_epoch_order_and_batches():
    """epoch_order is a deterministic permutation per (seed, epoch); batch_indices slices it."""
    a, b, c = epoch_order(100, 0, 1), epoch_order(100, 0, 1), epoch_order(100, 1, 1)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert sorted(a.tolist()) == list(range(100))
    assert np.array_equal(batch_indices(a, 8, 2), a[16:24])
    with pytest.raises(IndexError):
        batch_indices(a, 8, 12)
    assert num_sequences(1, 64) == 0 and num_sequences(65, 64) == 1 and num_sequences(0, 64) == 0


def test_check_tokenizer_match():
    """Matching tokenizers pass; a different sha256/vocab/eos is a UserError."""
    t = {"name": "a", "sha256": "x", "vocab_size": 10, "eos_id": 0}
    check_tokenizer_match(t, dict(t))
    with pytest.raises(UserError, match="mismatch"):
        check_tokenizer_match(t, {**t, "sha256": "y"})


def test_unreadable_meta_json_is_user_error(tmp_path, capsys):
    """An out_dir whose meta.json is valid JSON but not an object is reported as an incomplete data dir
    (exit 2, one line), not a traceback; --force=True rebuilds it."""
    write_parquet(tmp_path / "a.parquet", pg_rows(4))
    src = f"--source={tmp_path / 'a.parquet'}"
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "meta.json").write_text("[]")
    with pytest.raises(SystemExit) as e:
        run(tmp_path, src)
    assert e.value.code == 2 and "incomplete data dir" in capsys.readouterr().err
    assert load_meta(run(tmp_path, src, "--force=True"))["splits"]["train"]["books"] > 0


def test_report_rows_stay_one_line_for_multiline_titles(tmp_path):
    """A skipped book whose title spans lines gets its first line in report.md, so the table is not broken."""
    rows = pg_rows(4)
    rows.append({"TEXT": FRENCH, "SOURCE": "PG",
                 "METADATA": json.dumps({"text_id": 9, "language": "fr", "title": "Premier\nSecond"})})
    write_parquet(tmp_path / "a.parquet", rows)
    out = run(tmp_path, f"--source={tmp_path / 'a.parquet'}")
    report = open(os.path.join(out, "report.md"), encoding="utf-8").read()
    assert "| 9 | Premier |  | non-English (metadata) |" in report
    assert not any(line.startswith("Second") for line in report.splitlines())


# ---- bad bytes, sparse ids, leftovers of killed runs, full disk ------------------------------------------
def test_decode_text_keeps_valid_utf8_and_counts_bad_bytes():
    """Valid UTF-8 stays as it is around a few bad bytes; each bad byte is read alone (cp1252) and counted."""
    raw = "Café “déjà” vu — naïve. ".encode("utf-8") + b"\x92bad\xff" + "Ça va.".encode("utf-8")
    text, bad = sources.decode_text(raw)
    assert text == "Café “déjà” vu — naïve. ’badÿÇa va." and bad == 2
    assert sources.decode_text("plain é".encode("utf-8")) == ("plain é", 0)
    assert sources.decode_text("latin-1 é à".encode("latin-1")) == ("latin-1 é à", 2)
    assert sources.decode_text(b"\xe2\x80 cut")[0].endswith(" cut")


def test_partial_utf8_book_keeps_its_utf8_text_in_every_reader(tmp_path):
    """A book that is UTF-8 except for a few bad bytes keeps all its valid text (é, curly quotes) in the .txt,
    parquet (binary TEXT) and jsonl readers; only the bad bytes change, and meta.json counts them."""
    body = demo_bodies(1, seed=21)[0] + " Café “déjà” vu, naïve. "
    raw = pg_file(body, 180).encode("utf-8").replace("naïve".encode(), b"na\xefve \x9d")
    good = [pg_file(t, 181 + i).encode("utf-8") for i, t in enumerate(demo_bodies(3, seed=22))]
    (tmp_path / "txt").mkdir()
    for i, data in enumerate([raw, *good]):
        (tmp_path / "txt" / f"pg{180 + i}.txt").write_bytes(data)
    meta_of = lambda i: json.dumps({"text_id": 180 + i, "language": "en"})  # noqa: E731
    pq.write_table(pa.table({"TEXT": pa.array([raw, *good], pa.binary()),
                             "METADATA": [meta_of(i) for i in range(4)]}), tmp_path / "b.parquet")
    with open(tmp_path / "j.jsonl", "wb") as f:
        for i, text in enumerate([pg_file(body, 180), *(g.decode() for g in good)]):
            line = json.dumps({"TEXT": text, "METADATA": meta_of(i)}, ensure_ascii=False).encode("utf-8")
            f.write(line.replace("naïve".encode(), b"na\xefve \x9d") + b"\n")  # the same bytes in a JSON string
    for name, src in (("t", tmp_path / "txt"), ("p", tmp_path / "b.parquet"), ("j", tmp_path / "j.jsonl")):
        meta = load_meta(run(tmp_path, f"--source={src}", name=name))
        assert meta["notes"] == {"invalid UTF-8 bytes read as cp1252": 1, prepare_data.BAD_BYTES_TOTAL: 2}, name
        split = next(s for s in ("train", "val", "test") if 180 in meta["splits"][s]["book_ids"])
        ts = TokenSplit(tmp_path / name, split)
        _, start, n = next(sp for sp in ts.book_spans() if sp[0] == 180)
        text = load_tokenizer("byte").decode(ts.tokens[start:start + n])
        assert "Café “déjà” vu, naïve \x9d." in text, name
        assert "(2 bytes)" in (tmp_path / name / "report.md").read_text(encoding="utf-8")


def test_sparse_id_tokenizer_refused_before_writing(tmp_path, monkeypatch):
    """A tokenizer with only 3 tokens but an id of 70,000 (uint16 cannot hold it) is refused by its ids,
    before any folder is created (it used to pass the count check and crash while writing the .bin)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from mamba_lm.tokenizer import TextTokenizer
    wl = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "[UNK]": 1, "the": 70000}, unk_token="[UNK]"))
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "sparse.json").write_text(wl.to_str())
    assert TextTokenizer("sparse", "hf", wl.to_str()).vocab_size == 70001
    write_parquet(tmp_path / "a.parquet", pg_rows(3))
    with pytest.raises(UserError, match="ids up to 70,000"):
        prepare_data.prepare({**defaults(), "source": str(tmp_path / "a.parquet"),
                              "tokenizer": str(tmp_path / "sparse.json"), "out_dir": str(tmp_path / "o")})
    assert sorted(os.listdir(tmp_path)) == ["a.parquet", "sparse.json"]


def test_leftovers_of_a_killed_run_are_cleaned_up_and_nothing_else(tmp_path):
    """What a SIGKILL leaves beside out_dir (build folders of dead runs, the moved-aside old data dir) is
    removed by the next run on the same out_dir; a live run's build folder, other runs' leftovers, a
    look-alike folder with foreign files and unrelated files stay untouched."""
    write_parquet(tmp_path / "a.parquet", pg_rows(4))
    src = f"--source={tmp_path / 'a.parquet'}"
    run(tmp_path, src)
    dead = tmp_path / "out.tmp-dead1234"
    dead.mkdir()
    (dead / "train.bin").write_bytes(b"\0" * 10)
    (dead / ".prepare-pid").write_text(f"{socket.gethostname()} {2 ** 22 + 12345}\n")  # no such process
    nopid = tmp_path / "out.tmp-nopid123"
    nopid.mkdir()
    (nopid / "meta.json").write_text("{")
    old = tmp_path / ".out.old-4194999"  # runtime.replace_folder's name, of a pid that does not exist
    old.mkdir()
    (old / "val.bin").write_bytes(b"\1\0")
    live = tmp_path / "out.tmp-live1234"
    live.mkdir()
    (live / ".prepare-pid").write_text(f"{socket.gethostname()} {os.getpid()}\n")
    foreign = tmp_path / "out.tmp-foreign1"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    other = tmp_path / "other.tmp-dead1234"
    other.mkdir()
    (tmp_path / "out.tmp-file1234").write_text("a file")
    run(tmp_path, src)  # reuses out, and cleans up first
    assert not dead.exists() and not nopid.exists() and not old.exists()
    assert live.is_dir() and (foreign / "notes.txt").read_text() == "mine" and other.is_dir()
    assert (tmp_path / "out.tmp-file1234").read_text() == "a file"
    assert load_meta(tmp_path / "out")["splits"]["train"]["books"] >= 1


def test_kill_between_the_two_renames_restores_the_old_data(tmp_path):
    """Killed after out_dir was moved aside and before the new one took its place: the next run puts the
    old data dir back (then reuses it), instead of deleting the only copy."""
    write_parquet(tmp_path / "a.parquet", pg_rows(4))
    src = f"--source={tmp_path / 'a.parquet'}"
    run(tmp_path, src)
    before = {f: (tmp_path / "out" / f).read_bytes() for f in os.listdir(tmp_path / "out")}
    os.rename(tmp_path / "out", tmp_path / ".out.old-4194998")
    run(tmp_path, src)
    assert {f: (tmp_path / "out" / f).read_bytes() for f in os.listdir(tmp_path / "out")} == before
    assert sorted(os.listdir(tmp_path)) == ["a.parquet", "out"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_full_disk_is_one_line_naming_the_path(tmp_path, monkeypatch):
    """ENOSPC while writing a .bin: 'no space left on device while writing <path>', no tmp folder left,
    an existing out_dir unchanged."""
    write_parquet(tmp_path / "a.parquet", pg_rows(4))
    src = f"--source={tmp_path / 'a.parquet'}"
    run(tmp_path, src)
    before = {f: (tmp_path / "out" / f).read_bytes() for f in os.listdir(tmp_path / "out")}
    real_init = prepare_data.SplitWriter.__init__

    def full_train_bin(self, tmp_dir):
        real_init(self, tmp_dir)
        self.files["train"].close()
        self.files["train"] = open("/dev/full", "wb", buffering=0)
    monkeypatch.setattr(prepare_data.SplitWriter, "__init__", full_train_bin)
    with pytest.raises(UserError, match="no space left on device while writing /dev/full") as e:
        prepare_data.prepare({**defaults(), "source": str(tmp_path / "a.parquet"), "tokenizer": "byte",
                              "seq_len": 64, "min_chars": 500, "force": True, "out_dir": str(tmp_path / "out")})
    assert "unchanged" in str(e.value) and "\n" not in str(e.value)
    assert {f: (tmp_path / "out" / f).read_bytes() for f in os.listdir(tmp_path / "out")} == before
    assert sorted(os.listdir(tmp_path)) == ["a.parquet", "out"]
