"""mamba_lm/stats.py on hand-computed cases: seed summaries, Student t, paired intervals, tokens-to-target,
and the decision rule of research_plan.md."""

import math

import pytest

from mamba_lm import stats as S


def test_arm_summary_hand_case():
    """Guards mean and the sample sd (ddof 1): [1, 2, 3, 4] -> 2.5 ± sqrt(5/3); NaN/None dropped; one value has no sd."""
    s = S.arm_summary([1.0, 2.0, 3.0, 4.0, float("nan"), None])
    assert s["n"] == 4 and s["mean"] == pytest.approx(2.5) and s["sd"] == pytest.approx(math.sqrt(5 / 3))
    one = S.arm_summary([7.0])
    assert one["mean"] == 7.0 and math.isnan(one["sd"])


@pytest.mark.parametrize("df, q975", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (10, 2.2281), (30, 2.0423)])
def test_t_quantile_matches_tables(df, q975):
    """Guards the t quantile behind every interval against the printed two-sided 95% table values."""
    assert S.t_quantile(0.975, df) == pytest.approx(q975, abs=1e-4)
    assert S.t_quantile(0.025, df) == pytest.approx(-q975, abs=1e-4)
    assert S.t_cdf(0.0, df) == pytest.approx(0.5)


def test_paired_difference_hand_case():
    """Guards pairing on shared seeds and the t interval: d = [1, 2, 0.5] -> mean 7/6, sd sqrt(7/12),
    half-width t(0.975, 2) * sd / sqrt(3) = 1.8973; seed 4 (arm only) is ignored."""
    arm = {1: 3.0, 2: 5.0, 3: 4.0, 4: 100.0}
    base = {1: 2.0, 2: 3.0, 3: 3.5}
    d = S.paired_difference(arm, base)
    assert d["seeds"] == [1, 2, 3] and d["n"] == 3
    assert d["mean"] == pytest.approx(7 / 6) and d["sd"] == pytest.approx(math.sqrt(7 / 12))
    half = 4.302653 * math.sqrt(7 / 12) / math.sqrt(3)
    assert d["ci"][0] == pytest.approx(7 / 6 - half, abs=1e-5) and d["ci"][1] == pytest.approx(7 / 6 + half, abs=1e-5)
    single = S.paired_difference({1: 1.0}, {1: 0.0})
    assert single["n"] == 1 and all(math.isnan(c) for c in single["ci"])


def test_seed_noise_is_mean_pairwise_gap():
    """Guards the noise level of the decision rule: mean |b_i - b_j| over baseline pairs (two seeds: their gap)."""
    assert S.seed_noise([1.0, 1.2, 1.5]) == pytest.approx((0.2 + 0.5 + 0.3) / 3)
    assert S.seed_noise([2.0, 2.5]) == pytest.approx(0.5)
    assert math.isnan(S.seed_noise([1.0]))


def test_tokens_to_target_interpolates():
    """Guards tokens-to-target: linear interpolation at the first crossing, the first point if already there,
    an exact hit, None when never reached, and higher-is-better curves."""
    curve = [(100, 3.0), (200, 2.0), (300, 1.5), (400, 1.8)]
    assert S.tokens_to_target(curve, 2.5) == pytest.approx(150)
    assert S.tokens_to_target(curve, 1.75) == pytest.approx(250)
    assert S.tokens_to_target(curve, 3.5) == 100
    assert S.tokens_to_target(curve, 2.0) == 200
    assert S.tokens_to_target(curve, 1.0) is None
    assert S.tokens_to_target([(10, 0.1), (20, 0.5)], 0.3, lower_is_better=False) == pytest.approx(15)


def _diff(mean, lo, hi, n=3):
    return {"mean": mean, "ci": [lo, hi], "n": n}


def test_decision_rule():
    """Guards the verdicts: better/worse only when the CI excludes 0 on that side AND the gap exceeds the
    baseline's seed noise; otherwise (or with one seed) 'no difference at this budget'."""
    assert S.decide(_diff(-0.05, -0.08, -0.02), noise=0.01) == "better"
    assert S.decide(_diff(0.05, 0.02, 0.08), noise=0.01) == "worse"
    assert S.decide(_diff(-0.005, -0.008, -0.002), noise=0.01) == S.NO_DIFFERENCE     # inside the seed noise
    assert S.decide(_diff(-0.05, -0.09, 0.01), noise=0.01) == S.NO_DIFFERENCE        # CI spans 0
    assert S.decide(_diff(-0.05, math.nan, math.nan, n=1), noise=0.01) == S.NO_DIFFERENCE
    assert S.decide(_diff(0.2, 0.1, 0.3), noise=0.05, lower_is_better=False) == "better"  # accuracy: up is good
