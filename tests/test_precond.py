"""EDM preconditioning: coefficient formulas, boundary condition, sigma and label handling."""

import numpy as np
import pytest
import torch
from torch import nn

from tcm_core.precond import Precond, edm_coefficients


class _Recorder(nn.Module):
    """Backbone that returns a fixed random map of its input and remembers what it was called with."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(3.0))
        self.calls: list[tuple] = []

    def forward(self, x, noise_labels, class_labels):
        self.calls.append((x, noise_labels, class_labels))
        out = torch.sin(5 * x) * self.scale + noise_labels.reshape(-1, 1, 1, 1)
        if class_labels is not None:
            out = out + class_labels.argmax(dim=1).reshape(-1, 1, 1, 1).to(out.dtype)
        return out


def _precond(label_dim: int = 0, sigma_data: float = 0.5) -> Precond:
    return Precond(_Recorder(), img_resolution=4, img_channels=2, label_dim=label_dim, sigma_data=sigma_data)


@pytest.mark.parametrize("sigma_data", [0.5, 1.3])
def test_coefficients_match_numpy(sigma_data):
    sigma = np.array([0.002, 0.1, 0.5, 1.0, 7.0, 80.0])
    c_skip, c_out, c_in, c_noise = (c.numpy() for c in edm_coefficients(torch.tensor(sigma), sigma_data))
    sd2 = sigma_data**2
    np.testing.assert_allclose(c_skip, sd2 / (sigma**2 + sd2), rtol=1e-12)
    np.testing.assert_allclose(c_out, sigma * sigma_data / np.sqrt(sigma**2 + sd2), rtol=1e-12)
    np.testing.assert_allclose(c_in, 1 / np.sqrt(sigma**2 + sd2), rtol=1e-12)
    np.testing.assert_allclose(c_noise, np.log(sigma) / 4, rtol=1e-12)
    # c_out² + σd²·c_skip = σd²: the training target (y - c_skip x)/c_out has unit variance.
    np.testing.assert_allclose(c_out**2 + sd2 * c_skip, np.full_like(sigma, sd2), rtol=1e-12)


def test_coefficients_boundary_limits():
    c_skip, c_out, _, _ = edm_coefficients(torch.tensor([1e-6, 1e-9], dtype=torch.float64))
    assert torch.all(c_skip > 1 - 1e-11)
    assert torch.all(c_out < 1.01e-6)


def test_coefficients_float_and_bad_sigma_data():
    c_skip, *_ = edm_coefficients(0.5)
    assert c_skip.item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="sigma_data"):
        edm_coefficients(torch.tensor([1.0]), sigma_data=0.0)


def test_forward_is_the_edm_formula():
    net = _precond()
    x = torch.randn(3, 2, 4, 4)
    sigma = torch.tensor([0.01, 1.0, 50.0])
    out = net(x, sigma)
    c_skip, c_out, c_in, c_noise = edm_coefficients(sigma)
    xin, noise, labels = net.model.calls[-1]
    torch.testing.assert_close(xin, c_in.reshape(-1, 1, 1, 1) * x)
    torch.testing.assert_close(noise, c_noise)
    assert labels is None
    expected = c_skip.reshape(-1, 1, 1, 1) * x + c_out.reshape(-1, 1, 1, 1) * net.model(xin, noise, None)
    torch.testing.assert_close(out, expected)
    assert out.dtype == torch.float32


def test_boundary_condition_identity_at_small_sigma():
    net = _precond()
    x = torch.randn(5, 2, 4, 4)
    out = net(x, 1e-6)
    assert (out - x).abs().max().item() < 1e-4
    # ... and far from identity at a large sigma.
    assert (net(x, 10.0) - x).abs().max().item() > 0.1


def test_scalar_sigma_broadcasts():
    net = _precond()
    x = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(net(x, 0.7), net(x, torch.full((4,), 0.7)))
    assert net(x, 0.7).dtype == torch.float32
    with pytest.raises(ValueError, match="sigma"):
        net(x, torch.ones(3))


def test_class_labels_none_int_and_onehot():
    net = _precond(label_dim=5)
    x = torch.randn(3, 2, 4, 4)
    idx = torch.tensor([0, 4, 2])
    onehot = nn.functional.one_hot(idx, 5).float()
    torch.testing.assert_close(net(x, 1.0, idx), net(x, 1.0, onehot))
    net(x, 1.0)
    labels_none = net.model.calls[-1][2]
    torch.testing.assert_close(labels_none, torch.zeros(3, 5))
    assert not torch.allclose(net(x, 1.0, idx), net(x, 1.0))
    with pytest.raises(ValueError, match="rows"):
        net(x, 1.0, torch.tensor([1, 2]))


def test_precond_rejects_bad_arguments():
    with pytest.raises(ValueError, match="sigma_data"):
        _precond(sigma_data=-1.0)
    with pytest.raises(ValueError, match="label_dim"):
        _precond(label_dim=-2)
