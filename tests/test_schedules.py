"""Time distributions and the Δt curriculum, checked against scipy and the paper/reference numbers."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from tcm_core.schedules import (
    S_MIN,
    TABLE_POINTS,
    TruncatedLogNormal,
    TruncatedLogStudentT,
    curriculum_ratio,
    delta_t,
    earlier_time,
)

TCM_STAGE2 = dict(mu=0.0, sigma=0.2, nu=0.01, t_min=1.0, t_max=80.0)


@pytest.fixture(scope="module")
def stage2_dist():
    return TruncatedLogStudentT(**TCM_STAGE2)


# ---------------------------------------------------------------- log-Student-t (paper App. D, reference §2.3)
def test_log_student_t_quantiles_from_icdf(stage2_dist):
    q50, q90, q99 = stage2_dist.icdf([0.5, 0.9, 0.99])
    assert q50 == pytest.approx(1.22, abs=0.01)
    assert q90 == pytest.approx(10.5, rel=0.02)
    assert q99 == pytest.approx(61.3, rel=0.02)
    assert stage2_dist.cdf(2.0) == pytest.approx(0.70, abs=0.01)


def test_log_student_t_quantiles_from_samples(stage2_dist):
    samples = stage2_dist.sample(400_000).numpy()
    assert samples.dtype == np.float64  # times stay float64 until they enter the network
    q50, q90, q99 = np.quantile(samples, [0.5, 0.9, 0.99])
    assert q50 == pytest.approx(1.22, abs=0.02)
    assert q90 == pytest.approx(10.5, rel=0.04)
    assert q99 == pytest.approx(61.3, rel=0.06)
    assert (samples < 2).mean() == pytest.approx(0.70, abs=0.01)
    assert samples.min() >= 1.0 and samples.max() <= 80.0


def test_log_student_t_is_the_exact_truncation(stage2_dist):
    # Independent formula: F(t) = (F_nu((ln t - mu)/sigma) - F_nu(z_a)) / (F_nu(z_b) - F_nu(z_a)).
    t = np.array([1.0, 1.1, 1.5, 3.0, 10.0, 40.0, 80.0])
    base = stats.t(0.01)
    za, zb = 0.0, math.log(80.0) / 0.2
    expected = (base.cdf(np.log(t) / 0.2) - base.cdf(za)) / (base.cdf(zb) - base.cdf(za))
    np.testing.assert_allclose(stage2_dist.cdf(t), expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(stage2_dist.icdf(expected), t, rtol=1e-7)
    # pdf is the density of t: it integrates to 1 and is the derivative of the cdf.
    grid = np.exp(np.linspace(0.0, math.log(80.0), 200_001))
    assert np.trapezoid(stage2_dist.pdf(grid), grid) == pytest.approx(1.0, rel=1e-4)
    h = 1e-6
    numeric = (stage2_dist.cdf(t[1:-1] + h) - stage2_dist.cdf(t[1:-1] - h)) / (2 * h)
    np.testing.assert_allclose(stage2_dist.pdf(t[1:-1]), numeric, rtol=1e-5)
    assert stage2_dist.pdf(np.array([0.5, 81.0])).tolist() == [0.0, 0.0]


def test_inverse_cdf_table_is_accurate(stage2_dist):
    u = np.random.default_rng(0).random(100_000)
    exact = np.log(stage2_dist.icdf(u))
    tabulated = np.log(stage2_dist.icdf_table(torch.from_numpy(u)).numpy())
    # Guaranteed bound of the construction (see module docstring), and the much tighter measured error.
    assert np.abs(exact - tabulated).max() < math.log(80.0) / TABLE_POINTS
    assert np.abs(exact - tabulated).max() < 1e-5
    assert np.abs(stage2_dist.cdf(np.exp(tabulated)) - u).max() < 1e-6


def test_huge_nu_matches_truncated_lognormal():
    lognormal = TruncatedLogNormal(mean=0.3, std=0.8, t_min=0.5, t_max=20.0)
    student = TruncatedLogStudentT(mu=0.3, sigma=0.8, nu=1e6, t_min=0.5, t_max=20.0)
    t = np.linspace(0.5, 20.0, 50)
    np.testing.assert_allclose(student.cdf(t), lognormal.cdf(t), atol=1e-5)
    result = stats.ks_2samp(student.sample(20_000).numpy(), lognormal.sample(20_000).numpy())
    assert result.pvalue > 1e-3


# ---------------------------------------------------------------- truncated log-normal vs scipy.stats.truncnorm
@pytest.mark.parametrize(
    "mean,std,t_min,t_max",
    [(-1.1, 2.0, 0.002, 80.0), (-0.8, 1.6, 0.002, 80.0), (-5.0, 0.5, 1.0, 80.0), (6.0, 0.5, 0.002, 1.0)],
)
def test_truncated_lognormal_matches_truncnorm(mean, std, t_min, t_max):
    dist = TruncatedLogNormal(mean, std, t_min, t_max)
    a, b = (math.log(t_min) - mean) / std, (math.log(t_max) - mean) / std
    ref = stats.truncnorm(a, b, loc=mean, scale=std)  # distribution of ln t
    u = np.linspace(0.001, 0.999, 41)
    np.testing.assert_allclose(np.log(dist.icdf(u)), ref.ppf(u), rtol=1e-6, atol=1e-6)
    t = np.exp(ref.ppf(u))
    np.testing.assert_allclose(dist.cdf(t), u, atol=1e-8)
    np.testing.assert_allclose(dist.pdf(t), ref.pdf(np.log(t)) / t, rtol=1e-6)
    samples = dist.sample(20_000).double().numpy()
    assert samples.min() >= t_min * (1 - 1e-6) and samples.max() <= t_max * (1 + 1e-6)
    assert stats.kstest(np.log(samples), ref.cdf).pvalue > 1e-3


def test_cifar_stage1_quantiles():
    dist = TruncatedLogNormal(-1.1, 2.0, 0.002, 80.0)
    np.testing.assert_allclose(dist.icdf([0.5, 0.9, 0.99]), [0.335, 4.2, 28.7], rtol=0.01)


def test_sampling_uses_torch_global_rng(stage2_dist):
    torch.manual_seed(123)
    first = stage2_dist.sample(64)
    torch.manual_seed(123)
    assert torch.equal(first, stage2_dist.sample(64))


@pytest.mark.parametrize(
    "kwargs,argument",
    [
        (dict(mu=0, sigma=0.2, nu=0.0, t_min=1, t_max=80), "nu"),
        (dict(mu=0, sigma=0.2, nu=-1, t_min=1, t_max=80), "nu"),
        (dict(mu=0, sigma=0.0, nu=0.01, t_min=1, t_max=80), "sigma"),
        (dict(mu=0, sigma=0.2, nu=0.01, t_min=80, t_max=80), "t_max"),
        (dict(mu=0, sigma=0.2, nu=0.01, t_min=0, t_max=80), "t_min"),
    ],
)
def test_student_t_invalid_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        TruncatedLogStudentT(**kwargs)


def test_lognormal_invalid_arguments():
    with pytest.raises(ValueError, match="std"):
        TruncatedLogNormal(0.0, -1.0, 0.1, 1.0)
    with pytest.raises(ValueError, match="t_max"):
        TruncatedLogNormal(0.0, 1.0, 2.0, 1.0)
    with pytest.raises(ValueError, match="t_min"):
        TruncatedLogNormal(0.0, 1.0, -1.0, 1.0)


# ---------------------------------------------------------------- curriculum (reference §2.4)
def test_ratio_per_stage_cifar():
    ratios = [curriculum_ratio(stage * 25_000, q=2, double_iters=25_000, ratio_limit=0.999) for stage in range(10)]
    expected = [0.5, 0.75, 0.875, 0.9375, 0.96875, 0.984375, 0.9921875, 0.99609375, 0.998046875, 0.999]
    np.testing.assert_allclose(ratios, expected, rtol=0, atol=1e-12)
    # Within a stage the ratio is constant; the stage advances at multiples of double_iters.
    assert curriculum_ratio(24_999, 2, 25_000, 0.999) == 0.5
    assert curriculum_ratio(10**9, 2, 1, 0.999) == 0.999


def test_ratio_per_stage_imagenet():
    ratios = [curriculum_ratio(stage * 10_000, q=4, double_iters=10_000, ratio_limit=0.9961) for stage in range(5)]
    np.testing.assert_allclose(ratios, [0.75, 0.9375, 0.984375, 0.99609375, 0.9961], atol=1e-12)


@pytest.mark.parametrize(
    "ratio,t,expected",
    [(0.999, 1.0, 0.00315), (0.999, 80.0, 0.08), (0.9961, 1.0, 0.0123), (0.9961, 80.0, 0.312)],
)
def test_delta_t_at_the_cap(ratio, t, expected):
    dt = delta_t(torch.tensor([t], dtype=torch.float64), ratio).item()
    assert dt == pytest.approx(expected, rel=0.01)


def test_delta_t_formula_and_r_clamp():
    t = torch.tensor([0.002, 0.5, 1.0, 10.0], dtype=torch.float64)
    ratio = 0.75
    sigmoid = 1 / (1 + np.exp(t.numpy()))
    np.testing.assert_allclose(delta_t(t, ratio).numpy(), t.numpy() * 0.25 * (1 + 8 * sigmoid), rtol=1e-12)
    s = earlier_time(t, ratio)
    assert s[:2].tolist() == [S_MIN, S_MIN]  # Δt(t) > t for small t at ratio 0.75, so s is clamped
    np.testing.assert_allclose(s[2:].numpy(), (t - delta_t(t, ratio))[2:].numpy())
    assert torch.all(s < t)


@pytest.mark.parametrize(
    "kwargs,argument",
    [
        (dict(q=1.0, double_iters=10, ratio_limit=0.9), "q"),
        (dict(q=2.0, double_iters=0, ratio_limit=0.9), "double_iters"),
        (dict(q=2.0, double_iters=10, ratio_limit=1.0), "ratio_limit"),
        (dict(q=2.0, double_iters=10, ratio_limit=0.0), "ratio_limit"),
    ],
)
def test_curriculum_invalid_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        curriculum_ratio(0, **kwargs)


# ---------------------------------------------------------------- the standard distributions without scipy.stats
@pytest.mark.parametrize("nu", [None, 0.01, 2.0, 10000.0])
def test_standard_distributions_equal_scipy_stats_to_the_bit(nu):
    """The truncations call scipy.special as scipy.stats does (so a job never imports scipy.stats): every
    function equals scipy.stats' own, bit for bit, on both tails and at the ends of [0, 1]."""
    from tcm_core.schedules import _StandardNormal, _StandardStudentT

    ours, theirs = (_StandardNormal(), stats.norm) if nu is None else (_StandardStudentT(nu), stats.t(nu))
    z = np.concatenate([-np.geomspace(1e-3, 1e4, 200), [0.0], np.geomspace(1e-3, 1e4, 200)])
    p = np.concatenate([[0.0], np.geomspace(1e-300, 0.5, 200), 1 - np.geomspace(1e-16, 0.5, 200), [1.0]])
    for name, x in (("cdf", z), ("sf", z), ("pdf", z), ("ppf", p), ("isf", p)):
        np.testing.assert_array_equal(getattr(ours, name)(x), getattr(theirs, name)(x), err_msg=name)
        assert float(getattr(ours, name)(float(x[7]))) == float(getattr(theirs, name)(float(x[7]))), name


def test_config_checks_load_neither_torch_nor_scipy_stats():
    """Checking a preset (what the workflow does at every start) imports neither; only the architecture check,
    which a cluster job's Snakemake skips (``architecture=False``), loads torch."""
    import subprocess
    import sys

    from tcm_core.presets import SCHEMA

    def loaded(architecture: bool) -> str:
        code = ("import sys; from tcm_core import presets\n"
                "for name in ('ci', 'tiny', 'cifar10'):\n"
                "    cfg = presets.read_yaml('config.yaml'); cfg['preset'] = name\n"
                f"    presets.check_preset(cfg, name, architecture={architecture})\n"
                "print(sorted(m for m in ('torch', 'scipy.stats') if m in sys.modules))")
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              cwd=SCHEMA.parents[2]).stdout.strip()

    assert loaded(False) == "[]"
    assert loaded(True) == "['torch']"
