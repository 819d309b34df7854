"""EDM preconditioning (Karras et al. 2022, Table 1), the parameterisation ECT and TCM train.

D(x, σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, c_noise(σ), labels), with

    c_skip  = σd² / (σ² + σd²)        -> 1 as σ -> 0 (the consistency boundary condition f(x, 0) = x)
    c_out   = σ·σd / √(σ² + σd²)      -> 0 as σ -> 0
    c_in    = 1 / √(σ² + σd²)         (unit-variance network input)
    c_noise = ln(σ) / 4
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def edm_coefficients(
    sigma: torch.Tensor | float, sigma_data: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(c_skip, c_out, c_in, c_noise)`` for noise level(s) ``sigma`` (same shape as ``sigma``)."""
    if sigma_data <= 0:
        raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
    sigma = torch.as_tensor(sigma)
    if not sigma.is_floating_point():
        sigma = sigma.to(torch.float32)
    var = sigma.square() + sigma_data**2
    c_skip = sigma_data**2 / var
    c_out = sigma * sigma_data / var.sqrt()
    c_in = var.rsqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


class Precond(nn.Module):
    """Wraps a backbone ``model(x, noise_labels, class_labels)`` into the EDM denoiser ``D(x, σ)``.

    The backbone is the attribute ``model``, so parameter names are ``model.<backbone names>`` as in EDM's
    ``EDMPrecond`` and ECT/TCM's ``ECMPrecond``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        img_resolution: int,
        img_channels: int,
        label_dim: int = 0,
        sigma_data: float = 0.5,
        arch: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if sigma_data <= 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        if label_dim < 0:
            raise ValueError(f"label_dim must be >= 0, got {label_dim}")
        self.model = model
        self.img_resolution = int(img_resolution)
        self.img_channels = int(img_channels)
        self.label_dim = int(label_dim)
        self.sigma_data = float(sigma_data)
        self.arch: dict[str, Any] = dict(arch) if arch is not None else {}

    def _labels(self, class_labels: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor | None:
        if self.label_dim == 0:
            return None
        if class_labels is None:
            return torch.zeros(batch, self.label_dim, device=device, dtype=torch.float32)
        class_labels = torch.as_tensor(class_labels, device=device)
        if not class_labels.is_floating_point():
            # Integer class indices -> one-hot rows.
            class_labels = nn.functional.one_hot(class_labels.reshape(-1).long(), self.label_dim)
        class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        if class_labels.shape[0] == 1 and batch > 1:
            class_labels = class_labels.expand(batch, -1)
        if class_labels.shape[0] != batch:
            raise ValueError(f"class_labels has {class_labels.shape[0]} rows for a batch of {batch}")
        return class_labels

    def forward(
        self, x: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = x.to(torch.float32)
        batch = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(batch)
        if sigma.numel() != batch:
            raise ValueError(f"sigma must be a scalar or have one value per sample ({batch}), got {sigma.numel()}")
        labels = self._labels(class_labels, batch, x.device)
        c_skip, c_out, c_in, c_noise = edm_coefficients(sigma, self.sigma_data)
        c_skip, c_out, c_in = (c.reshape(-1, 1, 1, 1) for c in (c_skip, c_out, c_in))
        f_x = self.model(c_in * x, c_noise.flatten(), labels)
        return c_skip * x + c_out * f_x.to(torch.float32)

    def extra_repr(self) -> str:
        return (
            f"img_resolution={self.img_resolution}, img_channels={self.img_channels}, "
            f"label_dim={self.label_dim}, sigma_data={self.sigma_data}"
        )
