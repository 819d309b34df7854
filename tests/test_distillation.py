"""Consistency distillation against closed forms: a Gaussian data distribution y ~ N(μ, σ0²·I), where the EDM
denoiser is exact, D(x, t) = (σ0²·x + t²·μ)/(σ0² + t²), and the PF-ODE dx/dt = (x − D(x, t))/t has the exact
solution x(s) = μ + (x(t) − μ)·sqrt(σ0² + s²)/sqrt(σ0² + t²) (each trajectory shrinks towards μ). Every expected
number here comes from these two formulas, written out in numpy, never from the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from tcm_core.distillation import Teacher, TeacherStep, guided_denoise, method_params, ode_step
from tcm_core.losses import ConsistencyLoss
from tcm_core.schedules import TruncatedLogNormal

SIGMA0 = 0.7
MU = np.array([0.3, -0.2, 0.5, 0.1])  # one mean per pixel of a (1, 2, 2) image


def exact_flow(x_t: np.ndarray, t: np.ndarray, s: np.ndarray, mu: np.ndarray = MU) -> np.ndarray:
    """x(s) on the PF-ODE trajectory through x_t at time t (Gaussian data), per sample."""
    scale = np.sqrt(SIGMA0**2 + s**2) / np.sqrt(SIGMA0**2 + t**2)
    return mu + (x_t - mu) * scale.reshape(-1, 1)


class GaussianDenoiser(nn.Module):
    """The exact denoiser of N(μ_c, σ0²·I). With labels: μ_c = μ_∅ + labels·(M − μ_∅), so a one-hot row c gives
    M[c] and the zero row ∅ gives μ_∅. Works in the dtype of x (float64 here)."""

    def __init__(self, mu_null: np.ndarray, class_means: np.ndarray | None = None) -> None:
        super().__init__()
        self.mu_null = torch.as_tensor(mu_null, dtype=torch.float64)
        self.class_means = None if class_means is None else torch.as_tensor(class_means, dtype=torch.float64)
        self.label_dim = 0 if class_means is None else len(class_means)
        self.img_channels, self.img_resolution = 1, 2

    def forward(self, x, sigma, class_labels=None):
        mu = self.mu_null.expand(x.shape[0], -1)
        if self.class_means is not None and class_labels is not None:
            mu = mu + class_labels.to(torch.float64) @ (self.class_means - self.mu_null)
        mu = mu.reshape(x.shape).to(x.dtype)
        t2 = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1).square()
        return (SIGMA0**2 * x + t2 * mu) / (SIGMA0**2 + t2)


class GaussianConsistencyFunction(nn.Module):
    """The exact consistency function of N(μ, σ0²·I): f(x, t) = μ + (x − μ)·σ0/sqrt(σ0² + t²) (x(0) of the ODE)."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))  # a parameter, so the loss has something to grade
        self.mu = torch.as_tensor(MU, dtype=torch.float32).reshape(1, 1, 2, 2)

    def forward(self, x, sigma, class_labels=None):
        t = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, 1, 1, 1)
        return self.mu + (x.float() - self.mu) * SIGMA0 / torch.sqrt(SIGMA0**2 + t.square()) + 0 * self.unused


def gaussian_teacher() -> Teacher:
    return Teacher(GaussianDenoiser(MU))


def step_errors(solver: str, t: float, dt: float, n: int = 64, seed: int = 0) -> float:
    """max |x_s − x(s)| of one solver step of size dt from random x_t at time t (float64 throughout)."""
    rng = np.random.default_rng(seed)
    x_t = MU + rng.standard_normal((n, 4)) * math.sqrt(SIGMA0**2 + t**2)
    tt, ss = np.full(n, t), np.full(n, t - dt)
    got = ode_step(gaussian_teacher().denoise, torch.tensor(x_t.reshape(n, 1, 2, 2)), torch.tensor(tt),
                   torch.tensor(ss), None, solver)
    return float(np.abs(got.numpy().reshape(n, 4) - exact_flow(x_t, tt, ss)).max())


@pytest.mark.parametrize(("solver", "order"), [("euler", 2), ("heun", 3)])
@pytest.mark.parametrize("t", [0.5, 2.0])
def test_one_step_error_has_the_solvers_order_in_dt(solver, order, t):
    """Local error ~ C·Δt^(p+1): halving Δt divides it by 2^(p+1) (4 for Euler, 8 for Heun)."""
    dt = 0.1 * t
    big, small = step_errors(solver, t, dt), step_errors(solver, t, dt / 2)
    assert small > 0
    ratio = big / small
    print(f"{solver} t={t} dt={dt:g}: error {big:.3e}, dt/2: {small:.3e}, ratio {ratio:.2f}")
    assert 2**order * 0.85 < ratio < 2**order * 1.15
    # and the error is that of the step, not of anything else: it vanishes with the step
    assert step_errors(solver, t, 1e-4 * t) < 1e-7 * (1 if solver == "euler" else 1e-3)


def test_heun_beats_euler_at_the_same_step():
    for t in (0.3, 1.0, 5.0):
        assert step_errors("heun", t, 0.1 * t) < 0.25 * step_errors("euler", t, 0.1 * t)


def test_ode_step_refuses_an_unknown_solver():
    with pytest.raises(ValueError, match="euler"):
        ode_step(gaussian_teacher().denoise, torch.zeros(1, 1, 2, 2), torch.ones(1), torch.ones(1) / 2, None, "rk4")


# ------------------------------------------------------------------------------------------ CD targets


class InputRecorder:
    def __init__(self, net: nn.Module) -> None:
        self.calls: list[dict[str, torch.Tensor]] = []
        net.register_forward_hook(lambda m, args, out: self.calls.append(
            {"x": args[0].detach().double().clone(), "sigma": torch.as_tensor(args[1]).double().reshape(-1).clone(),
             "grad": torch.is_grad_enabled()}))


def cd_pair(solver: str | None, ratio: float, batch: int = 256, seed: int = 0):
    """(x_t, t, x_s, s, loss) of one ConsistencyLoss call with the exact consistency function as the student."""
    student = GaussianConsistencyFunction()
    recorder = InputRecorder(student)
    step = None if solver is None else TeacherStep(gaussian_teacher(), solver)
    loss_fn = ConsistencyLoss(TruncatedLogNormal(-1.1, 2.0, 0.002, 80.0), c=0.0, weighting="uniform",
                              teacher_step=step)
    rng = np.random.default_rng(seed)
    images = torch.tensor((MU + SIGMA0 * rng.standard_normal((batch, 4))).reshape(batch, 1, 2, 2),
                          dtype=torch.float32)
    torch.manual_seed(seed)
    out = loss_fn(student, images, None, ratio=ratio)
    graded, target = recorder.calls
    assert graded["grad"] and not target["grad"]
    return graded["x"].numpy().reshape(batch, 4), graded["sigma"].numpy(), target["x"].numpy().reshape(batch, 4), \
        target["sigma"].numpy(), out.loss.item()


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_cd_with_an_exact_teacher_puts_x_s_on_the_true_trajectory_of_x_t(solver):
    x_t, t, x_s, s, _ = cd_pair(solver, ratio=0.99)
    moved = np.abs(exact_flow(x_t, t, s) - x_t).max(axis=1)  # how far the true trajectory moves from t to s
    error = np.abs(x_s - exact_flow(x_t, t, s)).max(axis=1)
    relative = error / np.maximum(moved, 1e-6)
    print(f"{solver}: median error / movement {np.median(relative):.2e}, max {relative.max():.2e}")
    assert np.median(relative) < (0.05 if solver == "euler" else 1e-3)
    # CT's x_s = y + s·ε is no point of x_t's trajectory: same pairs, far larger errors
    x_t_ct, t_ct, x_s_ct, s_ct, _ = cd_pair(None, ratio=0.99)
    ct_relative = np.abs(x_s_ct - exact_flow(x_t_ct, t_ct, s_ct)).max(axis=1) / np.maximum(
        np.abs(exact_flow(x_t_ct, t_ct, s_ct) - x_t_ct).max(axis=1), 1e-6)
    assert np.median(ct_relative) > 10 * np.median(relative)


def test_cd_loss_of_the_exact_consistency_function_vanishes_with_the_step():
    """f(x_t, t) = f(x_s, s) on a trajectory: the CD (Heun) loss is the step error only, CT's is not small."""
    cd_coarse, cd_fine = cd_pair("heun", ratio=0.8)[-1], cd_pair("heun", ratio=0.99)[-1]
    ct = cd_pair(None, ratio=0.99)[-1]
    print(f"CD loss at ratio 0.8: {cd_coarse:.2e}, at 0.99: {cd_fine:.2e}; CT at 0.99: {ct:.2e}")
    assert cd_fine < cd_coarse / 100  # Δt 20x smaller, local error O(Δt³)
    assert cd_fine < 1e-3 * ct


# ------------------------------------------------------------------------------------------ guidance


CLASS_MEANS = np.array([[1.0, 0.0, -1.0, 0.5], [-0.5, 0.8, 0.2, -0.3], [0.0, -1.0, 0.4, 0.9]])


@pytest.mark.parametrize("w", [0.0, 1.0, 2.5])
def test_guidance_moves_the_gaussian_mean_by_w(w):
    """Gaussian teacher: D_w has the guided mean μ_∅ + w·(μ_c − μ_∅) in the exact denoiser formula."""
    teacher = Teacher(GaussianDenoiser(MU, CLASS_MEANS), guidance=w)
    rng = np.random.default_rng(1)
    x, t, c = rng.standard_normal((6, 4)) * 2, np.linspace(0.1, 5.0, 6), np.array([0, 1, 2, 2, 1, 0])
    got = teacher.denoise(torch.tensor(x.reshape(6, 1, 2, 2)), torch.tensor(t), torch.tensor(c)).numpy()
    mu = MU + w * (CLASS_MEANS[c] - MU)
    expected = (SIGMA0**2 * x + (t**2)[:, None] * mu) / (SIGMA0**2 + (t**2)[:, None])
    np.testing.assert_allclose(got.reshape(6, 4), expected, rtol=1e-12, atol=1e-12)


def conditional_unet(seed: int = 0) -> nn.Module:
    from tcm_core.networks import arch_preset, build_precond

    torch.manual_seed(seed)
    net = build_precond(arch_preset("tiny", model_channels=16, channel_mult=[1, 2], num_blocks=1,
                                    attn_resolutions=[], dropout=0.2, label_dim=3, label_dropout=0.1))
    with torch.no_grad():  # away from the zero-initialised output layer, so the labels change D
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net


def test_guidance_1_is_the_conditional_and_0_the_unconditional_teacher_network():
    net = conditional_unet()
    torch.manual_seed(2)
    x, t = torch.randn(5, 1, 16, 16) * 2, torch.tensor([0.1, 0.5, 1.0, 3.0, 20.0], dtype=torch.float64)
    labels = torch.tensor([0, 2, 1, 1, 0])
    one_hot = nn.functional.one_hot(labels, 3).float()
    net.eval()
    with torch.no_grad():
        conditional, unconditional = net(x, t, one_hot), net(x, t, torch.zeros(5, 3))
    assert (conditional - unconditional).abs().max() > 1e-3  # the labels matter to this network
    torch.testing.assert_close(Teacher(net, 1.0).denoise(x, t, labels), conditional, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(Teacher(net, 0.0).denoise(x, t, one_hot), unconditional, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(Teacher(net, None).denoise(x, t, one_hot), conditional, atol=0, rtol=0)


def test_guidance_needs_labels_and_a_conditional_teacher():
    with pytest.raises(ValueError, match="class-conditional"):
        guided_denoise(conditional_unet(), torch.zeros(2, 1, 16, 16), torch.ones(2), None, 2.0)
    with pytest.raises(ValueError, match="class-conditional"):
        guided_denoise(GaussianDenoiser(MU), torch.zeros(2, 1, 2, 2), torch.ones(2), torch.tensor([0, 1]), 2.0)
    with pytest.raises(ValueError, match="guidance"):
        Teacher(GaussianDenoiser(MU), guidance=-1.0)


# ------------------------------------------------------------------------------------------ the frozen teacher


def test_teacher_is_deterministic_frozen_and_never_graded():
    """Dropout 0.2 and label dropout 0.1 in the network: the teacher's D is still one fixed function."""
    net = conditional_unet(seed=3).train()
    teacher = Teacher(net, guidance=1.5)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    x, t, c = torch.randn(4, 1, 16, 16), torch.full((4,), 1.3, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    torch.manual_seed(0)
    first = teacher.denoise(x, t, c)
    torch.manual_seed(1)
    assert torch.equal(first, teacher.denoise(x, t, c)) and not first.requires_grad
    net.train()
    with pytest.raises(RuntimeError, match="eval mode"):
        teacher.denoise(x, t, c)


def test_cd_loss_backward_grades_the_student_only():
    student, teacher_net = conditional_unet(seed=4).train(), conditional_unet(seed=5)
    from tcm_core.networks import set_label_dropout

    set_label_dropout(student, 0.0)
    loss_fn = ConsistencyLoss(TruncatedLogNormal(-1.1, 2.0, 0.002, 80.0), c=1e-3, weighting="inv_delta_t",
                              teacher_step=TeacherStep(Teacher(teacher_net, 2.0), "heun"))
    torch.manual_seed(0)
    out = loss_fn(student, torch.rand(6, 1, 16, 16) * 2 - 1, torch.tensor([0, 1, 2, 0, 1, 2]), ratio=0.9)
    out.loss.backward()
    assert math.isfinite(out.loss.item()) and out.loss.item() > 0
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert all(p.grad is None for p in teacher_net.parameters())


def test_method_params_of_old_new_and_foreign_configs():
    assert method_params("stage2", {"method": "cd", "ode_solver": "euler", "guidance": 2.0}) == {
        "method": "cd", "ode_solver": "euler", "guidance": 2.0}
    assert method_params("stage1", {"lr": 1e-4})["method"] == "ct"  # a config from before CD existed
    assert method_params("pretrain", {"lr": 1e-4})["method"] is None
    assert method_params(None, None) == {"method": None, "ode_solver": None, "guidance": None}
