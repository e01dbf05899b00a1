"""Put training runs side by side: a markdown table and one PNG of their loss curves against tokens seen.

    python bench/compare_runs.py --runs=out/baseline-s1337,out/multitrack-s1337,out/baseline-s2
    python bench/compare_runs.py --runs=bench/results/gpu-20261129/baseline-s1337-metrics.jsonl,... \
        --out=bench/results/gpu-20261129/compare_runs.png

A run is a training out_dir (its metrics.jsonl) or a metrics.jsonl file; its name is the directory name,
or the file name without `-metrics.jsonl`. Table columns: parameters, tokens, steps, the final train loss
(mean of the last `tail` logged values), the last fixed-subset val loss, the full val loss of the last
epoch row, wall minutes, and the median training tokens/s the trainer logged (its first `skip` log lines,
kernel autotuning and warmup, left out). Plot: train loss (EMA) and val loss against tokens.
"""

import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mamba_lm.configurator import apply_overrides  # noqa: E402
from mamba_lm.errors import UserError, user_errors  # noqa: E402

# ----------------------------------------------------------------------------------------------
runs = ""          # comma-separated training out_dirs or metrics.jsonl files
out = ""           # PNG path ("" = compare_runs.png beside the first run's metrics) [output file]
tail = 10          # logged train losses averaged for the final train loss [>=1]
skip = 5           # first logged train lines left out of the median tokens/s [>=0]
ema = 0.9          # smoothing of the plotted train loss (0 = raw) [0, 1)
# ----------------------------------------------------------------------------------------------
config = apply_overrides(globals(), sys.argv[1:])


def metrics_path(run: str) -> tuple[str, str]:
    """(display name, metrics.jsonl path) of an out_dir or a metrics file."""
    if os.path.isdir(run):
        return os.path.basename(os.path.normpath(run)), os.path.join(run, "metrics.jsonl")
    name = os.path.basename(run)
    return (name[:-len("-metrics.jsonl")] if name.endswith("-metrics.jsonl") else os.path.splitext(name)[0]), run


def read_run(path: str) -> dict[str, list[dict]]:
    """Rows of a metrics.jsonl grouped by kind (config, train, eval, epoch). A resumed run repeats steps:
    the later row of a step wins, so each step appears once."""
    if not os.path.isfile(path):
        raise UserError(f"no metrics file at {path}; pass training out_dirs or metrics.jsonl files to --runs")
    by_kind: dict[str, dict] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path}:{n} is not JSON; is this a metrics.jsonl of train_*.py?") from None
            by_kind.setdefault(row.get("kind", "?"), {})[row.get("step", n)] = row
    return {kind: [rows[s] for s in sorted(rows)] for kind, rows in by_kind.items()}


def summary(rows: dict[str, list[dict]]) -> dict:
    train, evals, epochs = rows.get("train", []), rows.get("eval", []), rows.get("epoch", [])
    cfg = (rows.get("config") or [{}])[-1]
    speeds = [r["tok_per_s"] for r in train[skip:] if r.get("tok_per_s")]
    last = evals[-1] if evals else {}
    return {"params": cfg.get("num_params"), "tokens": (train[-1]["tokens"] if train else None),
            "steps": (train[-1]["step"] if train else None),
            "train_loss": statistics.fmean(r["train_loss"] for r in train[-tail:]) if train else None,
            "val_loss": last.get("val_loss"), "val_loss_full": (epochs[-1]["val_loss"] if epochs else None),
            "minutes": (epochs[-1].get("minutes") if epochs else last.get("minutes")),
            "tok_per_s": statistics.median(speeds) if speeds else None}


def cell(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def plot(curves: dict[str, dict], path: str) -> str | None:
    from mamba_lm.report import pyplot, save_figure

    plt = pyplot()
    if plt is None:
        return None
    fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for name, rows in curves.items():
        train = rows.get("train", [])
        smooth, s = [], None
        for r in train:
            s = r["train_loss"] if s is None else ema * s + (1 - ema) * r["train_loss"]
            smooth.append(s)
        line, = ax_t.plot([r["tokens"] / 1e6 for r in train], smooth, lw=1, label=name)
        evals = rows.get("eval", [])
        ax_v.plot([r["tokens"] / 1e6 for r in evals], [r["val_loss"] for r in evals], "o-", ms=3, lw=1.2,
                  color=line.get_color(), label=name)
    ax_t.set_title(f"train loss (EMA {ema})", fontsize=10)
    ax_v.set_title("val loss (fixed val subset)", fontsize=10)
    for ax in (ax_t, ax_v):
        ax.set_xlabel("tokens seen (M)")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    lows = [r["train_loss"] for rows in curves.values() for r in rows.get("train", [])]
    if lows:
        ax_t.set_ylim(min(lows) - 0.1, min(lows) + 3)
    return str(save_figure(fig, path))


def main():
    specs = [r for r in str(runs).split(",") if r.strip()]
    if not specs:
        raise UserError("pass --runs=DIR_OR_METRICS[,...] (training out_dirs or metrics.jsonl files)")
    curves = {}
    for spec in specs:
        name, path = metrics_path(spec.strip())
        curves[name] = read_run(path)
    print("| run | params | tokens | steps | train loss | val loss (subset) | val loss (full) | minutes | train tok/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, rows in curves.items():
        s = summary(rows)
        print(f"| {name} | {cell(s['params'], ',')} | {cell(s['tokens'], ',')} | {cell(s['steps'], ',')} "
              f"| {cell(s['train_loss'], '.4f')} | {cell(s['val_loss'], '.4f')} | {cell(s['val_loss_full'], '.4f')} "
              f"| {cell(s['minutes'], '.1f')} | {cell(s['tok_per_s'], ',.0f')} |")
    png = out or os.path.join(os.path.dirname(metrics_path(specs[0].strip())[1]) or ".", "compare_runs.png")
    written = plot(curves, png)
    print(f"\nwrote {written}" if written else "\n(matplotlib not installed: no plot)")


if __name__ == "__main__":
    with user_errors():
        main()
