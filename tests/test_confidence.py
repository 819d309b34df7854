"""The paired interval and the verdicts of the claims table (tcm_core.report.confidence), checked against scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from tcm_core.report.confidence import (
    FAILS,
    HOLDS,
    INCONCLUSIVE,
    NOT_MEASURED,
    Interval,
    all_of,
    minimum_detectable_effect,
    paired_interval,
    seeds_for_mde,
    standardized_mde,
    verdict,
)


@pytest.mark.parametrize("differences", [[-4.1, -2.0, -6.3], [0.5, -0.2], [1.0, 2.0, 3.0, 4.0, 10.0], [3.0, 3.0, 3.0]])
def test_interval_is_scipys_one_sample_t_interval(differences):
    ours = paired_interval(differences)
    assert ours.mean == pytest.approx(np.mean(differences)) and ours.n == len(differences)
    if np.std(differences) == 0:
        assert ours.low == ours.high == pytest.approx(differences[0])
        return
    ci = stats.ttest_1samp(differences, 0.0).confidence_interval(0.95)
    assert (ours.low, ours.high) == (pytest.approx(ci.low, rel=1e-12), pytest.approx(ci.high, rel=1e-12))


def test_three_seeds_give_the_wide_interval_of_t_with_two_degrees_of_freedom():
    ours = paired_interval([1.0, 2.0, 3.0])  # mean 2, sd 1
    half = 4.302652729911275 / math.sqrt(3)  # t_{0.975, 2} from the t table
    assert (ours.low, ours.high) == (pytest.approx(2 - half), pytest.approx(2 + half))
    assert ours.text() == "+2 [-0.484, +4.48]"


def test_one_seed_or_mixed_non_finite_values_give_no_interval():
    one = paired_interval([-3.0])
    assert (one.low, one.high, one.n) == (None, None, 1) and "1 seed, no interval" in one.text()
    mixed = paired_interval([math.inf, 2.0, 1.0])
    assert mixed.low is None and mixed.mean == math.inf
    assert paired_interval([math.nan, 1.0]).low is None
    exploded = paired_interval([math.inf, math.inf])  # every seed diverged: certainly above any threshold
    assert exploded.low == exploded.high == math.inf
    with pytest.raises(ValueError):
        paired_interval([])


@pytest.mark.parametrize(
    ("low", "high", "claimed", "expected"),
    [
        (-3.0, -1.0, "below", HOLDS),
        (1.0, 3.0, "below", FAILS),
        (-1.0, 2.0, "below", INCONCLUSIVE),
        (1.0, 3.0, "above", HOLDS),
        (-3.0, -1.0, "above", FAILS),
        (-1.0, 2.0, "above", INCONCLUSIVE),
        (-2.0, 0.0, "below", INCONCLUSIVE),  # touching the threshold is not below it
    ],
)
def test_verdict_follows_where_the_interval_lies(low, high, claimed, expected):
    assert verdict(Interval((low + high) / 2, low, high, 3), 0.0, claimed) == expected


def test_verdict_without_interval_or_measurement():
    assert verdict(Interval(-5.0, None, None, 1), 0.0, "below") == INCONCLUSIVE
    assert verdict(None, 0.0, "below") == NOT_MEASURED
    with pytest.raises(ValueError):
        verdict(Interval(0.0, -1.0, 1.0, 3), 0.0, "sideways")


def test_a_claim_of_several_parts():
    assert all_of([HOLDS, HOLDS]) == HOLDS
    assert all_of([HOLDS, INCONCLUSIVE]) == INCONCLUSIVE
    assert all_of([INCONCLUSIVE, FAILS, HOLDS]) == FAILS
    assert all_of([HOLDS, NOT_MEASURED]) == NOT_MEASURED and all_of([]) == NOT_MEASURED


def test_coverage_of_the_interval_is_95_percent_on_normal_differences():
    """The claim the docs make: with K = 3 normal differences the interval covers the true mean 95 % of the time."""
    rng = np.random.default_rng(0)
    samples = rng.normal(1.5, 2.0, size=(1500, 3))
    covered = [(i.low <= 1.5 <= i.high) for i in (paired_interval(row) for row in samples)]
    assert np.mean(covered) == pytest.approx(0.95, abs=0.017)  # 3 standard errors of the estimate


# ------------------------------------------------------------------------------------ minimum detectable effect


def _power_by_hand(delta: float, sd: float, n: int) -> float:
    """P(the 95 % paired t interval lies below 0 | true mean -delta): the noncentral t's upper tail (scipy)."""
    return float(stats.nct.sf(stats.t.ppf(0.975, n - 1), n - 1, delta * math.sqrt(n) / sd))


@pytest.mark.parametrize(("sd", "n"), [(1.0, 2), (2.0, 3), (6.6, 3), (0.3, 5), (1.5, 10)])
def test_mde_is_where_the_noncentral_t_gives_80_percent_power(sd, n):
    from scipy.optimize import brentq

    by_hand = brentq(lambda d: _power_by_hand(d, sd, n) - 0.8, 1e-9, 100 * sd)
    assert minimum_detectable_effect(sd, n) == pytest.approx(by_hand, rel=1e-6)
    assert _power_by_hand(minimum_detectable_effect(sd, n), sd, n) == pytest.approx(0.8, abs=1e-6)


def test_mde_hand_computed_values_and_the_large_sample_limit():
    # K = 3, sd(d) = 2: t_{0.975,2} = 4.3027; the noncentrality that puts 80 % of nct(2, .) above it is 5.6535
    # (scipy, by bisection), so the MDE is 5.6535 x 2 / sqrt(3) = 6.528 and d / sd = 3.264
    assert standardized_mde(3) == pytest.approx(3.2640, abs=1e-4)
    assert minimum_detectable_effect(2.0, 3) == pytest.approx(6.528, abs=1e-3)
    assert standardized_mde(10) == pytest.approx(0.9960, abs=1e-4)  # the same noncentral-t computation at K = 10
    # large K: the normal approximation (z_{0.975} + z_{0.8}) / sqrt(K)
    assert standardized_mde(400) == pytest.approx((1.959964 + 0.841621) / 20, rel=5e-3)
    assert paired_interval([1.0, 2.0, 3.0]).mde == pytest.approx(3.2640, abs=1e-4)  # sd 1
    assert paired_interval([-3.0]).mde is None and paired_interval([math.inf, 1.0]).mde is None


def test_seeds_for_a_wanted_mde_is_the_smallest_that_reaches_it():
    sd, wanted = 6.6, 2.64  # e.g. S1's spread on tiny and 15 % of a control FID of 17.6
    k = seeds_for_mde(sd, wanted)
    assert minimum_detectable_effect(sd, k) <= wanted < minimum_detectable_effect(sd, k - 1)
    assert seeds_for_mde(0.0, 1.0) == 2 and seeds_for_mde(10.0, 0.01, most=50) is None
    with pytest.raises(ValueError):
        standardized_mde(1)
    with pytest.raises(ValueError):
        minimum_detectable_effect(math.nan, 3)


# ---------------------------------------------------------------------------------------- power analysis (S1, S5)
def test_power_row_splits_the_spread_and_projects_more_images():
    """sd(d) = 0.5 over K = 3 with σ_a = 0.3, σ_b = 0.2 (measured over sampling seeds): σ_train² = 0.25 − 0.09 −
    0.04 = 0.12; 4x the images quarter the evaluation variances: sd² = 0.12 + 0.13 / 4 = 0.1525. The K for an MDE of
    15 % of a control FID of 4 (0.6) is the smallest K whose noncentral-t power at 0.6 reaches 80 % (scipy)."""
    from tcm_core.report.power import PowerRow, evaluation_sd

    row = PowerRow("S1", 3, 0.5, 4.0, (0.3, 0.2))
    assert row.train_sd == pytest.approx(math.sqrt(0.12)) and row.projected_sd(4.0) == pytest.approx(math.sqrt(0.1525))
    assert row.mde == pytest.approx(3.2640 * 0.5, abs=1e-4)
    for scale, sd in ((1.0, 0.5), (4.0, math.sqrt(0.1525))):
        k = row.seeds_needed(0.15, scale)
        assert _power_by_hand(0.6, sd, k) >= 0.8 > _power_by_hand(0.6, sd, k - 1), (scale, k)
    assert PowerRow("S1", 3, 0.1, 4.0, (0.3, 0.2)).train_sd == 0.0  # evaluation noise explains it all
    assert PowerRow("S1", 3, 0.5, 4.0, None).projected_sd(4.0) == 0.5  # no evaluation spread: nothing to project
    assert evaluation_sd([10.0, 12.0, 14.0]) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        evaluation_sd([10.0])
