"""Markdown and PNG output: sample files, the per-epoch table, loss curves.

Deliberately small (nanochat deleted its report module): one markdown writer, one table
formatter, one plot. Shared by train_*.py, generate_text.py and evaluate.py.
"""

from __future__ import annotations

import csv
import math
import os
import re
from pathlib import Path

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
        _write_atomic(path, f"# {title}\n{body}")
    return path


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


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
    _write_atomic(Path(md_path), epoch_table_markdown(rows))
    tmp = Path(csv_path).with_name(f".{Path(csv_path).name}.tmp{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=EPOCH_COLUMNS + ["epoch_frac", "step"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, csv_path)


def pyplot():
    """matplotlib.pyplot on the headless Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig, path) -> Path:
    """Lay out `fig`, write it to `path` atomically (tmp file + rename) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
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
