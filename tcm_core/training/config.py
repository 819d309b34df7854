"""Training configuration: the :class:`TrainConfig` keys, their types and their validation.

Where the keys come from (a preset's sections of config.yaml) is ``tcm_core.presets``. Here: ``key=value``
command-line overrides (values parsed with ``yaml.safe_load``), type coercion, mode-dependent defaults (``None``
below), and validation before any compute; every failure is a ``ConfigError`` naming the key.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import yaml

from tcm_core.errors import ConfigError
from tcm_core.sampling import SEED_STRIDE
from tcm_core.schedules import T_MAX, T_MIN

MODES = ("pretrain", "stage1", "stage1_continued", "intermediate", "stage2", "stage3")
TRUNCATED_MODES = ("stage2", "stage3")
CONSISTENCY_MODES = ("stage1", "stage1_continued", "intermediate", "stage2", "stage3")
# Modes that continue Stage 1's final training state (--init-state, ``control: continued``): the control, and the
# intermediate stage of paper App. B (Stage 1 going on with its times drawn on [t_min, t') only)
CONTINUING_MODES = ("stage1_continued", "intermediate")

# c and the times enter float32 losses and networks squared: at 1.8e19 the square overflows and every loss is NaN
FLOAT32_SQUARE_LIMIT = 1e18
MAX_BATCH = 1 << 16  # a global batch beyond this is a typo (the paper's largest is 2048), not a memory request
MAX_GRID_NUM = 4096  # a sample grid of more tiles is a typo (all its images are held at once)

CHOICES: dict[str, tuple[str, ...]] = {
    "optimizer": ("adam", "radam"),
    "ema": ("constant", "power"),
    "time_dist": ("lognormal", "student_t"),
    "weighting": ("inv_delta_t", "inv_cout_sq", "uniform"),
    "precision": ("fp32", "bf16", "fp16"),
    "nonfinite": ("skip", "abort"),
    "control": ("continued", "ema_restart"),
    "curriculum": ("auto", "continue", "cap"),
    "method": ("ct", "cd"),
    "ode_solver": ("euler", "heun"),
}
NULLABLE_CHOICES = ("time_dist", "method", "ode_solver")  # None: resolved per mode / method by build_config



@dataclass
class TrainConfig:
    """Hyperparameters of one training run, named as in the paper / official code (docs: §2 of the reference)."""

    # schedule and batch
    iterations: int = 1000  # iterations run by THIS job; the global counter starts at the init's iteration
    batch: int = 128  # global batch (all ranks together)
    batch_gpu: int | None = None  # samples per loss call (micro-batch); None = batch / world_size
    seed: int = 101
    # optimiser and learning rate
    optimizer: str = "radam"
    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    lr_decay_iters: int = 0  # 0: constant; else lr / sqrt(max(it / lr_decay_iters, 1))
    lr_rampup_iters: int = 0  # 0: none; else lr * min(it / lr_rampup_iters, 1)
    # EMA (what is saved)
    ema: str = "constant"
    ema_beta: float = 0.9999
    ema_gamma: float = 6.94  # power EMA: beta_k = (1 - 1/k)^(gamma + 1)
    # time distribution and consistency loss
    time_dist: str | None = None  # None: lognormal for pretrain/stage1, student_t for stage2/3
    p_mean: float | None = None  # None: -1.2 (pretrain, EDM) or -1.1 (consistency, ECT CIFAR)
    p_std: float | None = None  # None: 1.2 (pretrain) or 2.0
    t_min: float = T_MIN
    t_max: float = T_MAX
    # None: 1 for stage2 and intermediate, 4 for stage3. intermediate: the exclusive upper end of its times [t_min, t')
    t_prime: float | None = None
    rho: float = 0.25
    w_b: float = 0.1
    # ψ̄_t of Stage 2: ln t = student_mu + student_sigma·T_ν with ν = student_nu (the paper's μ, σ, ν; App. D)
    student_mu: float = 0.0
    student_nu: float = 0.01
    student_sigma: float = 0.2
    q: float = 2.0
    ratio_limit: float = 0.999
    double_iters: int = 25000
    c: float = 1e-8
    weighting: str = "inv_delta_t"
    # where the Δt curriculum starts: "continue" from the global iteration; "cap": at ratio_limit throughout;
    # "auto": "cap" for a stage2/stage3/stage1_continued init that carries no iteration (a foreign checkpoint,
    # App. E: "we start with the maximum r values"), else "continue"
    curriculum: str = "auto"
    # stage1_continued / intermediate: "continued" resumes Stage 1's final training state (the paper's control,
    # Fig. 1b); "ema_restart" restarts from the Stage-1 EMA with a fresh optimiser (when no Stage-1 state exists)
    control: str = "continued"
    dropout: float | None = None  # None: keep the checkpoint's / arch's dropout
    # how x_s is made (tcm_core.distillation): "ct" x_s = y + s·ε (consistency training); "cd" one PF-ODE step of
    # the frozen teacher (--teacher) from x_t (consistency distillation). None: "ct" in the consistency modes
    method: str | None = None
    ode_solver: str | None = None  # cd: "euler" | "heun" (None: heun); ct: must stay None
    guidance: float | None = None  # cd: classifier-free guidance scale w of the teacher; None: D(x, t, c) as is
    # probability that a sample's class label is replaced by ∅ (zeros) in the training pass: pretrain only (a
    # guided CD teacher must have learned ∅); the consistency modes need 0 (their target pass could not replay it)
    label_dropout: float = 0.0
    # numerics
    precision: str = "fp32"
    loss_scale: float = 65536.0  # fp16: the GradScaler's initial scale (official ImageNet runs: 16, --ls=16)
    loss_scale_growth: int = 2000  # fp16: overflow-free iterations before the scale doubles (official: 20000)
    tf32: bool = False
    deterministic: bool = False  # torch.use_deterministic_algorithms(True)
    grad_clip: float | None = None  # None: no clipping (the norm is still measured)
    nonfinite: str = "abort"
    nonfinite_patience: int = 5  # abort after this many consecutive non-finite steps
    nonfinite_max_share: float = 0.05  # ... or once >= patience steps were dropped and they exceed this share
    # observability
    log_every: int = 10
    state_every: int = 1000
    eval_every: int = 0  # 0: off (FID/dFID needs --eval-ref-stats)
    eval_points: int = 0  # > 0: that many evaluations, evenly spaced from the run's first to its last iteration
    grid_every: int = 0  # 0: off
    eval_num: int = 1000
    eval_mid_t: float | None = None
    eval_dfid_ts: list[float] = field(default_factory=list)
    grid_num: int = 64
    # network (pretrain from scratch only)
    arch: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(TrainConfig))
_INT_KEYS = {"iterations", "batch", "batch_gpu", "seed", "lr_decay_iters", "lr_rampup_iters", "double_iters",
             "loss_scale_growth", "nonfinite_patience", "log_every", "state_every", "eval_every", "eval_points",
             "grid_every", "eval_num", "grid_num"}
_BOOL_KEYS = {"tf32", "deterministic"}
_STR_KEYS = set(CHOICES)
_DICT_KEYS = {"arch"}
_LIST_KEYS = {"eval_dfid_ts"}
_NULLABLE_KEYS = {f.name for f in dataclasses.fields(TrainConfig) if f.default is None}


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["lr=2e-4", "eval_dfid_ts=[1,2]"]`` -> dict; values go through ``yaml.safe_load``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value", "command line", "write key=value")
        parsed = yaml.safe_load(value) if value != "" else None
        # yaml 1.1 reads "1e-4" as a string; accept it as the float it means
        if isinstance(parsed, str):
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        out[key.strip()] = parsed
    return out


def _coerce(key: str, value: Any) -> Any:
    if value is None:
        if key not in _NULLABLE_KEYS:
            raise ConfigError("null is not a value of this key", f"config key {key!r}", "give a value of its type")
        return None
    try:
        if key in _BOOL_KEYS:
            if not isinstance(value, bool):
                raise TypeError
            return value
        if key in _INT_KEYS:
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise TypeError
            return int(float(value))
        if key in _STR_KEYS:
            return str(value)
        if key in _DICT_KEYS:
            if not isinstance(value, dict):
                raise TypeError
            return dict(value)
        if key in _LIST_KEYS:
            values = value if isinstance(value, (list, tuple)) else [value]
            return [float(v) for v in values]
        if isinstance(value, bool):
            raise TypeError
        return float(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"cannot use {value!r} ({type(value).__name__})", f"config key {key!r}",
                          "give a value of the key's type") from None


def build_config(keys: dict[str, Any], mode: str) -> TrainConfig:
    """TrainConfig from resolved keys: unknown keys rejected, types coerced, mode defaults filled, validated."""
    if mode not in MODES:
        raise ConfigError(f"unknown mode {mode!r}", "--mode", f"use one of {', '.join(MODES)}")
    unknown = sorted(set(keys) - set(FIELD_NAMES))
    if unknown:
        raise ConfigError("unknown key", f"config key {unknown[0]!r}", f"use one of {', '.join(FIELD_NAMES)}")
    cfg = TrainConfig(**{k: _coerce(k, v) for k, v in keys.items()})
    truncated = mode in TRUNCATED_MODES
    if cfg.time_dist is None:
        cfg.time_dist = "student_t" if truncated else "lognormal"
    if cfg.p_mean is None:
        cfg.p_mean = -1.2 if mode == "pretrain" else -1.1
    if cfg.p_std is None:
        cfg.p_std = 1.2 if mode == "pretrain" else 2.0
    if cfg.t_prime is None and (truncated or mode == "intermediate"):
        cfg.t_prime = 4.0 if mode == "stage3" else 1.0
    if cfg.method is None and mode in CONSISTENCY_MODES:
        cfg.method = "ct"
    if cfg.ode_solver is None and cfg.method == "cd":
        cfg.ode_solver = "heun"
    validate_config(cfg, mode)
    return cfg


def _require(ok: bool, key: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"invalid value {value!r}", f"config key {key!r}", f"it must be {allowed}")


def validate_config(cfg: TrainConfig, mode: str, world_size: int = 1) -> None:
    """Raise ValueError naming the first invalid key and its allowed values (cheap: runs before any compute)."""
    _check_choices_and_finite(cfg)
    _check_optimiser(cfg)
    _check_noise_and_time(cfg)
    _check_numerics(cfg)
    _check_observability(cfg)
    if mode in TRUNCATED_MODES:
        _check_truncation(cfg)
    if mode == "intermediate":
        _require(cfg.t_min < cfg.t_prime < cfg.t_max, "t_prime", f"in (t_min, t_max) = ({cfg.t_min}, {cfg.t_max}) "
                 "(the intermediate stage trains on [t_min, t_prime))", cfg.t_prime)
    validate_method(cfg, mode)
    if mode == "pretrain" and cfg.arch is not None:
        _require(isinstance(cfg.arch, dict), "arch", "a mapping", cfg.arch)
    if mode in CONSISTENCY_MODES:
        check_time_distribution(cfg, mode)
    batch_split(cfg, mode, world_size)


def _check_choices_and_finite(cfg: TrainConfig) -> None:
    """Each key with a fixed set of values holds one of them; every float but p_mean and student_mu is finite."""
    for key, allowed in CHOICES.items():
        value = getattr(cfg, key)
        if value is not None or key not in NULLABLE_CHOICES:
            _require(value in allowed, key, f"one of {', '.join(allowed)}", value)
    for key in FIELD_NAMES:
        value = getattr(cfg, key)
        if isinstance(value, float) and key not in ("p_mean", "student_mu"):
            _require(math.isfinite(value), key, "finite", value)


def _check_optimiser(cfg: TrainConfig) -> None:
    """Run length, batch, Adam, learning-rate schedule and EMA."""
    _require(cfg.iterations >= 0, "iterations", ">= 0", cfg.iterations)
    _require(1 <= cfg.batch <= MAX_BATCH, "batch", f"in [1, {MAX_BATCH}]", cfg.batch)
    _require(cfg.lr > 0, "lr", "> 0", cfg.lr)
    _require(0 <= cfg.beta1 < 1, "beta1", "in [0, 1)", cfg.beta1)
    _require(0 <= cfg.beta2 < 1, "beta2", "in [0, 1)", cfg.beta2)
    _require(cfg.eps > 0, "eps", "> 0", cfg.eps)
    _require(cfg.lr_decay_iters >= 0, "lr_decay_iters", ">= 0 (0 = constant)", cfg.lr_decay_iters)
    _require(cfg.lr_rampup_iters >= 0, "lr_rampup_iters", ">= 0 (0 = none)", cfg.lr_rampup_iters)
    _require(0 <= cfg.ema_beta < 1, "ema_beta", "in [0, 1)", cfg.ema_beta)
    _require(cfg.ema_gamma > 0, "ema_gamma", "> 0", cfg.ema_gamma)


def _check_noise_and_time(cfg: TrainConfig) -> None:
    """The noise levels, the training-time distributions and the consistency schedule (q, ratio_limit, c)."""
    _require(math.isfinite(cfg.p_mean), "p_mean", "finite", cfg.p_mean)
    _require(cfg.p_std > 0, "p_std", "> 0", cfg.p_std)
    _require(cfg.t_min > 0, "t_min", "> 0", cfg.t_min)
    _require(cfg.t_max > cfg.t_min, "t_max", f"> t_min ({cfg.t_min})", cfg.t_max)
    _require(cfg.t_max <= FLOAT32_SQUARE_LIMIT, "t_max", f"<= {FLOAT32_SQUARE_LIMIT:g} (its square overflows float32)",
             cfg.t_max)
    _require(cfg.student_nu > 0, "student_nu", "> 0", cfg.student_nu)
    _require(cfg.student_sigma > 0, "student_sigma", "> 0", cfg.student_sigma)
    _require(cfg.q > 1, "q", "> 1", cfg.q)
    _require(0 < cfg.ratio_limit < 1, "ratio_limit", "in (0, 1)", cfg.ratio_limit)
    _require(cfg.double_iters >= 1, "double_iters", ">= 1", cfg.double_iters)
    _require(0 <= cfg.c <= FLOAT32_SQUARE_LIMIT, "c", f"in [0, {FLOAT32_SQUARE_LIMIT:g}] (c² overflows float32 above)",
             cfg.c)


def _check_numerics(cfg: TrainConfig) -> None:
    """Dropout, gradient clipping, loss scaling and the non-finite-step guard."""
    _require(cfg.dropout is None or 0 <= cfg.dropout < 1, "dropout", "in [0, 1) or null", cfg.dropout)
    _require(cfg.grad_clip is None or cfg.grad_clip > 0, "grad_clip", "> 0 or null", cfg.grad_clip)
    _require(cfg.loss_scale > 0, "loss_scale", "> 0", cfg.loss_scale)
    _require(cfg.loss_scale_growth >= 1, "loss_scale_growth", ">= 1", cfg.loss_scale_growth)
    _require(cfg.nonfinite_patience >= 1, "nonfinite_patience", ">= 1", cfg.nonfinite_patience)
    _require(0 <= cfg.nonfinite_max_share < 1, "nonfinite_max_share", "in [0, 1)", cfg.nonfinite_max_share)


def _check_observability(cfg: TrainConfig) -> None:
    """Logging, state files, periodic evaluation and sample grids."""
    _require(cfg.log_every >= 1, "log_every", ">= 1", cfg.log_every)
    _require(cfg.state_every >= 1, "state_every", ">= 1", cfg.state_every)
    _require(cfg.eval_every >= 0, "eval_every", ">= 0 (0 = off)", cfg.eval_every)
    _require(cfg.eval_points == 0 or cfg.eval_points >= 2, "eval_points", "0 (off) or >= 2 (first and last iteration)",
             cfg.eval_points)
    _require(cfg.grid_every >= 0, "grid_every", ">= 0 (0 = off)", cfg.grid_every)
    _require(2 <= cfg.eval_num <= SEED_STRIDE, "eval_num", f"in [2, {SEED_STRIDE}]", cfg.eval_num)
    _require(1 <= cfg.grid_num <= MAX_GRID_NUM, "grid_num", f"in [1, {MAX_GRID_NUM}]", cfg.grid_num)
    _require(cfg.eval_mid_t is None or cfg.t_min < cfg.eval_mid_t < cfg.t_max, "eval_mid_t",
             f"in (t_min, t_max) = ({cfg.t_min}, {cfg.t_max}) or null", cfg.eval_mid_t)
    _require(all(t > 0 for t in cfg.eval_dfid_ts), "eval_dfid_ts", "a list of times > 0", cfg.eval_dfid_ts)


def _check_truncation(cfg: TrainConfig) -> None:
    """The truncation point t', the boundary share rho and the boundary weight w_b of a truncated mode."""
    _require(cfg.t_min < cfg.t_prime < cfg.t_max, "t_prime", f"in (t_min, t_max) = ({cfg.t_min}, {cfg.t_max})",
             cfg.t_prime)
    _require(0 < cfg.rho < 1, "rho", "in (0, 1)", cfg.rho)
    _require(math.floor(cfg.batch * cfg.rho) >= 1, "rho", f"such that floor(batch * rho) >= 1 boundary sample "
             f"per global batch (batch {cfg.batch}: rho >= {1 / cfg.batch:.6g})", cfg.rho)
    _require(cfg.w_b >= 0, "w_b", ">= 0", cfg.w_b)


def time_range(cfg: TrainConfig, mode: str) -> tuple[float | None, float]:
    """[lower, upper] of the mode's training times: [t', T] for stage2/3 (ψ̄_t); [t_min, t') for intermediate,
    whose upper end is the largest float64 below t' (so no time reaches t', exactly truncated there); else
    [t_min, T]."""
    from tcm_core.schedules import largest_time_below

    if mode in TRUNCATED_MODES:
        return cfg.t_prime, cfg.t_max
    if mode == "intermediate" and cfg.t_prime is not None:
        return cfg.t_min, largest_time_below(cfg.t_prime)
    return cfg.t_min, cfg.t_max


def build_time_distribution(cfg: TrainConfig, lower: float, upper: float | None = None) -> Any:
    """ψ̄_t of Stage 2 (log-Student-t μ, σ, ν on [lower, upper]) or Stage 1's truncated log-normal; upper None:
    t_max."""
    from tcm_core.schedules import TruncatedLogNormal, TruncatedLogStudentT

    upper = cfg.t_max if upper is None else upper
    if cfg.time_dist == "student_t":
        return TruncatedLogStudentT(mu=cfg.student_mu, sigma=cfg.student_sigma, nu=cfg.student_nu, t_min=lower,
                                    t_max=upper)
    return TruncatedLogNormal(mean=cfg.p_mean, std=cfg.p_std, t_min=lower, t_max=upper)


def check_time_distribution(cfg: TrainConfig, mode: str) -> None:
    """The consistency loss's time distribution has probability mass on its range (a p_mean of 700 has none)."""
    lower, upper = time_range(cfg, mode)
    if lower is None or cfg.time_dist is None or None in (cfg.p_mean, cfg.p_std):
        return  # a TrainConfig not built by build_config: its mode defaults are not filled in yet
    try:
        build_time_distribution(cfg, lower, upper)
    except ValueError as error:
        keys = "student_mu, student_sigma, student_nu" if cfg.time_dist == "student_t" else "p_mean, p_std"
        raise ConfigError(f"the time distribution is unusable ({error})", f"config keys {keys}",
                          f"choose values with mass on [{lower:g}, {upper:g}]") from None


def validate_method(cfg: TrainConfig, mode: str) -> None:
    """method / ode_solver / guidance / label_dropout: each used only where it means something."""
    _require(0 <= cfg.label_dropout < 1, "label_dropout", "in [0, 1)", cfg.label_dropout)
    if mode == "pretrain":
        _require(cfg.method is None, "method", "null for pretrain (it trains the diffusion model, the CD teacher)",
                 cfg.method)
    else:
        _require(cfg.label_dropout == 0, "label_dropout", "0 in the consistency modes (the target pass cannot "
                 "replay a dropped label; set it in the pretrain section)", cfg.label_dropout)
    if cfg.method != "cd":
        _require(cfg.ode_solver is None, "ode_solver", "null unless method is cd (CT solves no ODE)", cfg.ode_solver)
        _require(cfg.guidance is None, "guidance", "null unless method is cd (it scales the teacher's guidance)",
                 cfg.guidance)
    _require(cfg.guidance is None or cfg.guidance >= 0, "guidance", ">= 0 or null", cfg.guidance)


def batch_split(cfg: TrainConfig, mode: str, world_size: int) -> tuple[int, int]:
    """(samples per loss call, loss calls per rank per iteration); ValueError when the batch does not divide."""
    _require(world_size >= 1, "world_size", ">= 1", world_size)
    _require(cfg.batch % world_size == 0, "batch", f"divisible by the world size {world_size}", cfg.batch)
    per_rank = cfg.batch // world_size
    chunk = per_rank if cfg.batch_gpu is None else cfg.batch_gpu
    _require(chunk >= 1 and per_rank % chunk == 0, "batch_gpu",
             f"a divisor of batch / world_size = {per_rank}", cfg.batch_gpu)
    return chunk, per_rank // chunk
