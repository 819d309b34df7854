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

**Minimum detectable effect** (MDE), what an "inconclusive" still says: the smallest true mean difference δ at
which the verdict would be "holds" with probability ``POWER`` (80 %), given K seeds and the spread sd(d) measured.
"Holds" means the two-sided interval at ``CONFIDENCE`` excludes the threshold on the claimed side, i.e. a
one-sided paired t test at level α = (1 − CONFIDENCE) / 2 = 0.025 rejects. Under a true difference δ the t
statistic follows a noncentral t with K − 1 degrees of freedom and noncentrality δ·√K / sd, so the MDE solves

    P(T_{K-1}(δ√K / sd) > t_{1-α, K-1}) = POWER      (≈ (z_{1-α} + z_POWER) · sd / √K for large K)

(statsmodels' ``TTestPower``). An inconclusive claim with MDE m means: no effect as large as m in the claimed
direction is likely to have been missed. The same formula sizes K for a wanted MDE (``seeds_for_mde``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

CONFIDENCE = 0.95
POWER = 0.8  # of the minimum detectable effect
MDE_METHOD = (f"one-sided paired t test at level {(1 - CONFIDENCE) / 2:g}, {POWER:.0%} power, noncentral t with K - 1 "
              "degrees of freedom, at the sample standard deviation of the differences")
METHOD = "paired t interval (Student t, K - 1 degrees of freedom, over the per-seed differences)"
HOLDS, FAILS, INCONCLUSIVE, NOT_MEASURED = "holds", "does not hold", "inconclusive", "not measured"


@dataclass(frozen=True)
class Interval:
    """The mean of K per-seed differences and its two-sided interval (None: no interval)."""

    mean: float
    low: float | None
    high: float | None
    n: int
    sd: float | None = None  # the sample standard deviation of the differences (None: fewer than 2, or non-finite)

    @property
    def mde(self) -> float | None:
        """The minimum detectable effect of this comparison (module docstring); None without a measured spread."""
        return None if self.sd is None else minimum_detectable_effect(self.sd, self.n)

    def mde_text(self, digits: int = 3) -> str:
        mde = self.mde
        return f"{mde:.{digits}g}" if mde is not None else "no spread measured"

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
    sd = statistics.stdev(values)
    half = t_quantile((1 + confidence) / 2, n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, sd)


def standardized_mde(n: int, confidence: float = CONFIDENCE, power: float = POWER) -> float:
    """δ / sd at which a paired t test over n seeds at one-sided level (1 − confidence) / 2 has ``power``."""
    if n < 2:
        raise ValueError(f"the MDE needs at least 2 seeds, got {n}")
    from statsmodels.stats.power import TTestPower

    return float(TTestPower().solve_power(effect_size=None, nobs=n, alpha=(1 - confidence) / 2, power=power,
                                          alternative="larger"))


def minimum_detectable_effect(sd: float, n: int, confidence: float = CONFIDENCE, power: float = POWER) -> float:
    """The MDE of a paired comparison of n seeds whose differences spread with standard deviation ``sd``."""
    if not (math.isfinite(sd) and sd >= 0):
        raise ValueError(f"the spread must be finite and >= 0, got {sd}")
    return standardized_mde(n, confidence, power) * sd


def seeds_for_mde(sd: float, wanted: float, confidence: float = CONFIDENCE, power: float = POWER,
                  most: int = 200) -> int | None:
    """The fewest seeds K (>= 2) whose MDE at spread ``sd`` is at most ``wanted``; None if more than ``most``."""
    for n in range(2, most + 1):
        if minimum_detectable_effect(sd, n, confidence, power) <= wanted:
            return n
    return None


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
