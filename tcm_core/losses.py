"""Training losses: EDM denoising (pre-training), Stage-1 consistency training, Stage-2 truncated CT.

All losses are called by the training loop with images in [-1, 1]; they draw times, noise and (standalone)
boundary indices from torch's global RNG and return a :class:`LossOutput` whose ``loss`` is the scalar to
back-propagate. The consistency losses take the curriculum ratio of the iteration (``schedules``); the training
loop owns that schedule, as it owns the learning rate and the EMA decay.

Consistency training (ECT, paper eq. 4), one shared ε per sample:
    x_t = y + t·ε,  x_s = y + s·ε,  s = max(t − Δt(t), 1e-6),  Δt(t) = t·(1 − ratio)·(1 + 8·sigmoid(−t))
    loss = mean_b  w(t, t − s) · d(D_θ(x_t, t), stopgrad D_θ(x_s, s)),  d = pseudo-Huber over C·H·W
t, s and Δt are float64 (as in the official code); they are cast to float32 only where they enter the network.
(The paper writes the earlier time t − Δ_t; we call it s, since the paper's App. E uses r for the curriculum ratio.)
The target pass replays the dropout masks of the graded pass (``networks.dropout``) and runs with EDM2's forced
weight normalisation switched off, so it neither sees other masks nor rewrites weights.

Consistency distillation (``method: cd``, paper App. A and C.2): everything as above, except that the earlier
point is one PF-ODE step of a frozen teacher diffusion model from x_t instead of y + s·ε:
    x_s = TeacherStep(x_t, t, s, c)      (Euler or Heun on dx/dt = (x − D_teacher(x, t))/t, optionally with
                                          classifier-free guidance; the formulas are in ``tcm_core.distillation``)
The losses take it as ``teacher_step``; None is consistency training. In Stage 2 the frozen Stage-1 model's
boundary targets are evaluated at the teacher's x_s too.

Truncated consistency training (TCM Stage 2, paper eqs. 5–11, Algorithm 1): the model below t' is a frozen
Stage-1 network; N_B = ⌊B·ρ⌋ samples of the GLOBAL batch B are placed at t = t' (boundary loss, eq. 8) and the
others follow ψ̄_t on [t', T] (eq. 9). The target f(x_s, s) belongs to the frozen net when s < t' and to the student
otherwise. Total (eq. 11) = (1/(B − N_B))·Σ_regular ℓ + (w_b/N_B)·Σ_boundary ℓ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from tcm_core.distillation import TeacherStep
from tcm_core.networks import no_forced_weight_norm
from tcm_core.networks.dropout import DropoutMaskRecord, record_dropout_masks, replay_dropout_masks
from tcm_core.schedules import earlier_time

WEIGHTINGS = ("inv_delta_t", "inv_cout_sq", "uniform")


@dataclass
class LossOutput:
    """What a loss returns: ``loss`` (graded scalar), and detached scalars for logging."""

    loss: torch.Tensor
    regular: torch.Tensor
    boundary: torch.Tensor | None = None  # None outside Stage 2


@dataclass(frozen=True)
class BoundaryPlan:
    """The boundary samples of one loss call, chosen by the training loop for the whole global batch.

    ``is_boundary``: (b,) bool mask over this call's samples; ``fraction``: N_B / B of the GLOBAL batch.
    """

    is_boundary: torch.Tensor
    fraction: float


def num_boundary(batch: int, rho: float) -> int:
    """N_B = ⌊B·ρ⌋ (paper eq. 11, Algorithm 1 line 4); ValueError if ρ > 0 but B·ρ < 1."""
    n_b = int(math.floor(batch * rho))
    if rho > 0 and n_b < 1:
        raise ValueError(
            f"batch size {batch} is too small for rho = {rho}: floor(B * rho) = 0 boundary samples; "
            f"use a batch of at least {math.ceil(1 / rho)}"
        )
    return n_b


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


def _check_common(c: float, weighting: str, sigma_data: float) -> None:
    if not c >= 0:
        raise ValueError(f"pseudo-Huber c must be >= 0, got {c}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if not sigma_data > 0:
        raise ValueError(f"sigma_data must be > 0, got {sigma_data}")


def _check_ratio(ratio: float) -> None:
    if not 0 <= ratio < 1:
        raise ValueError(f"the curriculum ratio must be in [0, 1), got {ratio}")


def _rows(value: torch.Tensor | None, rows: slice | torch.Tensor) -> torch.Tensor | None:
    """Rows of a batch tensor: a view for a slice, a copy for an index tensor."""
    if value is None:
        return None
    return value[rows] if isinstance(rows, slice) else value.index_select(0, rows)


def _noised(images: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """y + t·ε, computed in the times' precision and cast to the images' dtype where it enters the network."""
    return (images + t.reshape(-1, 1, 1, 1) * noise).to(images.dtype)


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

    def __call__(self, net: nn.Module, images: torch.Tensor, class_labels: torch.Tensor | None = None) -> LossOutput:
        batch = images.shape[0]
        sigma = (torch.randn(batch, device=images.device) * self.p_std + self.p_mean).exp()
        weight = loss_weight("inv_cout_sq", sigma, sigma, self.sigma_data)
        noisy = images + sigma.reshape(-1, 1, 1, 1) * torch.randn_like(images)
        denoised = net(noisy, sigma, class_labels)
        per_sample = weight * (denoised - images).square().flatten(1).mean(dim=1)
        loss = per_sample.mean()
        return LossOutput(loss=loss, regular=loss.detach(), boundary=None)


def _target_pass(
    net: nn.Module,
    record: DropoutMaskRecord,
    rows: slice | torch.Tensor,
    x_s: torch.Tensor,
    s: torch.Tensor,
    class_labels: torch.Tensor | None,
) -> torch.Tensor:
    """stopgrad f(x_s, s) on ``rows`` (a slice: views, no copies; or an index tensor), with the dropout masks
    those rows had in the graded pass."""
    with torch.no_grad(), no_forced_weight_norm(), replay_dropout_masks(record, rows):
        target = net(_rows(x_s, rows), _rows(s, rows), _rows(class_labels, rows))
    # ln(s)/4 noise embedding and fp16 passes can produce non-finite values; never let them into the loss.
    return torch.nan_to_num(target)


class ConsistencyLoss:
    """Stage-1 consistency training (ECT-style CT, paper eq. 4), or distillation with ``teacher_step`` (CD);
    the target is the student itself, no grad."""

    def __init__(self, time_dist, c: float, weighting: str, sigma_data: float = 0.5,
                 teacher_step: TeacherStep | None = None) -> None:
        _check_common(c, weighting, sigma_data)
        self.time_dist = time_dist
        self.c, self.weighting, self.sigma_data = float(c), weighting, float(sigma_data)
        self.teacher_step = teacher_step

    def earlier_point(self, images: torch.Tensor, noise: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                      s: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        """x_s: y + s·ε (CT, the same ε as x_t) or the teacher's PF-ODE step from (x_t, t) to s (CD)."""
        if self.teacher_step is None:
            return _noised(images, noise, s)
        return self.teacher_step(x_t, t, s, class_labels)

    def graded_pass(self, net: nn.Module, images: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
                    class_labels: torch.Tensor | None) -> tuple[torch.Tensor, DropoutMaskRecord, torch.Tensor]:
        """Draw ε, run the graded pass D_θ(x_t, t) recording its dropout masks, and give the earlier point x_s:
        (D_θ(x_t, t), the masks, x_s)."""
        noise = torch.randn_like(images)
        x_t = _noised(images, noise, t)
        with record_dropout_masks() as record:
            d_t = net(x_t, t, class_labels)
        return d_t, record, self.earlier_point(images, noise, x_t, t, s, class_labels)

    def per_sample(self, d_t: torch.Tensor, d_s: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """ω(t)/Δt-style weight times the pseudo-Huber distance, per sample (float64, like t and s)."""
        return loss_weight(self.weighting, t, t - s, self.sigma_data) * pseudo_huber(d_t, d_s, self.c)

    def __call__(
        self, net: nn.Module, images: torch.Tensor, class_labels: torch.Tensor | None = None, *, ratio: float
    ) -> LossOutput:
        _check_ratio(ratio)
        batch = images.shape[0]
        t = self.time_dist.sample(batch, device=images.device)
        s = earlier_time(t, ratio)
        d_t, record, x_s = self.graded_pass(net, images, t, s, class_labels)
        d_s = _target_pass(net, record, slice(0, batch), x_s, s, class_labels)
        loss = self.per_sample(d_t, d_s, t, s).mean()
        return LossOutput(loss=loss, regular=loss.detach(), boundary=None)


class TruncatedConsistencyLoss(ConsistencyLoss):
    """TCM Stage 2 (paper eqs. 5–11, Algorithm 1).

    - ``rho``: the boundary fraction. The training loop puts N_B = ⌊B·ρ⌋ samples of the GLOBAL batch at t = t'
      and hands each call its share as a :class:`BoundaryPlan`; called without a plan (standalone, tests), a
      call draws ⌊b·ρ⌋ of its own b samples with ``torch.randperm``. ρ = 0 means no boundary samples (Stage-1 CT
      restricted to [t', T]); training requires (0, 1).
    - Reduction: with ρ_B = N_B/B the call returns (1/b)·[Σ_regular ℓ/(1 − ρ_B) + w_b·Σ_boundary ℓ/ρ_B], i.e. its
      share of eq. 11 times the number of equal-sized calls, so the MEAN over the loop's calls is eq. 11 over the
      global batch whatever the world size and ``batch_gpu``.
    - ``time_dist``: ψ̄_t, supported on [t', T] (its ``t_min`` must be >= t_prime).
    - The graded student pass runs once on the full call batch (all times are >= t', so the student owns them all)
      while recording dropout masks. Each target f(x_s, s) is computed once, on its own sub-batch, by the owner
      of time s: the frozen Stage-1 net if s < t', else the student (no grad), replaying each sample's masks.
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
        c: float,
        weighting: str,
        sigma_data: float = 0.5,
        teacher_step: TeacherStep | None = None,
    ) -> None:
        super().__init__(time_dist, c, weighting, sigma_data, teacher_step)
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

    def own_plan(self, batch: int, device: torch.device) -> BoundaryPlan:
        """Standalone use: ⌊b·ρ⌋ boundary samples of this call's own batch, a random subset (global RNG)."""
        n_boundary = num_boundary(batch, self.rho)
        is_boundary = torch.zeros(batch, dtype=torch.bool, device=device)
        if n_boundary > 0:  # ρ = 0 draws nothing, so it reproduces Stage 1 draw for draw
            is_boundary[torch.randperm(batch, device=device)[:n_boundary]] = True
        return BoundaryPlan(is_boundary, n_boundary / batch)

    def targets(self, net, record, x_s, s, class_labels) -> torch.Tensor:
        """Each target f(x_s, s) once, on its own sub-batch, by the network that owns time s (frozen if s < t', else the
        student). A sub-batch that is the whole batch is passed as a slice (no copies)."""
        from_frozen = s < self.t_prime
        n_frozen = int(from_frozen.sum())
        if n_frozen in (0, len(s)):  # one owner: the whole batch
            owner = self.frozen if n_frozen else net
            return self._owned_pass(owner, net, record, slice(0, len(s)), x_s, s, class_labels)
        d_s = torch.empty_like(x_s)
        for owner, rows in ((net, (~from_frozen).nonzero().flatten()), (self.frozen, from_frozen.nonzero().flatten())):
            d_s.index_copy_(0, rows, self._owned_pass(owner, net, record, rows, x_s, s, class_labels))
        return d_s

    def _owned_pass(self, owner, net, record, rows, x_s, s, class_labels) -> torch.Tensor:
        """The frozen net runs in the student's train/eval mode (dropout masks line up), switched only if needed."""
        if owner is net or owner.training == net.training:
            return _target_pass(owner, record, rows, x_s, s, class_labels)
        was_training = owner.training
        owner.train(net.training)
        try:
            return _target_pass(owner, record, rows, x_s, s, class_labels)
        finally:
            owner.train(was_training)

    def __call__(
        self,
        net: nn.Module,
        images: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        *,
        ratio: float,
        boundary: BoundaryPlan | None = None,
    ) -> LossOutput:
        if net is self.frozen:
            raise ValueError("the student net must not be the frozen boundary net (pass a frozen copy)")
        _check_ratio(ratio)
        batch, device = images.shape[0], images.device
        # Same RNG order as ConsistencyLoss (times, then noise), so ρ = 0 reproduces Stage 1 draw for draw.
        t = self.time_dist.sample(batch, device=device)
        plan = boundary if boundary is not None else self.own_plan(batch, device)
        is_boundary = plan.is_boundary.to(device)
        t = torch.where(is_boundary, torch.full_like(t, self.t_prime), t)
        s = earlier_time(t, ratio)
        d_t, record, x_s = self.graded_pass(net, images, t, s, class_labels)
        per_sample = self.per_sample(d_t, self.targets(net, record, x_s, s, class_labels), t, s)
        in_boundary = is_boundary.to(per_sample.dtype)
        regular = (per_sample * (1.0 - in_boundary)).sum() / (batch * (1.0 - plan.fraction))
        boundary_loss = (per_sample * in_boundary).sum() / (batch * plan.fraction) if plan.fraction > 0 else (
            per_sample.sum() * 0.0)
        loss = regular + self.w_b * boundary_loss
        return LossOutput(loss=loss, regular=regular.detach(), boundary=boundary_loss.detach())
