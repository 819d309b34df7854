"""Stage-2 / Stage-1 cost of one full training step: time and peak memory, measured in one process.

    python -m tcm_core.bench --net tiny --batch 64 [--device cpu|cuda] [--repeats 5] --json [--out bench.json]

A "step" is what the training loop does per iteration: loss, backward, RAdam step and (unless --no-ema) the EMA
update. Stage 1 = ConsistencyLoss (truncated log-normal −1.1/2.0 on [0.002, 80]); Stage 2 =
TruncatedConsistencyLoss (frozen copy of the net, t' = 1, ρ = 0.25, w_b = 0.1, log-Student-t 0/0.2/0.01 on
[1, 80]); both at the curriculum cap (ratio 0.999), c = 1e-8, 1/Δt weighting, on the same net and batch.

Time: best of ``repeats`` measurements with the two variants interleaved (S1, S2, S1, S2, ...) after warm-up,
so drifting machine load affects both alike.

Memory: the peak of the bytes the step's work holds, static state included: weights, EMA, gradients, optimizer
state, the frozen copy (Stage 2), activations and temporaries. Each variant is measured separately, building
its state from nothing inside the measured window: on CUDA with ``torch.cuda.max_memory_allocated`` (relative
to the allocation before the window), on CPU from the allocator events of ``torch.profiler`` (profile_memory),
whose running sum is the live-byte count. Never process RSS (it sees caching, libraries, fragmentation).

The paper reports Stage 2 at 1.18× the time and 1.15× the memory of Stage 1 (App. E); this module's goal is
<= 1.05× time and <= 1.10× memory: each target is computed once, on its own sub-batch, so Stage 2 does the same
number of forward passes as Stage 1, and its only extra state is the frozen weights.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tcm_core.atomic import write_text_atomic
from tcm_core.losses import ConsistencyLoss, TruncatedConsistencyLoss
from tcm_core.schedules import TruncatedLogNormal, TruncatedLogStudentT

RATIO_AT_CAP = 0.999  # the curriculum ratio both stages run at (CIFAR's ratio_limit)
CT_SETTINGS = dict(c=1e-8, weighting="inv_delta_t")
STAGE2_SETTINGS = dict(t_prime=1.0, rho=0.25, w_b=0.1)
EMA_BETA = 0.9999
LR = 1e-4


@dataclass
class TrainState:
    """Everything one training step touches (what a measurement must count)."""

    net: nn.Module
    ema: nn.Module | None
    optimizer: torch.optim.Optimizer
    loss_fn: Callable
    frozen: nn.Module | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _frozen_copy(net: nn.Module) -> nn.Module:
    frozen = copy.deepcopy(net)
    frozen.requires_grad_(False)
    return frozen


def make_loss(stage: int, frozen: nn.Module | None = None) -> Callable:
    """The benchmark's Stage-1 or Stage-2 loss (settings in the module docstring)."""
    if stage == 1:
        return ConsistencyLoss(TruncatedLogNormal(-1.1, 2.0, 0.002, 80.0), **CT_SETTINGS)
    if stage == 2:
        if frozen is None:
            raise ValueError("stage 2 needs the frozen Stage-1 net")
        dist = TruncatedLogStudentT(0.0, 0.2, 0.01, 1.0, 80.0)
        return TruncatedConsistencyLoss(frozen, time_dist=dist, **STAGE2_SETTINGS, **CT_SETTINGS)
    raise ValueError(f"stage must be 1 or 2, got {stage}")


def build_state(master: nn.Module, stage: int, device: torch.device, ema: bool = True) -> TrainState:
    """A fresh student (copy of ``master``) with its EMA, RAdam and, for Stage 2, a frozen copy, on ``device``."""
    net = copy.deepcopy(master).to(device).train()
    ema_net = _frozen_copy(net).eval() if ema else None
    frozen = _frozen_copy(net).train() if stage == 2 else None
    optimizer = torch.optim.RAdam(net.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8)
    return TrainState(net, ema_net, optimizer, make_loss(stage, frozen), frozen)


def train_step(state: TrainState, images: torch.Tensor, ratio: float = RATIO_AT_CAP) -> float:
    """One full training iteration; returns the loss value (a host sync, as a training loop's logging does)."""
    state.optimizer.zero_grad(set_to_none=True)
    out = state.loss_fn(state.net, images, None, ratio=ratio)
    out.loss.backward()
    state.optimizer.step()
    if state.ema is not None:
        with torch.no_grad():
            ema_params = list(state.ema.parameters())
            torch._foreach_lerp_(ema_params, list(state.net.parameters()), 1.0 - EMA_BETA)
    return float(out.loss.detach())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def measure_peak_memory(
    master: nn.Module, stage: int, images: torch.Tensor, ema: bool = True, steps: int = 2
) -> dict[str, int]:
    """Peak bytes of building the Stage-``stage`` state and running ``steps`` training steps (see module doc).

    Two steps: the first allocates the optimizer state, the second is a steady-state step with all of it held.
    Also returns ``static_bytes``: what stays allocated after the steps (weights, EMA, grads, optimizer, frozen).
    """
    device = images.device
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        state = build_state(master, stage, device, ema)
        for _ in range(steps):
            train_step(state, images)
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        static = torch.cuda.memory_allocated(device) - base
    else:
        result: dict[str, int] = {}
        with cpu_peak_bytes(result):
            state = build_state(master, stage, device, ema)
            for _ in range(steps):
                train_step(state, images)
        peak = result["peak"]
        static = _state_bytes(state)
    del state
    gc.collect()
    return {"peak_bytes": int(peak), "static_bytes": int(static)}


def _state_bytes(state: TrainState) -> int:
    tensors: dict[int, torch.Tensor] = {}
    modules = [m for m in (state.net, state.ema, state.frozen) if m is not None]
    for module in modules:
        for t in list(module.parameters()) + list(module.buffers()):
            tensors[t.data_ptr()] = t
            if t.grad is not None:
                tensors[t.grad.data_ptr()] = t.grad
    for per_param in state.optimizer.state.values():
        for value in per_param.values():
            if isinstance(value, torch.Tensor):
                tensors[value.data_ptr()] = value
    return sum(t.numel() * t.element_size() for t in tensors.values())


def measure_step_times(
    master: nn.Module, images: torch.Tensor, repeats: int = 5, warmup: int = 1, ema: bool = True
) -> dict[str, list[float]]:
    """Seconds per training step of Stage 1 and Stage 2 on one shared net/EMA/optimizer, interleaved S1, S2, ...

    Returns lists of wall-clock seconds ("wall1", "wall2") and of this process's CPU seconds ("cpu1", "cpu2").
    On a shared CPU machine the CPU time is the steadier figure (it does not count time waiting for a core).
    """
    device = images.device
    state = build_state(master, 2, device, ema)
    stage1_loss = make_loss(1)
    stage2_loss = state.loss_fn
    times: dict[str, list[float]] = {"wall1": [], "wall2": [], "cpu1": [], "cpu2": []}
    for rep in range(warmup + repeats):
        for stage, loss_fn in ((1, stage1_loss), (2, stage2_loss)):
            state.loss_fn = loss_fn
            _sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            train_step(state, images)
            _sync(device)
            if rep >= warmup:
                times[f"wall{stage}"].append(time.perf_counter() - start)
                times[f"cpu{stage}"].append(time.process_time() - start_cpu)
    return times


def build_master(net_name: str, arch_overrides: dict[str, Any] | None = None, seed: int = 0) -> nn.Module:
    """The benchmark network, built on the CPU from ``arch_preset(net_name, **arch_overrides)``."""
    from tcm_core.networks import arch_preset, build_precond

    torch.manual_seed(seed)
    return build_precond(arch_preset(net_name, **(arch_overrides or {})))


def run_step_benchmark(
    net_name: str,
    batch: int,
    device: str | torch.device = "cpu",
    repeats: int = 5,
    *,
    warmup: int = 1,
    ema: bool = True,
    arch_overrides: dict[str, Any] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Time and peak memory of a full Stage-1 and Stage-2 step on the same net and batch; returns the JSON dict."""
    if batch < 4:
        raise ValueError(f"batch must be >= 4 (rho = 0.25 needs one boundary sample), got {batch}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested but CUDA is not available")
    master = build_master(net_name, arch_overrides, seed)
    shape = (batch, master.img_channels, master.img_resolution, master.img_resolution)
    generator = torch.Generator().manual_seed(seed)
    images = (torch.rand(shape, generator=generator) * 2 - 1).to(device)

    torch.manual_seed(seed)
    times = measure_step_times(master, images, repeats=repeats, warmup=warmup, ema=ema)
    torch.manual_seed(seed)
    memory = {stage: measure_peak_memory(master, stage, images, ema=ema) for stage in (1, 2)}

    t1, t2 = min(times["wall1"]), min(times["wall2"])
    c1, c2 = min(times["cpu1"]), min(times["cpu2"])
    m1, m2 = memory[1]["peak_bytes"], memory[2]["peak_bytes"]
    return {
        "net": net_name,
        "batch": batch,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in master.parameters()),
        "repeats": repeats,
        "warmup": warmup,
        "ema": ema,
        "stage1_time_s": t1,
        "stage2_time_s": t2,
        "stage1_times_s": times["wall1"],
        "stage2_times_s": times["wall2"],
        "stage1_cpu_time_s": c1,
        "stage2_cpu_time_s": c2,
        "stage2_over_stage1_cpu_time": c2 / c1,
        "stage1_peak_bytes": m1,
        "stage2_peak_bytes": m2,
        "stage1_static_bytes": memory[1]["static_bytes"],
        "stage2_static_bytes": memory[2]["static_bytes"],
        "stage2_over_stage1_time": t2 / t1,
        "stage2_over_stage1_mem": m2 / m1,
        "memory_method": "cuda.max_memory_allocated" if device.type == "cuda" else "profiler allocator events",
        "settings": {"stage1": "lognormal(-1.1, 2.0) on [0.002, 80]", **CT_SETTINGS, **STAGE2_SETTINGS},
    }


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--net", default="tiny", help="arch preset: tiny, ddpmpp, edm2_s, edm2_xl")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed repeats per variant (best kept)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-ema", action="store_true", help="leave the EMA update out of the step")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON to this file (atomically)")
    # --train: time real iterations of the training loop (tcm_core.training), not the bare loss step
    parser.add_argument("--train", action="store_true", help="time full iterations of tcm_core.training.train "
                        "(data, loss, backward, grad norm, optimiser, EMA) for --modes on synthetic data")
    parser.add_argument("--modes", default="stage1,stage2", help="--train: comma-separated training modes")
    parser.add_argument("--rounds", type=int, default=2, help="--train: rounds of short runs, modes interleaved")
    parser.add_argument("--method", default="ct", help="--train: ct, cd or ct,cd (CD distils the init network; "
                        "ct,cd also reports the CD/CT time per iteration of each mode)")


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2) + "\n")


def run_bench(args: argparse.Namespace) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if getattr(args, "train", False):
        return run_train_bench(args, device)
    result = run_step_benchmark(args.net, args.batch, device, args.repeats, warmup=args.warmup, ema=not args.no_ema)
    if args.out is not None:
        _write_json_atomic(args.out, result)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"{result['net']} batch {result['batch']} on {result['device_name']}: "
            f"time S1 {result['stage1_time_s']:.4f}s S2 {result['stage2_time_s']:.4f}s "
            f"(x{result['stage2_over_stage1_time']:.3f}, CPU time x{result['stage2_over_stage1_cpu_time']:.3f}); "
            f"peak memory S1 {result['stage1_peak_bytes'] / 2**20:.1f} MiB "
            f"S2 {result['stage2_peak_bytes'] / 2**20:.1f} MiB (x{result['stage2_over_stage1_mem']:.3f})"
        )
    return 0


def run_train_bench(args: argparse.Namespace, device: str) -> int:
    """``--train``: seconds per real training iteration per mode (see ``training.benchmark_train_iterations``)."""
    from tcm_core.training import benchmark_train_iterations

    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    methods = tuple(m.strip() for m in args.method.split(",") if m.strip())
    result = benchmark_train_iterations(args.net, args.batch, device, repeats=args.repeats, warmup=args.warmup,
                                        rounds=args.rounds, modes=modes, methods=methods)
    if args.out is not None:
        _write_json_atomic(args.out, result)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        names = [k[: -len("_train_s_per_it")] for k in result if k.endswith("_train_s_per_it")]
        parts = [f"{m} {result[f'{m}_train_s_per_it']:.4f}s (CPU {result[f'{m}_train_cpu_s_per_it']:.4f}s)"
                 for m in names]
        ratios = [f"{k[: -len('_train_time')]} x{v:.3f}" for k, v in result.items()
                  if k.endswith("_train_time") and "_over_" in k]
        print(f"{result['net']} batch {result['batch']} on {result['device_name']}, s/iteration: " + ", ".join(parts)
              + (f"; {', '.join(ratios)}" if ratios else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tcm_core.bench", description=__doc__.splitlines()[0])
    add_bench_arguments(parser)
    return run_bench(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
