"""Optimiser, learning-rate schedule and weight EMA: pure functions of the config and the GLOBAL iteration.

    lr(it)   = lr_ref / sqrt(max(it / lr_decay_iters, 1))  (lr_decay_iters > 0)   EDM2's inverse square root
             · min(it / lr_rampup_iters, 1)                (lr_rampup_iters > 0)
    β_k      = ema_beta                                    (ema: constant)
             = (1 − 1/k)^(γ + 1)                           (ema: power; EDM2's power-function EMA)
    ema     <- β·ema + (1 − β)·θ                           after the update that ends global iteration k

``it`` is the number of iterations done before the update and ``k = it + 1``. The official TCM code counts both
from the global iteration (Stage 2 continues Stage 1's counter), so do we; see docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from tcm_core.training.config import TrainConfig


def build_optimizer(cfg: TrainConfig, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    kind = torch.optim.RAdam if cfg.optimizer == "radam" else torch.optim.Adam
    # foreach: one fused launch per op over all tensors (torch's default on CUDA; ~25 % faster steps on CPU)
    return kind(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=True)


def learning_rate(cfg: TrainConfig, iteration: int) -> float:
    """The learning rate of the update made at global iteration ``iteration`` (iterations done before it)."""
    lr = cfg.lr
    if cfg.lr_decay_iters > 0:
        lr /= math.sqrt(max(iteration / cfg.lr_decay_iters, 1.0))
    if cfg.lr_rampup_iters > 0:
        lr *= min(iteration / cfg.lr_rampup_iters, 1.0)
    return lr


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def ema_beta(cfg: TrainConfig, k: int) -> float:
    """EMA decay for the update that ends global iteration ``k`` (>= 1): constant, or (1 - 1/k)^(gamma + 1)."""
    if cfg.ema == "power":
        return (1.0 - 1.0 / k) ** (cfg.ema_gamma + 1.0)
    return cfg.ema_beta


@torch.no_grad()
def update_ema(ema: nn.Module, net: nn.Module, beta: float) -> None:
    """ema <- beta * ema + (1 - beta) * net for parameters; buffers are copied."""
    ema_params, net_params = list(ema.parameters()), [p.detach() for p in net.parameters()]
    if ema_params:
        torch._foreach_lerp_(ema_params, net_params, 1.0 - beta)  # one fused launch for all tensors
    for b_ema, b_net in zip(ema.buffers(), net.buffers()):
        b_ema.copy_(b_net)
