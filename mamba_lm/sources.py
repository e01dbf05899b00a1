"""Book sources for prepare_data.py: the hub dataset, the demo corpus, and local parquet / jsonl / .txt
files, each read as a stream of book records.

    desc, records, total = open_source("../shared/data/gutenberg")   # or "hub", "demo", a file
    for rec in records:             # {"id", "text", "meta", "origin", "note", "bad_bytes"}
        ...

Local files: a .parquet or .jsonl file, or a folder of them, with the columns TEXT, SOURCE, METADATA
(a JSON string: title, authors, text_id, language, subjects, locc, bookshelves), as in
`sedthh/gutenberg_english`; parquet is read row group by row group with pyarrow. Or a folder of raw
Project Gutenberg .txt books (id from the header's "[EBook #N]" / "[Etext #N]", else from the file name).

Bytes are decoded by `decode_text`: valid UTF-8 stays UTF-8, and each byte that is not part of valid
UTF-8 is read on its own as cp1252 (the usual encoding of such stray bytes in old Gutenberg files:
curly quotes, accented letters; latin-1 for the five bytes cp1252 leaves undefined). A book with a few
bad bytes thus keeps all its valid text, a latin-1 book reads correctly, and the number of such bytes
is counted per book (`bad_bytes`, `note`) for meta.json's "notes".
"""

from __future__ import annotations

import codecs
import json
import os
import threading

from mamba_lm import demo_corpus, gutenberg
from mamba_lm.errors import UserError
from mamba_lm.tokenizer import hub_reachable

FICTION_WORDS = ("fiction", "drama", "stories", "story", "tales", "novel", "romance", "fairy", "comedies",
                 "tragedies", "fables", "legends", "folklore", "plays")
BAD_BYTES_NOTE = "invalid UTF-8 bytes read as cp1252"
COLUMNS_HINT = "expected the columns of sedthh/gutenberg_english: TEXT, SOURCE, METADATA"


# ---- decoding ------------------------------------------------------------------------------------------
def _byte_as_cp1252(b: int) -> str:
    try:
        return bytes([b]).decode("cp1252")
    except UnicodeDecodeError:       # 0x81, 0x8D, 0x8F, 0x90, 0x9D
        return bytes([b]).decode("latin-1")


_CP1252 = {b: _byte_as_cp1252(b) for b in range(0x80, 0x100)}   # bytes < 0x80 are always valid UTF-8
_bad = threading.local()


def _bad_bytes_as_cp1252(err: UnicodeError):
    """codecs error handler: the invalid bytes err.object[start:end], each read alone as cp1252."""
    if not isinstance(err, UnicodeDecodeError):
        raise err
    bad = err.object[err.start:err.end]
    _bad.count += len(bad)
    return "".join(_CP1252[b] for b in bad), err.end


codecs.register_error("mamba_lm.cp1252_bytes", _bad_bytes_as_cp1252)


def decode_text(raw: bytes) -> tuple[str, int]:
    """(text, number of bytes that were not valid UTF-8): UTF-8, each bad byte read alone as cp1252."""
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        _bad.count = 0
        text = raw.decode("utf-8", errors="mamba_lm.cp1252_bytes")
        return text, _bad.count


# ---- records -------------------------------------------------------------------------------------------
def parse_metadata(raw) -> dict:
    """The METADATA column as a dict ({"_bad_metadata": True} when it is not a JSON object)."""
    if isinstance(raw, dict):
        return raw
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except (TypeError, json.JSONDecodeError):
        return {"_bad_metadata": True}
    return meta if isinstance(meta, dict) else {"_bad_metadata": True}


def book_title(meta: dict) -> str:
    """A book's title for report.md: first line only (a table row), at most 60 characters."""
    return str(meta.get("title") or "").split("\n")[0].strip()[:60]


def make_record(text, metadata, origin, note=None, bad_bytes=0) -> dict:
    """One book record. Bytes (a binary TEXT column) are decoded; problems become a per-book `note`,
    counted in meta.json's "notes" when the book is kept."""
    notes = [note] if note else []
    if isinstance(text, (bytes, bytearray)):
        text, n = decode_text(bytes(text))
        bad_bytes += n
    if bad_bytes:
        notes.append(BAD_BYTES_NOTE)
    if isinstance(metadata, (bytes, bytearray)):
        metadata = decode_text(bytes(metadata))[0]
    meta = parse_metadata(metadata)
    if meta.get("_bad_metadata"):
        notes.append("unreadable METADATA")
    book_id = meta.get("text_id", meta.get("id"))
    try:
        book_id = int(book_id) if book_id is not None else None
    except (TypeError, ValueError):
        book_id = None
    if book_id is None and isinstance(text, str):
        book_id = gutenberg.gutenberg_id_from_header(text)
    return {"id": book_id, "text": text, "meta": meta, "origin": origin, "note": "; ".join(notes) or None,
            "bad_bytes": bad_bytes}


# ---- files ---------------------------------------------------------------------------------------------
def source_files(path: str) -> list[str]:
    """The .parquet / .jsonl / .txt files of `path` (a file, or a folder of them), sorted."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise UserError(f"--source={path}: no such file or folder (expected 'hub', 'demo', a .parquet/.jsonl file "
                        "or a folder of .parquet/.jsonl/.txt files)")
    try:
        names = os.listdir(path)
    except OSError as e:
        raise UserError(f"--source={path}: cannot list the folder ({e.strerror})") from None
    files = sorted(os.path.join(path, f) for f in names
                   if f.endswith((".parquet", ".jsonl", ".txt")) and f.lower() not in ("readme.txt",))
    if not files:
        raise UserError(f"--source={path} holds no .parquet, .jsonl or .txt files")
    return files


def parquet_columns(path):
    """(pyarrow ParquetFile, the columns to read); UserError for an unreadable file or no TEXT column."""
    import pyarrow.parquet as pq  # optional dependency: only parquet sources need it
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise UserError(f"cannot read parquet file {path}: {e}") from None
    names = pf.schema_arrow.names
    if "TEXT" not in names:
        raise UserError(f"{path} has no TEXT column (columns: {', '.join(names)}); {COLUMNS_HINT}")
    return pf, [c for c in ("TEXT", "METADATA") if c in names]


def read_parquet(path):
    """Book records of a parquet file, one row group in memory at a time."""
    pf, cols = parquet_columns(path)
    for rg in range(pf.metadata.num_row_groups):
        table = pf.read_row_group(rg, columns=cols)
        texts = table.column("TEXT").to_pylist()
        metas = table.column("METADATA").to_pylist() if "METADATA" in cols else [None] * len(texts)
        for i, (t, m) in enumerate(zip(texts, metas)):
            yield make_record(t, m, f"{os.path.basename(path)}:rg{rg}:{i}")


def read_jsonl(path):
    """Book records of a jsonl file; a line that is not JSON becomes a record without text ("bad json line")."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            line, bad = decode_text(raw)  # JSON is UTF-8: keep the row, read the bad bytes, count them
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                yield {"id": None, "text": None, "meta": {}, "origin": f"{path}:{lineno}", "note": "bad json line",
                       "bad_bytes": 0}
                continue
            if not isinstance(row, dict) or "TEXT" not in row:
                raise UserError(f"{path}:{lineno} has no TEXT field; {COLUMNS_HINT}")
            yield make_record(row["TEXT"], row.get("METADATA"), f"{os.path.basename(path)}:{lineno}", bad_bytes=bad)


def read_txt(path) -> dict:
    """The book record of one raw Gutenberg .txt file (id from its header, else from the file name)."""
    with open(path, "rb") as f:
        rec = make_record(f.read(), None, os.path.basename(path))
    if rec["id"] is None:
        digits = "".join(ch if ch.isdigit() else " " for ch in os.path.basename(path)).split()
        rec["id"] = int(digits[0]) if digits else None
    return rec


def count_rows(files) -> int:
    """Number of book rows in `files` (for the progress bar's total)."""
    total = 0
    for f in files:
        if f.endswith(".parquet"):
            total += parquet_columns(f)[0].metadata.num_rows
        elif f.endswith(".jsonl"):
            with open(f, "rb") as fh:
                total += sum(1 for line in fh if line.strip())
        else:
            total += 1
    return total


def load_hub_stream(dataset_id: str):
    """Streaming iterator over the hub dataset's train split (tests monkeypatch this)."""
    if not hub_reachable():
        raise ConnectionError("huggingface.co is not reachable")
    from datasets import load_dataset  # optional dependency: only --source=hub needs it
    return iter(load_dataset(dataset_id, split="train", streaming=True))


def open_source(source: str, *, hub_dataset: str = "sedthh/gutenberg_english", demo_num_books: int = 40,
                demo_seed: int = 1337, demo_words_per_book: int = 6000) -> tuple[dict, object, int | None]:
    """(source descriptor for meta.json, iterator of book records, expected number of rows or None).

    source: "hub" (streamed `hub_dataset`), "demo" (mamba_lm.demo_corpus) or a path (see module docstring)."""
    if source == "demo":
        desc = {"kind": "demo", "num_books": demo_num_books, "seed": demo_seed,
                "words_per_book": demo_words_per_book, "generator": "mamba_lm/demo_corpus.py"}
        books = demo_corpus.generate_books(demo_num_books, demo_seed, demo_words_per_book)
        return desc, (make_record(b["TEXT"], b["METADATA"], f"demo:{i}") for i, b in enumerate(books)), len(books)
    if source == "hub":
        try:
            stream = load_hub_stream(hub_dataset)
            first = next(stream)
        except Exception as e:  # offline, DNS, missing `datasets`: all mean "pass a local path"
            raise UserError(f"cannot stream {hub_dataset} from the Hugging Face hub ({type(e).__name__}); "
                            "pass a local copy, e.g. --source=../shared/data/gutenberg") from None

        def rows():
            yield make_record(first.get("TEXT"), first.get("METADATA"), "hub:0")
            for i, row in enumerate(stream, 1):
                yield make_record(row.get("TEXT"), row.get("METADATA"), f"hub:{i}")
        return {"kind": "hub", "dataset": hub_dataset, "split": "train"}, rows(), None
    files = source_files(source)
    desc = {"kind": "files", "path": os.path.abspath(source),
            "files": [[os.path.basename(f), os.path.getsize(f)] for f in files]}
    total = count_rows(files)

    def rows():
        for f in files:
            if f.endswith(".parquet"):
                yield from read_parquet(f)
            elif f.endswith(".jsonl"):
                yield from read_jsonl(f)
            else:
                yield read_txt(f)
    return desc, rows(), total


# ---- metadata --------------------------------------------------------------------------------------------
def is_english_metadata(meta: dict) -> bool | None:
    """True/False from the metadata's language, None when it has none."""
    lang = meta.get("language")
    if not lang:
        return None
    langs = [part.strip().lower() for part in str(lang).replace(";", ",").split(",")]
    return any(part in ("en", "eng", "english") for part in langs)


def is_fiction_metadata(meta: dict) -> bool | None:
    """True/False from subjects / LoCC (PZ) / bookshelves, None when the metadata has none of them."""
    fields = [meta.get(k) for k in ("subjects", "locc", "bookshelves")]
    if not any(fields):
        return None
    subjects = " ".join(str(f) for f in (fields[0], fields[2]) if f).lower()
    locc = [c.strip().upper() for c in str(fields[1] or "").split(";")]
    return "PZ" in locc or any(w in subjects for w in FICTION_WORDS)
