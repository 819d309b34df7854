"""Feature statistics, the Fréchet distance, FID of a generator and dFID (TCM's denoising FID).

FID = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2}) with float64 means and *unbiased* (N - 1)
covariances, as EDM's ``fid.py``. Generated images never touch the disk: batches are quantised to uint8
exactly as EDM saves PNGs, then streamed through the feature extractor into running sums.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg
import torch

from tcm_core.sampling import sample_batches, to_uint8
from tcm_core.schedules import T_MAX

FeatureExtractor = Callable[[torch.Tensor], torch.Tensor]


class StatsAccumulator:
    """Running float64 sum and sum of outer products, so 50k x 2048 features need not be stored."""

    def __init__(self, dim: int | None = None) -> None:
        self.count = 0
        self._sum: np.ndarray | None = None
        self._outer: np.ndarray | None = None
        if dim is not None:
            self._allocate(dim)

    def _allocate(self, dim: int) -> None:
        self._sum = np.zeros(dim, dtype=np.float64)
        self._outer = np.zeros((dim, dim), dtype=np.float64)

    def update(self, features: np.ndarray | torch.Tensor) -> None:
        if isinstance(features, torch.Tensor):
            features = features.detach().to("cpu", torch.float64).numpy()
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"features must be (N, D), got shape {x.shape}")
        if self._sum is None:
            self._allocate(x.shape[1])
        self.count += x.shape[0]
        self._sum += x.sum(axis=0)
        self._outer += x.T @ x

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        if self.count < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {self.count}")
        mu = self._sum / self.count
        sigma = (self._outer - self.count * np.outer(mu, mu)) / (self.count - 1)
        return mu, sigma


def feature_stats(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma): float64 mean and unbiased covariance of (N, D) features."""
    x = features.detach().cpu().double().numpy() if isinstance(features, torch.Tensor) else features
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, D), got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False, ddof=1).reshape(x.shape[1], x.shape[1])


FID_METHODS = ("sqrtm", "eigh")


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6, method: str = "sqrtm") -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (the FID formula).

    ``method="sqrtm"`` (default) is the reference computation of EDM / clean-fid / pytorch-fid:
    ``scipy.linalg.sqrtm(sigma1 @ sigma2)``, real part; when it is non-finite (singular covariances, fewer
    samples than dimensions) ``eps`` is added to both diagonals, the standard fallback.
    ``method="eigh"`` computes the same trace, Tr (S1 S2)^{1/2} = Tr (S1^{1/2} S2 S1^{1/2})^{1/2}, from two
    symmetric eigendecompositions; it agrees to round-off (tested) and is about 5x faster at 2048 dims on
    this CPU (11 s vs 55 s under load), useful for frequent Inception evaluations.
    """
    if method not in FID_METHODS:
        raise ValueError(f"method must be one of {FID_METHODS}, got {method!r}")
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    if method == "eigh":
        tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # LinAlgWarning on (near-)singular products: handled below
            covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
            if not np.isfinite(covmean).all():
                offset = np.eye(sigma1.shape[0]) * eps
                covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
        tr_covmean = float(np.trace(np.real(covmean)))
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr (S1 S2)^{1/2} for symmetric PSD S1, S2 (tiny negative eigenvalues from round-off clipped to 0)."""
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    inner = root1 @ sigma2 @ root1
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)).sum())


def fid_from_features(features1: np.ndarray | torch.Tensor, features2: np.ndarray | torch.Tensor) -> float:
    """FID of two feature sets, exact; cheap when a set has fewer samples than dimensions.

    With A = (X1 - mu1) / sqrt(n1 - 1) and B = (X2 - mu2) / sqrt(n2 - 1) (so S1 = A'A, S2 = B'B), the
    non-zero eigenvalues of S1 S2 are those of (A B')'(A B'), hence Tr (S1 S2)^{1/2} = ||A B'||_* (the sum
    of singular values of an n1 x n2 matrix) and FID = |mu1 - mu2|^2 + ||A||_F^2 + ||B||_F^2 - 2 ||A B'||_*.
    No D x D square root is needed (2048-d Inception features of a few dozen images: milliseconds instead of
    a minute). For sets larger than D it falls back to :func:`frechet_distance` on the statistics.
    """
    x1 = features1.detach().cpu().double().numpy() if isinstance(features1, torch.Tensor) else features1
    x2 = features2.detach().cpu().double().numpy() if isinstance(features2, torch.Tensor) else features2
    x1, x2 = np.asarray(x1, np.float64), np.asarray(x2, np.float64)
    if x1.ndim != 2 or x2.ndim != 2 or x1.shape[1] != x2.shape[1] or min(len(x1), len(x2)) < 2:
        raise ValueError(f"features must be (N >= 2, D) with the same D, got {x1.shape} and {x2.shape}")
    n1, n2, dim = len(x1), len(x2), x1.shape[1]
    if min(n1, n2) > dim:
        return frechet_distance(*feature_stats(x1), *feature_stats(x2))
    mu1, mu2 = x1.mean(0), x2.mean(0)
    a = (x1 - mu1) / np.sqrt(n1 - 1)
    b = (x2 - mu2) / np.sqrt(n2 - 1)
    nuclear = np.linalg.svd(a @ b.T, compute_uv=False).sum()
    diff = mu1 - mu2
    return float(diff @ diff + (a * a).sum() + (b * b).sum() - 2.0 * nuclear)


def extract_features(extractor: FeatureExtractor, images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> features (B, D), via the float [0, 255] interface of the extractors."""
    with torch.no_grad():
        return extractor(images_uint8.float())


@dataclass
class StreamResult:
    mu: np.ndarray
    sigma: np.ndarray
    count: int
    seconds: float
    first_images: list[torch.Tensor] = field(default_factory=list)  # kept for sample grids

    @property
    def images_per_second(self) -> float:
        return self.count / max(self.seconds, 1e-9)


def stats_of_batches(batches: Iterable[torch.Tensor], extractor: FeatureExtractor, *, keep_images: int = 0,
                     progress: object | None = None) -> StreamResult:
    """Stream uint8 batches through the extractor into float64 running statistics."""
    start = time.perf_counter()
    acc = StatsAccumulator()
    kept: list[torch.Tensor] = []
    n_kept = 0
    for batch in batches:
        if n_kept < keep_images:
            kept.append(batch[: keep_images - n_kept].cpu())
            n_kept += kept[-1].shape[0]
        acc.update(extract_features(extractor, batch))
        if progress is not None:
            progress.update(batch.shape[0])
    mu, sigma = acc.stats()
    return StreamResult(mu, sigma, acc.count, time.perf_counter() - start, kept)


def fid_of_generator(net: torch.nn.Module, *, extractor: FeatureExtractor, ref_stats: tuple[np.ndarray, np.ndarray],
                     num: int, seed: int = 0, steps: Sequence[float] = (T_MAX,), batch_size: int = 64,
                     device: str | torch.device = "cpu", keep_images: int = 0,
                     progress: object | None = None, method: str = "sqrtm") -> tuple[float, StreamResult]:
    """FID of ``num`` images generated with the seed set ``seed`` (image i seeded by seed * 1e6 + i)."""
    if num < 2:
        raise ValueError(f"num must be >= 2, got {num}")
    was_training = net.training
    net.eval()
    try:
        batches = sample_batches(net, num=num, seed=seed, steps=list(steps), batch_size=batch_size, device=device)
        result = stats_of_batches(batches, extractor, keep_images=keep_images, progress=progress)
    finally:
        net.train(was_training)
    return frechet_distance(result.mu, result.sigma, *ref_stats, method=method), result


def dfid_subset(dataset_size: int, num: int, seed: int = 0) -> np.ndarray:
    """TCM's dFID subset: the training set shuffled with ``seed``, first ``num`` indices."""
    if not 2 <= num <= dataset_size:
        raise ValueError(f"num must be in [2, {dataset_size}] (the dataset size), got {num}")
    return np.random.RandomState(seed).permutation(dataset_size)[:num]


def per_image_normal(shape: Sequence[int], indices: Iterable[int], seed: int) -> torch.Tensor:
    """Standard normal (len(indices), *shape), image i drawn from a generator seeded with seed * 1e6 + i.

    This is the latent that ``sampling.sample_batches`` draws first for image i of seed set ``seed``, so dFID
    at t = T with ``noise_seed = k`` sees the very latents of 1-step generation with seed set k.
    """
    out = []
    for i in indices:
        g = torch.Generator().manual_seed(int(seed) * 1_000_000 + int(i))
        out.append(torch.randn(tuple(shape), generator=g))
    return torch.stack(out)


def denoised_batches(net: torch.nn.Module, dataset, t: float, indices: np.ndarray, *, batch_size: int = 64,
                     device: str | torch.device = "cpu", noise_seed: int = 0) -> Iterator[torch.Tensor]:
    """uint8 batches of D(y + t z, t): one network evaluation on noised training images y."""
    shape = (dataset.channels, dataset.resolution, dataset.resolution)
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        images, labels = dataset.get_batch(chunk)
        y = torch.from_numpy(images).float() / 127.5 - 1.0
        z = per_image_normal(shape, range(start, start + len(chunk)), noise_seed)
        x = (y + t * z).to(device)
        class_labels = dataset.one_hot(labels) if getattr(net, "label_dim", 0) else None
        if class_labels is not None:
            class_labels = class_labels.to(device)
        with torch.no_grad():
            sigma = torch.full((x.shape[0],), float(t), device=device)
            out = net(x, sigma, class_labels)
        yield to_uint8(out.float()).cpu()


def dfid(net: torch.nn.Module, dataset, ts: float | Sequence[float], *, extractor: FeatureExtractor,
         ref_stats: tuple[np.ndarray, np.ndarray], num: int, batch_size: int = 64,
         device: str | torch.device = "cpu", subset_seed: int = 0, noise_seed: int = 0,
         progress: object | None = None, method: str = "sqrtm") -> dict[float, float]:
    """dFID per t: FID of D(y + t z, t) over a fixed seeded subset of ``num`` training images.

    Returns ``{t: fid}``. The same subset and the same noise are used for every t.
    """
    ts = [float(ts)] if isinstance(ts, (int, float)) else [float(t) for t in ts]
    for t in ts:
        if not (math.isfinite(t) and t > 0):
            raise ValueError(f"ts must be positive and finite, got {t}")
    indices = dfid_subset(len(dataset), num, subset_seed)
    was_training = net.training
    net.eval()
    values = {}
    try:
        for t in ts:
            batches = denoised_batches(net, dataset, t, indices, batch_size=batch_size, device=device,
                                       noise_seed=noise_seed)
            result = stats_of_batches(batches, extractor, progress=progress)
            values[t] = frechet_distance(result.mu, result.sigma, *ref_stats, method=method)
    finally:
        net.train(was_training)
    return values
