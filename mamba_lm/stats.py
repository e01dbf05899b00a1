"""Statistics of a seeded comparison: arms over seeds, paired differences, tokens-to-target, the verdict.

    arm_summary(values)                      mean, sample sd (n - 1), n of one arm's per-seed values
    t_quantile(q, df)                        Student t quantile (exact: the t CDF inverted by bisection)
    paired_difference(arm, base, level)      mean of (arm - baseline) over the seeds both ran, its sd and
                                             the two-sided Student-t confidence interval (df = n - 1)
    seed_noise(base)                         mean |difference| between two baseline seeds
    tokens_to_target(curve, target)          tokens at which an eval curve first reaches `target`
                                             (linear interpolation between eval points; None if never)
    decide(diff, noise, lower_is_better)     research_plan.md's decision rule -> better / worse / no difference

The confidence interval is the paired t interval: d_i = arm_i - base_i over the shared seeds,
mean(d) ± t_{1-(1-level)/2, n-1} · sd(d) / √n. Pairing is valid because runs that differ only in the
model share seed and data order (run_plan.py).

Decision rule (research_plan.md, "Evaluation protocol": a gap smaller than the baseline's seed-to-seed
difference is no difference), applied to n seeds: an arm is "better" (or "worse") only when the paired
95% interval excludes 0 on that side AND the mean difference is larger than the baseline's seed noise,
the mean absolute difference between two of its seeds (with two seeds: exactly the gap between
baseline-A and baseline-B). Everything else is "no difference at this budget".
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

NO_DIFFERENCE = "no difference at this budget"


def arm_summary(values: Sequence[float]) -> dict:
    """{"mean", "sd" (sample, ddof 1; nan for one value), "n"} of the finite values."""
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    n = len(v)
    mean = sum(v) / n if n else float("nan")
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1)) if n > 1 else float("nan")
    return {"mean": mean, "sd": sd, "n": n}


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (Lentz; Numerical Recipes 6.4)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    tail = 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(q: float, df: float) -> float:
    """The q-quantile of Student's t (q in (0, 1)), by bisection on t_cdf."""
    if not 0 < q < 1 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < q < 1 and df > 0, got q={q}, df={df}")
    if q < 0.5:
        return -t_quantile(1 - q, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < q:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < q else (lo, mid)
    return (lo + hi) / 2


def paired_difference(arm: dict, base: dict, level: float = 0.95) -> dict:
    """Paired difference arm - baseline over the seeds both have (dicts seed -> value).

    Returns {"mean", "sd", "n", "ci": [lo, hi] (Student t, df n-1; nan bounds for n < 2), "seeds"}.
    """
    seeds = sorted(s for s in set(arm) & set(base)
                   if arm[s] is not None and base[s] is not None
                   and math.isfinite(float(arm[s])) and math.isfinite(float(base[s])))
    d = [float(arm[s]) - float(base[s]) for s in seeds]
    s = arm_summary(d)
    if s["n"] >= 2:
        half = t_quantile(1 - (1 - level) / 2, s["n"] - 1) * s["sd"] / math.sqrt(s["n"])
        ci = [s["mean"] - half, s["mean"] + half]
    else:
        ci = [float("nan"), float("nan")]
    return {**s, "ci": ci, "seeds": seeds, "level": level}


def seed_noise(base: Sequence[float]) -> float:
    """Mean |b_i - b_j| over pairs of baseline seeds (nan with fewer than two)."""
    v = [float(x) for x in base if x is not None and math.isfinite(float(x))]
    pairs = list(itertools.combinations(v, 2))
    return sum(abs(a - b) for a, b in pairs) / len(pairs) if pairs else float("nan")


def tokens_to_target(curve: Sequence[tuple[float, float]], target: float, lower_is_better: bool = True):
    """Training tokens at which the curve [(tokens, value), ...] first reaches `target`.

    Linear interpolation between the two eval points around the first crossing; the first point
    itself if it is already at the target; None if the curve never reaches it.
    """
    pts = sorted((float(t), float(v)) for t, v in curve if v is not None and math.isfinite(float(v)))
    reached = (lambda v: v <= target) if lower_is_better else (lambda v: v >= target)
    for i, (t, v) in enumerate(pts):
        if reached(v):
            if i == 0:
                return t
            t0, v0 = pts[i - 1]
            return t0 + (t - t0) * (v0 - target) / (v0 - v) if v0 != v else t
    return None


def decide(diff: dict, noise: float, lower_is_better: bool = True) -> str:
    """"better" / "worse" / NO_DIFFERENCE for a paired difference (paired_difference's dict) of
    arm - baseline, given the baseline's seed noise (see the module docstring)."""
    lo, hi = diff["ci"]
    if diff["n"] < 2 or not (math.isfinite(lo) and math.isfinite(hi)):
        return NO_DIFFERENCE
    beyond_noise = math.isfinite(noise) and abs(diff["mean"]) > noise
    if not beyond_noise:
        return NO_DIFFERENCE
    below, above = hi < 0, lo > 0
    if below:
        return "better" if lower_is_better else "worse"
    if above:
        return "worse" if lower_is_better else "better"
    return NO_DIFFERENCE
