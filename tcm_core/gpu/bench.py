"""Stage-2 / Stage-1 cost of one full training step (time and peak memory), and real training iterations per mode.

    python -m tcm_core bench --net tiny --batch 64 [--device cpu|cuda] [--precision fp32|tf32|bf16|fp16]
                             [--repeats 5] --json [--out bench.json]
    python -m tcm_core bench --train --net tiny --batch 64 --modes stage1,stage2 [--precision ...] --json

A "step" is the training loop's own ``train_step`` (tcm_core.training.step) on a real :class:`Run` built by
``train_setup.setup`` from synthetic files written to a temporary folder (an EDM-layout zip of random images and
an init checkpoint): data, loss, backward, the one clip-norm pass, the RAdam step, the non-finite weight check and
the EMA update. Stage 1 = ``stage1`` (ConsistencyLoss, truncated log-normal −1.1/2.0 on [0.002, 80]); Stage 2 =
``stage2`` (TruncatedConsistencyLoss with the init as frozen boundary model, t' = 1, ρ = 0.25, w_b = 0.1,
log-Student-t 0/0.2/0.01 on [1, 80]); both at the curriculum cap (``curriculum: cap``, ratio 0.999), c = 1e-8,
1/Δt weighting, on the same net (the init's weights) and the same batch (same data, same seed).

Precision: ``fp32``; ``tf32`` = fp32 with ``tf32: true`` (TF32 matmuls/convolutions on CUDA, a no-op on CPU);
``bf16`` / ``fp16`` = the config's ``precision`` (autocast; fp16 with the GradScaler), CUDA only.

Time: best of ``repeats`` measurements with the two stages interleaved in pairs (S1 S2, S2 S1, S1 S2, ...) after
warm-up, so drifting machine load affects both alike and neither always runs first. The ratio of the bests is
the headline figure; its uncertainty comes from the pairs (``time_pairs``): each repeat's S2/S1 ratio (adjacent
in time, so slow drift cancels), their median and the distribution-free 95% interval of that median (binomial
order statistics, ``scipy.stats.quantile_test``; needs >= 6 repeats), and a verdict against the goal: "meets" if
the interval lies at or below it, "misses" if above it, else "inconclusive".

Memory: the peak of the bytes the measured work holds, static state included: weights, EMA, gradients, optimizer
state, the frozen copy (Stage 2), activations and temporaries. Each stage is measured separately, building its
run from nothing inside the measured window (``setup``, then two steps: the first allocates the optimizer state,
the second is a steady-state step with all of it held): on CUDA with ``torch.cuda.max_memory_allocated``
(relative to the allocation before the window), on CPU from the allocator events of ``torch.profiler``
(profile_memory), whose running sum is the live-byte count. Never process RSS (it sees caching, libraries,
fragmentation).

The paper reports Stage 2 at 1.18× the time and 1.15× the memory of Stage 1 (App. E); this code's goal is
<= 1.05× time and <= 1.10× memory: each target is computed once, on its own sub-batch, so Stage 2 does the same
number of forward passes as Stage 1, and its only extra state is the frozen weights.

``--train`` times whole iterations of ``training.train`` (the driver, with its outputs) per mode instead.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tcm_core.io.atomic import write_text_atomic
from tcm_core.training.config import MODES, TRUNCATED_MODES, TrainConfig, build_config

PRECISIONS: dict[str, dict[str, Any]] = {  # --precision -> TrainConfig keys
    "fp32": {"precision": "fp32", "tf32": False},
    "tf32": {"precision": "fp32", "tf32": True},
    "bf16": {"precision": "bf16", "tf32": False},
    "fp16": {"precision": "fp16", "tf32": False},
}
STAGE_MODES = {1: "stage1", 2: "stage2"}
GOALS = {"time": 1.05, "mem": 1.10}  # Stage-2 / Stage-1 goals of this code (the paper: 1.18, 1.15)
CONFIDENCE = 0.95  # of the paired-ratio interval
STEP_REPEATS = 25  # default step-benchmark repeats: enough pairs for a 95% interval of a few per cent on CPU
TRAIN_REPEATS = 5  # default --train iterations per round
SYNTHETIC_IMAGES = 256  # images in the synthetic data set (the sampler wraps around for larger batches)


# ---------------------------------------------------------------------------------------------------------- inputs


@dataclass
class SyntheticInputs:
    """The files a benchmark run trains on: random images and an init network (also the frozen model)."""

    net_name: str
    arch_overrides: dict[str, Any]
    data: Path
    init: Path
    parameters: int
    folder: Path


def write_synthetic_inputs(folder: Path, net_name: str, arch_overrides: dict[str, Any] | None = None,
                           seed: int = 0, images: int = SYNTHETIC_IMAGES) -> SyntheticInputs:
    """An EDM-layout zip of random images (random labels for a conditional net) and the preset's net (active)."""
    from tcm_core.data import write_dataset_zip
    from tcm_core.io.network_files import save_network
    from tcm_core.networks import arch_preset, build_precond

    overrides = dict(arch_overrides or {})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        master = activate_weights(build_precond(arch_preset(net_name, **overrides)))
    rng = np.random.default_rng(seed)
    shape = (master.img_channels, master.img_resolution, master.img_resolution)
    labels = None
    if master.label_dim:
        labels = rng.integers(0, master.label_dim, images)
        labels[0] = master.label_dim - 1  # the data set's label_dim is its largest label + 1
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{net_name}-data.zip"
    write_dataset_zip(data, (rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(images)), labels)
    init = folder / f"{net_name}-init.safetensors"
    save_network(master, init, iteration=0, provenance={"note": "synthetic benchmark init"})
    parameters = sum(p.numel() for p in master.parameters())
    return SyntheticInputs(net_name, overrides, data, init, parameters, folder)


@torch.no_grad()
def activate_weights(net: torch.nn.Module) -> torch.nn.Module:
    """Make a fresh preset network's output depend on its weights, as a trained network's does.

    Fresh, the presets output about 0 (DDPM++ starts the last convolution of each block at 1e-5 scale, EDM2 its
    gains at 0), so D(x, σ) ≈ c_skip·x and losses, precision errors and samples would hardly see the network:
    those weights are redrawn with std 1/√fan_in and zero gains set to 1 (output std about 0.5 to 1.5).
    """
    for p in net.parameters():
        if p.ndim >= 2 and float(p.abs().max()) < 1e-3:
            p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()))
        elif p.ndim == 0 and float(p) == 0.0:
            p.fill_(1.0)
    return net


def bench_config(mode: str, batch: int, precision: str = "fp32", seed: int = 0, **keys: Any) -> TrainConfig:
    """The TrainConfig of a benchmark run: TrainConfig's defaults (the paper's CIFAR-10 settings) at the cap."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    base = {"iterations": 10**6, "batch": batch, "seed": seed, "curriculum": "cap", "log_every": 10**6,
            "state_every": 10**6, **PRECISIONS[precision]}
    return build_config({**base, **keys}, mode)


def build_run(inputs: SyntheticInputs, mode: str, cfg: TrainConfig, device: str, out: Path):
    """A real training run (``train_setup.setup``) of ``mode`` on the synthetic inputs."""
    from tcm_core.training.setup import RunPaths, setup

    paths = RunPaths(data=inputs.data, out=out, init=inputs.init,
                     boundary_model=inputs.init if mode in TRUNCATED_MODES else None)
    return setup(cfg, mode, paths, device)


# ---------------------------------------------------------------------------------------------------------- memory


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def cpu_peak_bytes(result: dict[str, int]):
    """Peak of live bytes allocated inside the block (relative to its start), from profiler allocator events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield
    events = [
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    events.sort(key=lambda item: item[0])
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    result["peak"] = peak


@contextlib.contextmanager
def peak_bytes(device: torch.device, result: dict[str, int]) -> Iterator[None]:
    """``result["peak"]``: peak bytes the block allocates on ``device`` (CUDA allocator stats, or CPU profiler)."""
    free_memory(device)
    if device.type != "cuda":
        with cpu_peak_bytes(result):
            yield
        return
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    yield
    sync(device)
    result["peak"] = torch.cuda.max_memory_allocated(device) - base
    result["held"] = torch.cuda.memory_allocated(device) - base


def measure_peak_memory(inputs: SyntheticInputs, stage: int, batch: int, device: str, precision: str = "fp32",
                        steps: int = 2, seed: int = 0) -> dict[str, int]:
    """Peak bytes of building the Stage-``stage`` run and running ``steps`` steps (see the module docstring).

    Also returns ``static_bytes``: what stays allocated after the steps (weights, EMA, grads, optimizer, frozen).
    """
    from tcm_core.training.step import train_step

    dev = torch.device(_device_kind(device))
    cfg = bench_config(STAGE_MODES[stage], batch, precision, seed)
    result: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="tcm-bench-mem-", dir=inputs.folder) as out:
        with peak_bytes(dev, result):
            run = build_run(inputs, STAGE_MODES[stage], cfg, device, Path(out))
            for _ in range(steps):
                train_step(run)
        static = result["held"] if "held" in result else _state_bytes(run)
    del run
    free_memory(dev)
    return {"peak_bytes": int(result["peak"]), "static_bytes": int(static)}


def _state_bytes(run: Any) -> int:
    """Bytes of the run's tensors: weights and buffers of net, EMA and frozen model, gradients, optimizer state."""
    tensors: dict[int, torch.Tensor] = {}
    for module in (m for m in (run.net, run.ema, run.frozen) if m is not None):
        for t in list(module.parameters()) + list(module.buffers()):
            tensors[t.data_ptr()] = t
            if t.grad is not None:
                tensors[t.grad.data_ptr()] = t.grad
    for per_param in run.optimizer.state.values():
        for value in per_param.values():
            if isinstance(value, torch.Tensor):
                tensors[value.data_ptr()] = value
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _device_kind(device: str) -> str:
    """"cpu" or "cuda" ("auto": cuda when available); ConfigError for cuda without CUDA."""
    from tcm_core.training.distributed import pick_device

    return pick_device(str(device))


# ---------------------------------------------------------------------------------------------------------- time


def measure_step_times(inputs: SyntheticInputs, batch: int, device: str, precision: str = "fp32", repeats: int = 5,
                       warmup: int = 1, seed: int = 0) -> dict[str, list[float]]:
    """Seconds per ``train_step`` of a Stage-1 and a Stage-2 run of the same net and batch, interleaved in pairs
    (S1 S2, S2 S1, S1 S2, ...).

    Returns lists of wall-clock seconds ("wall1", "wall2") and of this process's CPU seconds ("cpu1", "cpu2").
    On a shared CPU machine the CPU time is the steadier figure (it does not count time waiting for a core).
    """
    from tcm_core.training.step import train_step

    dev = torch.device(_device_kind(device))
    times: dict[str, list[float]] = {"wall1": [], "wall2": [], "cpu1": [], "cpu2": []}
    with tempfile.TemporaryDirectory(prefix="tcm-bench-time-", dir=inputs.folder) as out:
        runs = {stage: build_run(inputs, mode, bench_config(mode, batch, precision, seed), device,
                                 Path(out) / mode) for stage, mode in STAGE_MODES.items()}
        for rep in range(warmup + repeats):
            # adjacent pairs, alternating S1 S2 / S2 S1, so neither stage always runs first
            for stage, run in (list(runs.items()) if rep % 2 == 0 else list(runs.items())[::-1]):
                sync(dev)
                start, start_cpu = time.perf_counter(), time.process_time()
                train_step(run)
                sync(dev)
                if rep >= warmup:
                    times[f"wall{stage}"].append(time.perf_counter() - start)
                    times[f"cpu{stage}"].append(time.process_time() - start_cpu)
        del runs
    free_memory(dev)
    return times


def run_step_benchmark(net_name: str, batch: int, device: str = "cpu", repeats: int = 5, *, warmup: int = 1,
                       precision: str = "fp32", arch_overrides: dict[str, Any] | None = None, seed: int = 0,
                       inputs: SyntheticInputs | None = None) -> dict[str, Any]:
    """Time and peak memory of a Stage-1 and a Stage-2 ``train_step`` on the same net and batch (the JSON dict)."""
    if batch < 4:
        raise ValueError(f"batch must be >= 4 (rho = 0.25 needs one boundary sample), got {batch}")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    device = _device_kind(device)
    bench_config("stage2", batch, precision)  # refuse a bad setting before writing anything
    with contextlib.ExitStack() as stack:
        if inputs is None:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tcm-bench-")))
            inputs = write_synthetic_inputs(folder, net_name, arch_overrides, seed)
        times = measure_step_times(inputs, batch, device, precision, repeats, warmup, seed)
        memory = {stage: measure_peak_memory(inputs, stage, batch, device, precision, seed=seed) for stage in (1, 2)}
    return step_report(inputs, batch, device, precision, repeats, warmup, times, memory)


def step_report(inputs: SyntheticInputs, batch: int, device: str, precision: str, repeats: int, warmup: int,
                times: dict[str, list[float]], memory: dict[int, dict[str, int]]) -> dict[str, Any]:
    t1, t2 = min(times["wall1"]), min(times["wall2"])
    c1, c2 = min(times["cpu1"]), min(times["cpu2"])
    m1, m2 = memory[1]["peak_bytes"], memory[2]["peak_bytes"]
    paired = paired_ratio(times["wall1"], times["wall2"])
    return {
        **device_fields(device), "net": inputs.net_name, "batch": batch, "precision": precision,
        "parameters": inputs.parameters, "repeats": repeats, "warmup": warmup, "ema": True,
        "stage1_time_s": t1, "stage2_time_s": t2, "stage1_times_s": times["wall1"], "stage2_times_s": times["wall2"],
        "stage1_cpu_time_s": c1, "stage2_cpu_time_s": c2, "stage2_over_stage1_cpu_time": c2 / c1,
        "stage1_peak_bytes": m1, "stage2_peak_bytes": m2,
        "stage1_static_bytes": memory[1]["static_bytes"], "stage2_static_bytes": memory[2]["static_bytes"],
        "stage2_over_stage1_time": t2 / t1, "stage2_over_stage1_mem": m2 / m1,
        "time_pairs": paired, "goals": GOALS,
        "mem_verdict": "meets" if m2 / m1 <= GOALS["mem"] else "misses",  # the peak bytes do not vary run to run
        "memory_method": "cuda.max_memory_allocated" if device == "cuda" else "profiler allocator events",
        "settings": {"stage1": "lognormal(-1.1, 2.0) on [0.002, 80]", "stage2": "student_t(0, 0.2, 0.01) on [1, 80]",
                     "t_prime": 1.0, "rho": 0.25, "w_b": 0.1, "c": 1e-8, "weighting": "inv_delta_t",
                     "ratio": 0.999, "step": "tcm_core.training.step.train_step"},
    }


def paired_ratio(first: list[float], second: list[float], goal: float = GOALS["time"],
                 confidence: float = CONFIDENCE) -> dict[str, Any]:
    """The per-repeat ratios second[i] / first[i], their median, its distribution-free ``confidence`` interval
    (None with too few repeats) and the verdict against ``goal`` (see the module docstring)."""
    from scipy.stats import quantile_test

    ratios = [b / a for a, b in zip(first, second, strict=True)]
    median = float(np.median(ratios))
    ci = quantile_test(ratios, q=median, p=0.5).confidence_interval(confidence)
    low, high = (None, None) if math.isnan(ci.low) or math.isnan(ci.high) else (float(ci.low), float(ci.high))
    if low is None:
        verdict = f"inconclusive (an interval needs >= 6 repeats, got {len(ratios)})"
    else:
        verdict = "meets" if high <= goal else "misses" if low > goal else "inconclusive"
    return {"ratios": ratios, "median": median, "interval": [low, high], "confidence": confidence, "goal": goal,
            "verdict": verdict}


def device_fields(device: str) -> dict[str, Any]:
    dev = torch.device(device)
    return {"device": str(dev), "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "torch": torch.__version__, "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------------------------- --train


def bench_variants(modes: tuple[str, ...], methods: tuple[str, ...]) -> list[tuple[str, str, str]]:
    """(name, mode, method) of each timed variant: ``stage1`` (CT) and ``stage1_cd`` (CD) etc.; pretrain has no
    method."""
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"modes must be among {', '.join(MODES)}, got {mode!r}")
    for method in methods:
        if method not in ("ct", "cd"):
            raise ValueError(f"methods must be among ct, cd, got {method!r}")
    return [(mode if method == "ct" or mode == "pretrain" else f"{mode}_cd", mode, method)
            for mode in modes for method in (methods if mode != "pretrain" else ("ct",))]


def benchmark_train_iterations(net_name: str = "tiny", batch: int = 64, device: str = "cpu", repeats: int = 5,
                               warmup: int = 2, rounds: int = 2, modes: tuple[str, ...] = ("stage1", "stage2"),
                               arch_overrides: dict[str, Any] | None = None, seed: int = 0,
                               config: dict[str, Any] | None = None, precision: str = "fp32",
                               inputs: SyntheticInputs | None = None, methods: tuple[str, ...] = ("ct",),
                               ode_solver: str = "heun", guidance: float | None = None) -> dict[str, Any]:
    """Seconds per iteration of the REAL training driver (``training.train``) for each mode and method, on
    synthetic data.

    Each round runs every variant once for ``warmup + repeats`` iterations (variants interleaved round by round,
    so drifting machine load hits all alike); the best post-warm-up iteration over all rounds is reported. An
    iteration is everything the loop does per step (data, loss, backward, grad norm, optimiser, EMA, host
    sync) except the periodic outputs (metrics lines, state files), which are excluded from the timing. Method
    ``cd`` distils the init network itself with ``ode_solver`` (Heun: two teacher passes per iteration, Euler:
    one) and ``guidance`` (each teacher pass over the doubled batch; the synthetic net is then class-conditional
    with label dropout, as a guided teacher must be).
    """
    variants = bench_variants(modes, methods)
    if repeats < 1 or warmup < 0 or rounds < 1:
        raise ValueError(f"need repeats >= 1, warmup >= 0, rounds >= 1; got {repeats}, {warmup}, {rounds}")
    keys = {**PRECISIONS[precision], **(config or {})}
    cd_keys = {"method": "cd", "ode_solver": ode_solver, "guidance": guidance}
    if guidance is not None:
        arch_overrides = {"label_dim": 10, "label_dropout": 0.1, **(arch_overrides or {})}
    times: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    cpu_times: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tcm-train-bench-")))
        if inputs is None:
            inputs = write_synthetic_inputs(folder, net_name, arch_overrides, seed)
        for round_index in range(rounds):
            for name, mode, method in variants:
                result = _train_once(inputs, mode, keys if method == "ct" else {**keys, **cd_keys}, batch, device,
                                     warmup + repeats, seed + round_index, folder / f"{name}-{round_index}")
                times[name].extend(result.iteration_seconds[warmup:])
                cpu_times[name].extend(result.iteration_cpu_seconds[warmup:])
    report = train_report(inputs, batch, device, repeats, warmup, rounds, keys, times, cpu_times)
    report["methods"] = list(methods)
    if "cd" in methods:
        report["cd"] = cd_keys
    return report


def _train_once(inputs: SyntheticInputs, mode: str, keys: dict[str, Any], batch: int, device: str, iterations: int,
                seed: int, out: Path) -> Any:
    from tcm_core.training.loop import train

    cfg_keys = {"iterations": iterations, "batch": batch, "seed": seed, "curriculum": "cap", "log_every": 10**6,
                "state_every": 10**6, **keys}
    if mode == "pretrain":
        cfg_keys["arch"] = {"preset": inputs.net_name, **inputs.arch_overrides}
    cfg = build_config(cfg_keys, mode)
    return train(cfg, mode=mode, data=inputs.data, out=out, init=None if mode == "pretrain" else inputs.init,
                 boundary_model=inputs.init if mode in TRUNCATED_MODES else None,
                 teacher=inputs.init if cfg.method == "cd" else None, device=device, progress=False)


def train_report(inputs: SyntheticInputs, batch: int, device: str, repeats: int, warmup: int, rounds: int,
                 keys: dict[str, Any], times: dict[str, list[float]], cpu_times: dict[str, list[float]]
                 ) -> dict[str, Any]:
    """Best and median seconds per iteration of each variant, and the Stage-2/Stage-1 and CD/CT ratios."""
    report: dict[str, Any] = {**device_fields(_device_kind(device)), "net": inputs.net_name, "batch": batch,
                              "parameters": inputs.parameters, "repeats": repeats, "warmup": warmup,
                              "rounds": rounds, "config": dict(keys)}
    for name in times:
        best = min(times[name])
        report[f"{name}_train_s_per_it"] = best
        report[f"{name}_train_s_per_it_median"] = float(np.median(times[name]))
        report[f"{name}_train_times_s"] = times[name]
        report[f"{name}_images_per_s"] = batch / best
        # CPU seconds of this process: on a shared CPU machine steadier than wall time (no waiting for a core)
        report[f"{name}_train_cpu_s_per_it"] = min(cpu_times[name])
    if "stage1" in times and "stage2" in times:
        report["stage2_over_stage1_train_time"] = report["stage2_train_s_per_it"] / report["stage1_train_s_per_it"]
        report["stage2_over_stage1_train_cpu_time"] = (report["stage2_train_cpu_s_per_it"]
                                                       / report["stage1_train_cpu_s_per_it"])
    for name in [n for n in times if f"{n}_cd" in times]:
        for kind in ("", "cpu_"):
            report[f"{name}_cd_over_ct_train_{kind}time"] = (report[f"{name}_cd_train_{kind}s_per_it"]
                                                             / report[f"{name}_train_{kind}s_per_it"])
    return report


# ---------------------------------------------------------------------------------------------------------- CLI


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--net", default="tiny", help="arch preset: tiny, ddpmpp, edm2_s, edm2_xl")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--precision", default="fp32", choices=tuple(PRECISIONS),
                        help="fp32, tf32 (fp32 with TF32 matmuls), bf16 or fp16 (autocast; CUDA only)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved timed repeats per variant (best "
                        f"kept; default {STEP_REPEATS} for the step benchmark, {TRAIN_REPEATS} iterations per round "
                        "for --train)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON to this file (atomically)")
    parser.add_argument("--train", action="store_true", help="time full iterations of tcm_core.training.loop.train "
                        "(data, loss, backward, grad norm, optimiser, EMA) for --modes on synthetic data")
    parser.add_argument("--modes", default="stage1,stage2", help="--train: comma-separated training modes")
    parser.add_argument("--rounds", type=int, default=2, help="--train: rounds of short runs, modes interleaved")
    parser.add_argument("--method", default="ct", help="--train: ct, cd or ct,cd (CD distils the init network; "
                        "ct,cd also reports the CD/CT time per iteration of each mode)")
    parser.add_argument("--ode-solver", default="heun", choices=("euler", "heun"), help="--train: CD's solver")
    parser.add_argument("--guidance", type=float, default=None,
                        help="--train: CD's classifier-free guidance scale (default: none)")


def _emit(args: argparse.Namespace, result: dict[str, Any], line: Callable[[dict[str, Any]], str]) -> None:
    if args.out is not None:
        write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2) if args.json else line(result))


def _step_line(r: dict[str, Any]) -> str:
    return (f"{r['net']} batch {r['batch']} {r['precision']} on {r['device_name']}: time S1 {r['stage1_time_s']:.4f}s "
            f"S2 {r['stage2_time_s']:.4f}s (x{r['stage2_over_stage1_time']:.3f}, CPU time "
            f"x{r['stage2_over_stage1_cpu_time']:.3f}); peak memory S1 {r['stage1_peak_bytes'] / 2**20:.1f} MiB "
            f"S2 {r['stage2_peak_bytes'] / 2**20:.1f} MiB (x{r['stage2_over_stage1_mem']:.3f}, {r['mem_verdict']} "
            f"<= {r['goals']['mem']}); {_pairs_text(r['time_pairs'])}")


def _pairs_text(pairs: dict[str, Any]) -> str:
    low, high = pairs["interval"]
    interval = "no interval" if low is None else f"{pairs['confidence']:.0%} interval [{low:.3f}, {high:.3f}]"
    return (f"paired time ratio median {pairs['median']:.3f} over {len(pairs['ratios'])} repeats, {interval}: "
            f"{pairs['verdict']} <= {pairs['goal']}")


def _train_line(r: dict[str, Any]) -> str:
    names = [k[: -len("_train_s_per_it")] for k in r if k.endswith("_train_s_per_it")]
    parts = [f"{m} {r[f'{m}_train_s_per_it']:.4f}s (CPU {r[f'{m}_train_cpu_s_per_it']:.4f}s)" for m in names]
    ratios = [f"{k[: -len('_train_time')]} x{v:.3f}" for k, v in r.items()
              if k.endswith("_train_time") and "_over_" in k]
    return (f"{r['net']} batch {r['batch']} on {r['device_name']}, s/iteration: " + ", ".join(parts)
            + (f"; {', '.join(ratios)}" if ratios else ""))


def run_bench(args: argparse.Namespace) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.train:
        modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
        methods = tuple(m.strip() for m in args.method.split(",") if m.strip())
        repeats = TRAIN_REPEATS if args.repeats is None else args.repeats
        result = benchmark_train_iterations(args.net, args.batch, device, repeats=repeats, warmup=args.warmup,
                                            rounds=args.rounds, modes=modes, precision=args.precision,
                                            methods=methods, ode_solver=args.ode_solver, guidance=args.guidance)
        _emit(args, result, _train_line)
        return 0
    repeats = STEP_REPEATS if args.repeats is None else args.repeats
    result = run_step_benchmark(args.net, args.batch, device, repeats, warmup=args.warmup,
                                precision=args.precision)
    _emit(args, result, _step_line)
    return 0
