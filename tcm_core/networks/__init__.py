"""Networks: DDPM++ SongUNet, EDM2 UNet, named presets and the builder from an ``arch`` dict.

``arch`` is a JSON-serialisable dict shaped like EDM's Precond constructor kwargs::

    {"model_type": "SongUNet" | "EDM2UNet", "img_resolution", "img_channels", "label_dim",
     "sigma_data": 0.5, ...backbone kwargs (model_channels, channel_mult, num_blocks, dropout, ...)}

``build_precond(arch)`` returns a :class:`Precond` whose backbone is ``.model``; unknown keys raise
``ValueError``. It allocates through the current default device, so ``with torch.device("meta"):``
builds the 1.1 B-parameter EDM2-XL without memory.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
from collections.abc import Iterator
from typing import Any

from torch import nn

from tcm_core.networks.dropout import MaskDropout, record_dropout_masks, replay_dropout_masks
from tcm_core.networks.edm2 import EDM2UNet, no_forced_weight_norm
from tcm_core.networks.songunet import SongUNet
from tcm_core.precond import Precond

__all__ = [
    "PRESETS",
    "EDM2UNet",
    "MaskDropout",
    "Precond",
    "SongUNet",
    "arch_preset",
    "build_precond",
    "count_parameters",
    "no_forced_weight_norm",
    "record_dropout_masks",
    "replay_dropout_masks",
    "set_label_dropout",
]

PRESETS: dict[str, dict[str, Any]] = {
    # Small DDPM++ for 16x16 grey images (MNIST-5k): runs on CPU in CI.
    "tiny": {
        "model_type": "SongUNet",
        "img_resolution": 16,
        "img_channels": 1,
        "label_dim": 0,
        "sigma_data": 0.5,
        "augment_dim": 0,
        "model_channels": 32,
        "channel_mult": [1, 2, 2],
        "num_blocks": 2,
        "attn_resolutions": [8],
        "dropout": 0.1,
    },
    # DDPM++ CIFAR-10 as in EDM's train.py (unconditional, no augmentation labels); dropout 0.2 as ECT/TCM.
    "ddpmpp": {
        "model_type": "SongUNet",
        "img_resolution": 32,
        "img_channels": 3,
        "label_dim": 0,
        "sigma_data": 0.5,
        "augment_dim": 0,
        "model_channels": 128,
        "channel_mult": [2, 2, 2],
        "num_blocks": 4,
        "attn_resolutions": [16],
        "dropout": 0.2,
    },
    # EDM2 ImageNet-64 S / XL, class-conditional; dropout 0.4 at resolutions <= 16 (TCM).
    "edm2_s": {
        "model_type": "EDM2UNet",
        "img_resolution": 64,
        "img_channels": 3,
        "label_dim": 1000,
        "sigma_data": 0.5,
        "model_channels": 192,
        "channel_mult": [1, 2, 3, 4],
        "num_blocks": 3,
        "attn_resolutions": [16, 8],
        "dropout": 0.4,
        "dropout_resolutions": [16, 8, 4, 2, 1],
    },
}
PRESETS["edm2_xl"] = {**PRESETS["edm2_s"], "model_channels": 384}  # XL differs from S in width only

_BACKBONES: dict[str, type[nn.Module]] = {"SongUNet": SongUNet, "EDM2UNet": EDM2UNet}
_PRECOND_KEYS = {"model_type", "img_resolution", "img_channels", "label_dim", "sigma_data", "use_fp16"}
# Keys EDM pickles carry for SongUNet that select variants we do not build: accepted only at these values.
_SONGUNET_FIXED = {"embedding_type": "positional", "encoder_type": "standard", "decoder_type": "standard"}


class OverBudget(Exception):
    """A network under construction registered more tensors or elements than its budget."""


@contextlib.contextmanager
def registration_budget(max_tensors: int, max_numel: int) -> Iterator[None]:
    """Abort module construction (raise :class:`OverBudget`) as soon as the parameters and buffers registered
    exceed ``max_tensors`` tensors or ``max_numel`` elements: an absurd size (``num_blocks: 100000``) stops at
    once instead of building for minutes, even on the meta device."""
    from torch.nn.modules import module

    seen = [0, 0]

    def count(_module: Any, name: str, tensor: Any) -> None:
        if tensor is None:
            return
        seen[0] += 1
        seen[1] += tensor.numel()
        if seen[0] > max_tensors or seen[1] > max_numel:
            raise OverBudget(f"more than {max_tensors:,} tensors or {max_numel:,} weights")

    handles = [module.register_module_parameter_registration_hook(count),
               module.register_module_buffer_registration_hook(count)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def count_parameters(module: nn.Module) -> int:
    """Number of parameter elements (shared tensors counted once; works on the meta device)."""
    return sum(p.numel() for p in module.parameters())


def arch_preset(name: str, **overrides: Any) -> dict[str, Any]:
    """A copy of preset ``name`` ("tiny", "ddpmpp", "edm2_s", "edm2_xl") with ``overrides`` applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown arch preset {name!r}; choose one of {sorted(PRESETS)}")
    arch = copy.deepcopy(PRESETS[name])
    arch.update(copy.deepcopy(overrides))
    _backbone_kwargs(arch)  # validate keys now rather than at build time
    return arch


def _backbone_kwargs(arch: dict[str, Any]) -> dict[str, Any]:
    model_type = arch.get("model_type")
    if model_type not in _BACKBONES:
        raise ValueError(f"arch['model_type'] must be one of {sorted(_BACKBONES)}, got {model_type!r}")
    for key in ("img_resolution", "img_channels"):
        if key not in arch:
            raise ValueError(f"arch is missing required key {key!r}")
    backbone = _BACKBONES[model_type]
    params = inspect.signature(backbone.__init__).parameters
    io_keys = {"img_resolution", "in_channels", "out_channels", "img_channels", "label_dim", "self"}
    allowed = set(params) - io_keys
    kwargs: dict[str, Any] = {}
    for key, value in arch.items():
        if key in _PRECOND_KEYS:
            continue
        if model_type == "SongUNet" and key in _SONGUNET_FIXED:
            if value != _SONGUNET_FIXED[key]:
                raise ValueError(
                    f"arch[{key!r}] must be {_SONGUNET_FIXED[key]!r} (only DDPM++ is built), got {value!r}"
                )
            continue
        if key not in allowed:
            raise ValueError(f"unknown arch key {key!r} for {model_type}; allowed: {sorted(allowed | _PRECOND_KEYS)}")
        kwargs[key] = value
    return kwargs


def build_precond(arch: dict[str, Any]) -> Precond:
    """Build ``Precond(backbone)`` from an ``arch`` dict (see the module docstring); honours ``arch['dropout']``."""
    try:
        json.dumps(arch)
    except TypeError as err:
        raise ValueError(f"arch must be JSON-serialisable: {err}") from err
    kwargs = _backbone_kwargs(arch)
    res, channels = int(arch["img_resolution"]), int(arch["img_channels"])
    label_dim = int(arch.get("label_dim", 0))
    if arch["model_type"] == "SongUNet":
        model = SongUNet(res, channels, channels, label_dim=label_dim, **kwargs)
    else:
        model = EDM2UNet(res, channels, label_dim, **kwargs)
    return Precond(
        model,
        img_resolution=res,
        img_channels=channels,
        label_dim=label_dim,
        sigma_data=float(arch.get("sigma_data", 0.5)),
        arch=copy.deepcopy(arch),
    )


def set_label_dropout(net: Precond, probability: float) -> None:
    """Set the probability that the training pass replaces a sample's class label by ∅ (zeros), in the network
    and in its ``arch`` (so a saved file records what it was trained with). Only SongUNet implements it;
    an unconditional network has no label to drop (``probability`` must then be 0, as for EDM2)."""
    backbone = net.model
    if int(net.label_dim) == 0 or not isinstance(backbone, SongUNet):
        if probability > 0:
            raise ValueError(f"label dropout needs a class-conditional SongUNet (label_dim {net.label_dim}, "
                             f"{type(backbone).__name__})")
        return
    if not 0 <= probability < 1:
        raise ValueError(f"label dropout must be in [0, 1), got {probability}")
    backbone.label_dropout = float(probability)
    if probability > 0 or "label_dropout" in net.arch:  # an arch without the key already means 0
        net.arch["label_dropout"] = float(probability)
