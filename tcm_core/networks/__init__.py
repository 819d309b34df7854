"""Networks: DDPM++ SongUNet, EDM2 UNet and named presets (work in progress: builders land next)."""

from __future__ import annotations

from typing import Any

from torch import nn

from tcm_core.networks.dropout import MaskDropout, record_dropout_masks, replay_dropout_masks
from tcm_core.precond import Precond

__all__ = [
    "MaskDropout",
    "Precond",
    "arch_preset",
    "build_precond",
    "count_parameters",
    "record_dropout_masks",
    "replay_dropout_masks",
]


def count_parameters(module: nn.Module) -> int:
    """Number of parameter elements (works on the meta device)."""
    return sum(p.numel() for p in module.parameters())


def arch_preset(name: str, **overrides: Any) -> dict[str, Any]:
    raise NotImplementedError("arch_preset lands with the SongUNet/EDM2 backbones")


def build_precond(arch: dict[str, Any]) -> Precond:
    raise NotImplementedError("build_precond lands with the SongUNet/EDM2 backbones")
