"""The markdown report of an experiment plan (run_plan.py): tables over seeds, paired tests, PNGs.

    write_report(plan, out_dir, rows) -> Path     out_dir/report.md + loss_<data>_<size>.png,
                                                  gate_<data>_<size>.png, ladder_<data>.png
    compare(rows, baseline) -> dict               per arm: mean ± sd, paired difference, verdict (tested)

Per (data, size): one row per arm with the final val loss (mean ± sd over seeds), the paired
difference to the baseline with its 95% Student-t interval and the verdict of the decision rule
(mamba_lm/stats.py), tokens-to-target (tokens a run needs to reach the baseline's mean final val loss,
interpolated on its eval curve), tokens/s, and the recall-gate accuracy per distance with the
reset control and chance. Loss curves by arm with min-max seed bands; recall accuracy by distance;
for more than one size, final loss against parameters (the ladder).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from mamba_lm import stats as S
from mamba_lm.report import pyplot, save_figure, write_markdown


def _fmt(x, digits=4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}f}"


def _pm(s: dict, digits=4) -> str:
    if not s["n"]:
        return "–"
    return f"{_fmt(s['mean'], digits)} ± {_fmt(s['sd'], digits)}" if s["n"] > 1 else _fmt(s["mean"], digits)


def compare(rows: list[dict], baseline: str, key: str = "final_val_loss", lower_is_better: bool = True) -> dict:
    """Per arm of `rows` (finished runs of one data x size): summary over seeds of `key`, the paired
    difference to the baseline arm, and the verdict. rows need "arm", "seed" and `key`."""
    by_arm: dict[str, dict] = {}
    for r in rows:
        if r.get(key) is not None:
            by_arm.setdefault(r["arm"], {})[r["seed"]] = r[key]
    base = by_arm.get(baseline, {})
    noise = S.seed_noise(list(base.values()))
    out = {}
    for arm, vals in by_arm.items():
        entry = {"summary": S.arm_summary(list(vals.values())), "noise": noise}
        if arm != baseline:
            diff = S.paired_difference(vals, base)
            entry.update(diff=diff, verdict=S.decide(diff, noise, lower_is_better))
        out[arm] = entry
    return out


def _arm_order(rows, plan) -> list[str]:
    names = [a.name for a in plan.arms]
    present = {r["arm"] for r in rows}
    return [n for n in names if n in present] + sorted(present - set(names))


def _section(plan, data: str, size: str, rows: list[dict], out_dir: Path) -> tuple[str, str]:
    arms = _arm_order(rows, plan)
    cmp = compare(rows, plan.baseline)
    base_curve_target = cmp.get(plan.baseline, {}).get("summary", {}).get("mean")
    lines = [f"Seeds: {sorted({r['seed'] for r in rows})}; {rows[0]['tokens']:,} training tokens per run; "
             f"decision: paired 95% Student-t interval of (arm - {plan.baseline}) over shared seeds must exclude 0 "
             f"and the mean gap must exceed the baseline's seed noise "
             f"({_fmt(cmp.get(plan.baseline, {}).get('noise'))} nats, mean |difference| between two baseline seeds).",
             "", "| arm | seeds | params | final val loss | best val loss | Δ vs baseline [95% CI] | verdict | "
             "tokens to target | tok/s |", "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    for arm in arms:
        rs = [r for r in rows if r["arm"] == arm]
        c = cmp.get(arm, {"summary": S.arm_summary([])})
        best = S.arm_summary([r["best_val_loss"] for r in rs])
        ttt = [S.tokens_to_target(r["curve"], base_curve_target) if base_curve_target is not None else None
               for r in rs]
        reached = [t for t in ttt if t is not None]
        ttt_s = (f"{np.mean(reached) / 1e6:.3f}M ({len(reached)}/{len(rs)})" if reached else f"not reached (0/{len(rs)})")
        if "diff" in c:
            d = c["diff"]
            delta = f"{_fmt(d['mean'])} [{_fmt(d['ci'][0])}, {_fmt(d['ci'][1])}]"
            verdict = c["verdict"]
        else:
            delta, verdict = "(baseline)", ""
        params = rs[0].get("num_params")
        tok_s = S.arm_summary([r.get("tok_per_s") for r in rs])
        lines.append(f"| {arm} | {len(rs)} | {params:,} | {_pm(c['summary'])} | {_pm(best)} | {delta} | {verdict} | "
                     f"{ttt_s} | {_fmt(tok_s['mean'], 0)} |" if params else
                     f"| {arm} | {len(rs)} | – | {_pm(c['summary'])} | {_pm(best)} | {delta} | {verdict} | {ttt_s} | "
                     f"{_fmt(tok_s['mean'], 0)} |")
    png = plot_curves(rows, arms, out_dir / f"loss_{data}_{size}.png", f"{data} / {size}")
    if png:
        lines += ["", f"![loss curves]({png.name})"]
    gate_rows = [r for r in rows if r.get("gate")]
    if gate_rows:
        lines += ["", *gate_table(gate_rows, arms, plan.baseline)]
        png = plot_gate(gate_rows, arms, out_dir / f"gate_{data}_{size}.png", f"recall gate: {data} / {size}")
        if png:
            lines += ["", f"![recall gate]({png.name})"]
    ev_rows = [r for r in rows if r.get("evaluate")]
    if ev_rows:
        keys = sorted({k for r in ev_rows for k in r["evaluate"]})
        lines += ["", "evaluate.py metrics (mean ± sd over seeds):", "",
                  "| arm | " + " | ".join(keys) + " |", "| --- | " + " | ".join("---:" for _ in keys) + " |"]
        for arm in arms:
            rs = [r for r in ev_rows if r["arm"] == arm]
            vals = [_pm(S.arm_summary([r["evaluate"].get(k) for r in rs if isinstance(r["evaluate"].get(k), (int, float))]))
                    for k in keys]
            lines.append(f"| {arm} | " + " | ".join(vals) + " |")
    return f"{data} / {size}", "\n".join(lines)


def gate_table(rows: list[dict], arms: list[str], baseline: str) -> list[str]:
    """Recall-gate accuracy per target distance: carried state (mean ± sd over seeds), reset control,
    chance; the verdict of the paired test on the carried accuracy (higher is better)."""
    targets = sorted({t for r in rows for t in r["gate"]["buckets"]}, key=int)
    head = ["| arm | " + " | ".join(f"acc @{t} (reset)" for t in targets) + " | mean logprob @" + targets[0] + " |",
            "| --- | " + " | ".join("---:" for _ in targets) + " | ---: |"]
    body = []
    for arm in arms:
        rs = [r for r in rows if r["arm"] == arm]
        if not rs:
            continue
        cells = []
        for t in targets:
            acc = S.arm_summary([r["gate"]["buckets"].get(t, {}).get("accuracy") for r in rs])
            rst = S.arm_summary([r["gate"]["buckets"].get(t, {}).get("reset_accuracy") for r in rs])
            cells.append(f"{_pm(acc, 3)} ({_fmt(rst['mean'], 3)})")
        lp = S.arm_summary([r["gate"]["buckets"].get(targets[0], {}).get("logprob") for r in rs])
        body.append(f"| {arm} | " + " | ".join(cells) + f" | {_pm(lp, 3)} |")
    chance = rows[0]["gate"]["chance"]
    verdicts = []
    for t in targets:
        flat = [{"arm": r["arm"], "seed": r["seed"], "acc": r["gate"]["buckets"].get(t, {}).get("accuracy")} for r in rows]
        cmp = compare(flat, baseline, key="acc", lower_is_better=False)
        v = [f"{a}: {c['verdict']}" for a, c in cmp.items() if "verdict" in c]
        if v:
            verdicts.append(f"@{t}: " + "; ".join(v))
    dist = ", ".join(f"{t}: {rows[0]['gate']['buckets'][t]['distance']}" for t in targets
                     if t in rows[0]["gate"]["buckets"])
    return (["Recall gate (accuracy = answer ranked first among the candidates; state carried across windows, "
             f"reset control in parentheses; chance {chance:.3f}; measured token distances min/median/max: {dist}):",
             ""] + head + body + ([""] + ["Paired verdicts on the carried accuracy: " + " | ".join(verdicts)]
                                  if verdicts else []))


def _band(curves: list[list]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Curves [[tokens, loss], ...] of several seeds on their common eval points -> x, mean, min, max."""
    common = sorted(set.intersection(*[{int(t) for t, _ in c} for c in curves]))
    vals = np.array([[dict((int(t), v) for t, v in c)[x] for x in common] for c in curves])
    return np.array(common), vals.mean(0), vals.min(0), vals.max(0)


def plot_curves(rows, arms, path: Path, title: str):
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm in arms:
        curves = [r["curve"] for r in rows if r["arm"] == arm and r.get("curve")]
        if not curves:
            continue
        x, mean, lo, hi = _band(curves)
        if not len(x):
            continue
        line, = ax.plot(x, mean, label=f"{arm} (n={len(curves)})")
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("val loss (fixed subset)")
    ax.set_title(f"{title}: mean over seeds, band = min..max")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_gate(rows, arms, path: Path, title: str):
    plt = pyplot()
    if plt is None:
        return None
    targets = sorted({t for r in rows for t in r["gate"]["buckets"]}, key=int)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm in arms:
        rs = [r for r in rows if r["arm"] == arm]
        if not rs:
            continue
        acc = [S.arm_summary([r["gate"]["buckets"].get(t, {}).get("accuracy") for r in rs]) for t in targets]
        rst = [S.arm_summary([r["gate"]["buckets"].get(t, {}).get("reset_accuracy") for r in rs]) for t in targets]
        eb = ax.errorbar([int(t) for t in targets], [a["mean"] for a in acc],
                         yerr=[a["sd"] if a["n"] > 1 else 0 for a in acc], marker="o", capsize=3, label=arm)
        ax.plot([int(t) for t in targets], [a["mean"] for a in rst], ls=":", color=eb[0].get_color())
    ax.axhline(rows[0]["gate"]["chance"], color="grey", ls="--", label="chance")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("target distance (tokens) between fact and question")
    ax.set_ylabel("accuracy (dotted: state reset every window)")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_ladder(rows, arms, path: Path, title: str):
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm in arms:
        pts = {}
        for r in rows:
            if r["arm"] == arm and r.get("num_params"):
                pts.setdefault(r["num_params"], []).append(r["final_val_loss"])
        if not pts:
            continue
        xs = sorted(pts)
        ax.errorbar(xs, [np.mean(pts[x]) for x in xs], yerr=[np.std(pts[x], ddof=1) if len(pts[x]) > 1 else 0
                                                            for x in xs], marker="o", capsize=3, label=arm)
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("final val loss (mean ± sd over seeds)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def write_report(plan, out_dir, rows: list[dict]) -> Path:
    """report.md of the plan from its result rows (the latest row per run id)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    latest = {r["id"]: r for r in rows}
    done = [r for r in latest.values() if r.get("status") == "done"]
    failed = [r for r in latest.values() if r.get("status") != "done"]
    total = len(plan.queue())
    sections = [("Plan", f"`{plan.path}`: {plan.description}\n\n{len(done)} of {total} runs done"
                         + (f", {len(failed)} failed" if failed else "") + f"; arms {', '.join(a.name for a in plan.arms)}; "
                         f"sizes {', '.join(plan.sizes)}; seeds {plan.seeds}; tokens per run "
                         f"{', '.join(f'{d} {s} {plan.tokens_of(s, d):,}' for d in plan.data for s in plan.sizes)}."
                         + "".join(f"\n\nOptional arm `{a}` not run: {why}." for a, why in plan.skipped_arms.items()))]
    for data in plan.data:
        for size in plan.sizes:
            rs = [r for r in done if r["data"] == data and r["size"] == size]
            if rs:
                sections.append(_section(plan, data, size, rs, out_dir))
        ladder = [r for r in done if r["data"] == data]
        if len({r["size"] for r in ladder}) > 1:
            png = plot_ladder(ladder, _arm_order(ladder, plan), out_dir / f"ladder_{data}.png", f"size ladder: {data}")
            if png:
                sections.append((f"{data}: size ladder", f"![ladder]({png.name})"))
    if failed:
        sections.append(("Failed runs", "\n".join(f"- `{r['id']}`: {r.get('error', '')}" for r in failed)))
    return write_markdown(out_dir / "report.md", f"Plan report: {plan.name}", sections, append=False)
