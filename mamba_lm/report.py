"""Markdown and PNG output: sample files, the per-epoch table, loss curves, router usage.

Deliberately small (nanochat deleted its report module): one markdown writer, one table
formatter, the training plots (loss curves; the multi-track router's usage, drawn from plain stats
dicts so that model code draws nothing). Shared by train_*.py, generate_text.py and evaluate.py.
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

from mamba_lm.runtime import atomic_path, atomic_write_text

EPOCH_COLUMNS = ["epoch", "train_loss", "val_loss", "val_ppl", "minutes", "tokens"]


def write_markdown(path, title: str, sections: list[tuple[str, str]], append: bool = True) -> Path:
    """Write `sections` [(heading, markdown body), ...] under `# title`; append if the file exists.

    An existing file is never clobbered: new sections are appended after its content (the
    title is written only when the file is created). Returns the path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = "".join(f"\n## {heading}\n\n{text.rstrip()}\n" for heading, text in sections)
    if append and path.exists():
        with open(path, "a", encoding="utf-8") as f:
            f.write(body)
    else:
        atomic_write_text(path, f"# {title}\n{body}")
    return path


def as_paragraphs(text: str) -> str:
    """Model output as markdown paragraphs: keep line breaks, neutralise markdown syntax at line starts."""
    lines = []
    for line in text.replace("\r\n", "\n").split("\n"):
        line = line.strip()
        line = re.sub(r"^([#>*+|=`~-])", r"\\\1", line)    # headings, quotes, lists, tables, rules, fences
        line = re.sub(r"^(\d+)([.)])", r"\1\\\2", line)   # "1. " would start an ordered list
        lines.append(line + "  " if line else "")   # two trailing spaces: a hard line break
    return "\n".join(lines).strip()


def blockquote(text: str) -> str:
    return "\n".join("> " + line for line in text.strip("\n").split("\n"))


def format_number(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        return f"{x:,.0f}" if abs(x) >= 1e4 else f"{x:.4g}" if abs(x) < 1e-3 else f"{x:.4f}".rstrip("0").rstrip(".")
    return str(x)


def epoch_table_markdown(rows: list[dict]) -> str:
    """Per-epoch table in the reference run's format: epoch, train loss, val loss, val ppl, minutes, tokens.

    `rows`: dicts with those keys (`epoch_frac` < 1 marks a partial epoch: shown as `2 (40%)`).
    `minutes` and `tokens` are cumulative since the start of the run.
    """
    header = "| epoch | train loss | val loss | val ppl | minutes | tokens |\n|---:|---:|---:|---:|---:|---:|\n"
    body = ""
    for r in rows:
        epoch = str(r["epoch"])
        frac = r.get("epoch_frac", 1.0)
        if frac is not None and frac < 1.0:
            epoch += f" ({100 * frac:.0f}%)"
        body += (f"| {epoch} | {_f(r.get('train_loss'), 4)} | {_f(r.get('val_loss'), 4)} | "
                 f"{_f(r.get('val_ppl'), 2)} | {_f(r.get('minutes'), 1)} | {format_number(r.get('tokens'))} |\n")
    return header + body


def _f(x, digits):
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def write_epoch_tables(rows: list[dict], md_path, csv_path) -> None:
    """epochs.md (markdown table) and epochs.csv (same columns, full precision)."""
    atomic_write_text(md_path, epoch_table_markdown(rows))
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=EPOCH_COLUMNS + ["epoch_frac", "step"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def pyplot():
    """matplotlib.pyplot on the headless Agg backend, or None when matplotlib is not installed."""
    try:  # optional dependency: without matplotlib the reports are written without figures
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # optional, as above
    except ImportError:
        return None
    return plt


def save_figure(fig, path) -> Path:
    """Lay out `fig`, write it to `path` atomically (runtime.atomic_path) and close it."""
    import matplotlib.pyplot as plt  # optional dependency: only called with a figure made by pyplot()

    path = Path(path)
    fig.tight_layout()
    with atomic_path(path, keep_suffix=True) as tmp:   # savefig reads the format from the suffix
        fig.savefig(tmp)
    plt.close(fig)
    return path


def plot_losses(history: list[dict], path, title: str | None = None) -> Path | None:
    """PNG of the loss curves: train loss per logged step, val loss per eval, x = optimizer step.

    `history`: metrics rows (dicts with "step" and "train_loss" and/or "val_loss"). Returns the
    path, or None when matplotlib is missing (the run goes on without the picture).
    """
    plt = pyplot()
    if plt is None:
        return None
    train = [(r["step"], r["train_loss"]) for r in history if r.get("train_loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in history if r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), lw=1, alpha=0.8, label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", ms=3, lw=1.5, label="val loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    if train or val:
        ax.legend()
    return save_figure(fig, path)


def plot_router_usage(rows: list[dict], path, track_names, token_types) -> str | None:
    """PNG of router and plot-clock statistics. rows: plain dicts, each with a "step" (the multi-track
    model's MultiTrackLM.stats() rows: "router/<type>/<track>", "router/frac/<type>", "router/all/<track>",
    "router/layer<i>/<track>", "router/tokens"; with a plot clock also "clock/<type>", "clock/layer<i>",
    "clock/tokens").

    Router panels: mean track weight by token type at the last row, as the difference from uniform
    mixing (1/G), so that small preferences are visible (grouped bars, token share under each group);
    mean weight of each track over all tokens across training steps; per-layer mean weights at the last
    row. Plot-clock panels: the gate's open rate by token type at the last row (its "boundary" /
    "non_boundary" bars: where the boundary rule fires or not), and at and off boundaries across
    training. Returns the path, or None when there is nothing to plot.
    """
    def last_per_step(key):                                                  # a repeated step: keep the last
        by_step = {r["step"]: r for r in rows if key in r}
        return [by_step[s] for s in sorted(by_step)]

    router_rows, clock_rows = last_per_step("router/tokens"), last_per_step("clock/tokens")
    if not router_rows and not clock_rows:
        return None
    plt = pyplot()
    if plt is None:
        return None
    from matplotlib.ticker import MaxNLocator  # optional dependency, like pyplot itself

    # router panels in the first row, plot-clock panels in the second (or alone)
    n_rows = int(bool(router_rows)) + int(bool(clock_rows))
    fig = plt.figure(figsize=(16 if router_rows else 11, 4.8 * n_rows), dpi=110)
    grid = fig.add_gridspec(n_rows, 3, width_ratios=[1.6, 1, 1] if router_rows else [1.2, 0.5, 0.5])
    if router_rows:
        axes = [fig.add_subplot(grid[0, i]) for i in range(3)]
        _plot_router_panels(axes, router_rows, track_names, token_types, MaxNLocator)
    if clock_rows:
        row = n_rows - 1
        axes = [fig.add_subplot(grid[row, 0]), fig.add_subplot(grid[row, 1:])]
        _plot_clock_panels(axes, clock_rows, MaxNLocator)
    return str(save_figure(fig, path))


def _plot_router_panels(axes, rows, track_names, token_types, MaxNLocator) -> None:
    last = rows[-1]
    n = len(track_names)
    uniform = 1 / n
    types = [t for t in token_types if f"router/{t}/{track_names[0]}" in last]
    colors = [f"C{g}" for g in range(n)]
    width = 0.8 / n
    for g, track in enumerate(track_names):
        axes[0].bar([i + (g - (n - 1) / 2) * width for i in range(len(types))],
                    [last[f"router/{t}/{track}"] - uniform for t in types], width=width, label=track,
                    color=colors[g])
    axes[0].axhline(0, color="gray", lw=0.8)
    axes[0].set_xticks(range(len(types)))

    def share(t):
        f = 100 * last.get(f"router/frac/{t}", 0)
        return f"{f:.0f}%" if f >= 10 or f == 0 else f"{f:.1f}%"

    axes[0].set_xticklabels([f"{t.replace('_', chr(10))}\n({share(t)})" for t in types], fontsize=9)
    axes[0].set_ylabel(f"mean router weight - 1/{n} (uniform)")
    axes[0].set_title(f"track usage by token type, step {last['step']} (share of tokens in brackets)", fontsize=10)
    axes[0].legend(fontsize=9, ncol=n, loc="best")
    steps = [r["step"] for r in rows]
    for g, track in enumerate(track_names):
        axes[1].plot(steps, [r[f"router/all/{track}"] for r in rows], marker=".", label=track, color=colors[g])
    axes[1].axhline(uniform, color="gray", lw=0.8, ls="--")
    axes[1].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("mean router weight")
    axes[1].set_title("track usage over training (all tokens)", fontsize=10)
    axes[1].legend(fontsize=9)
    layers = sorted({int(k.split("/")[1][5:]) for k in last if k.startswith("router/layer")})
    for g, track in enumerate(track_names):
        axes[2].plot(layers, [last[f"router/layer{k}/{track}"] for k in layers], marker="o", label=track,
                     color=colors[g])
    axes[2].axhline(uniform, color="gray", lw=0.8, ls="--")
    axes[2].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[2].set_xlabel("layer")
    axes[2].set_ylabel("mean router weight")
    axes[2].set_title(f"track usage by layer, step {last['step']}", fontsize=10)
    axes[2].legend(fontsize=9)


def _plot_clock_panels(axes, rows, MaxNLocator) -> None:
    last = rows[-1]
    types = [k.split("/", 1)[1] for k in last
             if k.startswith("clock/") and k != "clock/tokens" and not k.startswith("clock/layer")]
    axes[0].bar(range(len(types)), [last[f"clock/{t}"] for t in types], color="C3")
    axes[0].set_xticks(range(len(types)))
    axes[0].set_xticklabels([t.replace("_", "\n") for t in types], fontsize=9)
    axes[0].set_ylim(0, 1.05)
    axes[0].set_ylabel("plot-clock gate, mean (open rate)")
    axes[0].set_title(f"plot clock open rate by token type, step {last['step']}", fontsize=10)
    steps = [r["step"] for r in rows]
    for t, style in (("boundary", "o-"), ("non_boundary", "s--"), ("all", ".-")):
        if all(f"clock/{t}" in r for r in rows):
            axes[1].plot(steps, [r[f"clock/{t}"] for r in rows], style, ms=4, label=t)
    axes[1].set_ylim(-0.02, 1.05)
    axes[1].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("open rate")
    axes[1].set_title("plot clock over training (at / off rule boundaries)", fontsize=10)
    axes[1].legend(fontsize=9)
