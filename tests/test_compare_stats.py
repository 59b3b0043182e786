"""Repeat aggregation of the encoder comparison against direct computations (numpy, the Welch formula)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from ldm.tools.compare_stats import Spread, spread, welch


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
