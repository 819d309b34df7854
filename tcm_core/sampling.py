"""One-step and few-step generation with a consistency model (ECT/TCM sampler).

    x = f(t_0·z, t_0)                  t_0 = T = 80 (at T the data term of x_T = y + T·z is negligible)
    x = f(x + t_i·z_i, t_i)            for each further t_i (fresh noise z_i per step)

Two-step mid times used by the paper (App. E): t = (80, 1.0) on CIFAR-10 and (80, 1.526) on ImageNet-64.
Every step uses the same (student EMA) network; TCM never routes sampling to the Stage-1 model.

Seeding (``sample_batches``): image i of a run with seed k draws its latent, its class (if the net is
conditional and labels are random) and then its step noises from its own CPU generator seeded with
k·1_000_000 + i. Results are therefore identical for any batch size and device, and 1-step and 2-step samples
of the same seed share latent and class.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: config validation reads SEED_STRIDE without it
    import torch
    from torch import nn

SEED_STRIDE = 1_000_000  # images per seed set; seed sets k and k+1 never share a generator seed


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 as EDM quantises for FID: (x·127.5 + 128).clip(0, 255), truncated."""
    import torch

    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8)


def _check_steps(steps: Sequence[float]) -> list[float]:
    steps = [float(t) for t in steps]
    if not steps:
        raise ValueError("steps must hold at least one time (e.g. [80.0] for one-step generation)")
    if any(not t > 0 for t in steps):
        raise ValueError(f"steps must all be > 0, got {steps}")
    return steps


def generate(
    net: nn.Module,
    latents: torch.Tensor,
    steps: Sequence[float],
    class_labels: torch.Tensor | None = None,
    step_noise: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Consistency sampling from standard-normal ``latents`` (B, C, H, W); output in [-1, 1], unclipped.

    ``step_noise[i]`` is the noise added before step i+1 (default: ``torch.randn_like``). The net runs in eval
    mode under no_grad; its previous train/eval mode is restored afterwards.
    """
    import torch

    steps = _check_steps(steps)
    if step_noise is not None and len(step_noise) != len(steps) - 1:
        raise ValueError(f"step_noise must hold len(steps) - 1 = {len(steps) - 1} tensors, got {len(step_noise)}")
    batch = latents.shape[0]
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            sigma = torch.full((batch,), steps[0], device=latents.device, dtype=torch.float32)
            x = net(latents.to(torch.float32) * steps[0], sigma, class_labels)
            for i, t in enumerate(steps[1:]):
                z = torch.randn_like(x) if step_noise is None else step_noise[i].to(x.device, x.dtype)
                sigma = torch.full((batch,), t, device=x.device, dtype=torch.float32)
                x = net(x + t * z, sigma, class_labels)
    finally:
        net.train(was_training)
    return x


def _image_noise(
    index: int, seed: int, shape: tuple[int, ...], label_dim: int, random_label: bool, num_extra_steps: int
) -> tuple[torch.Tensor, int | None, list[torch.Tensor]]:
    import torch

    generator = torch.Generator().manual_seed(seed * SEED_STRIDE + index)
    latent = torch.randn(shape, generator=generator)
    label = int(torch.randint(label_dim, (1,), generator=generator)) if random_label else None
    noises = [torch.randn(shape, generator=generator) for _ in range(num_extra_steps)]
    return latent, label, noises


def sample_batches(
    net: nn.Module,
    num: int,
    seed: int,
    steps: Sequence[float],
    batch_size: int,
    device: torch.device | str,
    class_labels: str | int | Sequence[int] | torch.Tensor | None = "random",
) -> Iterator[torch.Tensor]:
    """Yield ``num`` generated images as uint8 (B, C, H, W) batches on ``device``.

    ``class_labels``: "random" (a uniform class per image if the net is conditional, else none), None (no labels),
    an int (that class for every image), or ``num`` class indices.
    """
    import torch

    steps = _check_steps(steps)
    if num < 0 or num > SEED_STRIDE:
        raise ValueError(f"num must be in [0, {SEED_STRIDE}], got {num}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    label_dim = int(getattr(net, "label_dim", 0))
    random_label = isinstance(class_labels, str)
    if random_label and class_labels != "random":
        raise ValueError(f"class_labels must be 'random', None, an int or a sequence, got {class_labels!r}")
    random_label = random_label and label_dim > 0
    fixed_labels: torch.Tensor | None = None
    if class_labels is not None and not isinstance(class_labels, str):
        if label_dim == 0:
            raise ValueError("class_labels were given but the network is unconditional (label_dim = 0)")
        fixed_labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        if fixed_labels.numel() == 1:
            fixed_labels = fixed_labels.expand(num)
        if fixed_labels.numel() != num:
            raise ValueError(f"class_labels must hold 1 or num = {num} labels, got {fixed_labels.numel()}")
        if fixed_labels.numel() and not (0 <= int(fixed_labels.min()) and int(fixed_labels.max()) < label_dim):
            raise ValueError(f"class_labels must lie in [0, {label_dim})")
    shape = (int(net.img_channels), int(net.img_resolution), int(net.img_resolution))
    device = torch.device(device)
    for start in range(0, num, batch_size):
        indices = range(start, min(num, start + batch_size))
        drawn = [_image_noise(i, seed, shape, label_dim, random_label, len(steps) - 1) for i in indices]
        latents = torch.stack([d[0] for d in drawn]).to(device)
        step_noise = [torch.stack([d[2][j] for d in drawn]).to(device) for j in range(len(steps) - 1)]
        if random_label:
            labels = torch.tensor([d[1] for d in drawn], dtype=torch.long, device=device)
        elif fixed_labels is not None:
            labels = fixed_labels[start : start + len(indices)].to(device)
        else:
            labels = None
        yield to_uint8(generate(net, latents, steps, labels, step_noise))
