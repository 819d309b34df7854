"""Consistency distillation (CD): the earlier point x_s of a consistency pair from one PF-ODE step of a teacher.

The teacher is a frozen diffusion network D(x, t) (EDM preconditioning, ``Precond``). Its probability-flow ODE
(Karras et al. 2022, with σ(t) = t; the paper's eq. 12 written with the denoiser, s_t(x) = (D(x, t) − x)/t²) is

    dx/dt = (x − D(x, t)) / t

and CD replaces consistency training's x_s = y + s·ε by one step of it from x_t = y + t·ε down to s < t
(paper App. C.2, eq. 15; Song et al. 2023):

    Euler:  x_s = x_t + (s − t)·d_t,                         d_t = (x_t − D(x_t, t)) / t
    Heun:   x_s = x_t + (s − t)·(d_t + d_s)/2,               d_s = (x̂_s − D(x̂_s, s)) / s,  x̂_s = the Euler x_s

(s = max(t − Δt, 1e-6) > 0, so the Heun correction never divides by 0.) The local error of one step is O(Δt²)
for Euler and O(Δt³) for Heun (``tests/test_distillation.py`` measures both on a Gaussian, where D and the ODE
have closed forms).

Classifier-free guidance (Ho & Salimans 2022) for a class-conditional teacher, with scale w:

    D_w(x, t, c) = D(x, t, ∅) + w·(D(x, t, c) − D(x, t, ∅))

(w = 1: the conditional teacher; w = 0: the unconditional one.) ∅ is the label vector of zeros, what EDM's
networks see for "no label" and what our SongUNet's label dropout feeds them at pretraining (``label_dropout``),
so a teacher pretrained with label dropout has learned D(x, t, ∅). ``guidance=None`` uses D(x, t, c) as it is
(for an unconditional teacher, D(x, t)).

The teacher runs in eval mode (no dropout), without autograd and with EDM2's forced weight normalisation off:
a teacher is a fixed function, and the ODE it defines must not change from one call to the next (dropout would
make every step a random one; a forced renormalisation would rewrite its weights). Note that the paper's eq. 14
calls the stop-gradient copy f_θ⁻ the "teacher"; here the teacher is the diffusion model whose ODE CD follows.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from tcm_core.networks import no_forced_weight_norm
from tcm_core.training.config import CHOICES, CONSISTENCY_MODES

ODE_SOLVERS = CHOICES["ode_solver"]


def _column(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, 1, 1, 1)


def label_rows(class_labels: torch.Tensor, label_dim: int) -> torch.Tensor:
    """Class labels as float rows (B, label_dim): integer indices become one-hot rows."""
    if class_labels.is_floating_point():
        return class_labels.reshape(-1, label_dim)
    return nn.functional.one_hot(class_labels.reshape(-1).long(), label_dim).to(torch.float32)


def guided_denoise(net: nn.Module, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None,
                   guidance: float) -> torch.Tensor:
    """D_w = D(x, t, ∅) + w·(D(x, t, c) − D(x, t, ∅)), both terms in one pass over the doubled batch."""
    label_dim = int(getattr(net, "label_dim", 0))
    if label_dim == 0 or class_labels is None:
        raise ValueError("classifier-free guidance needs a class-conditional teacher and the samples' labels")
    cond = label_rows(class_labels, label_dim)
    both = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, torch.zeros_like(cond)]))
    d_cond, d_uncond = both.chunk(2)
    return d_uncond + guidance * (d_cond - d_uncond)


class Teacher:
    """The frozen diffusion model of CD: ``denoise(x, t, labels)`` is D(x, t) or, with ``guidance`` w, D_w."""

    def __init__(self, net: nn.Module, guidance: float | None = None) -> None:
        if guidance is not None and not (math.isfinite(guidance) and guidance >= 0):
            raise ValueError(f"guidance must be a finite number >= 0 or None, got {guidance}")
        net.eval().requires_grad_(False)
        self.net, self.guidance = net, None if guidance is None else float(guidance)

    def denoise(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        if self.net.training:
            raise RuntimeError("the teacher must stay in eval mode (it was switched to train mode)")
        with torch.no_grad(), no_forced_weight_norm():
            if self.guidance is None:
                return self.net(x, t, class_labels)
            return guided_denoise(self.net, x, t, class_labels, self.guidance)


def ode_step(denoise: Any, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
             class_labels: torch.Tensor | None, solver: str) -> torch.Tensor:
    """One step of dx/dt = (x − D(x, t))/t from (x_t, t) to s (per sample), Euler or Heun (module docstring).

    ``denoise(x, t, labels)`` is the teacher's D. The step is formed in the precision of the times (float64 in
    training) and returned in the dtype of ``x_t``.
    """
    if solver not in ODE_SOLVERS:
        raise ValueError(f"ode_solver must be one of {ODE_SOLVERS}, got {solver!r}")
    t_col, s_col = _column(t), _column(s)
    d_t = (x_t - denoise(x_t, t, class_labels)) / t_col
    x_euler = x_t + (s_col - t_col) * d_t
    if solver == "euler":
        return x_euler.to(x_t.dtype)
    x_hat = x_euler.to(x_t.dtype)
    d_s = (x_hat - denoise(x_hat, s, class_labels)) / s_col
    return (x_t + (s_col - t_col) * 0.5 * (d_t + d_s)).to(x_t.dtype)


class TeacherStep:
    """x_s of CD: ``step(x_t, t, s, labels)`` = one ``solver`` step of the teacher's PF-ODE from t to s."""

    def __init__(self, teacher: Teacher, solver: str) -> None:
        if solver not in ODE_SOLVERS:
            raise ValueError(f"ode_solver must be one of {ODE_SOLVERS}, got {solver!r}")
        self.teacher, self.solver = teacher, solver

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
                 class_labels: torch.Tensor | None) -> torch.Tensor:
        return ode_step(self.teacher.denoise, x_t, t, s, class_labels, self.solver)


def method_params(mode: str | None, config: dict[str, Any] | None) -> dict[str, Any]:
    """``method``, ``ode_solver``, ``guidance`` of a training run (logged on every MLflow run, training and eval).

    A consistency run whose config has no ``method`` predates CD: "ct". Pretraining has none, and neither has a
    foreign checkpoint (no config): None for each.
    """
    config = config if isinstance(config, dict) else {}
    method = config.get("method")
    if method is None and mode in CONSISTENCY_MODES and config:
        method = "ct"
    return {"method": method, "ode_solver": config.get("ode_solver"), "guidance": config.get("guidance")}
