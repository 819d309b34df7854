"""Time distributions for consistency training and ECT's discretisation curriculum (Δt schedule).

Time distributions
    ``TruncatedLogNormal``   ln t ~ N(mean, std²) truncated to [ln t_min, ln t_max]   (Stage 1, paper eq. 4)
    ``TruncatedLogStudentT`` ln t = mu + sigma·T_nu, truncated to [ln t_min, ln t_max] (Stage 2, ψ̄_t, App. D)

Both are exact truncations by the inverse CDF: u ~ U(F(ln t_min), F(ln t_max)), ln t = F⁻¹(u). Drawing a batch
must not call scipy (it would run on the CPU once per iteration), so the constructor tabulates F⁻¹ once in float64
and ``sample`` interpolates that table on the torch device with torch's global RNG. The table's knots are the
union of a uniform grid in the (normalised) probability v ∈ [0, 1] and a uniform grid in ln t. F⁻¹ is monotone,
so between two knots the interpolation error is at most the gap between the knots, in both v and ln t:
the sampled CDF is within 1/TABLE_POINTS of the exact one, and a sampled ln t within (ln t_max − ln t_min)/TABLE_POINTS
of the exact quantile (both bounds are checked in the tests, with a much smaller measured error).

Curriculum (ECT, used unchanged by TCM)
    ratio(it)  = min(1 − q^−(k+1), ratio_limit), k = it // double_iters   (k: how often Δt has been divided by q;
                                                                        the official code calls it "stage")
    Δt(t)      = t·(1 − ratio)·(1 + 8·sigmoid(−t))
    s(t)       = max(t − Δt(t), 1e-6)          (so s > 0 always; the effective step is t − s)
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported inside the functions that use it: the workflow reads T_MIN / T_MAX and
    import torch  # validates configs without loading torch (about 1.5 s of every Snakemake start and SLURM job)

T_MAX = 80.0  # T: EDM's sigma_max, where 1-step generation starts and every time range ends
T_MIN = 0.002  # EDM's sigma_min: the lower end of Stage 1's time range
TABLE_POINTS = 4096  # knots per grid (probability grid and ln-t grid); 2·TABLE_POINTS knots in the table
S_MIN = 1e-6  # lower clamp of s = t − Δt, as in the official TCM code


def largest_time_below(t: float) -> float:
    """The largest float64 below ``t``: the upper end that makes a range [t_min, t) exclude t itself (the
    intermediate stage's times stay below t', so its pairs s < t < t' never reach Stage 2's range)."""
    return math.nextafter(float(t), 0.0)


def time_dtype(device: torch.device) -> torch.dtype:
    """The dtype of sampled times t, s and Δt: float64, except on MPS (no float64 there)."""
    import torch

    return torch.float32 if device.type == "mps" else torch.float64


def _check_range(t_min: float, t_max: float) -> None:
    if not (math.isfinite(t_min) and t_min > 0):
        raise ValueError(f"t_min must be a finite number > 0, got {t_min}")
    if not (math.isfinite(t_max) and t_max > t_min):
        raise ValueError(f"t_max must be finite and > t_min ({t_min}), got {t_max}")


def _quantile(p, inner):
    """``inner`` on (0, 1); −∞ at 0 and +∞ at 1 (the support's ends, as scipy.stats answers); NaN outside."""
    p = np.asarray(p, dtype=np.float64)
    inside = (p > 0) & (p < 1)
    ends = np.where(p == 0, -np.inf, np.where(p == 1, np.inf, np.nan))
    return np.where(inside, inner(np.where(inside, p, 0.5)), ends)


class _StandardNormal:
    """Z ~ N(0, 1): scipy.stats.norm's functions, called as scipy.stats calls them (the same numbers), from
    scipy.special: importing scipy.stats would cost about a second of every training job and Snakemake start."""

    def __init__(self) -> None:
        from scipy import special

        self._special = special

    def cdf(self, z):
        return self._special.ndtr(z)

    def sf(self, z):
        return self._special.ndtr(-np.asarray(z))

    def ppf(self, p):
        return _quantile(p, self._special.ndtri)

    def isf(self, p):
        return -self.ppf(p)

    def pdf(self, z):
        return np.exp(-np.asarray(z) ** 2 / 2.0) / np.sqrt(2 * np.pi)


class _StandardStudentT(_StandardNormal):
    """Z ~ Student-t with ``nu`` degrees of freedom: scipy.stats.t's functions, as scipy.stats calls them."""

    def __init__(self, nu: float) -> None:
        super().__init__()
        self.nu = float(nu)

    def cdf(self, z):
        return self._special.stdtr(self.nu, z)

    def sf(self, z):
        return self._special.stdtr(self.nu, -np.asarray(z))

    def ppf(self, p):
        return _quantile(p, lambda inside: self._special.stdtrit(self.nu, inside))

    def pdf(self, z):
        from scipy import stats  # the density is only drawn (figures), never sampled from

        return stats.t.pdf(z, self.nu)


class _TruncatedLogDistribution:
    """ln t = loc + scale·Z, Z ~ ``base`` (a standard distribution above), truncated to [ln t_min, ln t_max]."""

    def __init__(self, base, loc: float, scale: float, t_min: float, t_max: float) -> None:
        _check_range(t_min, t_max)
        self.t_min = float(t_min)
        self.t_max = float(t_max)
        self._base = base
        self._loc = float(loc)
        self._scale = float(scale)
        self._za = (math.log(self.t_min) - self._loc) / self._scale
        self._zb = (math.log(self.t_max) - self._loc) / self._scale
        # Work in whichever tail keeps the truncation mass well away from cancellation (F ≈ 1 on both ends).
        self._upper = self._za > 0
        if self._upper:
            self._pa, self._pb = float(base.sf(self._za)), float(base.sf(self._zb))
            self._mass = self._pa - self._pb
        else:
            self._pa, self._pb = float(base.cdf(self._za)), float(base.cdf(self._zb))
            self._mass = self._pb - self._pa
        if not self._mass > 0:
            raise ValueError(
                f"the distribution has no probability mass on [t_min, t_max] = [{t_min}, {t_max}] "
                "(in float64); move the range towards the distribution's centre"
            )
        self._table: tuple[np.ndarray, np.ndarray] | None = None  # built on the first draw (a config check draws none)
        self._device_tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # ---- exact functions in z = (ln t − loc)/scale, v = normalised probability in [0, 1] ----
    def _v_of_z(self, z: np.ndarray) -> np.ndarray:
        z = np.clip(z, self._za, self._zb)
        if self._upper:
            v = (self._pa - self._base.sf(z)) / self._mass
        else:
            v = (self._base.cdf(z) - self._pa) / self._mass
        return np.clip(v, 0.0, 1.0)

    def _z_of_v(self, v: np.ndarray) -> np.ndarray:
        v = np.clip(v, 0.0, 1.0)
        if self._upper:
            z = self._base.isf(self._pa - v * self._mass)
        else:
            z = self._base.ppf(self._pa + v * self._mass)
        return np.clip(z, self._za, self._zb)

    def table(self) -> tuple[np.ndarray, np.ndarray]:
        """The knots (v, ln t) of the tabulated F⁻¹ that :meth:`sample` interpolates, built once."""
        if self._table is None:
            self._table = self._build_table()
        return self._table

    def _build_table(self) -> tuple[np.ndarray, np.ndarray]:
        v_grid = np.linspace(0.0, 1.0, TABLE_POINTS)
        z_grid = np.linspace(self._za, self._zb, TABLE_POINTS)
        v = np.concatenate([v_grid, self._v_of_z(z_grid)])
        z = np.concatenate([self._z_of_v(v_grid), z_grid])
        order = np.lexsort((z, v))
        v, z = v[order], z[order]
        z = np.maximum.accumulate(z)  # guard against float64 noise breaking monotonicity
        v, first = np.unique(v, return_index=True)
        z = z[first]
        v[0], v[-1] = 0.0, 1.0
        z[0], z[-1] = self._za, self._zb
        return v, self._loc + self._scale * z  # knots of ln t as a function of v

    # ---- public, exact (scipy) ----
    def cdf(self, t) -> np.ndarray:
        """P(T <= t), exact. numpy in, numpy out; 0 below t_min, 1 above t_max."""
        t = np.asarray(t, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = (np.log(t) - self._loc) / self._scale
        v = self._v_of_z(np.where(np.isfinite(z), z, self._za))
        return np.where(t < self.t_min, 0.0, np.where(t >= self.t_max, 1.0, v))

    def icdf(self, u) -> np.ndarray:
        """Quantile function: the t with cdf(t) = u, for u in [0, 1]. numpy in, numpy out."""
        u = np.asarray(u, dtype=np.float64)
        if np.any((u < 0) | (u > 1)):
            raise ValueError("icdf: u must lie in [0, 1]")
        t = np.exp(self._loc + self._scale * self._z_of_v(u))
        return np.clip(t, self.t_min, self.t_max)

    def pdf(self, t) -> np.ndarray:
        """Density of t (not of ln t), exact: f_Z(z)/(scale·t·mass) on [t_min, t_max], 0 elsewhere."""
        t = np.asarray(t, dtype=np.float64)
        inside = (t >= self.t_min) & (t <= self.t_max)
        safe_t = np.where(inside, t, self.t_min)
        z = (np.log(safe_t) - self._loc) / self._scale
        density = self._base.pdf(z) / (self._scale * safe_t * self._mass)
        return np.where(inside, density, 0.0)

    # ---- sampling on the torch device ----
    def icdf_table(self, u: torch.Tensor) -> torch.Tensor:
        """The tabulated quantile function used by :meth:`sample` (float64 in, float64 t out, same device)."""
        import torch

        table_v, table_x = self._tables(u.device)
        u = u.to(table_v.dtype).clamp(0.0, 1.0)
        hi = torch.searchsorted(table_v, u, right=True).clamp(1, table_v.numel() - 1)
        lo = hi - 1
        v0, v1 = table_v[lo], table_v[hi]
        x0, x1 = table_x[lo], table_x[hi]
        frac = ((u - v0) / (v1 - v0)).clamp(0.0, 1.0)
        return torch.exp(x0 + frac * (x1 - x0)).clamp(self.t_min, self.t_max)

    def sample(self, n: int, device: torch.device | str | None = None) -> torch.Tensor:
        """``n`` samples of t on ``device`` in float64 (float32 on MPS), from torch's global RNG (no scipy call).

        Times stay in float64 through s = t − Δt and the weights, as in the official code; they are cast to
        float32 only where they enter the network. (In float32, at ratio 0.999, Δt moves by up to ~6e-5 relative.)
        """
        import torch

        device = torch.device(device) if device is not None else torch.device("cpu")
        u = torch.rand(n, device=device, dtype=time_dtype(device))
        return self.icdf_table(u)

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        key = str(device)
        if key not in self._device_tables:
            dtype = time_dtype(device)
            v, x = (torch.as_tensor(knots, dtype=dtype, device=device) for knots in self.table())
            self._device_tables[key] = (v, x)
        return self._device_tables[key]


class TruncatedLogNormal(_TruncatedLogDistribution):
    """ln t ~ N(mean, std²) truncated exactly to [ln t_min, ln t_max] (TCM Stage 1; ECT without truncation)."""

    def __init__(self, mean: float, std: float, t_min: float, t_max: float) -> None:
        if not (math.isfinite(std) and std > 0):
            raise ValueError(f"std must be a finite number > 0, got {std}")
        if not math.isfinite(mean):
            raise ValueError(f"mean must be finite, got {mean}")
        self.mean = float(mean)
        self.std = float(std)
        super().__init__(_StandardNormal(), mean, std, t_min, t_max)

    def __repr__(self) -> str:
        return f"TruncatedLogNormal(mean={self.mean}, std={self.std}, t_min={self.t_min}, t_max={self.t_max})"


class TruncatedLogStudentT(_TruncatedLogDistribution):
    """ln t = mu + sigma·T_nu truncated exactly to [ln t_min, ln t_max] (TCM Stage 2: mu 0, sigma 0.2, nu 0.01)."""

    def __init__(self, mu: float, sigma: float, nu: float, t_min: float, t_max: float) -> None:
        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be a finite number > 0, got {sigma}")
        if not nu > 0:
            raise ValueError(f"nu (degrees of freedom) must be > 0, got {nu}")
        if not math.isfinite(mu):
            raise ValueError(f"mu must be finite, got {mu}")
        self.mu = float(mu)
        self.sigma = float(sigma)
        self.nu = float(nu)
        super().__init__(_StandardStudentT(self.nu), mu, sigma, t_min, t_max)

    def __repr__(self) -> str:
        return (
            f"TruncatedLogStudentT(mu={self.mu}, sigma={self.sigma}, nu={self.nu}, "
            f"t_min={self.t_min}, t_max={self.t_max})"
        )


def curriculum_ratio(iteration: int, q: float, double_iters: int, ratio_limit: float) -> float:
    """ECT's curriculum: min(1 − q^−(k+1), ratio_limit) with k = iteration // double_iters (the doublings)."""
    if not q > 1:
        raise ValueError(f"q must be > 1, got {q}")
    if int(double_iters) != double_iters or double_iters < 1:
        raise ValueError(f"double_iters must be an integer >= 1, got {double_iters}")
    if not 0 < ratio_limit < 1:
        raise ValueError(f"ratio_limit must be in (0, 1), got {ratio_limit}")
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}")
    doublings = int(iteration) // int(double_iters)
    # q ** -(doublings + 1) underflows to 0.0 for huge counts, which the cap then takes care of.
    return min(1.0 - float(q) ** -(doublings + 1), float(ratio_limit))


def _check_ratio(ratio: float) -> None:
    if not 0 <= ratio < 1:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")


def delta_t(t: torch.Tensor, ratio: float) -> torch.Tensor:
    """Δt = t·(1 − ratio)·(1 + 8·sigmoid(−t)) (ECT's 'sigmoid' mapping, k = 8, b = 1)."""
    import torch

    _check_ratio(ratio)
    return t * (1.0 - ratio) * (1.0 + 8.0 * torch.sigmoid(-t))


def earlier_time(t: torch.Tensor, ratio: float) -> torch.Tensor:
    """s = max(t − Δt(t), 1e-6): the earlier time whose prediction is the consistency target.

    The paper writes it t − Δ_t; we call it s because the paper's App. E uses r for the curriculum ratio."""
    return (t - delta_t(t, ratio)).clamp_min(S_MIN)
