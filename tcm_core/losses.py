"""Training losses: EDM denoising (pre-training), Stage-1 consistency training, Stage-2 truncated CT.

All losses are called by the training loop as ``out = loss_fn(net, images, class_labels, iteration=it)`` with
images in [-1, 1]; they draw times, noise and boundary indices from torch's global RNG and return a
:class:`LossOutput` whose ``loss`` is the scalar to back-propagate.

Consistency training (ECT, paper eq. 4), one shared ε per sample:
    x_t = y + t·ε,  x_r = y + r·ε,  r = max(t − Δt(t), 1e-6)
    loss = mean_b  w(t, t − r) · d(D_θ(x_t, t), stopgrad D_θ(x_r, r)),  d = pseudo-Huber over C·H·W
The target pass replays the dropout masks of the graded pass (``networks.dropout``) and runs with EDM2's forced
weight normalisation switched off, so it neither sees other masks nor rewrites weights.

Truncated consistency training (TCM Stage 2, paper eqs. 5–11, Algorithm 1): the model below t' is a frozen
Stage-1 network; N_B = ⌊B·ρ⌋ samples are placed at t = t' (boundary loss, eq. 8) and the others follow ψ̄_t on
[t', T] (eq. 9). The target f(x_r, r) belongs to the frozen net when r < t' and to the student otherwise.
Total = mean(regular) + w_b·mean(boundary) (eq. 11).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from tcm_core.networks import no_forced_weight_norm
from tcm_core.networks.dropout import DropoutMaskRecord, record_dropout_masks, replay_dropout_masks
from tcm_core.schedules import curriculum_ratio, r_from_t

WEIGHTINGS = ("inv_delta_t", "inv_cout_sq", "uniform")


@dataclass
class LossOutput:
    """What a loss returns: ``loss`` (graded scalar), and detached scalars for logging."""

    loss: torch.Tensor
    regular: torch.Tensor
    boundary: torch.Tensor | None = None  # None outside Stage 2
    ratio: float | None = None  # curriculum ratio used (consistency losses only)


def pseudo_huber(x: torch.Tensor, y: torch.Tensor, c: float) -> torch.Tensor:
    """Per-sample sqrt(||x − y||² + c²) − c over all non-batch elements, shape (B,). c = 0 gives ||x − y||₂."""
    if not c >= 0:
        raise ValueError(f"pseudo-Huber c must be >= 0, got {c}")
    diff = (x - y).flatten(1)
    if c == 0:
        # vector_norm has a finite (zero) subgradient at 0, unlike sqrt of the squared norm.
        return torch.linalg.vector_norm(diff, dim=1)
    return torch.sqrt(diff.square().sum(dim=1) + c * c) - c


def loss_weight(kind: str, t: torch.Tensor, dt: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """Per-sample weight λ(t): "inv_delta_t" 1/Δt (ECT/TCM CIFAR), "inv_cout_sq" 1/c_out(t)² (ImageNet), "uniform"."""
    if kind == "inv_delta_t":
        return 1.0 / dt
    if kind == "inv_cout_sq":
        # 1/c_out² with c_out = t·σd/√(t² + σd²): EDM's λ(σ), ECT's "snrpk", TCM's "cout_sq".
        return (t.square() + sigma_data**2) / (t * sigma_data).square()
    if kind == "uniform":
        return torch.ones_like(t)
    raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {kind!r}")


def _check_common(q: float, ratio_limit: float, double_iters: int, c: float, weighting: str) -> None:
    curriculum_ratio(0, q, double_iters, ratio_limit)  # raises ValueError naming the bad argument
    if not c >= 0:
        raise ValueError(f"pseudo-Huber c must be >= 0, got {c}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")


def _take(labels: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
    return None if labels is None else labels.index_select(0, index)


class EDMDenoisingLoss:
    """EDM's denoising loss (pre-training): ln σ ~ N(p_mean, p_std²), λ(σ) = (σ² + σd²)/(σ·σd)².

    Reduction: per sample λ(σ)·mean over C·H·W of (D − y)², then the mean over the batch. EDM sums over the
    elements instead; the two differ by the constant factor C·H·W, which Adam-type optimisers absorb (up to eps).
    """

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2, sigma_data: float = 0.5) -> None:
        if not p_std > 0:
            raise ValueError(f"p_std must be > 0, got {p_std}")
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        self.p_mean, self.p_std, self.sigma_data = float(p_mean), float(p_std), float(sigma_data)

    def __call__(
        self, net: nn.Module, images: torch.Tensor, class_labels: torch.Tensor | None = None, iteration: int = 0
    ) -> LossOutput:
        batch = images.shape[0]
        sigma = (torch.randn(batch, device=images.device) * self.p_std + self.p_mean).exp()
        weight = loss_weight("inv_cout_sq", sigma, sigma, self.sigma_data)
        noisy = images + sigma.reshape(-1, 1, 1, 1) * torch.randn_like(images)
        denoised = net(noisy, sigma, class_labels)
        per_sample = weight * (denoised - images).square().flatten(1).mean(dim=1)
        loss = per_sample.mean()
        return LossOutput(loss=loss, regular=loss.detach(), boundary=None, ratio=None)


class _ConsistencyBase:
    def __init__(self, time_dist, q, ratio_limit, double_iters, c, weighting, sigma_data) -> None:
        _check_common(q, ratio_limit, double_iters, c, weighting)
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        self.time_dist = time_dist
        self.q, self.ratio_limit, self.double_iters = float(q), float(ratio_limit), int(double_iters)
        self.c, self.weighting, self.sigma_data = float(c), weighting, float(sigma_data)

    def ratio(self, iteration: int) -> float:
        return curriculum_ratio(iteration, self.q, self.double_iters, self.ratio_limit)

    def _per_sample(self, d_t: torch.Tensor, d_r: torch.Tensor, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        weight = loss_weight(self.weighting, t, t - r, self.sigma_data)
        return weight * pseudo_huber(d_t, d_r, self.c)


def _target_pass(
    net: nn.Module,
    record: DropoutMaskRecord,
    index: torch.Tensor,
    images: torch.Tensor,
    noise: torch.Tensor,
    r: torch.Tensor,
    class_labels: torch.Tensor | None,
) -> torch.Tensor:
    """stopgrad f(y + r·ε, r) on the rows ``index``, with the dropout masks those rows had in the graded pass."""
    r_sub = r.index_select(0, index)
    x_r = images.index_select(0, index) + r_sub.reshape(-1, 1, 1, 1) * noise.index_select(0, index)
    with torch.no_grad(), no_forced_weight_norm(), replay_dropout_masks(record, index):
        target = net(x_r, r_sub, _take(class_labels, index))
    # ln(r)/4 noise embedding and fp16 passes can produce non-finite values; never let them into the loss.
    return torch.nan_to_num(target)


class ConsistencyLoss(_ConsistencyBase):
    """Stage-1 consistency training (ECT-style CT, paper eq. 4); the target is the student itself, no grad."""

    def __init__(
        self,
        time_dist,
        q: float,
        ratio_limit: float,
        double_iters: int,
        c: float,
        weighting: str,
        sigma_data: float = 0.5,
    ) -> None:
        super().__init__(time_dist, q, ratio_limit, double_iters, c, weighting, sigma_data)

    def __call__(
        self, net: nn.Module, images: torch.Tensor, class_labels: torch.Tensor | None = None, iteration: int = 0
    ) -> LossOutput:
        batch = images.shape[0]
        ratio = self.ratio(iteration)
        t = self.time_dist.sample(batch, device=images.device)
        r = r_from_t(t, ratio)
        noise = torch.randn_like(images)
        with record_dropout_masks() as record:
            d_t = net(images + t.reshape(-1, 1, 1, 1) * noise, t, class_labels)
        everyone = torch.arange(batch, device=images.device)
        d_r = _target_pass(net, record, everyone, images, noise, r, class_labels)
        loss = self._per_sample(d_t, d_r, t, r).mean()
        return LossOutput(loss=loss, regular=loss.detach(), boundary=None, ratio=ratio)


class TruncatedConsistencyLoss(_ConsistencyBase):
    """TCM Stage 2 (paper eqs. 5–11, Algorithm 1).

    - ``rho``: fraction of the batch put at t = t' (N_B = ⌊B·ρ⌋, a random subset by ``torch.randperm``).
      ρ = 0 means no boundary samples (then this is Stage-1 CT restricted to [t', T]); training requires (0, 1).
    - ``time_dist``: ψ̄_t, supported on [t', T] (its ``t_min`` must be >= t_prime).
    - The graded student pass runs once on the full batch (all times are >= t', so the student owns them all)
      while recording dropout masks. Each target f(x_r, r) is computed once, on its own sub-batch, by the owner
      of time r: the frozen Stage-1 net if r < t', else the student (no grad), replaying each sample's masks.
      The frozen net runs in the student's train/eval mode (as the official code's deep copy does), so dropout
      masks line up; it is never given gradients.
    """

    def __init__(
        self,
        frozen: nn.Module,
        t_prime: float,
        rho: float,
        w_b: float,
        time_dist,
        q: float,
        ratio_limit: float,
        double_iters: int,
        c: float,
        weighting: str,
        sigma_data: float = 0.5,
    ) -> None:
        super().__init__(time_dist, q, ratio_limit, double_iters, c, weighting, sigma_data)
        if not 0 <= rho < 1:
            raise ValueError(f"rho must be in [0, 1) (0: no boundary samples), got {rho}")
        if not (math.isfinite(w_b) and w_b >= 0):
            raise ValueError(f"w_b must be a finite number >= 0, got {w_b}")
        t_max = float(time_dist.t_max)
        if not 0 < t_prime < t_max:
            raise ValueError(f"t_prime must be in (0, time_dist.t_max = {t_max}), got {t_prime}")
        if float(time_dist.t_min) < t_prime:
            raise ValueError(
                f"time_dist must be supported on [t_prime, T]: its t_min ({time_dist.t_min}) must be >= "
                f"t_prime ({t_prime})"
            )
        frozen.requires_grad_(False)
        self.frozen = frozen
        self.t_prime, self.rho, self.w_b = float(t_prime), float(rho), float(w_b)

    def num_boundary(self, batch: int) -> int:
        """N_B = ⌊B·ρ⌋; ValueError if ρ > 0 but the batch is too small for one boundary sample."""
        n_b = int(math.floor(batch * self.rho))
        if self.rho > 0 and n_b < 1:
            raise ValueError(
                f"batch size {batch} is too small for rho = {self.rho}: floor(B * rho) = 0 boundary samples; "
                f"use a batch of at least {math.ceil(1 / self.rho)}"
            )
        return n_b

    def __call__(
        self, net: nn.Module, images: torch.Tensor, class_labels: torch.Tensor | None = None, iteration: int = 0
    ) -> LossOutput:
        if net is self.frozen:
            raise ValueError("the student net must not be the frozen boundary net (pass a frozen copy)")
        batch, device = images.shape[0], images.device
        n_boundary = self.num_boundary(batch)
        ratio = self.ratio(iteration)
        # Same RNG order as ConsistencyLoss (times, then noise), so ρ = 0 reproduces Stage 1 draw for draw.
        t = self.time_dist.sample(batch, device=device)
        is_boundary = torch.zeros(batch, dtype=torch.bool, device=device)
        if n_boundary > 0:
            is_boundary[torch.randperm(batch, device=device)[:n_boundary]] = True
            t = torch.where(is_boundary, torch.full_like(t, self.t_prime), t)
        r = r_from_t(t, ratio)
        noise = torch.randn_like(images)

        with record_dropout_masks() as record:
            d_t = net(images + t.reshape(-1, 1, 1, 1) * noise, t, class_labels)

        # Route each target to the network that owns time r; every target is computed exactly once.
        from_frozen = r < self.t_prime
        frozen_index = from_frozen.nonzero().flatten()
        student_index = (~from_frozen).nonzero().flatten()
        d_r = torch.empty_like(d_t, requires_grad=False)
        if student_index.numel() > 0:
            d_r.index_copy_(0, student_index, _target_pass(net, record, student_index, images, noise, r, class_labels))
        if frozen_index.numel() > 0:
            was_training = self.frozen.training
            self.frozen.train(net.training)
            try:
                target = _target_pass(self.frozen, record, frozen_index, images, noise, r, class_labels)
            finally:
                self.frozen.train(was_training)
            d_r.index_copy_(0, frozen_index, target)

        per_sample = self._per_sample(d_t, d_r, t, r)
        n_regular = batch - n_boundary
        regular_mask = (~is_boundary).to(per_sample.dtype)
        regular = (per_sample * regular_mask).sum() / max(n_regular, 1)
        boundary = (per_sample * (1.0 - regular_mask)).sum() / max(n_boundary, 1)
        loss = regular + self.w_b * boundary
        return LossOutput(loss=loss, regular=regular.detach(), boundary=boundary.detach(), ratio=ratio)
