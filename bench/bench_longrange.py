"""Speed and peak memory of evaluate.py's long-range stages (longrange, chapters) as books get longer.

    python bench/bench_longrange.py --data_dir=data/gutenberg-neox                  # GPU: mamba-130m, bf16
    python prepare_data.py --source=demo --out_dir=data/demo-long --demo_num_books=12 --demo_words_per_book=60000
    python bench/bench_longrange.py --data_dir=data/demo-long --books=4 --caps=8192,0   # long books, no download
    python bench/bench_longrange.py --data_dir=data/demo --preset=tiny --device=cpu --dtype=float32 --caps=2048,8192

A randomly initialised model of `preset` (the numbers are speed and memory, not quality) reads the first
`books` books of `split`, each cut to every cap of `caps` (0 = the whole book), through
mamba_lm.evaluation.eval_longrange and eval_chapters. The stages stream one window of logits at a time,
so peak memory must stay flat as the cap grows (GPU: torch.cuda.max_memory_allocated, reset per row;
CPU: the max RSS of the process so far).
tokens/s counts the book tokens a stage reads once (longrange reads them twice: carried and reset).
Prints a markdown table and one JSON line.
"""

import json
import os
import resource
import sys
import time
from contextlib import nullcontext

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from mamba_lm import evaluation as E
from mamba_lm.configurator import apply_overrides
from mamba_lm.data import TokenSplit, load_meta
from mamba_lm.errors import user_errors
from mamba_lm.mamba import mamba_config
from mamba_lm.models import build_model
from mamba_lm.tokenizer import tokenizer_from_dict

# ----------------------------------------------------------------------------------------------
data_dir = "data/gutenberg-neox"  # prepared data dir (prepare_data.py) [input folder]
split = "test"                  # split whose books are read
preset = "mamba-130m"           # mamba_lm.mamba.PRESETS key (random init)
books = 8                       # books read (the split's first ones) [>=1]
caps = "16384,65536,0"          # tokens per book at each row (0 = whole books)
window = 1024                   # window of the reset control (the training length) [>=1]
book_batch_size = 4             # books per forward in the longrange stage [>=1]
device = "cuda"                 # cuda | cpu
dtype = "bfloat16"              # bfloat16 | float32 (autocast)
# ----------------------------------------------------------------------------------------------
config = apply_overrides(globals(), sys.argv[1:])


def main() -> None:
    meta = load_meta(data_dir)
    tokenizer = tokenizer_from_dict({**meta["tokenizer"], "json": _tokenizer_json()})
    data = TokenSplit(data_dir, split)
    dev = torch.device(device)
    torch.manual_seed(0)
    model = build_model("mamba", mamba_config(preset, vocab_size=tokenizer.vocab_size)).to(dev).eval()
    amp = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if dtype == "bfloat16" else nullcontext
    rows = []
    for cap in [int(c) for c in caps.split(",")]:
        cfg = {"split": split, "longrange_books": books, "longrange_tokens": cap, "position_tokens": 65536,
               "book_batch_size": book_batch_size, "chapter_tokens": 128, "chapter_candidates": 6, "seed": 1}
        row = {"cap": cap}
        for stage, run in (("longrange", E.eval_longrange), ("chapters", E.eval_chapters)):
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.time()
            res = run(model, tokenizer, data, cfg, amp, window)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.time() - t0
            row[stage] = {"seconds": round(seconds, 2), "peak_mib": peak_mib(dev)}
            if stage == "longrange":
                row.update(tokens=res["tokens"], longest=res["longest_book"], name_targets=res["name_targets"])
                row[stage]["tok_per_s"] = round(2 * res["tokens"] / seconds)
            else:
                row["breaks"] = res.get("carried", {}).get("breaks", 0)
        rows.append(row)
        print(row, flush=True)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"\n{preset} (random init), {dtype}, {name}, window {window}, {books} books of {data_dir}/{split}\n")
    print("| tokens per book | book tokens | longest | longrange s | tok/s | peak MiB | chapters s | breaks "
          "| peak MiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['cap'] or 'whole'} | {r['tokens']:,} | {r['longest']:,} | {r['longrange']['seconds']} | "
              f"{r['longrange']['tok_per_s']:,} | {r['longrange']['peak_mib']} | {r['chapters']['seconds']} | "
              f"{r['breaks']} | {r['chapters']['peak_mib']} |")
    print(json.dumps({"config": config, "device": name, "rows": rows}))


def peak_mib(dev) -> int:
    """GPU: max_memory_allocated since the last reset; CPU: the process's max RSS so far (never decreases,
    so rows with ascending caps show whether a longer book needed more)."""
    if dev.type == "cuda":
        return round(torch.cuda.max_memory_allocated() / 2**20)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def _tokenizer_json():
    path = os.path.join(data_dir, "tokenizer.json")
    return open(path).read() if os.path.exists(path) else None


if __name__ == "__main__":
    with user_errors():
        main()
