"""Paired comparisons over training seeds: the mean difference, its 95 % interval and the claim's verdict.

Seed j of one arm is compared with seed j of the other (both train from the same Stage-1 run, with the same
seed), so each claim reduces to K per-seed differences d_j. The interval is the paired t interval

    mean(d) ± t_{0.975, K-1} · sd(d) / √K

(Student t with K − 1 degrees of freedom). Why t and not a bootstrap: with K = 3 a bootstrap has 10 distinct
resamples and its percentile interval never leaves the range of the three values, so it ignores the uncertainty
of the spread and covers less than it claims; the t interval is exact for normal differences and wide at small K
(t_{0.975,2} = 4.30): that width is the honest answer. Fewer than two seeds, or a non-finite difference mixed
with finite ones, give no interval.

Verdicts against a threshold: **holds** when the interval lies entirely on the claimed side, **does not hold**
when it lies entirely on the other side, **inconclusive** when it contains the threshold or there is no
interval.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

CONFIDENCE = 0.95
METHOD = "paired t interval (Student t, K - 1 degrees of freedom, over the per-seed differences)"
HOLDS, FAILS, INCONCLUSIVE, NOT_MEASURED = "holds", "does not hold", "inconclusive", "not measured"


@dataclass(frozen=True)
class Interval:
    """The mean of K per-seed differences and its two-sided interval (None: no interval)."""

    mean: float
    low: float | None
    high: float | None
    n: int

    def text(self, digits: int = 3) -> str:
        """``-4.2 [-9.1, 0.7]``, or ``-4.2 (1 seed, no interval)``."""
        if self.low is None or self.high is None:
            reason = f"{self.n} seed, no interval" if self.n < 2 else "non-finite value, no interval"
            return f"{self.mean:+.{digits}g} ({reason})"
        return f"{self.mean:+.{digits}g} [{self.low:+.{digits}g}, {self.high:+.{digits}g}]"


def t_quantile(probability: float, dof: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(probability, dof))


def paired_interval(differences: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """The mean of ``differences`` with its paired t interval (see the module docstring)."""
    values = [float(d) for d in differences]
    if not values:
        raise ValueError("no differences: a claim needs at least one seed measured on both arms")
    n = len(values)
    finite = all(math.isfinite(v) for v in values)
    mean = statistics.fmean(values) if finite else _non_finite_mean(values)
    if not finite:
        same_infinity = all(v == values[0] for v in values) and not math.isnan(values[0])
        return Interval(mean, values[0], values[0], n) if same_infinity and n >= 2 else Interval(mean, None, None, n)
    if n < 2:
        return Interval(mean, None, None, n)
    half = t_quantile((1 + confidence) / 2, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def _non_finite_mean(values: Sequence[float]) -> float:
    with_nan = [v for v in values if math.isnan(v)]
    return math.nan if with_nan else sum(values)  # +inf, -inf or nan (inf - inf)


def verdict(interval: Interval | None, threshold: float, claimed: str) -> str:
    """holds / does not hold / inconclusive: is the interval entirely ``below`` or ``above`` the threshold?"""
    if claimed not in ("below", "above"):
        raise ValueError(f"claimed must be 'below' or 'above', got {claimed!r}")
    if interval is None:
        return NOT_MEASURED
    if interval.low is None or interval.high is None:
        return INCONCLUSIVE
    below, above = interval.high < threshold, interval.low > threshold
    if claimed == "below":
        return HOLDS if below else FAILS if above else INCONCLUSIVE
    return HOLDS if above else FAILS if below else INCONCLUSIVE


def all_of(verdicts: Sequence[str]) -> str:
    """The verdict of a claim made of several parts: holds if every part holds, does not hold if any part does
    not, else inconclusive (not measured when a part is)."""
    if not verdicts or NOT_MEASURED in verdicts:
        return NOT_MEASURED
    if FAILS in verdicts:
        return FAILS
    return HOLDS if all(v == HOLDS for v in verdicts) else INCONCLUSIVE
