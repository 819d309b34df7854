"""EDM, Stage-1 CT and Stage-2 TCM losses, checked against direct re-computations of the paper's formulas."""

import copy
import functools
import math

import numpy as np
import pytest
import torch
from training_helpers import perturbed_micro_net

from tcm_core.losses import (
    ConsistencyLoss,
    EDMDenoisingLoss,
    LossOutput,
    TruncatedConsistencyLoss,
    loss_weight,
    pseudo_huber,
)
from tcm_core.precond import edm_coefficients
from tcm_core.schedules import TruncatedLogNormal, TruncatedLogStudentT, curriculum_ratio, earlier_time

B = 8


small_net = functools.partial(perturbed_micro_net, dropout=0.0)


def images(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 1, 16, 16, generator=g) * 2 - 1


STAGE2_DIST = dict(mu=0.0, sigma=0.2, nu=0.01, t_min=1.0, t_max=80.0)
CT_KW = dict(c=0.0, weighting="inv_delta_t")
AT_CAP = 0.999  # the CIFAR curriculum cap


# ------------------------------------------------------------------------ distance and weights
def test_pseudo_huber_matches_numpy():
    x, y = torch.randn(4, 3, 5, 5, dtype=torch.float64), torch.randn(4, 3, 5, 5, dtype=torch.float64)
    d2 = ((x - y).numpy() ** 2).reshape(4, -1).sum(axis=1)
    np.testing.assert_allclose(pseudo_huber(x, y, 0.06).numpy(), np.sqrt(d2 + 0.06**2) - 0.06, rtol=1e-12)
    np.testing.assert_allclose(pseudo_huber(x, y, 0.0).numpy(), np.sqrt(d2), rtol=1e-12)
    assert pseudo_huber(x, y, 0.06).shape == (4,)
    with pytest.raises(ValueError, match="c must be >= 0"):
        pseudo_huber(x, y, -1.0)


def test_pseudo_huber_l2_has_finite_gradient_at_zero():
    x = torch.zeros(2, 3, requires_grad=True)
    pseudo_huber(x, torch.zeros(2, 3), 0.0).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_loss_weights():
    t = torch.tensor([0.01, 1.0, 80.0], dtype=torch.float64)
    dt = torch.tensor([0.001, 0.003, 0.08], dtype=torch.float64)
    torch.testing.assert_close(loss_weight("inv_delta_t", t, dt), 1 / dt)
    _, c_out, _, _ = edm_coefficients(t, 0.5)
    torch.testing.assert_close(loss_weight("inv_cout_sq", t, dt, sigma_data=0.5), 1 / c_out**2)
    torch.testing.assert_close(loss_weight("uniform", t, dt), torch.ones_like(t))
    with pytest.raises(ValueError, match="weighting"):
        loss_weight("cout", t, dt)


# ------------------------------------------------------------------------ EDM denoising
def test_edm_loss_recomputed():
    net = small_net().eval()
    y = images()
    torch.manual_seed(5)
    out = EDMDenoisingLoss(p_mean=-1.2, p_std=1.2)(net, y, None)
    torch.manual_seed(5)
    sigma = (torch.randn(B) * 1.2 - 1.2).exp()
    noise = torch.randn_like(y)
    with torch.no_grad():
        d = net(y + sigma[:, None, None, None] * noise, sigma)
    weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    expected = (weight * ((d - y) ** 2).mean(dim=(1, 2, 3))).mean()
    torch.testing.assert_close(out.loss.detach(), expected)
    assert out.boundary is None and not out.regular.requires_grad
    out.loss.backward()


# ------------------------------------------------------------------------ Stage 1
def test_consistency_loss_recomputed():
    net = small_net().eval()  # no dropout: the two passes are plain function calls
    dist = TruncatedLogNormal(-1.1, 2.0, 0.002, 80.0)
    loss_fn = ConsistencyLoss(dist, c=0.03, weighting="inv_delta_t")
    y = images()
    torch.manual_seed(7)
    ratio = curriculum_ratio(250, 2.0, 100, 0.999)
    assert ratio == 0.875
    out = loss_fn(net, y, None, ratio=ratio)
    torch.manual_seed(7)
    t = dist.sample(B)
    s = earlier_time(t, ratio)
    eps = torch.randn_like(y)
    with torch.no_grad():
        d_t = net(y + t[:, None, None, None] * eps, t)
        d_s = net(y + s[:, None, None, None] * eps, s)
    dist_ph = torch.sqrt(((d_t - d_s) ** 2).sum(dim=(1, 2, 3)) + 0.03**2) - 0.03
    torch.testing.assert_close(out.loss.detach(), (dist_ph / (t - s)).mean())
    assert out.boundary is None


def test_consistency_loss_replays_dropout_masks():
    net = small_net(dropout=0.3)
    dist = TruncatedLogNormal(0.0, 1.0, 0.5, 5.0)
    # ratio ≈ 1 − 1e-7: Δt is tiny, so D(x_t, t) and D(x_s, s) agree iff they saw the same dropout masks.
    loss_fn = ConsistencyLoss(dist, c=0.0, weighting="uniform")
    y = images()
    out = loss_fn(net, y, None, ratio=1 - 1e-7)
    t = torch.full((B,), 1.0)
    with torch.no_grad():  # control: two independent dropout draws at the same input differ clearly
        x = y + torch.randn_like(y)
        independent = pseudo_huber(net(x, t), net(x, t), 0.0).mean()
    assert independent > 1e-2
    assert out.loss.item() < 1e-3 * independent.item()


# ------------------------------------------------------------------------ Stage 2
class ForwardLog:
    """Forward hooks recording (batch size, sigma values) of every call of a Precond."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.calls: list[tuple[int, torch.Tensor]] = []
        self.handle = net.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        x, sigma = args[0], args[1]
        self.calls.append((x.shape[0], torch.as_tensor(sigma).detach().clone().reshape(-1)))


def stage2(frozen, t_prime=1.0, rho=0.25, w_b=0.1, dist=None, **overrides):
    kw = dict(CT_KW, **overrides)
    return TruncatedConsistencyLoss(frozen, t_prime, rho, w_b, dist or TruncatedLogStudentT(**STAGE2_DIST), **kw)


@pytest.mark.parametrize("t_prime_at_t_min", [False, True])
def test_stage2_with_rho_zero_equals_stage1(t_prime_at_t_min):
    student = small_net(dropout=0.2, seed=0)
    dist = TruncatedLogStudentT(**STAGE2_DIST)
    if t_prime_at_t_min:
        # t' = t_min: every target s < t' is the frozen net's; a bit-identical copy must reproduce Stage 1.
        frozen, t_prime = copy.deepcopy(student), dist.t_min
    else:
        # t' below every s (s >= 1e-6): the frozen net (a different one) is never asked.
        frozen, t_prime = small_net(dropout=0.2, seed=1), 1e-6
    y = images()
    kw = dict(CT_KW, c=0.01)
    torch.manual_seed(11)
    ratio = curriculum_ratio(5000, 2.0, 1000, 0.999)
    s1 = ConsistencyLoss(dist, **kw)(student, y, None, ratio=ratio)
    torch.manual_seed(11)
    s2 = TruncatedConsistencyLoss(frozen, t_prime, 0.0, 0.1, dist, **kw)(student, y, None, ratio=ratio)
    torch.testing.assert_close(s2.loss, s1.loss, rtol=1e-6, atol=0)
    assert s2.boundary.item() == 0.0


def test_stage2_matches_full_batch_blend_reference():
    """Against the official-style computation: both nets on the whole batch, blended by s < t'."""
    student, frozen = small_net(seed=0).eval(), small_net(seed=1).eval()
    dist = TruncatedLogStudentT(**STAGE2_DIST)
    loss_fn = stage2(frozen, t_prime=1.0, rho=0.25, w_b=0.1, dist=dist, c=0.02)
    y = images()
    torch.manual_seed(3)
    out = loss_fn(student, y, None, ratio=AT_CAP)
    torch.manual_seed(3)
    t = dist.sample(B)
    boundary = torch.randperm(B)[: B // 4]
    t[boundary] = 1.0
    eps = torch.randn_like(y)
    ratio = 0.999
    s = earlier_time(t, ratio)
    with torch.no_grad():
        d_t = student(y + t[:, None, None, None] * eps, t)
        x_s = y + s[:, None, None, None] * eps
        target = torch.where((s < 1.0)[:, None, None, None], frozen(x_s, s), student(x_s, s))
    per = (torch.sqrt(((d_t - target) ** 2).sum(dim=(1, 2, 3)) + 0.02**2) - 0.02) / (t - s)
    is_b = torch.zeros(B, dtype=torch.bool)
    is_b[boundary] = True
    # float64 sums of float32 network outputs (graded vs no-grad kernels may differ in the last float32 bits)
    close = dict(rtol=1e-5, atol=0)
    torch.testing.assert_close(out.regular, per[~is_b].mean(), **close)
    torch.testing.assert_close(out.boundary, per[is_b].mean(), **close)
    torch.testing.assert_close(out.loss.detach(), per[~is_b].mean() + 0.1 * per[is_b].mean(), **close)


def test_stage2_targets_computed_once_by_their_owner():
    student, frozen = small_net(seed=0), small_net(seed=1)
    log_s, log_f = ForwardLog(student), ForwardLog(frozen)
    loss_fn = stage2(frozen, t_prime=1.0, rho=0.25)
    torch.manual_seed(0)
    out = loss_fn(student, images(), None, ratio=AT_CAP)
    assert math.isfinite(out.loss.item())
    boundary_s = earlier_time(torch.tensor([1.0]), 0.999).item()  # t' − Δt(t') ≈ 0.99685
    assert boundary_s == pytest.approx(1.0 - 0.00315, abs=1e-5)
    # Student: one graded pass over the full batch, then one no-grad pass over its own targets (s >= t').
    assert len(log_s.calls) == 2 and log_s.calls[0][0] == B
    graded_sigma = log_s.calls[0][1]
    assert (graded_sigma == 1.0).sum() >= B // 4 and torch.all(graded_sigma >= 1.0)
    assert torch.all(log_s.calls[1][1] >= 1.0)
    # Frozen: exactly once, only on the sub-batch whose s < t' (all boundary samples at t' − Δt(t')).
    assert len(log_f.calls) == 1
    n_frozen, frozen_sigma = log_f.calls[0]
    assert torch.all(frozen_sigma < 1.0)
    assert (frozen_sigma.sub(boundary_s).abs() < 1e-6).sum() >= B // 4
    assert n_frozen + log_s.calls[1][0] == B


def test_stage2_replays_masks_in_both_target_nets():
    student = small_net(dropout=0.3, seed=0)
    frozen = copy.deepcopy(student)
    # Regular times near t' so that both nets own some targets; tiny Δt so D_t ≈ D_r iff masks match.
    dist = TruncatedLogNormal(0.0, 0.01, 1.0, 1.05)
    loss_fn = stage2(
        frozen, t_prime=1.0, rho=0.25, dist=dist, weighting="uniform"
    )
    log_s, log_f = ForwardLog(student), ForwardLog(frozen)
    torch.manual_seed(2)
    out = loss_fn(student, images(), None, ratio=1 - 1e-7)
    assert len(log_f.calls) == 1 and len(log_s.calls) == 2  # both nets produced targets
    with torch.no_grad():
        x = images() + torch.randn(B, 1, 16, 16)
        independent = pseudo_huber(student(x, 1.0), student(x, 1.0), 0.0).mean()
    assert independent > 1e-2
    assert out.regular.item() < 1e-3 * independent.item()
    assert out.boundary.item() < 1e-3 * independent.item()
    assert frozen.training  # the frozen net's mode is left as it was


def test_stage2_gradients_reach_only_the_student():
    student, frozen = small_net(dropout=0.1, seed=0), small_net(dropout=0.1, seed=1)
    loss_fn = stage2(frozen, rho=0.5)
    out = loss_fn(student, images(), None, ratio=AT_CAP)
    out.loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in frozen.parameters())
    grads = [p.grad for p in student.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    assert isinstance(out, LossOutput) and not out.regular.requires_grad and not out.boundary.requires_grad


def test_stage2_with_class_labels():
    student, frozen = small_net(seed=0, label_dim=3), small_net(seed=1, label_dim=3)
    out = stage2(frozen, rho=0.5)(student, images(), torch.arange(B) % 3, ratio=0.5)
    assert math.isfinite(out.loss.item())


@pytest.mark.parametrize(
    "kwargs,argument",
    [
        (dict(rho=1.0), "rho"),
        (dict(rho=-0.1), "rho"),
        (dict(w_b=-1.0), "w_b"),
        (dict(t_prime=0.0), "t_prime"),
        (dict(t_prime=80.0), "t_prime"),
        (dict(t_prime=2.0), "t_min"),
        (dict(c=-0.1), "c must be"),
        (dict(weighting="cout"), "weighting"),
    ],
)
def test_stage2_invalid_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        stage2(small_net(), **kwargs)


def test_stage2_batch_too_small_for_a_boundary_sample():
    loss_fn = stage2(small_net(seed=1), rho=0.25)
    with pytest.raises(ValueError, match="batch size 3"):
        loss_fn(small_net(), images()[:3], None, ratio=0.5)


def test_stage1_invalid_arguments():
    dist = TruncatedLogNormal(-1.1, 2.0, 0.002, 80.0)
    with pytest.raises(ValueError, match="weighting"):
        ConsistencyLoss(dist, **dict(CT_KW, weighting="nope"))
    with pytest.raises(ValueError, match="c must be"):
        ConsistencyLoss(dist, **dict(CT_KW, c=-1))


def test_stage2_refuses_the_frozen_net_as_student():
    frozen = small_net()
    with pytest.raises(ValueError, match="frozen"):
        stage2(frozen)(frozen, images(), None, ratio=0.5)
