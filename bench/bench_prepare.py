"""Benchmark prepare_data.py: cleaning + tokenizing throughput on the shared Gutenberg corpus.

    python bench/bench_prepare.py                          # first 100 books, local NeoX tokenizer, all cores
    python bench/bench_prepare.py --num_books=0            # the whole corpus

Runs the real pipeline (prepare_data.prepare) into a temporary dir (removed afterwards unless --out_dir
is given) and prints raw-text MB/s and tokens/s. Record results in bench/results/prepare_cpu.md.
"""

import os
import platform
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import prepare_data  # noqa: E402
from mamba_lm.configurator import apply_overrides, config_keys  # noqa: E402
from mamba_lm.data import load_meta  # noqa: E402
from mamba_lm.errors import user_errors  # noqa: E402

# -----------------------------------------------------------------------------
source = "../shared/data/gutenberg"                                  # corpus to prepare [input path, or hub | demo]
tokenizer = "../shared/data/tokenizers/gpt-neox-20b/tokenizer.json"  # tokenizer spec (see prepare_data.py)
num_books = 100                                                      # books to prepare (0 = all) [>=0]
num_workers = 0                                                      # worker processes (0 = all cores) [>=0]
out_dir = ""                                                         # "" = temporary dir, deleted afterwards [output folder]
# -----------------------------------------------------------------------------
config = apply_overrides(globals(), sys.argv[1:])

tmp = None if out_dir else tempfile.mkdtemp(prefix="bench_prepare-")
cfg = {k: getattr(prepare_data, k) for k in config_keys(vars(prepare_data))}
cfg.update(source=source, tokenizer=tokenizer, num_books=num_books, num_workers=num_workers,
           out_dir=out_dir or os.path.join(tmp, "data"), force=True)
load = os.getloadavg()[0]
try:
    with user_errors():
        t0 = time.time()
        out = prepare_data.prepare(cfg)
        seconds = time.time() - t0
finally:
    meta = load_meta(out) if "out" in globals() else None
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)
books = sum(meta["splits"][s]["books"] for s in ("train", "val", "test"))
tokens = sum(meta["splits"][s]["tokens"] for s in ("train", "val", "test"))
raw_mb = meta["stats"]["raw_characters"] / 1e6
print(f"bench_prepare: {books} books, {raw_mb:.1f} M raw chars -> {tokens / 1e6:.2f} M tokens in {seconds:.1f} s: "
      f"{raw_mb / seconds:.2f} MB/s, {tokens / seconds / 1e3:.0f}k tokens/s "
      f"({meta['stats']['workers']} workers, {os.cpu_count()} cores, load avg before {load:.1f}, "
      f"{platform.machine()}, Python {platform.python_version()})")
