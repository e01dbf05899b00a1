"""Peak CPU memory of one training step at long windows (seq_len 1k-16k), reset vs stateful, both models.

Each (model, seq_len, mode) runs in its own process, so the peak resident set (ru_maxrss) is that step's:
build the model, run two training steps (forward + cross-entropy + backward + AdamW) on random tokens,
and report the peak RSS and its growth over the process right after the model was built. "stateful"
carries the recurrent state from the first window into the second (mamba_lm/stateful.py, detached in
between) with one row resetting mid-window, as `--stateful=True` training does; "reset" is the plain
forward from a zero state.

    python bench/bench_long_windows.py                                  # the table in research_plan.md
    python bench/bench_long_windows.py --seq_lens=1024,4096 --vocab_size=50277
"""

import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench_common import build_impl, set_random_signals  # noqa: E402
from mamba_lm.configurator import apply_overrides  # noqa: E402

# -----------------------------------------------------------------------------
preset = "tiny"                        # model preset (mamba_lm.mamba.PRESETS; multitrack: the same-named preset)
models = "ours,multitrack"             # ours = the Mamba baseline, multitrack = the multi-track model
seq_lens = "1024,4096,8192,16384"      # window lengths to measure
modes = "reset,stateful"               # reset: zero state every window; stateful: carried state + a reset
batch_size = 1                         # rows per step [>=1]
vocab_size = 4096                      # the demo tokenizer's; NeoX (50277) adds batch*seq_len*vocab*4 B per logits copy [>=2]
threads = 1                            # torch CPU threads [>=1]
one = ""                               # internal: "model:seq_len:mode" runs that case in this process
# -----------------------------------------------------------------------------
config = apply_overrides(globals(), sys.argv[1:])


def rss_mib() -> float:
    """Current resident set size of this process (Linux /proc), MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_one(impl: str, seq_len: int, mode: str) -> None:
    from mamba_lm.stateful import forward_with_resets

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = build_impl(impl, preset, vocab_size, "cpu").train()
    if impl == "multitrack":
        set_random_signals(net)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    base = rss_mib()
    cache = net.allocate_cache(batch_size) if mode == "stateful" else None
    t0 = time.time()
    for k in range(2):
        ids = torch.randint(0, vocab_size, (batch_size, seq_len + 1))
        if cache is None:
            logits = net(ids[:, :-1])
        else:
            resets = torch.zeros(batch_size, seq_len, dtype=torch.bool)
            resets[0, seq_len // 2] = k == 1                      # a book ends mid-window in the second window
            logits, _ = forward_with_resets(net, ids[:, :-1], cache, resets, state_grad=False)
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cache is not None:
            cache.detach_()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{impl}\t{seq_len}\t{mode}\t{peak:.0f}\t{peak - base:.0f}\t{(time.time() - t0) / 2:.2f}")


def main() -> None:
    if one:
        impl, seq_len, mode = one.split(":")
        run_one(impl, int(seq_len), mode)
        return
    print(f"# peak RSS of one CPU training step, preset {preset}, batch {batch_size}, vocab {vocab_size}, "
          f"fp32, {threads} thread(s); torch {torch.__version__}")
    print("| model | seq_len | mode | peak RSS (MiB) | growth over the built model (MiB) | s/step |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    for impl in models.split(","):
        for seq_len in seq_lens.split(","):
            for mode in modes.split(","):
                args = [sys.executable, os.path.abspath(__file__), f"--one={impl}:{seq_len}:{mode}",
                        f"--preset={preset}", f"--batch_size={batch_size}", f"--vocab_size={vocab_size}",
                        f"--threads={threads}"]
                r = subprocess.run(args, capture_output=True, text=True)
                if r.returncode:
                    print(f"| {impl} | {seq_len} | {mode} | failed: {r.stderr.strip().splitlines()[-1]} | | |")
                    continue
                name, L, m, peak, growth, sec = r.stdout.strip().splitlines()[-1].split("\t")
                print(f"| {name} | {L} | {m} | {peak} | {growth} | {sec} |", flush=True)


if __name__ == "__main__":
    main()
