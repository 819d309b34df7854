"""One training iteration: forward, backward and accumulate over the rank's chunks, clip once, step, EMA.

The randomness of every chunk comes from ``global_batch`` (world-size invariant). Non-finite policy: an iteration
whose loss or gradient norm is non-finite drops its update (optimiser and EMA) and is counted; the run aborts
after ``nonfinite_patience`` consecutive dropped iterations, or once ``nonfinite_patience`` were dropped and they
exceed ``nonfinite_max_share`` of the iterations run (``nonfinite: skip`` never aborts on the consecutive count);
at the last iteration the share alone decides, so no run finishes having dropped more than that share.
Weights that are non-finite right after an optimiser step abort at once: nothing of that step is ever written,
so the last saved state stays the last good one. fp16 overflow is left to the GradScaler.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from tcm_core.errors import NonFiniteTrainingError
from tcm_core.training.config import TRUNCATED_MODES
from tcm_core.training.distributed import sum_over_ranks
from tcm_core.training.global_batch import boundary_positions, chunk_plan, chunk_seed, chunk_slice
from tcm_core.training.optim import ema_beta, learning_rate, set_learning_rate, update_ema
from tcm_core.training.setup import Run


@dataclass
class StepStats:
    """What one iteration did (``iteration``: the global iteration it ended, k = iterations done)."""

    iteration: int
    loss: float
    regular: float
    boundary: float | None
    grad_norm: float
    lr: float  # as applied to the optimiser
    ratio: float | None  # curriculum ratio used
    ema_beta: float | None  # None when the update was dropped
    dropped: bool
    seconds: float
    cpu_seconds: float


def load_images(dataset, indices: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images in [-1, 1] (float32) and one-hot labels of a labelled set (None otherwise)."""
    images, labels = dataset.get_batch(indices)
    x = torch.from_numpy(images).to(device=device, dtype=torch.float32) / 127.5 - 1.0
    y = dataset.one_hot(labels)
    return x, (y.to(device) if y is not None else None)


def _loss_call(run: Run, images, labels, ratio: float | None, plan):
    if run.mode == "pretrain":
        return run.loss_fn(run.model, images, labels)
    if plan is not None:
        return run.loss_fn(run.model, images, labels, ratio=ratio, boundary=plan)
    return run.loss_fn(run.model, images, labels, ratio=ratio)


def accumulate_gradients(run: Run, indices: np.ndarray, ratio: float | None) -> torch.Tensor:
    """Backward over this rank's chunks; returns (loss, regular, boundary, non-finite count), summed over ranks."""
    iteration, cfg = run.iteration, run.cfg
    mask = boundary_positions(cfg.seed, iteration, cfg.batch, cfg.rho) if run.mode in TRUNCATED_MODES else None
    sums = torch.zeros(4, dtype=torch.float64, device=run.device)
    for local in range(run.chunks_per_rank):
        chunk = run.dist.rank * run.chunks_per_rank + local
        images, labels = load_images(run.dataset, indices[chunk_slice(chunk, run.chunk)], run.device)
        if int(getattr(run.net, "label_dim", 0)) == 0:
            labels = None  # an unconditional network ignores the data set's labels
        torch.manual_seed(chunk_seed(cfg.seed, iteration, chunk))
        plan = chunk_plan(mask, chunk, run.chunk) if mask is not None else None
        last = local == run.chunks_per_rank - 1
        sync = run.model.no_sync() if run.dist.world_size > 1 and not last else contextlib.nullcontext()
        with sync:
            with torch.autocast(run.device.type, dtype=run.autocast_dtype, enabled=run.autocast_dtype is not None):
                out = _loss_call(run, images, labels, ratio, plan)
            # the mean over all chunks of all ranks (DDP averages the ranks)
            run.scaler.scale(out.loss / run.chunks_per_rank).backward()
        boundary = out.boundary if out.boundary is not None else torch.zeros((), device=run.device)
        parts = torch.stack([out.loss.detach(), out.regular.detach(), boundary.detach()]).double()
        sums[:3] += parts / run.chunks_per_rank
        sums[3] += float(not torch.isfinite(parts).all())
    sums = sum_over_ranks(run.dist, sums)
    sums[:3] /= run.dist.world_size
    return sums


def clip_gradients(run: Run) -> float:
    """The total gradient norm before clipping (clipped to ``grad_clip`` when set); one pass."""
    if run.scaler.is_enabled():
        run.scaler.unscale_(run.optimizer)
    limit = run.cfg.grad_clip if run.cfg.grad_clip is not None else float("inf")
    return float(torch.nn.utils.clip_grad_norm_(run.net.parameters(), max_norm=limit))


def weights_finite(net: torch.nn.Module) -> bool:
    norms = torch._foreach_norm([p.detach() for p in net.parameters()])
    return bool(torch.isfinite(torch.stack(norms)).all()) if norms else True


def drop_update(run: Run, stats_loss: float, grad_norm: float) -> None:
    """Count a non-finite iteration; raise when the policy says the run is lost."""
    cfg = run.cfg
    run.nonfinite_skipped += 1
    run.consecutive_bad += 1
    run.optimizer.zero_grad(set_to_none=True)
    if run.scaler.is_enabled():
        run.scaler.update()
    in_a_row = cfg.nonfinite == "abort" and run.consecutive_bad >= cfg.nonfinite_patience
    if in_a_row:
        raise _lost(run, f"{run.consecutive_bad} consecutive", stats_loss, grad_norm)
    check_dropped_share(run, stats_loss, grad_norm)


def check_dropped_share(run: Run, stats_loss: float, grad_norm: float) -> None:
    """Raise when more than ``nonfinite_max_share`` of the iterations run were dropped, once at least
    ``nonfinite_patience`` were; at the run's last iteration the share alone decides (a finished run never
    dropped more than that share, however short it is)."""
    cfg, done, dropped = run.cfg, run.iteration + 1 - run.start_iteration, run.nonfinite_skipped
    needed = 1 if run.iteration + 1 == run.end_iteration else cfg.nonfinite_patience
    if dropped >= needed and dropped > cfg.nonfinite_max_share * done:
        raise _lost(run, f"{dropped} of {done} ({dropped / done:.0%})", stats_loss, grad_norm)


def _lost(run: Run, what: str, stats_loss: float, grad_norm: float) -> NonFiniteTrainingError:
    return NonFiniteTrainingError(
        f"non-finite loss or gradient norm in {what} iterations (last: global iteration {run.iteration + 1}, "
        f"loss {stats_loss}, grad norm {grad_norm})", "training", "no network was written (the last state file is "
        "the last good one); lower lr, set grad_clip, or set nonfinite=skip / raise nonfinite_patience")


def apply_update(run: Run, grad_norm: float) -> float | None:
    """Optimiser step, the non-finite weight check, then the EMA; returns the EMA decay used (None: no update)."""
    run.consecutive_bad = 0
    try:
        run.scaler.step(run.optimizer)  # with fp16, skipped by the scaler when the gradients overflowed
    except RuntimeError as error:  # Adam's scalar step size lr / (1 - beta1^k) past float32 (e.g. lr=1e38)
        if "overflow" not in str(error):
            raise
        raise NonFiniteTrainingError(f"the optimiser step of global iteration {run.iteration + 1} overflowed "
                                     f"({error})", "training", "lower lr; the last saved state is intact and "
                                     "nothing of this step was written") from None
    run.scaler.update()
    if not math.isfinite(grad_norm):
        return None
    if not weights_finite(run.net):
        raise NonFiniteTrainingError(f"the weights became non-finite in the optimiser step of global iteration "
                                     f"{run.iteration + 1}", "training", "lower lr or set grad_clip; the last "
                                     "saved state is intact and nothing of this step was written")
    beta = ema_beta(run.cfg, run.iteration + 1)
    update_ema(run.ema, run.net, beta)
    return beta


def train_step(run: Run, after_backward: Callable[[Run], None] | None = None) -> StepStats:
    """Run one iteration of ``run`` and advance its counter."""
    start, cpu_start = time.perf_counter(), time.process_time()
    indices = run.sampler.take(run.cfg.batch)
    lr, ratio = learning_rate(run.cfg, run.iteration), run.ratio(run.iteration)
    set_learning_rate(run.optimizer, lr)
    run.optimizer.zero_grad(set_to_none=True)
    sums = accumulate_gradients(run, indices, ratio)
    if after_backward is not None:
        after_backward(run)  # tests and debugging: gradients are in run.net's parameters
    grad_norm = clip_gradients(run)
    loss = sums[0].item()
    # fp16: non-finite gradients with a finite loss are the loss scaler's business (it skips and backs off)
    dropped = sums[3].item() > 0 or (not math.isfinite(grad_norm) and not run.scaler.is_enabled())
    beta = None
    if dropped:
        drop_update(run, loss, grad_norm)
    else:
        beta = apply_update(run, grad_norm)
        if run.nonfinite_skipped and run.iteration + 1 == run.end_iteration:
            check_dropped_share(run, loss, grad_norm)  # the share at the end, also when the last step was good
    run.iteration += 1
    boundary = sums[2].item() if run.mode in TRUNCATED_MODES else None
    return StepStats(run.iteration, loss, sums[1].item(), boundary, grad_norm, lr, ratio, beta, dropped,
                     time.perf_counter() - start, time.process_time() - cpu_start)
