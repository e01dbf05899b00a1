"""Shared pytest fixtures (tiny, CPU, no ../shared).

    demo_data_dir   session-scoped prepared data dir: 6 demo-corpus books, byte-level tokenizer
                    (vocab 257), seq_len 32; written to the data-dir contract of CONTRACTS.md
                    (train/val/test.bin uint16 + meta.json). Read-only: copy it if a test must modify it.
    make_data_dir   the function behind it: make_data_dir(path, seq_len=32, num_books=6, words_per_book=600)
    tiny_model      factory: tiny_model(vocab_size=257, d_model=32, n_layer=2, seed=0) -> MambaLMHeadModel
    train_config    factory: train_config(data_dir, out_dir, **overrides) -> a config dict for trainer.train:
                    train_baseline.py's constants (read from the script, the one home of the defaults), made
                    tiny (batch 4, seq_len from the data, fp32 CPU, no tensorboard)
    script_constants(path) -> {name: (value, comment)}: the constants block at the top of a script (ast)

MAMBA_NARRATIVE_CPU_SCAN is set to "eager" unless already set (see below).

The data dir is written directly (not via prepare_data.py) so that these fixtures depend only on the
data *format*; tests of prepare_data itself live in its own test file.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# training in tests (in process and in the scripts they start) stays on the eager CPU scan, whatever the run's
# size (trainer.choose_cpu_scan would compile long runs): fast and free of compile time; set it to
# "compiled" to run the suite through the compiled scan
os.environ.setdefault("MAMBA_NARRATIVE_CPU_SCAN", "eager")


def make_data_dir(path, seq_len: int = 32, num_books: int = 6, words_per_book: int = 600) -> Path:
    """Write a prepared data dir of demo books with the byte tokenizer (books 0..n-3 train, then val, test)."""
    from mamba_lm.demo_corpus import generate_books
    from mamba_lm.tokenizer import load_tokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer("byte")
    books = generate_books(num_books, seed=7, words_per_book=words_per_book)
    parts = {"train": books[:-2], "val": books[-2:-1], "test": books[-1:]}
    splits, digest = {}, hashlib.sha256()
    for split, split_books in parts.items():
        ids, spans = [], []
        for b in split_books:
            book_ids = tok.encode(b["TEXT"]) + [tok.eos_id]
            spans.append([b["id"], len(ids), len(book_ids)])
            ids.extend(book_ids)
        arr = np.asarray(ids, dtype=np.uint16)
        arr.tofile(path / f"{split}.bin")
        digest.update(arr.tobytes())
        splits[split] = {"books": len(split_books), "characters": sum(len(b["TEXT"]) for b in split_books),
                         "tokens": len(arr), "sequences": max(0, (len(arr) - 1) // seq_len),
                         "book_ids": [b["id"] for b in split_books], "book_spans": spans}
    tok_meta = {k: v for k, v in tok.to_dict().items() if k != "json"}
    meta = {"format": "mamba-narrative-data/1", "seq_len": seq_len, "dtype": "uint16", "tokenizer": tok_meta,
            "fingerprint": digest.hexdigest(), "source": {"kind": "demo", "num_books": num_books, "seed": 7,
                                                          "words_per_book": words_per_book},
            "options": {}, "splits": splits}
    (path / "meta.json").write_text(json.dumps(meta, indent=1))
    return path


@pytest.fixture(scope="session")
def demo_data_dir(tmp_path_factory) -> Path:
    """A tiny prepared data dir (byte tokenizer, seq_len 32); treat as read-only."""
    return make_data_dir(tmp_path_factory.mktemp("data") / "demo")


@pytest.fixture
def tiny_model():
    """Factory for a tiny Mamba LM (d_model 32, 2 layers) with a fixed init seed."""
    def make(vocab_size: int = 257, d_model: int = 32, n_layer: int = 2, seed: int = 0):
        from mamba_lm.mamba import mamba_config
        from mamba_lm.models import build_model
        torch.manual_seed(seed)
        return build_model("mamba", mamba_config("tiny", vocab_size=vocab_size, d_model=d_model, n_layer=n_layer))
    return make


def script_constants(path) -> dict:
    """{name: (value, trailing comment)} of the module-level constants of a script, in order: the assignments of
    literals between its `# ----` rulers, read with ast (the script is not run)."""
    source = Path(path).read_text(encoding="utf-8")
    lines = source.splitlines()
    rulers = [i for i, line in enumerate(lines, 1) if line.startswith("# ----")][:2]
    out = {}
    for node in ast.parse(source).body:
        if not (rulers[0] < node.lineno < rulers[1] and isinstance(node, ast.Assign)
                and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            continue
        try:
            value = ast.literal_eval(node.value)
        except ValueError:
            continue
        after = lines[node.lineno - 1][node.value.end_col_offset:]
        comment = after[after.index("#") + 1:].strip() if "#" in after else ""
        out[node.targets[0].id] = (value, comment)
    return out


@pytest.fixture
def train_config():
    """Factory for a tiny trainer config (see module docstring)."""
    defaults = {k: v for k, (v, _) in script_constants(ROOT / "train_baseline.py").items()}

    def make(data_dir, out_dir, **overrides):
        cfg = {**defaults, "data_dir": str(data_dir), "out_dir": str(out_dir), "batch_size": 4, "grad_accum": 1,
               "epochs": 1, "max_steps": 8, "eval_interval": 4, "eval_batches": 2, "log_interval": 1,
               "device": "cpu", "dtype": "float32", "tensorboard": False, "lr": 3e-3, "warmup_steps": 2}
        cfg.update(overrides)
        return cfg
    return make


# One intra-op thread: these models are tiny, and on a loaded machine two spinning OpenMP threads per
# process make small ops ~50x slower. Subprocesses (CLI tests, DDP workers) inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
