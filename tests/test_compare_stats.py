"""Repeat aggregation of the encoder comparison against direct computations (numpy, the Welch formula)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from lab.compare_stats import Spread, Welch, convergence, detectable_difference, spread, welch


def direct_welch(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """t, Welch–Satterthwaite df and the two-sided p from the textbook formulas."""
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    t = (np.mean(a) - np.mean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return t, df, 2 * stats.t.sf(abs(t), df)


@pytest.mark.parametrize("a,b", [([25.0, 25.2], [24.0, 24.6]), ([1.0, 2.0, 4.0], [3.0, 3.5, 5.0, 7.0]),
                                 ([0.91, 0.93, 0.92, 0.90], [0.80, 0.95])])
def test_mean_std_and_welch_match_a_direct_computation(a, b):
    sa, sb = spread(a), spread(b)
    assert sa.mean == pytest.approx(np.mean(a)) and sa.std == pytest.approx(np.std(a, ddof=1))
    t, df, p = direct_welch(a, b)
    test = welch(sa, sb)
    assert test.t == pytest.approx(t) and test.df == pytest.approx(df) and test.p == pytest.approx(p)
    assert test.difference == pytest.approx(np.mean(a) - np.mean(b))
    assert test.significant == (p < 0.05)


def test_a_clear_difference_is_significant_and_noise_is_not():
    assert welch(spread([10.0, 10.1, 9.9, 10.05]), spread([12.0, 12.1, 11.9, 12.02])).significant
    assert not welch(spread([10.0, 11.0, 9.0]), spread([10.2, 9.5, 11.1])).significant


def test_missing_values_and_degenerate_cases():
    assert spread([1.0, None, float("nan"), 3.0]).values == (1.0, 3.0)
    assert math.isnan(spread([2.0]).std) and spread([2.0]).format() == "2"
    assert Spread(()).format() == "—"
    assert math.isnan(welch(spread([1.0]), spread([2.0, 3.0])).p)  # one repeat: no test
    assert math.isnan(welch(spread([1.0, 1.0]), spread([2.0, 2.0])).p)  # no spread at all: undefined
    assert spread([25.0, 25.2]).format("{:.2f}") == "25.10 ± 0.14"


def exact_power(difference: float, std: float, n: int) -> float:
    """Power of the two-sided equal-n two-sample t-test at p < 0.05: the noncentral t distribution's mass beyond
    the critical values (the textbook power function)."""
    df, nc = 2 * n - 2, difference / (std * math.sqrt(2 / n))
    crit = stats.t.ppf(0.975, df)
    return stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc)


@pytest.mark.parametrize("n", [3, 5, 20])
def test_the_detectable_difference_has_the_stated_power(n):
    a = spread(list(np.linspace(-1, 1, n)))
    b = spread(list(np.linspace(-1, 1, n) + 7.0))
    d = detectable_difference(a, b)
    # the approximation (t_crit + t_power) is within a few points of the exact power, and tends to the normal one
    assert exact_power(d, a.std, n) == pytest.approx(0.8, abs=0.03)
    if n == 20:
        assert d == pytest.approx((stats.norm.ppf(0.975) + stats.norm.ppf(0.8)) * a.std * math.sqrt(2 / n), rel=0.05)
    assert math.isnan(detectable_difference(spread([1.0]), b))


def welch_points(*diffs_and_significance: tuple[int, float, bool]) -> list[tuple[int, Welch]]:
    return [(step, Welch(d, 0.0, 2.0, 0.01 if sig else 0.5)) for step, d, sig in diffs_and_significance]


def test_convergence_settles_only_on_a_steady_sign_and_significance_over_the_last_half():
    steady = convergence(welch_points((300, -3.0, True), (600, -1.0, True), (900, -1.2, True), (1200, -1.1, True)), 1200)
    assert steady.settled and [s for s, _ in steady.points] == [600, 900, 1200]  # 300 is in the first half
    assert "settled" in steady.describe()
    # significance lost at the end: still moving, heading to zero -> a crossing by the least-squares line
    moving = convergence(welch_points((600, -2.0, True), (900, -1.5, True), (1200, -1.0, False)), 1200)
    assert not moving.settled and moving.slope == pytest.approx(1000 * 1.0 / 600)
    assert moving.crossing == pytest.approx(1800)  # -1.0 at 1200, +1/600 per step -> 0 at 1800
    assert "still moving" in moving.describe() and "1,800 steps" in moving.describe()
    # a growing difference never reaches zero; a sign change is moving even if both ends are significant
    assert convergence(welch_points((600, -1.0, True), (1200, -2.0, True)), 1200).crossing is None
    assert not convergence(welch_points((600, 1.0, True), (1200, -1.0, True)), 1200).settled
    assert convergence(welch_points((300, 1.0, True), (1200, 1.0, True)), 1200) is None  # one point in the last half


def test_class_accuracy_differences_are_shown_in_the_units_of_its_cells():
    """The table shows class accuracy in %: the verdict's detectable difference and convergence points are in
    percentage points too (they were printed as fractions, 0.105 next to 86.5 %)."""
    from lab.compare_report import METRICS, metric_verdict
    accuracy = next(m for m in METRICS if m.key == "accuracy")

    def rec(value, at_half):
        return {"downstream": {"accuracy": value}, "curves": {"downstream": {5: {"accuracy": at_half},
                                                                            10: {"accuracy": value}}}}
    records = {"a": [rec(0.883, 0.80), rec(0.847, 0.82)], "b": [rec(0.840, 0.85), rec(0.853, 0.86)]}
    _, text = metric_verdict(records, accuracy, "a", "b", {"a": "A", "b": "B"}, True, {"ldm_steps": 10})
    detectable = detectable_difference(spread([0.883, 0.847]), spread([0.840, 0.853]))
    assert f"detectable at this n: {100 * detectable:.3g} pp" in text and "86.5" in text
    assert "+1.85 pp at 10" in text


def test_verdict_tests_every_pair_of_arms():
    """With three arms the report tested only the first against each other, so the paper's second claim (LiteVAE-S
    vs SD-VAE: arms 2 and 3 of make compare-full) had no line; every pair gets one now, in the arms' order."""
    from lab.compare_report import verdict

    def rec(psnr):
        return {"fmnist": {"psnr": psnr}}
    records = {"a": [rec(20.0), rec(20.2)], "b": [rec(21.0), rec(21.4)], "c": [rec(22.0), rec(22.1)]}
    encoders = {k: {"encoder_params": p, "encoder_images_per_s": 100.0} for k, p in zip("abc", (1, 2, 3))}
    labels = {"a": "A", "b": "B", "c": "C"}
    text = "\n".join(verdict(records, encoders, labels, "toy", True))
    one_liners = [line for line in text.splitlines() if line.startswith("**In one line:**")]
    assert [line.split(":")[1].split("**")[-1].strip() for line in one_liners] == ["A vs B", "A vs C", "B vs C"]
    assert "(C relative to B)" in text
