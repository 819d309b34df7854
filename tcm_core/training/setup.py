"""Setting up a training run: everything the loop needs, built from the config and the job's input files.

``setup(cfg, mode, paths, device)`` returns a :class:`Run`. Where a run starts (the GLOBAL iteration):

* pretrain: 0 (or the init's iteration when one is given);
* stage1: 0 — its init is a diffusion model (ours or EDM's), whose denoising iterations are no CT progress;
* stage1_continued (the control, ``control: continued``): Stage 1's final training state (``--init-state``):
  online weights, optimiser, EMA, sampler position and iteration, so the control is Stage 1 launched with the
  longer duration (paper Fig. 1b). ``control: ema_restart`` restarts from the Stage-1 EMA with a fresh
  optimiser instead — a named variant for inits that have no training state (a foreign Stage-1 checkpoint);
* intermediate (paper App. B, "adding an intermediate training stage"): like the control, Stage 1's final training
  state (``control: continued``; ``ema_restart`` without one), going on with its times drawn on [t_min, t') only
  (``training.config.time_range``): it fine-tunes f_θ0 below t' into the boundary of a Stage-2 variant;
* stage2 / stage3: the init checkpoint's iteration, 0 when it carries none.

The LR decay and the power-EMA count use the global iteration (as the official code, whose ImageNet Stage-2
command passes no ``--lr_schedule_start_iter``). The Δt curriculum does too, except that it starts at its cap
(``ratio_limit``) for a stage2/stage3/control init that carries no iteration, or with ``curriculum: cap``:
App. E, "for the second stage, we start with the maximum r values ... and do not change them".
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tcm_core.errors import ConfigError, MissingFileError, RefusedFileError
from tcm_core.schedules import curriculum_ratio
from tcm_core.training import distributed
from tcm_core.training.config import (
    CONTINUING_MODES,
    TRUNCATED_MODES,
    TrainConfig,
    batch_split,
    build_time_distribution,
    time_range,
    validate_config,
)
from tcm_core.training.optim import build_optimizer
from tcm_core.training.state import (
    check_compatible,
    discard_states,
    load_latest_state,
    load_state_file,
    restore_state,
)

log = logging.getLogger(__name__)

CURRICULUM_AT_CAP_MODES = ("stage1_continued", "intermediate", "stage2", "stage3")


@dataclass
class RunPaths:
    """The files of one training job."""

    data: Path
    out: Path
    init: Path | None = None  # network to start from
    boundary_model: Path | None = None  # stage2/stage3: the frozen model below t'
    init_state: Path | None = None  # stage1_continued / intermediate: Stage 1's final training state
    state_dir: Path | None = None  # mid-run state (default OUT/_state)
    final_state: Path | None = None  # write the final training state here (stage1: the control's input)
    teacher: Path | None = None  # method cd: the frozen diffusion model whose PF-ODE gives x_s

    @property
    def state_folder(self) -> Path:
        return self.state_dir if self.state_dir is not None else self.out / "_state"


@dataclass
class Run:
    """A training run in progress: networks, loss, optimiser, sampler and counters."""

    cfg: TrainConfig
    mode: str
    paths: RunPaths
    dist: distributed.Distributed
    device: torch.device
    dataset: Any
    net: nn.Module  # the trained network (unwrapped)
    model: nn.Module  # ``net`` or its DDP wrapper: what the loss calls
    ema: nn.Module
    frozen: nn.Module | None
    teacher: nn.Module | None  # method cd: the frozen diffusion model (eval mode)
    loss_fn: Any
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    chunk: int  # samples per loss call
    chunks_per_rank: int
    sampler: Any
    start_iteration: int
    iteration: int  # iterations done (global)
    curriculum_at_cap: bool
    nonfinite_skipped: int = 0
    consecutive_bad: int = 0
    resumed_from: int | None = None
    info: dict[str, Any] = field(default_factory=dict)  # provenance and resolved settings, logged as params
    log_sums: dict[str, float] = field(default_factory=dict)
    log_count: int = 0

    @property
    def end_iteration(self) -> int:
        return self.start_iteration + self.cfg.iterations

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.precision)

    def ratio(self, iteration: int) -> float | None:
        """The curriculum ratio of the update at global iteration ``iteration`` (None: not a consistency mode)."""
        cfg = self.cfg
        if self.mode == "pretrain":
            return None
        if self.curriculum_at_cap:
            return cfg.ratio_limit
        return curriculum_ratio(iteration, cfg.q, cfg.double_iters, cfg.ratio_limit)


# ---------------------------------------------------------------------------------------------------------- checks


def check_inputs(cfg: TrainConfig, mode: str, paths: RunPaths) -> None:
    """The job's files exist and fit the mode (before any compute)."""
    if mode in TRUNCATED_MODES and not paths.boundary_model:
        raise ConfigError(f"mode {mode} needs the frozen model used below t_prime", "--boundary-model",
                          "pass the Stage-1 network")
    if mode != "pretrain" and not paths.init:
        raise ConfigError(f"mode {mode} needs a checkpoint to start from", "--init", "pass one")
    if mode in CONTINUING_MODES and cfg.control == "continued" and not paths.init_state:
        raise ConfigError(f"mode {mode} continues Stage 1's training state", "--init-state",
                          "pass Stage 1's final train_state.pt, or set control=ema_restart (not the paper's control)")
    if paths.init_state and not (mode in CONTINUING_MODES and cfg.control == "continued"):
        raise ConfigError(f"--init-state is only for {' / '.join(CONTINUING_MODES)} with control=continued (mode "
                          f"{mode}, control {cfg.control})", "--init-state", "drop it")
    if cfg.method == "cd" and not paths.teacher:
        raise ConfigError("method cd distils a diffusion model", "--teacher", "pass the teacher checkpoint")
    if paths.teacher and cfg.method != "cd":
        raise ConfigError(f"--teacher is only used by method cd (method {cfg.method})", "--teacher",
                          "drop it or set method=cd")
    for label, path in (("--init", paths.init), ("--boundary-model", paths.boundary_model),
                        ("--init-state", paths.init_state), ("--teacher", paths.teacher), ("--data", paths.data)):
        if path and not Path(path).exists():
            raise MissingFileError("input file does not exist", f"{label} {path}", "build or fetch it first")


# bf16/fp16 (autocast, GradScaler) on CPU: refused in training; allowed only inside cpu_autocast_allowed(), which
# the GPU check's dry run uses to run those code paths (CPU autocast, a CPU GradScaler) without a GPU.
_CPU_AUTOCAST_ALLOWED = contextvars.ContextVar("tcm_cpu_autocast_allowed", default=False)


@contextlib.contextmanager
def cpu_autocast_allowed() -> Iterator[None]:
    """Within the block, runs set up on CPU accept ``precision`` bf16/fp16 (no config key reaches this)."""
    token = _CPU_AUTOCAST_ALLOWED.set(True)
    try:
        yield
    finally:
        _CPU_AUTOCAST_ALLOWED.reset(token)


def check_precision(cfg: TrainConfig, device_kind: str) -> None:
    if device_kind != "cuda" and cfg.precision != "fp32" and not _CPU_AUTOCAST_ALLOWED.get():
        raise ConfigError(f"bf16/fp16 autocast is CUDA only, got precision {cfg.precision!r} on {device_kind}",
                          "config key 'precision'", "use precision=fp32 on this device")


def configure_numerics(cfg: TrainConfig, device_kind: str) -> None:
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # CUDA lacks deterministic kernels for some ops the losses use (index_copy_): warn there, not fail
        torch.use_deterministic_algorithms(True, warn_only=device_kind == "cuda")
        torch.backends.cudnn.benchmark = False
    if device_kind == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32


# ---------------------------------------------------------------------------------------------------------- networks


def _arch_overrides(cfg: TrainConfig) -> dict[str, Any] | None:
    return None if cfg.dropout is None else {"dropout": cfg.dropout}


def apply_label_dropout(cfg: TrainConfig, net: nn.Module, where: str) -> nn.Module:
    """The run's ``label_dropout`` on a network it trains or runs in train mode (consistency modes: 0)."""
    from tcm_core.networks import set_label_dropout

    try:
        set_label_dropout(net, cfg.label_dropout)
    except ValueError as error:
        raise ConfigError(str(error), f"config key 'label_dropout' ({where})", "set label_dropout=0") from None
    return net


def load_init(cfg: TrainConfig, path: Path, device: torch.device) -> tuple[nn.Module, int | None, str | None]:
    """(network, the iteration it carries or None, its sha256) of a checkpoint file."""
    from tcm_core.io.network_files import load_network

    net, meta = load_network(path, device, _arch_overrides(cfg))
    apply_label_dropout(cfg, net, str(path))
    iteration = meta.get("iteration")  # None: the file carries none (foreign checkpoints)
    return net, (None if iteration is None else int(iteration)), meta.get("sha256")


def fresh_network(cfg: TrainConfig, dataset: Any, device: torch.device) -> nn.Module:
    """pretrain without --init: a network built from ``cfg.arch``, seeded by ``cfg.seed``."""
    if not cfg.arch:
        raise ConfigError("training from scratch needs an architecture", "config key 'arch'",
                          "set e.g. arch={preset: tiny, dropout: 0.1} or pass --init")
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
    return apply_label_dropout(cfg, net, "arch").to(device)


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


def build_loss(cfg: TrainConfig, mode: str, sigma_data: float, frozen: nn.Module | None,
               teacher: nn.Module | None = None) -> Any:
    from tcm_core import losses
    from tcm_core.distillation import Teacher, TeacherStep

    if mode == "pretrain":
        return losses.EDMDenoisingLoss(p_mean=cfg.p_mean, p_std=cfg.p_std, sigma_data=sigma_data)
    step = None
    if cfg.method == "cd":
        if teacher is None:
            raise ConfigError("method cd needs the teacher network", "--teacher", "pass the teacher checkpoint")
        step = TeacherStep(Teacher(teacher, cfg.guidance), cfg.ode_solver)
    common = dict(c=cfg.c, weighting=cfg.weighting, sigma_data=sigma_data, teacher_step=step)
    if mode in TRUNCATED_MODES:
        # ψ̄_t lives on [t', T]: its lower bound is t', not t_min
        return losses.TruncatedConsistencyLoss(frozen=frozen, t_prime=cfg.t_prime, rho=cfg.rho, w_b=cfg.w_b,
                                               time_dist=build_time_distribution(cfg, cfg.t_prime), **common)
    # Stage 1, the control: [t_min, T]; the intermediate stage: [t_min, t') (every s = t − Δt < t < t' too)
    return losses.ConsistencyLoss(time_dist=build_time_distribution(cfg, *time_range(cfg, mode)), **common)


def loss_scaling(cfg: TrainConfig) -> dict[str, Any]:
    """fp16's dynamic loss scaling (App. E): initial scale ``loss_scale``, doubled after ``loss_scale_growth``
    overflow-free iterations; off for fp32/bf16."""
    return {"init_scale": cfg.loss_scale, "growth_interval": cfg.loss_scale_growth, "enabled": cfg.precision == "fp16"}


def build_scaler(cfg: TrainConfig, device_kind: str) -> torch.amp.GradScaler:
    return torch.amp.GradScaler(device_kind, **loss_scaling(cfg))


def curriculum_at_cap(cfg: TrainConfig, mode: str, init_iteration: int | None, continued: bool) -> bool:
    """Whether the Δt curriculum runs at ratio_limit from the first iteration (see the module docstring)."""
    if cfg.curriculum != "auto":
        return cfg.curriculum == "cap"
    return mode in CURRICULUM_AT_CAP_MODES and init_iteration is None and not continued


def start_iteration(mode: str, init_iteration: int | None) -> int:
    return 0 if mode == "stage1" else int(init_iteration or 0)


# ---------------------------------------------------------------------------------------------------------- setup


def _networks(cfg: TrainConfig, mode: str, paths: RunPaths, dataset: Any, device: torch.device
              ) -> tuple[nn.Module, nn.Module | None, dict[str, Any]]:
    info: dict[str, Any] = {"init": str(paths.init) if paths.init else None, "init_sha256": None,
                            "init_iteration": None, "boundary_model": None, "boundary_sha256": None,
                            "boundary_iteration": None}
    if paths.init:
        net, info["init_iteration"], info["init_sha256"] = load_init(cfg, paths.init, device)
    else:
        net = fresh_network(cfg, dataset, device)
    if net.img_resolution != dataset.resolution or net.img_channels != dataset.channels:
        raise ConfigError(f"the network is {net.img_channels}x{net.img_resolution}x{net.img_resolution} but the "
                          f"data is {dataset.channels}x{dataset.resolution}x{dataset.resolution}",
                          f"--data {paths.data}", "use the data set the network was trained on")
    frozen = None
    if mode in TRUNCATED_MODES:
        frozen, info["boundary_iteration"], info["boundary_sha256"] = load_init(cfg, paths.boundary_model, device)
        frozen = freeze_boundary_model(frozen)
        info["boundary_model"] = str(paths.boundary_model)
    return net.train().requires_grad_(True), frozen, info


def load_teacher(cfg: TrainConfig, paths: RunPaths, student: nn.Module, dataset: Any, device: torch.device,
                 info: dict[str, Any]) -> nn.Module | None:
    """method cd: the teacher diffusion model, frozen in eval mode, checked against the student, data, guidance."""
    info.update(teacher=str(paths.teacher) if paths.teacher else None, teacher_sha256=None)
    if cfg.method != "cd":
        return None
    from tcm_core.io.network_files import load_network

    teacher, meta = load_network(paths.teacher, device)
    info["teacher_sha256"] = meta.get("sha256")
    where = f"--teacher {paths.teacher}"
    shape = lambda net: (net.img_channels, net.img_resolution, net.label_dim)  # noqa: E731
    if shape(teacher) != shape(student):
        raise ConfigError(f"the teacher is (channels, resolution, label_dim) {shape(teacher)} but the student "
                          f"{shape(student)}", where, "distil a teacher of the student's data and labels")
    if cfg.guidance is not None:
        learned_null = float(teacher.arch.get("label_dropout", 0.0)) > 0
        if teacher.label_dim == 0 or dataset.label_dim != teacher.label_dim or not learned_null:
            raise ConfigError(f"guidance needs a class-conditional teacher pretrained with label dropout and a "
                              f"labelled data set (teacher label_dim {teacher.label_dim}, label_dropout "
                              f"{teacher.arch.get('label_dropout', 0.0)}; data label_dim {dataset.label_dim})",
                              where, "pretrain the teacher with label_dropout > 0, or set guidance=null")
    return teacher.eval().requires_grad_(False)


def setup(cfg: TrainConfig, mode: str, paths: RunPaths, device: str = "auto") -> Run:
    """Build the run (networks, loss, optimiser, sampler) and restore its newest state or Stage 1's final one."""
    check_inputs(cfg, mode, paths)
    device_kind = distributed.pick_device(device)
    check_precision(cfg, device_kind)
    dist_info = distributed.init_distributed(device_kind)
    validate_config(cfg, mode, dist_info.world_size)
    chunk, chunks_per_rank = batch_split(cfg, mode, dist_info.world_size)
    configure_numerics(cfg, device_kind)
    dev = distributed.torch_device(device_kind, dist_info)
    if dist_info.is_main:
        paths.out.mkdir(parents=True, exist_ok=True)

    from tcm_core.data import InfiniteSampler, open_dataset

    dataset = open_dataset(paths.data)
    net, frozen, info = _networks(cfg, mode, paths, dataset, dev)
    teacher = load_teacher(cfg, paths, net, dataset, dev, info)
    continued = paths.init_state is not None
    start = start_iteration(mode, info["init_iteration"])
    run = Run(cfg=cfg, mode=mode, paths=paths, dist=dist_info, device=dev, dataset=dataset, net=net, model=net,
              ema=copy.deepcopy(net).eval().requires_grad_(False), frozen=frozen, teacher=teacher,
              loss_fn=build_loss(cfg, mode, float(getattr(net, "sigma_data", 0.5)), frozen, teacher),
              optimizer=build_optimizer(cfg, net.parameters()),
              scaler=build_scaler(cfg, device_kind), chunk=chunk,
              chunks_per_rank=chunks_per_rank, sampler=None, start_iteration=start, iteration=start,
              curriculum_at_cap=curriculum_at_cap(cfg, mode, info["init_iteration"], continued), info=info)
    sampler_position = restore(run)
    run.sampler = InfiniteSampler(len(dataset), seed=cfg.seed, rank=0, num_replicas=1, start=sampler_position)
    run.model = distributed.wrap_ddp(net, dist_info, dev)
    run.info.update(resolved_info(run, device_kind))
    return run


def input_hashes(run: Run) -> dict[str, str | None]:
    """sha256 of the files a run starts from: a saved state is only resumed on top of the same ones."""
    from tcm_core.io.hashing import sha256_file

    init_state = run.paths.init_state
    hashes = {"init": run.info["init_sha256"], "boundary_model": run.info["boundary_sha256"],
              "init_state": sha256_file(init_state) if init_state else None}
    if run.info.get("teacher_sha256"):  # only CD runs carry the key: CT states from before CD still resume
        hashes["teacher"] = run.info["teacher_sha256"]
    return hashes


def restore(run: Run) -> int:
    """Resume the run's own newest state, else (the control) Stage 1's final state; return the sampler position."""
    run.info["inputs"] = input_hashes(run)
    state = load_latest_state(run.paths.state_folder)
    if state is not None and state.get("inputs", run.info["inputs"]) != run.info["inputs"]:
        # an upstream job reran (e.g. Stage 1): never resume Stage 2 on top of an outdated Stage 1
        log.warning("discarding the training states in %s: they were trained from other input files",
                    run.paths.state_folder)
        discard_states(run.paths.state_folder)
        state = None
    if state is not None:
        check_compatible(state, run.cfg.to_dict(), run.mode, run.start_iteration, run.paths.state_folder)
        run.resumed_from = int(state["iteration"])
    elif run.paths.init_state is not None:
        state = continuation_state(run)
        run.start_iteration = int(state["iteration"])
        run.info["init_state"] = str(run.paths.init_state)
    found = distributed.all_ranks_agree(run.dist, run.resumed_from)
    if len(set(found)) != 1:
        raise RefusedFileError(f"ranks resumed from different iterations {found}", f"--state-dir "
                               f"{run.paths.state_folder}", "put it on a filesystem shared by all nodes")
    if state is None:
        return 0
    position = restore_state(run, state)
    return position


def continuation_state(run: Run) -> dict[str, Any]:
    """Stage 1's final training state, checked to be the run the control (or the intermediate stage) continues.

    ``seed`` may differ: the control of training seed j > 0 (``presets.seeded_keys``) is Stage 1's state continued
    with another random stream (data order, times, noise, dropout from iteration i on); seed 0 is Stage 1's own
    seed, so that control is Stage 1 continued bit for bit. The intermediate stage also sets ``t_prime``, the upper
    end of its times (Stage 1 has none): every other key is Stage 1's."""
    state = load_state_file(run.paths.init_state)
    free = {"control", "curriculum", "seed"} | ({"t_prime"} if run.mode == "intermediate" else set())
    check_compatible(state, run.cfg.to_dict(), "stage1", None, run.paths.init_state, extra_free=free)
    if run.info["init_iteration"] is not None and int(state["iteration"]) != run.info["init_iteration"]:
        raise RefusedFileError(f"the training state is at iteration {state['iteration']} but the Stage-1 network "
                               f"at {run.info['init_iteration']}", f"--init-state {run.paths.init_state}",
                               "pass the state and the network of the same Stage-1 run")
    run.info["init_state_sha256"] = run.info["inputs"]["init_state"]
    return state


def resolved_info(run: Run, device_kind: str) -> dict[str, Any]:
    """Settings resolved at setup (logged as params beside the config)."""
    cfg = run.cfg
    info: dict[str, Any] = {"mode": run.mode, "start_iteration": run.start_iteration,
                            "end_iteration": run.end_iteration, "data": str(run.paths.data),
                            "world_size": run.dist.world_size, "batch_gpu_resolved": run.chunk,
                            "device": device_kind, "curriculum_at_cap": run.curriculum_at_cap}
    if run.mode in CONTINUING_MODES:
        info["control_resolved"] = "continued" if run.paths.init_state else "ema_restart"
    if run.mode in TRUNCATED_MODES:
        from tcm_core.losses import num_boundary

        info["rho_effective"] = num_boundary(cfg.batch, cfg.rho) / cfg.batch
    return info
