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


def detectable_difference(a: Spread, b: Spread, power: float = 0.8) -> float:
    """The smallest true difference of means that a two-sided t-test at ``ALPHA`` detects with probability
    ``power``, given these repeats' pooled standard deviation: ``(t_{1-α/2} + t_{power}) · s_p · √(1/n_a + 1/n_b)``
    with ``n_a + n_b - 2`` degrees of freedom (NaN with fewer than 2 repeats in an arm)."""
    from scipy import stats

    if a.n < 2 or b.n < 2:
        return math.nan
    df = a.n + b.n - 2
    pooled = math.sqrt(((a.n - 1) * a.std ** 2 + (b.n - 1) * b.std ** 2) / df)
    return (stats.t.ppf(1 - ALPHA / 2, df) + stats.t.ppf(power, df)) * pooled * math.sqrt(1 / a.n + 1 / b.n)


@dataclass(frozen=True)
class Convergence:
    """Whether an arm difference has settled over the last half of the budget: the same sign and the same
    significance at every evaluation point there. Else it is still moving; ``slope`` is the change of the mean
    difference per 1,000 steps over those points, and ``crossing`` the budget at which that trend would reach zero
    (None when it does not head towards zero)."""

    settled: bool
    points: tuple[tuple[int, Welch], ...]
    slope: float
    crossing: float | None

    def describe(self, fmt: str = "{:+.3g}", scale: float = 1.0, unit: str = "") -> str:
        """``scale``/``unit``: how the metric is shown (class accuracy: 100, " pp")."""
        show = lambda v: fmt.format(v * scale) + unit  # noqa: E731
        shown = ", ".join(f"{show(w.difference)} at {s}{'*' if w.significant else ''}" for s, w in self.points)
        if self.settled:
            return f"settled ({shown}; * = p < {ALPHA})"
        trend = f"trend {show(self.slope)} per 1,000 steps"
        if self.crossing is not None:
            trend += f", which would reach 0 at about {self.crossing:,.0f} steps"
        return f"still moving ({shown}; * = p < {ALPHA}; {trend})"


def convergence(points: Sequence[tuple[int, Welch]], budget: int) -> Convergence | None:
    """The convergence of one arm difference from its tests at each evaluation step (``points``: step, Welch),
    judged on the points in the last half of ``budget`` (at least two are needed; None otherwise)."""
    late = tuple(sorted((s, w) for s, w in points if s >= budget / 2 and not math.isnan(w.difference)))
    if len(late) < 2:
        return None
    signs = {w.difference > 0 for _, w in late}
    significance = {w.significant for _, w in late}
    steps = [s for s, _ in late]
    diffs = [w.difference for _, w in late]
    mean_s, mean_d = sum(steps) / len(steps), sum(diffs) / len(diffs)
    slope = sum((s - mean_s) * (d - mean_d) for s, d in zip(steps, diffs)) / sum((s - mean_s) ** 2 for s in steps)
    last_step, last = late[-1][0], late[-1][1].difference
    heading_to_zero = slope != 0 and (last > 0) != (slope > 0)
    crossing = last_step - last / slope if heading_to_zero else None
    return Convergence(len(signs) == 1 and len(significance) == 1, late, slope * 1000, crossing)
