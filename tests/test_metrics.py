"""Fréchet distance and feature statistics against independent numpy/scipy computations."""

import numpy as np
import pytest
import torch

from tcm_core.evaluation.metrics import (
    StatsAccumulator,
    dfid_subset,
    feature_stats,
    fid_from_features,
    frechet_distance,
    per_image_normal,
)


def _direct_fid(x1, x2):
    """FID with a symmetric square root: |mu1-mu2|^2 + Tr S1 + Tr S2 - 2 Tr (A S2 A)^(1/2), A = S1^(1/2)."""
    mu1, mu2 = x1.mean(0), x2.mean(0)
    s1, s2 = np.cov(x1, rowvar=False), np.cov(x2, rowvar=False)
    w, v = np.linalg.eigh(s1)
    a = v @ np.diag(np.sqrt(w)) @ v.T
    inner = np.linalg.eigvalsh(a @ s2 @ a)
    return ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(inner, 0, None)).sum()


def test_feature_stats_unbiased_and_streaming():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(57, 6)) @ rng.normal(size=(6, 6)) + 3.0
    mu, sigma = feature_stats(x)
    assert mu.dtype == np.float64 and sigma.shape == (6, 6)
    assert np.allclose(mu, x.mean(0)) and np.allclose(sigma, np.cov(x, rowvar=False, ddof=1))
    acc = StatsAccumulator()
    for chunk in np.array_split(x, 5):
        acc.update(torch.from_numpy(chunk).float())  # float32 in, float64 sums
    mu2, sigma2 = acc.stats()
    assert np.allclose(mu2, mu, atol=1e-5) and np.allclose(sigma2, sigma, atol=1e-4)
    with pytest.raises(ValueError, match="at least 2"):
        StatsAccumulator(3).stats()


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_distance_matches_direct_computation(method):
    rng = np.random.default_rng(1)
    x1 = rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16))
    x2 = rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16)) * 0.7 + 0.5
    got = frechet_distance(*feature_stats(x1), *feature_stats(x2), method=method)
    assert got == pytest.approx(_direct_fid(x1, x2), rel=1e-9)


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()  # = 5 + 1 + 1 + 6.25
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(13.25)


def test_identical_sets_zero_and_pure_shift_is_exact_and_monotone():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(500, 12)) @ rng.normal(size=(12, 12))
    stats = feature_stats(x)
    assert abs(frechet_distance(*stats, *stats)) < 1e-8
    direction = rng.normal(size=12)
    values = []
    for s in [0.0, 0.25, 0.5, 1.0, 2.0, 4.0]:
        fid = frechet_distance(*stats, *feature_stats(x + s * direction))
        assert fid == pytest.approx(s**2 * direction @ direction, abs=1e-7)  # covariance unchanged by a shift
        values.append(fid)
    assert all(b > a for a, b in zip(values, values[1:]))


def test_singular_covariances_stay_finite_and_methods_agree():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(10, 40)), rng.normal(size=(10, 40)) + 0.3  # N < D: rank-deficient covariances
    sa, sb = feature_stats(a), feature_stats(b)
    f_sqrtm, f_eigh = frechet_distance(*sa, *sb), frechet_distance(*sa, *sb, method="eigh")
    assert np.isfinite(f_sqrtm) and f_sqrtm == pytest.approx(f_eigh, rel=1e-4)
    assert abs(frechet_distance(*sa, *sa)) < 1e-5
    with pytest.raises(ValueError, match="method"):
        frechet_distance(*sa, *sb, method="svd")
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(sa[0], sa[1], sb[0][:3], sb[1][:3, :3])


def test_dfid_subset_and_noise_are_seeded():
    assert np.array_equal(dfid_subset(100, 10), np.random.RandomState(0).permutation(100)[:10])
    assert not np.array_equal(dfid_subset(100, 10), dfid_subset(100, 10, seed=1))
    with pytest.raises(ValueError, match="num"):
        dfid_subset(5, 6)
    z = per_image_normal((1, 2, 2), range(4), seed=3)
    g = torch.Generator().manual_seed(3 * 1_000_000 + 2)
    assert torch.equal(z[2], torch.randn((1, 2, 2), generator=g))
    assert torch.equal(per_image_normal((1, 2, 2), [2], seed=3)[0], z[2])  # independent of the batch


@pytest.mark.parametrize("n1,n2,dim", [(7, 9, 20), (30, 12, 16), (50, 60, 8)])
def test_fid_from_features_low_rank_route_is_exact(n1, n2, dim):
    rng = np.random.default_rng(n1)
    x1 = rng.normal(size=(n1, dim)) * 2.0
    x2 = rng.normal(size=(n2, dim)) + 0.4
    expected = frechet_distance(*feature_stats(x1), *feature_stats(x2), method="eigh")
    assert fid_from_features(x1, x2) == pytest.approx(expected, rel=1e-8, abs=1e-9)
    assert abs(fid_from_features(x1, x1)) < 1e-9
