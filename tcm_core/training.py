"""The one training loop for every mode: pretrain, stage1, stage1_continued, stage2, stage3.

Every mode starts from a checkpoint (``--init``; pretrain may start from a fresh network built from
``arch``) and continues the GLOBAL iteration counter stored in it (``meta["iteration"]``, 0 for foreign
checkpoints; stage1 always starts at 0, since its init is a diffusion model): the Δt curriculum, the LR
decay and the power-EMA count all use the global iteration, as the official code does with ``--resume_tick``.
``iterations`` more iterations are run.

* pretrain: EDM denoising loss.  stage1 / stage1_continued: consistency training (Stage 1; the control
  continues Stage 1 from the Stage-1 EMA for as long as Stage 2 runs).  stage2 / stage3: truncated
  consistency training; the frozen boundary model (``--boundary-model``: the Stage-1 EMA for stage2, the
  Stage-2 result for stage3) has ``requires_grad=False``, stays in train mode (dropout active, as in the
  official code) and always runs with EDM2 forced weight normalisation off and without autograd.
* The EMA of the weights is what is saved (``RUN_DIR/network.safetensors`` + ``.json``).

Randomness and multi-GPU: the global batch of ``batch`` samples is cut into chunks of ``batch_gpu``
samples (one loss call each; a rank accumulates the gradients of its chunks). The data indices of the
whole global batch come from ONE seeded sampler that every rank advances identically, and chunk ``g`` of
iteration ``i`` reseeds torch's global RNG with ``hash(seed, i, g)`` before its loss call, so its times,
noise, boundary indices and dropout masks depend only on (seed, i, g). Rank ``r`` of ``W`` handles chunks
``r*n .. (r+1)*n - 1``. A run is therefore the same (up to float summation order) for any world size with
the same ``batch`` and ``batch_gpu``, and resuming needs no RNG state (it is saved anyway). Only rank 0
writes files and metrics.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tcm_core.train_config import (
    CONSISTENCY_MODES,
    MODES,
    TRUNCATED_MODES,
    TrainConfig,
    batch_split,
    build_config,
    resolve_config,
    validate_config,
)
from tcm_core.train_state import load_latest_state, save_state, tensors_finite

log = logging.getLogger(__name__)

# keys that may change between an interrupted attempt and its resumption (observability, run length)
_RESUME_FREE_KEYS = {"iterations", "log_every", "state_every", "eval_every", "grid_every", "eval_num", "eval_mid_t",
                     "eval_dfid_ts", "grid_num", "nonfinite", "nonfinite_patience"}


class NonFiniteError(RuntimeError):
    """Training produced non-finite losses or gradients for too many consecutive iterations."""


# ----------------------------------------------------------------------------------------------------------
# Schedules (pure functions of the global iteration)


def learning_rate(cfg: TrainConfig, iteration: int) -> float:
    """ref_lr / sqrt(max(it / decay, 1)) (decay > 0) times min(it / rampup, 1) (rampup > 0); it = iterations done."""
    lr = cfg.lr
    if cfg.lr_decay_iters > 0:
        lr /= math.sqrt(max(iteration / cfg.lr_decay_iters, 1.0))
    if cfg.lr_rampup_iters > 0:
        lr *= min(iteration / cfg.lr_rampup_iters, 1.0)
    return lr


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


def chunk_seed(seed: int, iteration: int, chunk: int) -> int:
    """Seed of the randomness of chunk ``chunk`` of global iteration ``iteration`` (independent of world size)."""
    words = np.random.SeedSequence([seed, iteration, chunk]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31 | int(words[1])) & ((1 << 63) - 1)


# ----------------------------------------------------------------------------------------------------------
# Process group and devices


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialised: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> Distributed:
    """Join the torchrun process group when WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        # periodic evaluation runs on rank 0 only; the others wait at the next collective
        dist.init_process_group(backend=backend, timeout=timedelta(hours=2))
    return Distributed(rank, world_size, local_rank, initialised=True)


def pick_device(requested: str) -> str:
    if requested not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device must be one of auto, cpu, cuda, got {requested!r}")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but CUDA is not available")
    return requested


def check_precision(cfg: TrainConfig, device_kind: str) -> None:
    if device_kind != "cuda" and cfg.precision != "fp32":
        raise ValueError(f"config key 'precision' must be fp32 on {device_kind} (bf16/fp16 autocast is CUDA only), "
                         f"got {cfg.precision!r}")


# ----------------------------------------------------------------------------------------------------------
# Networks, losses, data


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _arch_overrides(cfg: TrainConfig) -> dict[str, Any] | None:
    return None if cfg.dropout is None else {"dropout": cfg.dropout}


def build_initial_network(cfg: TrainConfig, mode: str, init: str | Path | None, dataset: Any,
                          device: str | torch.device) -> tuple[nn.Module, int, str | None]:
    """(network, start iteration, init sha256) from ``init`` or, for pretrain without init, from ``cfg.arch``."""
    if init:
        from tcm_core.checkpoints import load_network

        net, meta = load_network(Path(init), device, _arch_overrides(cfg))
        # Stage 1 starts consistency training from a diffusion model: its counter (Δt curriculum, LR decay,
        # power EMA) starts at 0 as the official code's does from an EDM pickle, even when the init is our
        # own pretraining run (whose denoising iterations are no CT progress). Later stages continue it.
        start = 0 if mode == "stage1" else int(meta.get("iteration") or 0)
        return net, start, meta.get("sha256")
    if mode != "pretrain":
        raise ValueError(f"mode {mode} needs --init (a checkpoint to start from)")
    if not cfg.arch:
        raise ValueError("config key 'arch' must be set to train from scratch (pretrain without --init), "
                         "e.g. arch={preset: tiny, dropout: 0.1}")
    from tcm_core.networks import arch_preset, build_precond

    spec = dict(cfg.arch)
    spec.setdefault("img_resolution", dataset.resolution)
    spec.setdefault("img_channels", dataset.channels)
    if cfg.dropout is not None:
        spec["dropout"] = cfg.dropout
    arch = arch_preset(spec.pop("preset"), **spec) if "preset" in spec else spec
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        net = build_precond(arch)
    return net.to(device), 0, None


def freeze_boundary_model(model: nn.Module) -> nn.Module:
    """Frozen boundary model: no grads, train mode (dropout as official), no autograd, forced weight norm off."""
    from tcm_core.networks import no_forced_weight_norm

    model.requires_grad_(False)
    model.train()
    inner_forward = model.forward

    def frozen_forward(*args: Any, **kwargs: Any) -> Any:
        with torch.no_grad(), no_forced_weight_norm():
            return inner_forward(*args, **kwargs)

    model.forward = frozen_forward  # instance attribute: nn.Module.__call__ picks it up
    return model


def build_time_distribution(cfg: TrainConfig, lower: float) -> Any:
    from tcm_core.schedules import TruncatedLogNormal, TruncatedLogStudentT

    if cfg.time_dist == "student_t":
        return TruncatedLogStudentT(cfg.mu, cfg.sigma, cfg.nu, lower, cfg.t_max)
    return TruncatedLogNormal(cfg.p_mean, cfg.p_std, lower, cfg.t_max)


def build_loss(cfg: TrainConfig, mode: str, sigma_data: float, frozen: nn.Module | None) -> Callable[..., Any]:
    from tcm_core import losses

    if mode == "pretrain":
        return losses.EDMDenoisingLoss(p_mean=cfg.p_mean, p_std=cfg.p_std, sigma_data=sigma_data)
    common = dict(q=cfg.q, ratio_limit=cfg.ratio_limit, double_iters=cfg.double_iters, c=cfg.c,
                  weighting=cfg.weighting, sigma_data=sigma_data)
    if mode in TRUNCATED_MODES:
        return losses.TruncatedConsistencyLoss(frozen=frozen, t_prime=cfg.t_prime, rho=cfg.rho, w_b=cfg.w_b,
                                               time_dist=build_time_distribution(cfg, cfg.t_prime), **common)
    return losses.ConsistencyLoss(time_dist=build_time_distribution(cfg, cfg.t_min), **common)


def build_optimizer(cfg: TrainConfig, params: Iterator[nn.Parameter]) -> torch.optim.Optimizer:
    kind = torch.optim.RAdam if cfg.optimizer == "radam" else torch.optim.Adam
    return kind(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def load_images(dataset: Any, indices: np.ndarray, device: str | torch.device
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images in [-1, 1] (float32) and one-hot labels of a labelled set (None otherwise)."""
    images, labels = dataset.get_batch(indices)
    x = torch.from_numpy(images).to(device=device, dtype=torch.float32) / 127.5 - 1.0
    y = dataset.one_hot(labels)
    return x, (y.to(device) if y is not None else None)


# ----------------------------------------------------------------------------------------------------------
# Output helpers


def write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def open_run_tracker(run_dir: Path, mode: str, resume_step: int | None, mlflow_uri: str | None,
                     mlflow_parent: str | None, run_key: str | None) -> Any:
    from tcm_core import tracking

    if hasattr(tracking, "open_tracker"):
        tags = {"tcm.stage": mode}
        if run_key:
            tags["tcm.run_key"] = run_key
        return tracking.open_tracker(run_dir, mlflow_uri=mlflow_uri, parent=Path(mlflow_parent) if mlflow_parent
                                     else None, run_key=run_key, tags=tags, resume_step=resume_step)
    if mlflow_uri:
        log.warning("tcm_core.tracking.open_tracker is not available: metrics go to metrics.jsonl only")
    return tracking.JsonlTracker(run_dir, resume_step=resume_step)


# ----------------------------------------------------------------------------------------------------------
# The loop


@dataclass
class StepContext:
    """Handed to ``after_backward`` hooks (debugging, tests): gradients are in ``net``'s parameters."""

    iteration: int  # global iteration being run (0-based: iterations done before this one)
    net: nn.Module  # the trained network (unwrapped from DDP)
    ema: nn.Module
    frozen: nn.Module | None


@dataclass
class TrainResult:
    start_iteration: int
    end_iteration: int
    resumed_from: int | None
    nonfinite_skipped: int
    seconds_per_iteration: float | None
    network: Path | None
    iteration_seconds: list[float] = dataclasses.field(default_factory=list)  # wall time of each iteration run
    iteration_cpu_seconds: list[float] = dataclasses.field(default_factory=list)  # this process's CPU time


@dataclass
class _LogWindow:
    sums: dict[str, float] = dataclasses.field(default_factory=dict)
    count: int = 0

    def add(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.count += 1

    def means(self) -> dict[str, float]:
        return {k: v / self.count for k, v in self.sums.items()} if self.count else {}


def train(cfg: TrainConfig, *, mode: str, data: str | Path, out: str | Path, init: str | Path | None = None,
          boundary_model: str | Path | None = None, state_dir: str | Path | None = None, device: str = "auto",
          mlflow_uri: str | None = None, mlflow_parent: str | None = None, run_key: str | None = None,
          eval_ref_stats: str | None = None, eval_extractor: str | None = None, eval_feature_net: str | None = None,
          after_backward: Callable[[StepContext], None] | None = None, progress: bool = True) -> TrainResult:
    """Run ``cfg.iterations`` iterations of ``mode`` (resuming from ``state_dir`` when a state exists)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode in TRUNCATED_MODES and not boundary_model:
        raise ValueError(f"mode {mode} needs --boundary-model (the frozen model used below t_prime)")
    if mode != "pretrain" and not init:
        raise ValueError(f"mode {mode} needs --init (a checkpoint to start from)")
    for label, path in (("--init", init), ("--boundary-model", boundary_model), ("--data", data)):
        if path and not Path(path).exists():
            raise FileNotFoundError(f"{label} {path} does not exist")
    device_kind = pick_device(device)
    check_precision(cfg, device_kind)
    dist_info = init_distributed(device_kind)
    validate_config(cfg, mode, dist_info.world_size)
    chunk, chunks_per_rank = batch_split(cfg, mode, dist_info.world_size)
    dev = torch.device(f"cuda:{dist_info.local_rank}" if device_kind == "cuda" else "cpu")
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # CUDA lacks deterministic kernels for some ops the losses use (index_copy_): warn there, not fail
        torch.use_deterministic_algorithms(True, warn_only=device_kind == "cuda")
        torch.backends.cudnn.benchmark = False
    if device_kind == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32

    out_dir = Path(out)
    state_folder = Path(state_dir) if state_dir else out_dir / "_state"
    if dist_info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)

    from tcm_core.data import InfiniteSampler, open_dataset

    dataset = open_dataset(data)
    net, start_iteration, init_sha = build_initial_network(cfg, mode, init, dataset, dev)
    if net.img_resolution != dataset.resolution or net.img_channels != dataset.channels:
        raise ValueError(f"network is {net.img_channels}x{net.img_resolution}x{net.img_resolution} but the data "
                         f"{data} is {dataset.channels}x{dataset.resolution}x{dataset.resolution}")
    net.train().requires_grad_(True)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    frozen, boundary_sha = None, None
    if mode in TRUNCATED_MODES:
        from tcm_core.checkpoints import load_network

        frozen, frozen_meta = load_network(Path(boundary_model), dev, _arch_overrides(cfg))
        frozen, boundary_sha = freeze_boundary_model(frozen), frozen_meta.get("sha256")
    loss_fn = build_loss(cfg, mode, float(getattr(net, "sigma_data", 0.5)), frozen)
    optimizer = build_optimizer(cfg, net.parameters())
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16")
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    end_iteration = start_iteration + cfg.iterations
    cfg_dict = cfg.to_dict()

    # ---- resume
    iteration, sampler_position, nonfinite_skipped, consecutive_bad = start_iteration, 0, 0, 0
    window = _LogWindow()
    resumed_from = None
    state = load_latest_state(state_folder)
    if state is not None:
        _check_resumable(state, cfg_dict, mode, start_iteration, state_folder)
        net.load_state_dict(state["net"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        if device_kind == "cuda" and state.get("rng_cuda") is not None and dist_info.world_size == 1:
            torch.cuda.set_rng_state(state["rng_cuda"], dev)
        iteration = resumed_from = int(state["iteration"])
        sampler_position = int(state["sampler_position"])
        nonfinite_skipped = int(state.get("nonfinite_skipped", 0))
        consecutive_bad = int(state.get("consecutive_bad", 0))
        window = _LogWindow(dict(state.get("log_sums", {})), int(state.get("log_count", 0)))
        del state
    if dist_info.world_size > 1:
        import torch.distributed as dist

        # every rank reads the state itself: they must all have found the same one (shared filesystem)
        found: list[Any] = [None] * dist_info.world_size
        dist.all_gather_object(found, resumed_from)
        if len(set(found)) != 1:
            raise RuntimeError(f"ranks resumed from different iterations {found}: --state-dir {state_folder} must "
                               "be on a filesystem shared by all nodes")
    # one global stream of indices, advanced identically on every rank (see the module docstring)
    sampler = InfiniteSampler(len(dataset), seed=cfg.seed, rank=0, num_replicas=1, start=sampler_position)
    label_dim = int(getattr(net, "label_dim", 0))

    model: nn.Module = net
    if dist_info.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        # broadcast_buffers=False (as ECT/TCM): a buffer broadcast is a collective on EVERY forward, and the
        # number of no-grad student target passes differs between ranks (zero when all of a rank's r < t').
        # Our buffers are constants (resampling filters, Fourier frequencies), identical on all ranks.
        model = DistributedDataParallel(net, device_ids=[dev.index] if device_kind == "cuda" else None,
                                        broadcast_buffers=False)

    # ---- outputs (rank 0)
    tracker = evaluator = None
    if dist_info.is_main:
        init_sha = init_sha or (file_sha256(init) if init else None)
        boundary_sha = boundary_sha or (file_sha256(boundary_model) if boundary_model else None)
        run_info = {"mode": mode, "start_iteration": start_iteration, "end_iteration": end_iteration,
                    "init": str(init) if init else None, "init_sha256": init_sha,
                    "boundary_model": str(boundary_model) if boundary_model else None,
                    "boundary_sha256": boundary_sha, "data": str(data), "world_size": dist_info.world_size,
                    "batch_gpu_resolved": chunk, "arch": getattr(net, "arch", None)}
        write_json_atomic(out_dir / "config.json", {**cfg_dict, **run_info})
        tracker = open_run_tracker(out_dir, mode, resumed_from, mlflow_uri, mlflow_parent, run_key)
        if resumed_from is None:
            tracker.log_params({**cfg_dict, **{k: v for k, v in run_info.items() if k != "arch"}})
        if eval_ref_stats:
            from tcm_core.evaluation import make_periodic_evaluator

            evaluator = make_periodic_evaluator(
                extractor=eval_extractor or "lenet", ref_stats=Path(eval_ref_stats),
                feature_net=Path(eval_feature_net) if eval_feature_net else None, data=Path(data),
                num=cfg.eval_num, mid_t=cfg.eval_mid_t, dfid_ts=tuple(cfg.eval_dfid_ts), device=dev)

    def periodic_outputs(at: int, force: bool = False) -> None:
        if not dist_info.is_main:
            return
        if cfg.grid_every and (force or at % cfg.grid_every == 0):
            _write_grids(ema, cfg, out_dir, at, dev)
        if evaluator is not None and (force or (cfg.eval_every and at % cfg.eval_every == 0)):
            with torch.random.fork_rng(devices=[dev] if device_kind == "cuda" else []):
                metrics = evaluator(ema, at)
            tracker.log_metrics({k: float(v) for k, v in metrics.items()}, step=at)

    def write_state() -> None:
        if not dist_info.is_main:
            return
        save_state(state_folder, {
            "net": net.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else {}, "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(dev) if device_kind == "cuda" else None,
            "iteration": iteration, "sampler_position": sampler_position, "nonfinite_skipped": nonfinite_skipped,
            "consecutive_bad": consecutive_bad, "log_sums": dict(window.sums), "log_count": window.count,
            "config": cfg_dict, "mode": mode, "start_iteration": start_iteration})

    if resumed_from is None and mode in ("stage1_continued", "stage2", "stage3"):
        periodic_outputs(iteration, force=True)  # curves start at the stage's first iteration

    bar = _progress_bar(end_iteration - start_iteration, iteration - start_iteration,
                        enabled=progress and dist_info.is_main)
    status = "FAILED"
    seconds_start, iteration_seconds, iteration_cpu_seconds = time.perf_counter(), [], []
    try:
        while iteration < end_iteration:
            iteration_start, iteration_cpu_start = time.perf_counter(), time.process_time()
            indices = sampler.take(cfg.batch)
            sampler_position = sampler.position
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg, iteration)
            optimizer.zero_grad(set_to_none=True)
            sums = torch.zeros(4, dtype=torch.float64, device=dev)  # loss, regular, boundary, any non-finite
            ratio = None
            for local in range(chunks_per_rank):
                global_chunk = dist_info.rank * chunks_per_rank + local
                images, labels = load_images(dataset, indices[global_chunk * chunk:(global_chunk + 1) * chunk], dev)
                if label_dim == 0:
                    labels = None  # an unconditional network ignores the data set's labels
                torch.manual_seed(chunk_seed(cfg.seed, iteration, global_chunk))
                sync = (model.no_sync() if dist_info.world_size > 1 and local < chunks_per_rank - 1
                        else contextlib.nullcontext())
                with sync:
                    with torch.autocast(device_kind, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                        result = loss_fn(model, images, labels, iteration=iteration)
                    scaler.scale(result.loss / chunks_per_rank).backward()
                boundary = result.boundary if result.boundary is not None else torch.zeros((), device=dev)
                parts = torch.stack([result.loss.detach(), result.regular.detach(), boundary.detach()]).double()
                sums[:3] += parts / chunks_per_rank
                sums[3] += float(not torch.isfinite(parts).all())
                ratio = result.ratio
            if dist_info.world_size > 1:
                import torch.distributed as dist

                dist.all_reduce(sums)
                sums[:3] /= dist_info.world_size
            if scaler.is_enabled():
                scaler.unscale_(optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(
                net.parameters(), max_norm=cfg.grad_clip if cfg.grad_clip is not None else float("inf")))
            if after_backward is not None:
                after_backward(StepContext(iteration, net, ema, frozen))
                grad_norm = float(torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm=float("inf")))
            loss_finite = sums[3].item() == 0
            # fp16: non-finite gradients with a finite loss are the loss scaler's business (it skips and backs off)
            bad = not loss_finite or (not math.isfinite(grad_norm) and not scaler.is_enabled())
            iteration += 1
            if bad:
                nonfinite_skipped += 1
                consecutive_bad += 1
                optimizer.zero_grad(set_to_none=True)
                if scaler.is_enabled():
                    scaler.update()
                if cfg.nonfinite == "abort" and consecutive_bad >= cfg.nonfinite_patience:
                    raise NonFiniteError(
                        f"non-finite loss or gradient norm in {consecutive_bad} consecutive iterations (last: global "
                        f"iteration {iteration}, loss {sums[0].item()}, grad norm {grad_norm}); no weights were "
                        "written. Lower lr, set grad_clip, or set nonfinite=skip to drop such updates")
            else:
                consecutive_bad = 0
                scaler.step(optimizer)
                scaler.update()
                if math.isfinite(grad_norm):
                    update_ema(ema, net, ema_beta(cfg, iteration))
                    window.add({"loss": sums[0].item(), "loss_regular": sums[1].item(),
                                "loss_boundary": sums[2].item(), "grad_norm": grad_norm})
            # the step above already synchronised with the device (loss / grad norm read on the host)
            iteration_seconds.append(time.perf_counter() - iteration_start)
            iteration_cpu_seconds.append(time.process_time() - iteration_cpu_start)
            if bar is not None:
                bar.update(1)
                if iteration % cfg.log_every == 0:
                    bar.set_postfix(loss=f"{sums[0].item():.4g}", gnorm=f"{grad_norm:.3g}", refresh=False)
            if dist_info.is_main and (iteration % cfg.log_every == 0 or iteration == end_iteration):
                metrics = window.means()
                if mode not in TRUNCATED_MODES:
                    metrics.pop("loss_boundary", None)
                metrics.update(lr=learning_rate(cfg, iteration - 1), nonfinite_skipped=float(nonfinite_skipped))
                if ratio is not None and mode in CONSISTENCY_MODES:
                    metrics["ratio"] = float(ratio)
                tracker.log_metrics(metrics, step=iteration)
                window = _LogWindow()
            if iteration % cfg.state_every == 0 or iteration == end_iteration:
                write_state()
            periodic_outputs(iteration)
        network_path = None
        if dist_info.is_main:
            if not tensors_finite(ema.state_dict()):
                raise NonFiniteError("the EMA weights are non-finite; refusing to write network.safetensors")
            from tcm_core.checkpoints import save_network

            network_path = out_dir / "network.safetensors"
            save_network(ema, network_path, iteration=iteration, provenance={
                "mode": mode, "config": cfg_dict, "init": str(init) if init else None, "init_sha256": init_sha,
                "boundary_model": str(boundary_model) if boundary_model else None, "boundary_sha256": boundary_sha,
                "data": str(data), "start_iteration": start_iteration})
        status = "FINISHED"
    finally:
        if bar is not None:
            bar.close()
        if tracker is not None:
            tracker.close(status)
        if dist_info.initialised:
            import torch.distributed as dist

            if status == "FINISHED":
                dist.barrier()
            dist.destroy_process_group()
    elapsed = time.perf_counter() - seconds_start
    return TrainResult(start_iteration, iteration, resumed_from, nonfinite_skipped,
                       elapsed / len(iteration_seconds) if iteration_seconds else None, network_path,
                       iteration_seconds, iteration_cpu_seconds)


def _check_resumable(state: dict[str, Any], cfg_dict: dict[str, Any], mode: str, start_iteration: int,
                     folder: Path) -> None:
    old = state.get("config") or {}
    changed = sorted(k for k in cfg_dict if k not in _RESUME_FREE_KEYS and k in old and old[k] != cfg_dict[k])
    if state.get("mode", mode) != mode or int(state.get("start_iteration", start_iteration)) != start_iteration:
        changed.insert(0, "mode/init")
    if changed:
        raise ValueError(f"the training state in {folder} belongs to a different run (differs in {', '.join(changed)});"
                         " delete that folder or pass another --state-dir")


def _write_grids(ema: nn.Module, cfg: TrainConfig, out_dir: Path, iteration: int, device: torch.device) -> None:
    from tcm_core.evaluation import save_grid
    from tcm_core.sampling import sample_batches

    step_sets = {"1step": [cfg.t_max]}
    if cfg.eval_mid_t is not None:
        step_sets["2step"] = [cfg.t_max, cfg.eval_mid_t]
    for name, steps in step_sets.items():
        batches = list(sample_batches(ema, num=cfg.grid_num, seed=cfg.seed, steps=steps,
                                      batch_size=min(cfg.grid_num, 64), device=device))
        (out_dir / "grids").mkdir(parents=True, exist_ok=True)
        save_grid(torch.cat(batches), out_dir / "grids" / f"grid-{iteration:09d}-{name}.png")


def _progress_bar(total: int, initial: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    # in log files a line every minute, not a carriage-return stream
    return tqdm(total=total, initial=initial, unit="it", dynamic_ncols=interactive, mininterval=0.5 if interactive
                else 60.0, file=sys.stderr, leave=interactive)


# ----------------------------------------------------------------------------------------------------------
# Benchmark of real training iterations (``python -m tcm_core.bench --train``)

BENCH_CAP_ITERATION = 10**7  # init checkpoints claim this many iterations: the curriculum is at its cap


def benchmark_train_iterations(net_name: str = "tiny", batch: int = 64, device: str = "cpu", repeats: int = 5,
                               warmup: int = 2, rounds: int = 2, modes: tuple[str, ...] = ("stage1", "stage2"),
                               arch_overrides: dict[str, Any] | None = None, seed: int = 0,
                               config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Seconds per iteration of the REAL training loop (``train``) for each mode, on synthetic data.

    Each round runs every mode once for ``warmup + repeats`` iterations (modes interleaved round by round, so
    drifting machine load hits all alike); the best post-warm-up iteration over all rounds is reported. An
    iteration is everything the loop does per step (data, loss, backward, grad norm, optimiser, EMA, host
    sync) except the periodic outputs (metrics lines, state files), which are excluded from the timing.
    """
    import tempfile

    from tcm_core.checkpoints import save_network
    from tcm_core.data import write_dataset_zip
    from tcm_core.networks import arch_preset, build_precond

    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"modes must be among {', '.join(MODES)}, got {mode!r}")
    if repeats < 1 or warmup < 0 or rounds < 1:
        raise ValueError(f"need repeats >= 1, warmup >= 0, rounds >= 1; got {repeats}, {warmup}, {rounds}")
    torch.manual_seed(seed)
    master = build_precond(arch_preset(net_name, **(arch_overrides or {})))
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    cpu_times: dict[str, list[float]] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory(prefix="tcm-train-bench-") as tmp:
        folder = Path(tmp)
        rng = np.random.default_rng(seed)
        shape = (master.img_channels, master.img_resolution, master.img_resolution)
        data = folder / "data.zip"
        write_dataset_zip(data, (rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(max(batch, 64))))
        init = folder / "init.safetensors"
        save_network(master, init, iteration=BENCH_CAP_ITERATION, provenance={"note": "benchmark"})
        for round_index in range(rounds):
            for mode in modes:
                keys = {"iterations": warmup + repeats, "batch": batch, "seed": seed + round_index,
                        "log_every": 10**6, "state_every": 10**6, **(config or {})}
                if mode == "pretrain":
                    keys["arch"] = {"preset": net_name, **(arch_overrides or {})}
                cfg = build_config(keys, mode)
                result = train(cfg, mode=mode, data=data, out=folder / f"{mode}-{round_index}",
                               init=None if mode == "pretrain" else init,
                               boundary_model=init if mode in TRUNCATED_MODES else None, device=device,
                               progress=False)
                times[mode].extend(result.iteration_seconds[warmup:])
                cpu_times[mode].extend(result.iteration_cpu_seconds[warmup:])
    dev = torch.device(pick_device(device))
    report: dict[str, Any] = {
        "net": net_name, "batch": batch, "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "parameters": sum(p.numel() for p in master.parameters()),
        "repeats": repeats, "warmup": warmup, "rounds": rounds, "config": dict(config or {}),
    }
    for mode in modes:
        report[f"{mode}_train_s_per_it"] = min(times[mode])
        report[f"{mode}_train_s_per_it_median"] = float(np.median(times[mode]))
        report[f"{mode}_train_times_s"] = times[mode]
        # CPU seconds of this process: on a shared CPU machine steadier than wall time (no waiting for a core)
        report[f"{mode}_train_cpu_s_per_it"] = min(cpu_times[mode])
    if "stage1" in modes and "stage2" in modes:
        report["stage2_over_stage1_train_time"] = report["stage2_train_s_per_it"] / report["stage1_train_s_per_it"]
        report["stage2_over_stage1_train_cpu_time"] = (report["stage2_train_cpu_s_per_it"]
                                                       / report["stage1_train_cpu_s_per_it"])
    return report


# ----------------------------------------------------------------------------------------------------------
# CLI


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", required=True, choices=MODES)
    parser.add_argument("--config", default=None, help="YAML: presets (config.yaml layout) or flat TrainConfig keys")
    parser.add_argument("--preset", default=None, help="preset name in the YAML (default: its `preset` key)")
    parser.add_argument("--init", default=None, help="checkpoint to start from (pretrain: optional)")
    parser.add_argument("--boundary-model", default=None, help="stage2/stage3: frozen model used below t_prime")
    parser.add_argument("--data", required=True, help="EDM-layout dataset (.zip or folder)")
    parser.add_argument("--out", required=True, help="run folder: network.safetensors/.json, metrics.jsonl, "
                        "config.json")
    parser.add_argument("--state-dir", default=None, help="mid-run state (default OUT/_state); the workflow passes "
                        "a folder outside the job's declared outputs, which Snakemake deletes before a job starts")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--mlflow-uri", default=None)
    parser.add_argument("--mlflow-parent", default=None, help="JSON from `mlflow-init`")
    parser.add_argument("--run-key", default=None)
    parser.add_argument("--eval-ref-stats", default=None, help="FID reference statistics (.npz) for periodic FID")
    parser.add_argument("--eval-extractor", default=None, choices=("lenet", "inception"))
    parser.add_argument("--eval-feature-net", default=None)
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="TrainConfig overrides")


def run_train(args: argparse.Namespace) -> int:
    from tcm_core.checkpoints import CheckpointError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = resolve_config(args.config, args.mode, args.preset, args.overrides)
        result = train(cfg, mode=args.mode, data=args.data, out=args.out, init=args.init,
                       boundary_model=args.boundary_model, state_dir=args.state_dir, device=args.device,
                       mlflow_uri=args.mlflow_uri, mlflow_parent=args.mlflow_parent, run_key=args.run_key,
                       eval_ref_stats=args.eval_ref_stats, eval_extractor=args.eval_extractor,
                       eval_feature_net=args.eval_feature_net, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, NonFiniteError, CheckpointError) as error:
        print(f"train: error: {error}", file=sys.stderr)
        return 2 if isinstance(error, ValueError) else 1
    if int(os.environ.get("RANK", "0")) == 0:
        spi = result.seconds_per_iteration
        print(f"train: {args.mode} finished at global iteration {result.end_iteration} (started at "
              f"{result.start_iteration}" + (f", resumed from {result.resumed_from}" if result.resumed_from else "")
              + f"; {result.nonfinite_skipped} non-finite steps skipped"
              + (f"; {spi:.3f} s/iteration" if spi else "") + f") -> {result.network}", file=sys.stderr)
    return 0
