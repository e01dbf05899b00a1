"""The markdown report of evaluate.py: tables, verdicts and PNG plots of the stage results.

Input: `results` {checkpoint name: {stage: result dict of mamba_lm.evaluation}}, several checkpoints side by
side (a section appears when at least one checkpoint has its stage); `cfg` is evaluate.py's config dict.
`report_sections` returns [(heading, markdown)] for `mamba_lm.report.write_markdown`; `plot_*` write one
PNG each (None when matplotlib is missing or no checkpoint has the numbers).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from mamba_lm import metrics as M
from mamba_lm.report import as_paragraphs, blockquote, pyplot, save_figure


def fmt(x, digits=4) -> str:
    if x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x))):
        return "–" if x is None or math.isnan(x) else str(x)          # "inf" / "-inf"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if abs(x) < 0.5 * 10 ** -digits:
            x = 0.0                                                     # no "-0.0000"
        if abs(x) >= 1e6:
            return f"{x:.3e}"
        return f"{x:,.1f}" if abs(x) >= 100 else f"{x:.{digits}f}"
    return str(x)


def plural(n, word: str) -> str:
    return f"{fmt(n)} {word}" + ("" if n == 1 else "s")


def md_table(header: list[str], rows: list[list], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    sep = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    lines = ["| " + " | ".join(header) + " |", sep]
    lines += ["| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows]
    return "\n".join(lines)


def plot_position_loss(results: dict, path: Path, split: str) -> Path | None:
    """Mean loss at each context position (log x), one line per checkpoint."""
    plt = pyplot()
    series = {n: r["loss"]["position_loss"] for n, r in results.items() if "position_loss" in r.get("loss", {})}
    if plt is None or not series:
        return None
    fig, ax = plt.subplots(figsize=(8, 4), dpi=110)
    for i, (n, ys) in enumerate(series.items()):
        color = f"C{i % 10}"
        ax.plot(np.arange(1, len(ys) + 1), ys, lw=0.8, alpha=0.35, color=color)       # raw: noisy
        buckets = results[n]["loss"]["position_buckets"]                              # log2-bucket means
        ax.plot([math.sqrt((b["lo"] + 1) * b["hi"]) for b in buckets], [b["loss"] for b in buckets], "o-",
                ms=3, lw=1.5, color=color, label=f"{n} (log2-bucket mean)")
    ax.set_xscale("log")
    ax.set_xlabel("position in the context + 1 (tokens seen before the target)")
    ax.set_ylabel("mean loss (nats/token)")
    ax.set_title(f"loss by position ({split} split; faint: each position, dots: log2-bucket means)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def _plot_carried_vs_reset(ax, gap, xs, rows: list[dict], color: str, name: str, gap_from: int = 0) -> None:
    """One model's rows ({"carried", "reset"} losses at xs): carried solid and reset dashed on `ax`, the gain
    reset - carried on `gap` (from row `gap_from` on)."""
    ax.plot(xs, [r["carried"] for r in rows], "o-", ms=3, color=color, label=f"{name} (state carried)")
    ax.plot(xs, [r["reset"] for r in rows], "s--", ms=3, color=color, alpha=0.7, label=f"{name} (state reset)")
    gap.plot(xs[gap_from:], [r["reset"] - r["carried"] for r in rows[gap_from:]], "o-", ms=3, color=color, label=name)


def _style_gain_axes(ax, gap, xlabel: str) -> None:
    """The shared look of the carried-vs-reset figures: the gain panel's zero line, labels, grids, legends."""
    gap.axhline(0.0, color="0.3", lw=0.8)
    gap.set_xlabel(xlabel)
    gap.set_ylabel("reset - carried (nats/token)")
    gap.set_title("gain from carrying the state (> 0: the state helps)", fontsize=10)
    for a in (ax, gap):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)


def plot_book_loss(results: dict, path: Path, split: str) -> Path | None:
    """Loss by window index into the book, carried (solid) vs reset (dashed), one colour per checkpoint."""
    plt = pyplot()
    series = {n: r["books"]["rows"] for n, r in results.items() if r.get("books", {}).get("rows")}
    if plt is None or not series:
        return None
    fig, (ax, gap) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for i, (n, rows) in enumerate(series.items()):
        xs = [r["first_token"] for r in rows]
        color = f"C{i % 10}"
        _plot_carried_vs_reset(ax, gap, xs, rows, color, n, gap_from=1)
    ax.set_xlabel("distance into the book (tokens, start of window)")
    ax.set_ylabel("mean loss (nats/token)")
    ax.set_title(f"loss by window ({split} split)", fontsize=10)
    _style_gain_axes(ax, gap, "distance into the book (tokens, start of window)")
    return save_figure(fig, path)


def plot_name_loss(results: dict, path: Path, split: str) -> Path | None:
    """Loss on recurring names by distance bucket, carried (solid) vs reset (dashed), and the gain."""
    plt = pyplot()
    series = {n: r["longrange"]["names"] for n, r in results.items() if (r.get("longrange") or {}).get("names")}
    if plt is None or not series:
        return None
    fig, (ax, gap) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for i, (n, rows) in enumerate(series.items()):
        rows = [r for r in rows if r["targets"] > 0]
        labels, color = [r["bucket"] for r in rows], f"C{i % 10}"
        _plot_carried_vs_reset(ax, gap, labels, rows, color, n)
    ax.set_xlabel("tokens since the previous mention of the name")
    ax.set_ylabel("mean loss on the name's tokens (nats/token)")
    ax.set_title(f"recurring names ({split} split)", fontsize=10)
    _style_gain_axes(ax, gap, "tokens since the previous mention of the name")
    return save_figure(fig, path)


def plot_deep_positions(results: dict, path: Path, split: str) -> Path | None:
    """Loss by position into the book (log2 buckets, log x), carried (solid) vs reset (dashed)."""
    plt = pyplot()
    series = {n: r["longrange"]["positions"] for n, r in results.items()
              if (r.get("longrange") or {}).get("positions")}
    if plt is None or not series:
        return None
    fig, ax = plt.subplots(figsize=(8, 4), dpi=110)
    for i, (n, rows) in enumerate(series.items()):
        xs, color = [math.sqrt((r["lo"] + 1) * r["hi"]) for r in rows], f"C{i % 10}"
        ax.plot(xs, [r["carried"] for r in rows], "o-", ms=3, color=color, label=f"{n} (state carried)")
        ax.plot(xs, [r["reset"] for r in rows], "s--", ms=3, color=color, alpha=0.7, label=f"{n} (state reset)")
    ax.set_xscale("log")
    ax.set_xlabel("position in the book + 1 (tokens read before the target)")
    ax.set_ylabel("mean loss (nats/token)")
    ax.set_title(f"loss by position into the book ({split} split, log2-bucket means)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_chapters(results: dict, path: Path, split: str) -> Path | None:
    """Next-chapter ranking accuracy per checkpoint, carried vs reset, with the chance level."""
    plt = pyplot()
    series = {n: r["chapters"] for n, r in results.items() if "carried" in (r.get("chapters") or {})}
    if plt is None or not series:
        return None
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(series) + 2), 4), dpi=110)
    xs = np.arange(len(series))
    ax.bar(xs - 0.2, [c["carried"]["accuracy"] for c in series.values()], 0.4, label="state carried")
    ax.bar(xs + 0.2, [c["reset"]["accuracy"] for c in series.values()], 0.4, label="state reset")
    chance = np.mean([c["carried"]["chance_accuracy"] for c in series.values()])
    ax.axhline(chance, color="0.3", ls=":", lw=1, label=f"chance ({chance:.2f})")
    ax.set_xticks(xs, list(series))
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (true opening ranked first)")
    ax.set_title(f"next-chapter ranking ({split} split)", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def write_plots(results: dict, out_md: Path, split: str) -> dict:
    """Every PNG of the report beside `out_md` (<stem>_<plot>.png): {plot: path or None}."""
    stem = out_md.with_name(out_md.stem)
    return {"positions": plot_position_loss(results, Path(f"{stem}_positions.png"), split),
            "books": plot_book_loss(results, Path(f"{stem}_books.png"), split),
            "names": plot_name_loss(results, Path(f"{stem}_names.png"), split),
            "deep": plot_deep_positions(results, Path(f"{stem}_deep.png"), split),
            "chapters": plot_chapters(results, Path(f"{stem}_chapters.png"), split)}


def with_stage(results: dict, stage: str, key: str) -> list[str]:
    """Names of the checkpoints whose `stage` result holds `key` (skipped stages hold none)."""
    return [n for n, r in results.items() if key in (r.get(stage) or {})]


def section_checkpoints(infos: dict, meta: dict) -> str:
    rows = []
    for n, info in infos.items():
        fp = (info.get("data") or {}).get("fingerprint")
        trained_on = "–" if not fp else "this data" if fp == meta.get("fingerprint") else f"other data (`{fp[:12]}`)"
        rows.append([n, f"`{info.get('path')}`", str(info.get("model_type", "?")), info.get("num_params"),
                     info.get("step"), info.get("tokens_seen"), trained_on])
    return md_table(["name", "path", "type", "params", "step", "tokens seen", "trained on"], rows, "lllrrrl")


def section_data(meta: dict, results: dict, L: int, win: int, device_name: str, cfg: dict) -> str:
    split, data_dir, dtype = cfg["split"], cfg["data_dir"], cfg["dtype"]
    sp, tok = meta["splits"].get(split, {}), meta["tokenizer"]
    times = "; ".join(f"{n}: " + ", ".join(f"{st} {r[st].get('seconds', 0):.1f}" for st in r)
                      for n, r in results.items())
    return "\n".join([
        f"- data dir: `{data_dir}`, split **{split}**: {plural(sp.get('books'), 'book')}, "
        f"{fmt(sp.get('tokens'))} tokens, {fmt(sp.get('characters'))} characters",
        f"- fingerprint: `{meta.get('fingerprint')}`",
        f"- tokenizer: {tok.get('name')} ({tok.get('kind')}, vocab {tok.get('vocab_size')}, eos {tok.get('eos_id')}, "
        f"sha256 `{str(tok.get('sha256'))[:16]}`)",
        f"- evaluation context: {L} tokens; window for whole-book evaluation: {win} tokens",
        f"- device: {device_name}, dtype {dtype}; seconds per stage: {times}"])


def section_loss(results: dict) -> str:
    rows = []
    for n in with_stage(results, "loss", "tokens"):
        r = results[n]["loss"]
        rows.append([n, r["tokens"], r["loss"], r["ppl"], r["bits_per_byte"], r["word_ppl"], r["bytes_per_token"],
                     f"{r['sequences']:,} / {r['of_sequences']:,}"])
    return (md_table(["name", "tokens", "loss", "ppl", "bits/byte", "word ppl", "bytes/token", "sequences"], rows)
            + "\n\nloss: mean NLL in nats per token; bits/byte: total NLL in bits / UTF-8 bytes of the target text "
            "(comparable across tokenizers); word ppl: exp(total NLL / whitespace-separated words), the PG-19 "
            "convention. Every sequence starts from the zero state, as in training.")


def section_positions(results: dict, png: Path | None) -> str:
    names_ = with_stage(results, "loss", "position_buckets")
    buckets = results[names_[0]]["loss"]["position_buckets"]
    rows = [[b["label"]] + [results[n]["loss"]["position_buckets"][i]["loss"] for n in names_]
            for i, b in enumerate(buckets)]
    text = (md_table(["positions"] + names_, rows) + "\n\nMean loss of the targets at each position of the "
            "context (the target at position p follows p+1 tokens of context), by log2 buckets.")
    return text + (f"\n\n![loss by position]({png.name})" if png else "")


def section_token_types(results: dict) -> str:
    names_ = [n for n in with_stage(results, "loss", "token_types") if results[n]["loss"]["token_types"]]
    types = list(results[names_[0]]["loss"]["token_types"])
    rows = [[t, results[names_[0]]["loss"]["token_types"][t]["tokens"]]
            + [results[n]["loss"]["token_types"][t]["loss"] for n in names_] for t in types]
    return (md_table(["target token type", "tokens"] + names_, rows)
            + "\n\nMean loss of the targets of each narrative type (multitrack/narrative.py): dialogue = inside "
            "double quotes of the current paragraph, narration = the rest, plus paragraph starts, sentence ends "
            "and heading words; the signals the multi-track router conditions on.")


def book_verdict(bk: dict) -> str:
    delta = bk["reset_beyond"] - bk["carried_beyond"]
    if math.isnan(delta):
        return "no window beyond the first was scored"
    if delta > 0.005:
        return f"carrying the state **helps**: {delta:.4f} nats/token lower than resetting"
    if delta < -0.005:
        return (f"carrying the state **hurts**: {-delta:.4f} nats/token higher than resetting "
                "(the model does not extrapolate past its training length)")
    return f"carrying the state makes **no difference** ({delta:+.4f} nats/token)"


def section_books(results: dict, win: int, png: Path | None) -> str:
    names_ = with_stage(results, "books", "rows")
    header = ["window", "tokens from", "books"] + [f"{n} {mode}" for n in names_ for mode in ("carried", "reset")]
    n_rows = max(len(results[n]["books"]["rows"]) for n in names_)
    # long books (book_tokens=0): windows grouped in log2 buckets (0, 1, 2-3, 4-7, ...), token-weighted
    groups = M.log2_buckets(n_rows) if n_rows > 24 else [(w, w + 1) for w in range(n_rows)]
    rows = []
    for lo, hi in groups:
        cells = [M.bucket_label(lo, hi), None, None] + [None] * (2 * len(names_))
        for j, n in enumerate(names_):
            part = results[n]["books"]["rows"][lo:hi]
            if part:
                tokens = sum(r["tokens"] for r in part)
                cells[1], cells[2] = part[0]["first_token"], part[0]["books"]
                cells[3 + 2 * j] = sum(r["carried"] * r["tokens"] for r in part) / tokens
                cells[4 + 2 * j] = sum(r["reset"] * r["tokens"] for r in part) / tokens
        rows.append(cells)
    lines = [md_table(header, rows), ""]
    for n in names_:
        bk = results[n]["books"]
        lines.append(f"- **{n}**: {plural(bk['books'], 'book')}, {bk['tokens']:,} tokens; beyond the first window, "
                     f"carried {bk['carried_beyond']:.4f} vs reset {bk['reset_beyond']:.4f}: {book_verdict(bk)}.")
    lines.append(f"\nEach book is read from its start in windows of {win} tokens. *carried*: the recurrent state at "
                 "the end of a window is the initial state of the next (one pass over the whole book); *reset*: "
                 "every window starts from the zero state, as in training. Window 0 is the same for both.")
    if png:
        lines.append(f"\n![loss vs distance into the book]({png.name})")
    return "\n".join(lines)


GEN_COLUMNS = [("distinct_1", "distinct-1"), ("distinct_2", "distinct-2"), ("seq_rep_4", "seq-rep-4"),
               ("rep_16", "rep/16"), ("rep_128", "rep/128"), ("first_loop", "tokens before loop"),
               ("looped", "looped"), ("names_consistency", "name consistency"), ("names_new_names", "new names"),
               ("names_prompt_name_recall", "prompt names reused")]


GEN_COUNTS = ("first_loop", "names_new_names")


def section_generation(results: dict, cfg: dict) -> str:
    c = cfg
    names_ = with_stage(results, "generation", "model")
    def cells(r: dict) -> list:        # counts (means over prompts) with one decimal, rates with four
        return [f"{r[k]:.1f}" if k in GEN_COUNTS and isinstance(r.get(k), float) and math.isfinite(r[k])
                else r.get(k) for k, _ in GEN_COLUMNS]

    rows = [[n] + cells(results[n]["generation"]["model"]) for n in names_]
    rows.append(["real continuation"] + cells(results[names_[0]]["generation"]["human"]))
    text = md_table(["source"] + [h for _, h in GEN_COLUMNS], rows)
    prompts = plural(results[names_[0]]["generation"]["prompts"], "prompt")
    text += (f"\n\nMeans over {prompts}: the first {c['prompt_tokens']} tokens of {c['split']} books, "
             f"{c['gen_tokens']} tokens generated with temperature={c['temperature']}, top_k={c['top_k']}, "
             f"top_p={c['top_p']}, min_p={c['min_p']}, repetition_penalty={c['repetition_penalty']}, "
             f"seed={c['seed']}. distinct-n: "
             "unique/total n-grams of a sample; seq-rep-4: 1 - unique/total 4-grams (Welleck et al. 2019); rep/l: "
             "share of sampled tokens already among the previous l tokens (prompt included); loop: a block of "
             f">= {c['loop_min_period']} tokens repeated {c['loop_repeats']} times back "
             "to back; name consistency: share of capitalised-name mentions that reuse names of the prompt; "
             "'real continuation' scores the books' own next tokens the same way.")
    for n in names_:
        for s in results[n]["generation"]["samples"][:1]:
            text += (f"\n\n**{n}**, sample 1 (prompt ends: …{s['prompt'][-200:]!r})\n\n"
                     + blockquote(as_paragraphs(s["continuation"][:1200])))
    return text


def section_recall(results: dict, win: int) -> str:
    names_ = with_stage(results, "recall", "buckets")
    labels = []
    for n in names_:
        labels += [lab for lab in results[n]["recall"]["buckets"] if lab not in labels]
    header = ["distance (tokens)", "probes"] + [h for n in names_
                                                for h in (f"{n} acc", f"{n} acc (reset)", f"{n} logprob")]
    rows = []
    for lab in labels + ["all"]:
        row = [lab, None]
        for n in names_:
            rec = results[n]["recall"]
            bk = rec if lab == "all" else rec["buckets"].get(lab, {})
            row[1] = row[1] or bk.get("probes")
            row += [bk.get("accuracy"), bk.get("reset_accuracy"), bk.get("mean_logprob")]
        rows.append(row)
    kinds = md_table(["kind"] + names_, [[k] + [results[n]["recall"]["by_kind"].get(k) for n in names_]
                                         for k in results[names_[0]]["recall"]["by_kind"]])
    return (md_table(header, rows)
            + f"\n\nProbes on {results[names_[0]]['recall']['stories']}. acc: share of probes whose answer's first "
            "token is the model's argmax right after the cue (e.g. \"..., the blacksmith from\" -> \" Eldham\"); "
            "logprob: mean log-probability of the answer tokens (teacher-forced); distance: tokens between the "
            f"fact's introduction and the cue. The story is read in windows of {win} tokens with the state carried "
            "over; *reset* is the control that zeroes the state at every window, so facts from earlier windows "
            "are out of reach.\n\nAccuracy by kind of fact:\n\n" + kinds)


def section_names(results: dict, png: Path | None) -> str:
    names_ = with_stage(results, "longrange", "names")
    first = results[names_[0]]["longrange"]
    rows = []
    for k, row in enumerate(first["names"]):
        cells = [row["bucket"]]
        for n in names_:
            r = results[n]["longrange"]["names"][k]
            cells += [r["targets"], r["carried"], r["reset"], r["reset"] - r["carried"] if r["targets"] else None]
        rows.append(cells)
    header = ["distance to previous mention"] + [h for n in names_ for h in
                                                 (f"{n} targets", f"{n} carried", f"{n} reset", f"{n} gain")]
    lines = [md_table(header, rows), ""]
    for n in names_:
        lr = results[n]["longrange"]
        lines.append(f"- **{n}**: {plural(lr['books'], 'book')}, {lr['tokens']:,} tokens (longest "
                     f"{lr['longest_book']:,}); {lr['name_targets']:,} recurring-name targets: carried {fmt(lr['recurring_carried'])} vs reset "
                     f"{fmt(lr['recurring_reset'])} nats/token; all tokens: carried {fmt(lr['carried_loss'])} vs "
                     f"reset {fmt(lr['reset_loss'])}.")
    lines.append(f"\nLoss on the tokens of proper names (capitalised words that are not sentence-initial, minus a "
                 "stop list; every token of a multi-token name) that already occurred earlier in the same book, by "
                 "the token distance to the previous mention; *first mention* is the reference row of names not "
                 f"seen before. *carried*: the state runs through the whole book; *reset*: zero state every "
                 f"{first['window']} tokens, as in training; gain = reset - carried (> 0: the state helps). "
                 "Definitions: mamba_lm/longrange.py.")
    if png:
        lines.append(f"\n![recurring-name loss by distance]({png.name})")
    return "\n".join(lines)


def section_deep_positions(results: dict, png: Path | None) -> str:
    names_ = with_stage(results, "longrange", "positions")
    labels = []
    for n in names_:
        labels += [r["label"] for r in results[n]["longrange"]["positions"] if r["label"] not in labels]
    rows = []
    for lab in labels:
        cells, tokens = [lab, None], None
        for n in names_:
            r = next((r for r in results[n]["longrange"]["positions"] if r["label"] == lab), None)
            tokens = tokens or (r or {}).get("tokens")
            cells += [r["carried"] if r else None, r["reset"] if r else None]
        cells[1] = tokens
        rows.append(cells)
    header = ["positions", "tokens"] + [f"{n} {m}" for n in names_ for m in ("carried", "reset")]
    text = (md_table(header, rows) + "\n\nMean loss of the targets at each position into the book (the target at "
            "position p follows p tokens of the book), by log2 buckets, up to `position_tokens`; *carried* reads the "
            f"book in one pass, *reset* zeroes the state every {results[names_[0]]['longrange']['window']} tokens.")
    return text + (f"\n\n![loss by position into the book]({png.name})" if png else "")


def section_chapters(results: dict, png: Path | None) -> str:
    names_ = with_stage(results, "chapters", "carried")
    rows = []
    for n in names_:
        ch = results[n]["chapters"]
        rows.append([n, ch["books_with_breaks"], ch["carried"]["breaks"], ch["carried"]["candidates"],
                     ch["carried"]["accuracy"], ch["reset"]["accuracy"], ch["carried"]["chance_accuracy"],
                     ch["carried"]["mean_rank"], ch["reset"]["mean_rank"], ch["carried"]["chance_rank"]])
    ch = results[names_[0]]["chapters"]
    text = (md_table(["name", "books", "breaks", "candidates", "acc carried", "acc reset", "acc chance",
                      "rank carried", "rank reset", "rank chance"], rows)
            + f"\n\nAt each chapter heading after a book's first (ChapterBreak, arXiv 2204.10878), the first "
            f"{ch['chapter_tokens']} tokens of the true next chapter (headings and title lines removed) are ranked "
            "against the openings of up to `chapter_candidates - 1` later chapters of the same book by mean "
            "log-likelihood per token. *carried*: given the whole book so far; *reset*: given only the last "
            f"{ch['window'] - ch['chapter_tokens']} tokens, from the zero state. acc: share of breaks where the "
            "true opening ranks first; rank: mean rank (1 = first).")
    return text + (f"\n\n![next-chapter ranking]({png.name})" if png else "")


def report_sections(results: dict, infos: dict, meta: dict, win: int, L: int, pngs: dict, notes: list[str],
                    device_name: str, cfg: dict) -> list[tuple[str, str]]:
    """[(heading, markdown)] of the report; a section appears when at least one checkpoint has its stage."""
    sections = [("Checkpoints", section_checkpoints(infos, meta)),
                ("Data", section_data(meta, results, L, win, device_name, cfg))]
    if with_stage(results, "loss", "tokens"):
        sections.append(("Token loss", section_loss(results)))
        sections.append(("Loss by position in the context", section_positions(results, pngs.get("positions"))))
        if any(results[n]["loss"].get("token_types") for n in with_stage(results, "loss", "token_types")):
            sections.append(("Loss by token type", section_token_types(results)))
    if with_stage(results, "books", "rows"):
        sections.append(("Beyond the training length", section_books(results, win, pngs.get("books"))))
    if with_stage(results, "generation", "model"):
        sections.append(("Generation", section_generation(results, cfg)))
    if with_stage(results, "recall", "buckets"):
        sections.append(("Long-range recall", section_recall(results, win)))
    if with_stage(results, "longrange", "names"):
        sections.append(("Recurring names by distance", section_names(results, pngs.get("names"))))
        sections.append(("Loss by position into the book", section_deep_positions(results, pngs.get("deep"))))
    if with_stage(results, "chapters", "carried"):
        sections.append(("Next-chapter ranking", section_chapters(results, pngs.get("chapters"))))
    if notes:
        sections.append(("Notes", "\n".join(f"- {x}" for x in notes)))
    sections.append(("Settings", "```json\n" + json.dumps(cfg, indent=1) + "\n```"))
    return sections




def headline(stage: str, res: dict) -> str:
    if stage == "loss" and "loss" in res:
        return (f" | loss {res['loss']:.4f} ppl {res['ppl']:.2f} bpb {res['bits_per_byte']:.4f} "
                f"word-ppl {res['word_ppl']:.2f}")
    if stage == "books" and "carried_beyond" in res:
        return f" | beyond window 0: carried {res['carried_beyond']:.4f} reset {res['reset_beyond']:.4f}"
    if stage == "generation" and "model" in res:
        return f" | seq-rep-4 {res['model']['seq_rep_4']:.3f} distinct-2 {res['model']['distinct_2']:.3f}"
    if stage == "recall" and "accuracy" in res:
        return f" | accuracy {res['accuracy']:.3f}"
    if stage == "longrange" and "names" in res:
        return (f" | recurring names: carried {res['recurring_carried']:.4f} reset {res['recurring_reset']:.4f} "
                f"({res['name_targets']:,} targets)")
    if stage == "chapters" and "carried" in res:
        return (f" | accuracy carried {res['carried']['accuracy']:.3f} reset {res['reset']['accuracy']:.3f} "
                f"(chance {res['carried']['chance_accuracy']:.3f}, {res['carried']['breaks']} breaks)")
    return ""
