"""Prepare Project Gutenberg fiction (or the demo corpus) as uint16 token streams for training.

    python prepare_data.py --source=../shared/data/gutenberg \\
        --tokenizer=../shared/data/tokenizers/gpt-neox-20b/tokenizer.json      # -> data/gutenberg-neox
    python prepare_data.py --source=demo                                         # -> data/demo (offline, ~5 s)
    python prepare_data.py                                                       # hub: sedthh/gutenberg_english

Sources (--source=):
  hub      Hugging Face `sedthh/gutenberg_english`, streamed (never fully in memory); needs internet.
  demo     the procedural demo corpus of mamba_lm/demo_corpus.py (tokenizer: a BPE trained on it).
  recall-gate  the synthetic narrative-recall gate of mamba_lm/recall_gate.py, dial --gate=cpu|gpu|book[,k=v]
           (tokenizer: a BPE trained on it); also writes gate_probes.json, the held-out probe set.
  PATH     a .parquet or .jsonl file, or a folder of them, with the columns TEXT, SOURCE, METADATA (a JSON
           string: title, authors, text_id, language, subjects, locc, bookshelves); parquet is read row
           group by row group with pyarrow. Or a folder of raw Gutenberg .txt books (id from the header's
           "[EBook #N]" / "[Etext #N]" or from the file name). The readers live in mamba_lm/sources.py.
Pipeline: select (English, not seen before by Gutenberg id, optionally fiction) -> clean (mamba_lm/
gutenberg.py: header/footer, credits, illustrations, transcriber's notes, unwrap) -> drop duplicates by
sha256 of the cleaned text and books under `min_chars` -> tokenize on all cores, eos after each book ->
split BY BOOK: sha256(str(book_id)) mod 1000 < val_permille -> val, < val_permille + test_permille ->
test, else train (if val or test gets no book, the train books with the smallest hashes move there) ->
train.bin / val.bin / test.bin (uint16), meta.json, tokenizer.json, report.md, written atomically.
Re-running with the same source, options and tokenizer reuses the result; other options need --force=True.
An interrupted run (Ctrl-C, SIGTERM, an error) removes its tmp dir and leaves out_dir as it was; what a
SIGKILL leaves beside out_dir (<name>.tmp-*, <name>.old-*) is removed, or put back, by the next run on it.
A full disk is one line naming the file; out_dir is unchanged.
Bad input: missing TEXT column -> error; empty / too short / non-English / duplicate books -> counted skips
(meta.json "skipped", report.md); bytes that are not UTF-8 -> each read alone as cp1252, the valid UTF-8
around them kept, counted per book and in total (meta.json "notes", report.md); a tokenizer whose ids do
not fit uint16 -> error before anything is written; books without header/footer markers are kept by the rule in mamba_lm/gutenberg.py
and counted (meta.json "cleaning": head/tail found by marker, precleaned or heuristic).

Expected output on the shared corpus (2-core CPU shared with other jobs, see bench/results/prepare_cpu.md):
"""
# $ python prepare_data.py --source=../shared/data/gutenberg --num_books=0 \
#       --tokenizer=../shared/data/tokenizers/gpt-neox-20b/tokenizer.json
# override: source = '../shared/data/gutenberg'
# override: tokenizer = '../shared/data/tokenizers/gpt-neox-20b/tokenizer.json'
# override: num_books = 0
# prepare: 100%|██████████| 1276/1276 [07:28<00:00,  2.85book/s, 1.09 MB/s, 250k tok/s, kept 1275]
# kept 1275 books, skipped 1: too short 1; 489.7 MB raw text in 448.9 s
# header/footer found by marker: 1275/1275 books; without markers (kept, see mamba_lm/gutenberg.py): pre-cleaned 0/0, heuristic 0/0
# wrote data/gutenberg-neox: train 1154 books / 101,743,663 tokens / 99,359 seqs, val 59 books / 5,031,238 tokens
#   / 4,913 seqs, test 62 books / 5,367,234 tokens / 5,241 seqs in 449.1 s
# (the skipped book is #45265, "The Story of a Fierce Bad Rabbit": 1,219 characters once cleaned)
# Running it again prints: reusing data/gutenberg-neox (same source, options and tokenizer; --force=True rebuilds it)

import errno
import hashlib
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import Counter, deque
from contextlib import contextmanager

import numpy as np
from tqdm import tqdm

from mamba_lm import gutenberg, recall_gate
from mamba_lm.configurator import PathRule, apply_overrides, config_keys
from mamba_lm.data import DATA_FORMAT as _DATA_FORMAT
from mamba_lm.data import SPLITS, num_sequences
from mamba_lm.errors import UserError, user_errors
from mamba_lm.runtime import replace_folder
from mamba_lm.sources import BAD_BYTES_NOTE, book_title, is_english_metadata, is_fiction_metadata, open_source
from mamba_lm.tokenizer import NEOX_NAME as _NEOX_NAME
from mamba_lm.tokenizer import TextTokenizer, load_tokenizer, tokenizer_from_dict, train_demo_bpe

# -----------------------------------------------------------------------------
source = "hub"                   # "hub" | "demo" | "recall-gate" | path to .parquet/.jsonl file(s) or a folder of .txt books [input path, or hub | demo | recall-gate]
tokenizer = "auto"               # "auto" (NeoX; demo-bpe for --source=demo) | hub id | tokenizer.json path | "byte" | "demo-bpe"
out_dir = ""                     # "" -> data/<source>-<tokenizer>, e.g. data/gutenberg-neox, data/demo [output folder]
num_books = 5000                 # books to keep after filtering, in source order (0 = all) [>=0]
seq_len = 1024                   # training context length L (stored in meta.json) [>=1]
fiction_only = False             # keep only books whose metadata says fiction (books without metadata are kept)
unwrap = True                    # join hard-wrapped prose lines into one line per paragraph (verse kept)
min_chars = 2000                 # skip books shorter than this after cleaning [>=0]
english_threshold = 0.2          # stop-word density below which a book without language metadata is skipped [0, 1]
val_permille = 50                # sha256(str(id)) % 1000 < this -> val (about 5%) [0, 999]
test_permille = 50               # next this many per mille -> test (about 5%) [0, 999]
num_workers = 0                  # processes for cleaning + tokenizing (0 = all cores) [>=0]
hub_dataset = "sedthh/gutenberg_english"  # dataset id for --source=hub
demo_num_books = 40              # --source=demo: number of generated books [>=3]
demo_words_per_book = 6000       # --source=demo: words per book [>=1]
demo_seed = 1337                 # --source=demo: generator seed [>=0]
demo_vocab_size = 2048           # --tokenizer=demo-bpe: BPE vocabulary size (at most; the demo text saturates near 1.8k) [257, 65536]
gate = "cpu"                     # --source=recall-gate: dial of mamba_lm/recall_gate.py, preset[,key=value...]
force = False                    # overwrite an out_dir prepared with different options
# -----------------------------------------------------------------------------

_OPTION_KEYS = ("num_books", "seq_len", "fiction_only", "unwrap", "min_chars", "english_threshold",
                "val_permille", "test_permille")
_PID_FILE = ".prepare-pid"        # in a build folder: "<host> <pid>" of the run writing it
_DATA_FILES = {"train.bin", "val.bin", "test.bin", "meta.json", "tokenizer.json", "report.md",
               recall_gate.PROBE_FILE} | {f"{s}.answers.bin" for s in SPLITS}  # what --force may replace
BAD_BYTES_TOTAL = f"{BAD_BYTES_NOTE}: bytes in all"  # meta.json "notes": books per note, and this total
_CLEANING_VERSION = 2            # bump when mamba_lm/gutenberg.py changes its output


# ---- selection ------------------------------------------------------------------------------------------
def assign_split(book_id: int, val_pm: int, test_pm: int) -> str:
    """Deterministic split of a book: sha256(str(book_id)) mod 1000 against the per-mille thresholds."""
    h = split_hash(book_id)
    return "val" if h < val_pm else "test" if h < val_pm + test_pm else "train"


def split_hash(book_id) -> int:
    return int(hashlib.sha256(str(book_id).encode()).hexdigest(), 16) % 1000


# ---- per-book work (runs in worker processes) ------------------------------------------------------------
_WORKER = {}


def _init_worker(tok_dict, cfg, in_pool=False):
    if in_pool:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # Pool.terminate() must kill workers (main() traps SIGTERM)
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is handled once, by the main process
    _WORKER["tok"] = tok_dict if isinstance(tok_dict, TextTokenizer) else tokenizer_from_dict(tok_dict)
    _WORKER["cfg"] = cfg


def process_book(rec: dict) -> dict:
    """Clean, check and tokenize one book. Returns a result dict with status 'ok' or a skip reason."""
    cfg, tok = _WORKER["cfg"], _WORKER["tok"]
    text, report = gutenberg.clean_book(rec["text"], unwrap=cfg["unwrap"])
    out = {"id": rec["id"], "title": book_title(rec["meta"]), "report": report.as_dict(), "note": rec["note"],
           "bad_bytes": rec.get("bad_bytes", 0), "raw_chars": len(rec["text"])}
    if len(text) < cfg["min_chars"]:
        return {**out, "status": "empty" if not text.strip() else "too short"}
    if rec["english_meta"] is None and not gutenberg.looks_english(text, cfg["english_threshold"]):
        return {**out, "status": "non-English (stop-word check)"}
    ids = tok.encode(text)
    ids.append(tok.eos_id)
    return {**out, "status": "ok", "chars": len(text), "sha": hashlib.sha256(text.encode()).hexdigest(),
            "tokens": np.asarray(ids, dtype=np.uint16)}


def _results(records, tok: TextTokenizer, cfg, workers: int):
    """Yield process_book results in input order, with at most 2*workers books in flight."""
    if workers <= 1:
        _init_worker(tok, cfg)
        for rec in records:
            yield process_book(rec)
        return
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # each worker encodes one book on one core
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tok.to_dict(), cfg, True)) as pool:
        pending = deque()
        for rec in records:
            pending.append(pool.apply_async(process_book, (rec,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ---- writing ---------------------------------------------------------------------------------------------
class SplitWriter:
    """Appends each book's tokens to <tmp>/<split>.bin and keeps the per-split counts and book spans."""

    def __init__(self, tmp_dir):
        self.tmp_dir = tmp_dir
        self.files = {s: open(os.path.join(tmp_dir, f"{s}.bin"), "wb") for s in SPLITS}
        self.stats = {s: {"books": 0, "characters": 0, "tokens": 0, "book_ids": [], "book_spans": [], "book_chars": []}
                      for s in SPLITS}

    def add(self, split, book_id, chars, tokens: np.ndarray):
        st = self.stats[split]
        with _naming_the_file(self.files[split].name):
            self.files[split].write(tokens.tobytes())
        st["book_spans"].append([book_id, st["tokens"], int(tokens.size)])
        st["book_ids"].append(book_id)
        st["book_chars"].append(chars)
        st["books"] += 1
        st["characters"] += chars
        st["tokens"] += int(tokens.size)

    def close(self):
        for f in self.files.values():
            with _naming_the_file(f.name):
                f.close()


@contextmanager
def _naming_the_file(path):
    """An OSError of a write (ENOSPC, EIO, ...) carries the path it was writing, for prepare()'s one line."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            raise OSError(e.errno, e.strerror, path) from None
        raise


def rebalance(writer: SplitWriter, split_of: dict) -> list:
    """Tiny corpora: give an empty val/test split the train book with the smallest split hash.

    Rewrites the affected .bin files from the spans. Returns [(book_id, from, to)] moves."""
    moves = []
    candidates = sorted(writer.stats["train"]["book_ids"], key=lambda b: (split_hash(b), str(b)))
    for target in ("val", "test"):
        if writer.stats[target]["books"] == 0 and len(candidates) >= 2:  # train keeps at least one book
            book_id = candidates.pop(0)
            moves.append((book_id, "train", target))
            split_of[book_id] = target
    if not moves:
        return moves
    old = {s: np.fromfile(os.path.join(writer.tmp_dir, f"{s}.bin"), dtype=np.uint16) for s in SPLITS}
    old_stats = writer.stats
    writer.__init__(writer.tmp_dir)
    for s in SPLITS:
        for (book_id, start, n), chars in zip(old_stats[s]["book_spans"], old_stats[s]["book_chars"]):
            writer.add(split_of[book_id], book_id, chars, old[s][start:start + n])
    writer.close()
    return moves


def _sha256_file(path, h=None):
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h


def _short_tok_name(tok_spec: str, tok: TextTokenizer | None) -> str:
    if tok_spec.startswith("demo-bpe"):
        return "demo-bpe"
    if tok_spec == "byte":
        return "byte"
    if "neox" in tok_spec.lower() or (tok is not None and tok.vocab_size == 50277):
        return "neox"
    return os.path.splitext(os.path.basename(tok_spec.rstrip("/")))[0].replace("tokenizer", "tok") or "tok"


def default_out_dir(cfg, tok_spec, tok) -> str:
    src = cfg["source"]
    src_name = "gutenberg" if src == "hub" else os.path.basename(os.path.abspath(src).rstrip("/")).split(".")[0]
    short = _short_tok_name(tok_spec, tok)
    if src == "demo" and short == "demo-bpe":
        return os.path.join("data", "demo")
    return os.path.join("data", f"{src_name}-{short}")


def cleaning_totals(rows) -> dict:
    """Kept books: characters removed per kind, and how head / tail were found (marker, precleaned = no
    marker and no Project Gutenberg text near that end, heuristic = no marker but PG text; see gutenberg.py)."""
    kept = [r["report"] for r in rows if r["status"] == "ok"]
    tot = {k: sum(c[k] for c in kept) for k in ("header_chars", "footer_chars", "credit_chars",
                                                "illustration_chars", "note_chars", "unwrapped_paragraphs")}
    for end in ("head", "tail"):
        tot[end] = {how: sum(1 for c in kept if c[end] == how) for how in ("marker", "precleaned", "heuristic")}
    return tot


def _note_of(row) -> str:
    """A book's note for report.md, with the number of bytes that were not UTF-8."""
    return (row.get("note") or "") + (f" ({row['bad_bytes']:,} bytes)" if row.get("bad_bytes") else "")


def write_report(path, name, meta, rows, elapsed):
    """report.md: totals, skips and the per-book cleaning table (totals from meta's "cleaning", "skipped",
    "notes" and "rebalanced")."""
    sp, cl = meta["splits"], meta["cleaning"]
    lines = [f"# Data preparation report: `{name}`", "",
             f"Source: `{json.dumps(meta['source'])[:300]}`  ",
             f"Tokenizer: `{meta['tokenizer']['name']}` (vocab {meta['tokenizer']['vocab_size']}, "
             f"eos {meta['tokenizer']['eos_id']}), seq_len {meta['seq_len']}  ",
             f"Fingerprint: `{meta['fingerprint']}`  ", f"Time: {elapsed:.1f} s", "",
             "| split | books | characters | tokens | sequences |", "| --- | ---: | ---: | ---: | ---: |"]
    for s in SPLITS:
        lines.append(f"| {s} | {sp[s]['books']:,} | {sp[s]['characters']:,} | {sp[s]['tokens']:,} | {sp[s]['sequences']:,} |")
    lines += ["", "## Cleaning totals (kept books)", "",
              "Removed characters: " + ", ".join(f"{k} {cl[k]:,}" for k in
                                                  ("header_chars", "footer_chars", "credit_chars",
                                                   "illustration_chars", "note_chars")) + ".  ",
              "How the header/footer were found (marker / precleaned / heuristic, see mamba_lm/gutenberg.py): "
              + ", ".join(f"{end}={how}: {n}" for end in ("head", "tail") for how, n in sorted(cl[end].items()) if n)
              + ".", "", "## Skipped", ""]
    lines += [f"- {reason}: {n}" for reason, n in sorted(meta["skipped"].items())] or ["- none"]
    if meta["notes"]:
        lines += ["", "Kept with a note: " + ", ".join(f"{k} {v}" for k, v in sorted(meta["notes"].items())) + "."]
    if meta["rebalanced"]:
        lines += ["", "Tiny corpus: moved " + ", ".join(f"book {b} {a}->{t}" for b, a, t in meta["rebalanced"]) + "."]
    lines += ["", "## Per book", "",
              "| id | title | split | status | chars in | chars out | tokens | header | footer | credits | illus. | notes | head | tail | note |",
              "| ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |"]
    for r in rows:
        c = r["report"]
        title = r["title"].replace("|", "/")
        lines.append(f"| {r['id']} | {title} | {r.get('split', '')} | {r['status']} | {c['chars_in']:,} | "
                     f"{c['chars_out']:,} | {r.get('n_tokens', 0):,} | {c['header_chars']:,} | {c['footer_chars']:,} | "
                     f"{c['credit_chars']:,} | {c['illustration_chars']:,} | {c['note_chars']:,} | {c['head']} | "
                     f"{c['tail']} | {_note_of(r)} |")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


# ---- the whole pipeline ----------------------------------------------------------------------------------
def resolve_tokenizer(cfg):
    """(spec, TextTokenizer or None when it must be trained on the corpus first)."""
    spec = cfg["tokenizer"]
    if spec == "auto":
        spec = "demo-bpe" if cfg["source"] in ("demo", "recall-gate") else _NEOX_NAME
    if spec.startswith("demo-bpe"):
        if spec not in ("demo-bpe", f"demo-bpe-{cfg['demo_vocab_size']}"):
            raise UserError(f"--tokenizer={spec}: the demo BPE is named demo-bpe; set its size with "
                            f"--demo_vocab_size (now {cfg['demo_vocab_size']})")
        return f"demo-bpe-{cfg['demo_vocab_size']}", None
    tok = load_tokenizer(spec)
    check_vocab(tok)
    return spec, tok


def check_vocab(tok):
    """Every id of the tokenizer (not only their count: ids may be sparse) must fit the uint16 .bin files."""
    if tok.vocab_size > 2 ** 16:
        raise UserError(f"tokenizer {tok.name} has token ids up to {tok.vocab_size - 1:,}; the .bin files store "
                        "uint16 (ids 0..65,535): use a tokenizer with a smaller vocabulary")


def request_of(cfg, desc, tok_spec, tok) -> dict:
    """What determines the output: reused when equal, refused (without --force) when different."""
    return {"source": desc, "options": {k: cfg[k] for k in _OPTION_KEYS} | {"cleaning_version": _CLEANING_VERSION},
            "tokenizer": tok.sha256 if tok is not None else tok_spec}


def check_existing(out, request, force) -> bool:
    """True if `out` already holds this exact request (reuse). UserError if it holds something else."""
    meta_path = os.path.join(out, "meta.json")
    if not os.path.exists(out) or (os.path.isdir(out) and not os.listdir(out)):
        return False
    old = None
    if os.path.isfile(meta_path):
        try:
            with open(meta_path, encoding="utf-8") as f:
                old = json.load(f).get("request")
        except (OSError, json.JSONDecodeError, AttributeError):  # AttributeError: meta.json holds no object
            old = None
    if not os.path.isdir(out):
        raise UserError(f"--out_dir={out} is a file, not a folder; choose another --out_dir")
    if old == request and all(os.path.isfile(os.path.join(out, f"{s}.bin")) for s in SPLITS):
        return not force
    foreign = sorted(set(os.listdir(out)) - _DATA_FILES)
    if old is None and foreign:  # never delete a folder that is not a data dir, not even with --force
        raise UserError(f"{out} exists and is not a prepared data dir (it holds {', '.join(foreign[:3])}"
                        f"{', ...' if len(foreign) > 3 else ''}); choose another --out_dir")
    if force:
        return False
    if old is None:
        raise UserError(f"{out} holds an incomplete data dir (no readable meta.json); pass --force=True to rebuild it")
    diff = sorted(k for k in set(old.get("options", {})) | set(request["options"])
                  if old.get("options", {}).get(k) != request["options"].get(k))
    diff += [k for k in ("source", "tokenizer") if old.get(k) != request[k]]
    raise UserError(f"{out} was prepared with different settings ({', '.join(diff)}); pass --force=True to "
                    "overwrite it or choose another --out_dir")


def clean_leftovers(out: str) -> list[str]:
    """Remove what a killed run (SIGKILL, power loss) of this script left beside `out`, nothing else.

    <name>.tmp-XXXXXXXX: a build folder; removed when the run that made it is gone (its .prepare-pid names a
    process that no longer exists here, or it has none) and it holds only data files. .<name>.old-<pid>
    (runtime.replace_folder): the previous data dir, moved aside while the new one was renamed into place;
    when its run is gone, put back as `out` if the kill came between the two renames (`out` missing), else
    removed. Returns the paths handled."""
    parent = os.path.dirname(os.path.abspath(out))
    name = re.escape(os.path.basename(os.path.abspath(out)))
    pattern = re.compile(rf"{name}\.(tmp)-[A-Za-z0-9_]{{8}}|\.{name}\.(old)-(\d+)")
    try:
        entries = sorted(os.listdir(parent))
    except OSError:
        return []
    handled = []
    for entry in entries:
        m = pattern.fullmatch(entry)
        path = os.path.join(parent, entry)
        if not m or os.path.islink(path) or not os.path.isdir(path):
            continue
        files = set(os.listdir(path))
        alive = _run_alive(path) if m.group(1) else _pid_alive(int(m.group(3)))
        if not files <= _DATA_FILES | {_PID_FILE} or alive:
            continue  # not ours, or a run still at work on it
        if m.group(2) and not os.path.exists(out):
            os.rename(path, out)
            print(f"restored {out} from {entry} (a run was killed while replacing it)")
        else:
            shutil.rmtree(path, ignore_errors=True)
            print(f"removed {path}, left by a killed run")
        handled.append(path)
    return handled


def _run_alive(tmp: str) -> bool:
    """True when the .prepare-pid of a build folder names a live process on this machine."""
    try:
        with open(os.path.join(tmp, _PID_FILE)) as f:
            host, pid = f.read().split()
    except (OSError, ValueError):
        return False  # no pid file, or unreadable: the run that made it is gone
    return host != socket.gethostname() or _pid_alive(int(pid))  # another machine's run: not ours to judge


def _pid_alive(pid: int) -> bool:
    """True when process `pid` exists on this machine (also when it is another user's)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except PermissionError:
        return True
    except (OSError, OverflowError):
        return False  # ProcessLookupError: gone
    return True


def prepare(cfg: dict) -> str:
    """Run the pipeline for config `cfg`; returns the data dir."""
    t0 = time.time()
    if cfg["val_permille"] < 0 or cfg["test_permille"] < 0 or cfg["val_permille"] + cfg["test_permille"] >= 1000:
        raise UserError("--val_permille and --test_permille must be >= 0 and sum to less than 1000")
    tok_spec, tok = resolve_tokenizer(cfg)
    if cfg["source"] == "recall-gate":
        desc, records, total_rows = recall_gate.open_source(cfg["gate"])
    else:
        desc, records, total_rows = open_source(cfg["source"], hub_dataset=cfg["hub_dataset"],
                                                demo_num_books=cfg["demo_num_books"], demo_seed=cfg["demo_seed"],
                                                demo_words_per_book=cfg["demo_words_per_book"])
    out = cfg["out_dir"] or default_out_dir(cfg, tok_spec, tok)
    why = PathRule("output", "folder").error(out)  # --out_dir was checked already; the default name is now known
    if why:
        raise UserError(f"out_dir {out}: {why}")
    clean_leftovers(out)
    request = request_of(cfg, desc, tok_spec, tok)
    if check_existing(out, request, cfg["force"]):
        print(f"reusing {out} (same source, options and tokenizer; --force=True rebuilds it)")
        return out
    if tok is None:
        records = list(records)  # the demo corpus is small: train the BPE on the cleaned texts
        tok = train_demo_bpe([gutenberg.clean_book(r["text"], cfg["unwrap"])[0] for r in records if r["text"]],
                             cfg["demo_vocab_size"])
        check_vocab(tok)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(os.path.abspath(out)) + ".tmp-", dir=parent)
    try:
        with open(os.path.join(tmp, _PID_FILE), "w") as f:
            f.write(f"{socket.gethostname()} {os.getpid()}\n")
        meta = _build(cfg, desc, records, total_rows, tok, tmp, out, request, t0)
        os.remove(os.path.join(tmp, _PID_FILE))
        if cfg["source"] == "recall-gate":  # the held-out probe set, and the answer masks (--loss_on=answers)
            dial = recall_gate.parse_dial(cfg["gate"])
            recall_gate.write_probe_set(tmp, dial, tok)
            answers = recall_gate.write_answer_masks(tmp, dial, tok)
            print("answer tokens (--loss_on=answers): " + ", ".join(f"{s} {n:,}" for s, n in answers.items()))
        replace_folder(tmp, out)       # atomically: the old out_dir is removed only after the rename
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        what = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e)).lower()
        raise UserError(f"{what} while writing {e.filename or tmp}; {out} is unchanged"
                        + (": free some space or choose another --out_dir" if e.errno == errno.ENOSPC else "")) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    sp = meta["splits"]
    print(f"wrote {out}: " + ", ".join(f"{s} {sp[s]['books']} books / {sp[s]['tokens']:,} tokens / "
                                       f"{sp[s]['sequences']:,} seqs" for s in SPLITS) + f" in {time.time() - t0:.1f} s")
    return out


def _selected(records, cfg, skipped, rows):
    """Metadata-level selection in the main process: bad rows, non-English, non-fiction, duplicate ids."""
    seen_ids = set()
    for rec in records:
        reason = None
        if not isinstance(rec["text"], str):
            reason = "bad json line" if rec["note"] == "bad json line" else "missing TEXT"
        elif rec["id"] is not None and rec["id"] in seen_ids:
            reason = "duplicate Gutenberg id"
        else:
            rec["english_meta"] = is_english_metadata(rec["meta"])
            if rec["english_meta"] is False:
                reason = "non-English (metadata)"
            elif cfg["fiction_only"] and is_fiction_metadata(rec["meta"]) is False:
                reason = "not fiction (metadata)"
        if reason:
            skipped[reason] += 1
            rows.append({"id": rec["id"], "title": book_title(rec["meta"]), "status": reason,
                         "report": gutenberg.CleanReport().as_dict(), "note": rec["note"]})
            continue
        if rec["id"] is None:
            rec["id"] = 10 ** 12 + int(hashlib.sha256(rec["text"].encode()).hexdigest()[:10], 16)
        seen_ids.add(rec["id"])
        yield rec


def _build(cfg, desc, records, total_rows, tok, tmp, out, request, t0) -> dict:
    workers = cfg["num_workers"] or os.cpu_count() or 1
    limit = cfg["num_books"] or None
    skipped, notes, rows, split_of, seen_sha = Counter(), Counter(), [], {}, set()
    writer = SplitWriter(tmp)
    expected = min(x for x in (total_rows, limit) if x) if (total_rows or limit) else None
    bar = tqdm(total=expected, unit="book", desc="prepare", dynamic_ncols=True, smoothing=0.05)
    raw_bytes = n_tok = kept = 0
    results = _results(_selected(records, cfg, skipped, rows), tok, cfg, workers)
    try:  # on an error or Ctrl-C too: stop the worker pool and close the .bin files now
        for res in results:
            raw_bytes += res["raw_chars"]
            bar.update(1)
            if res["status"] == "ok" and res["sha"] in seen_sha:
                res["status"] = "duplicate text"
            if res["status"] != "ok":
                skipped[res["status"]] += 1
                rows.append(res)
                continue
            seen_sha.add(res["sha"])
            for note in (res["note"] or "").split("; "):
                if note:
                    notes[note] += 1
            if res["bad_bytes"]:
                notes[BAD_BYTES_TOTAL] += res["bad_bytes"]
            split = assign_split(res["id"], cfg["val_permille"], cfg["test_permille"])
            split_of[res["id"]] = split
            writer.add(split, res["id"], res["chars"], res.pop("tokens"))
            res["split"], res["n_tokens"] = split, writer.stats[split]["book_spans"][-1][2]
            rows.append(res)
            kept += 1
            n_tok += res["n_tokens"]
            dt = max(time.time() - t0, 1e-6)
            bar.set_postfix_str(f"{raw_bytes / dt / 1e6:.2f} MB/s, {n_tok / dt / 1e3:.0f}k tok/s, kept {kept}")
            if limit and kept >= limit:
                break
    finally:
        results.close()
        bar.close()
        writer.close()
    if kept == 0:
        raise UserError(f"no usable books in --source={cfg['source']} (skipped: "
                        + (", ".join(f"{k} {v}" for k, v in skipped.items()) or "none") + ")")
    if limit and kept < limit and cfg["source"] not in ("demo", "recall-gate"):  # the demo corpus has demo_num_books by design
        print(f"note: --num_books={limit} but the source has only {kept} usable books; using all of them")
    if kept < 3:
        raise UserError(f"only {kept} usable book(s); need at least 3 so train, val and test each get a book")
    moves = rebalance(writer, split_of)
    for r in rows:
        if r.get("split"):
            r["split"] = split_of[r["id"]]
    h = hashlib.sha256(json.dumps(request, sort_keys=True).encode())
    for s in SPLITS:
        _sha256_file(os.path.join(tmp, f"{s}.bin"), h)
    splits = {}
    for s in SPLITS:
        st = writer.stats[s]
        splits[s] = {"books": st["books"], "characters": st["characters"], "tokens": st["tokens"],
                     "sequences": num_sequences(st["tokens"], cfg["seq_len"]),
                     "book_ids": st["book_ids"], "book_spans": st["book_spans"]}
        if splits[s]["sequences"] == 0:
            print(f"warning: the {s} split has {st['tokens']:,} tokens, not one full sequence of {cfg['seq_len']}: "
                  "add books or lower --seq_len")
    tok_meta = {k: v for k, v in tok.to_dict().items() if k != "json"}
    meta = {"format": _DATA_FORMAT, "seq_len": cfg["seq_len"], "dtype": "uint16", "tokenizer": tok_meta,
            "fingerprint": h.hexdigest(), "source": desc,
            "options": request["options"] | {"dedupe": "gutenberg id, then sha256 of cleaned text",
                                             "split_rule": "sha256(str(book_id)) % 1000"},
            "splits": splits, "skipped": dict(skipped), "notes": dict(notes),
            "cleaning": cleaning_totals(rows), "rebalanced": [list(m) for m in moves],
            "request": request, "config": cfg,
            "stats": {"raw_characters": raw_bytes, "seconds": round(time.time() - t0, 2), "workers": workers},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "script": "prepare_data.py"}
    if tok.kind == "hf":
        with open(os.path.join(tmp, "tokenizer.json"), "w", encoding="utf-8") as f:
            f.write(tok.json)
    with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
        f.write(dump_meta(meta))
    write_report(os.path.join(tmp, "report.md"), out, meta, rows, time.time() - t0)
    print(f"kept {kept} books, skipped {sum(skipped.values())}: "
          + (", ".join(f"{k} {v}" for k, v in sorted(skipped.items())) or "none")
          + f"; {raw_bytes / 1e6:.1f} MB raw text in {time.time() - t0:.1f} s")
    cl = meta["cleaning"]
    print(f"header/footer found by marker: {cl['head']['marker']}/{cl['tail']['marker']} books; without markers "
          f"(kept, see mamba_lm/gutenberg.py): pre-cleaned {cl['head']['precleaned']}/{cl['tail']['precleaned']}, "
          f"heuristic {cl['head']['heuristic']}/{cl['tail']['heuristic']}"
          + ("; notes on kept books: " + ", ".join(f"{k} {v}" for k, v in sorted(notes.items())) if notes else ""))
    return meta


def dump_meta(meta: dict) -> str:
    """meta.json text: indented, but innermost lists (book ids, one book span) on one line."""
    text = json.dumps(meta, indent=1, ensure_ascii=False)
    return re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text) + "\n"


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def main(argv=None) -> str:
    """Run with `--key=value` overrides of the constants above (tests call this; the CLI goes through it too)."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # so a killed run removes its tmp dir too
    namespace = {k: globals()[k] for k in config_keys(globals())} | {"__file__": __file__, "__doc__": __doc__}
    cfg = apply_overrides(namespace, sys.argv[1:] if argv is None else argv, check=True)  # main() is the CLI
    with user_errors():
        try:
            return prepare(cfg)
        except KeyboardInterrupt:  # prepare() has already removed its tmp dir: out_dir is untouched
            print("\ninterrupted: nothing was written (out_dir is unchanged)", file=sys.stderr)
            raise SystemExit(130) from None


if __name__ == "__main__":
    main()
