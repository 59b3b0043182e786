"""Run-to-run statistics of the encoder comparison: mean ± std over repeats, and Welch's t-test between arms.

Welch's unequal-variance t-test (Welch 1947) is used because two encoders need not have the same run-to-run
spread. With two repeats per arm it has at most 2 degrees of freedom, so only large, consistent differences
reach p < 0.05: "not significant" then means "not shown by this many repeats", not "equal".
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

ALPHA = 0.05  # significance level of every test in the report


@dataclass(frozen=True)
class Spread:
    """Per-repeat values of one metric of one arm, with their mean and sample standard deviation (ddof 1)."""

    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return sum(self.values) / self.n if self.n else math.nan

    @property
    def std(self) -> float:
        if self.n < 2:
            return math.nan
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.values) / (self.n - 1))

    def format(self, fmt: str = "{:.4g}") -> str:
        if not self.n:
            return "—"
        if self.n == 1:
            return fmt.format(self.mean)
        return f"{fmt.format(self.mean)} ± {fmt.format(self.std)}"


def spread(values: Sequence[float | None]) -> Spread:
    """The repeats that produced a value (a missing metric, e.g. LPIPS without weights, is left out)."""
    return Spread(tuple(float(v) for v in values if v is not None and math.isfinite(float(v))))


@dataclass(frozen=True)
class Welch:
    """Welch's t-test of mean(a) - mean(b): t statistic, Welch–Satterthwaite degrees of freedom, two-sided p."""

    difference: float
    t: float
    df: float
    p: float

    @property
    def significant(self) -> bool:
        return self.p < ALPHA

    def describe(self) -> str:
        if math.isnan(self.p):
            return "no test (fewer than 2 repeats, or no spread in either arm)"
        verdict = "significant" if self.significant else "not significant"
        return f"{verdict} (Welch t = {self.t:.2f}, df = {self.df:.1f}, p = {self.p:.3f})"


def welch(a: Spread, b: Spread) -> Welch:
    """Welch's t-test between two arms' repeats (``scipy.stats.ttest_ind(equal_var=False)``)."""
    from scipy import stats

    diff = a.mean - b.mean
    if a.n < 2 or b.n < 2:
        return Welch(diff, math.nan, math.nan, math.nan)
    va, vb = a.std ** 2 / a.n, b.std ** 2 / b.n
    if va + vb == 0:  # identical repeats in both arms: the test is undefined
        return Welch(diff, math.nan, math.nan, math.nan)
    result = stats.ttest_ind(a.values, b.values, equal_var=False)
    df = (va + vb) ** 2 / (va ** 2 / (a.n - 1) + vb ** 2 / (b.n - 1))
    return Welch(diff, float(result.statistic), df, float(result.pvalue))
