"""One command that checks every CUDA path of the pipeline on synthetic data and writes what it found.

    python -m tcm_core gpu-check                 # on a GPU machine (scripts/gpu-check.sh): about 5 minutes
    python -m tcm_core gpu-check --dry-run       # on CPU, micro sizes, through the same functions (a test runs it)
    python -m tcm_core gpu-check --cost-table docs/gpu/<date>-<gpu>.json   # the README's cost rows from it

The dry run skips only TF32 (a CUDA setting); its bf16/fp16 cases run under CPU autocast with a CPU GradScaler
(``train_setup.cpu_autocast_allowed``): the same code paths, CPU kernels and rounding.

Writes ``<out-root>/<date>-<gpu>/<date>-<gpu>.json`` and ``.md`` (rewritten after every case, so a run cut
short still leaves its results) and exits 1 if any case failed (0 when every case passed or was skipped).

Checks, in order (cases in gpu_checks; each check has a share of the time budget and skips what is left once
its share is spent, and everything stops at 1.4x the budget):

* precision: ``ddpmpp`` at batch 128 and ``edm2_s`` at 32, Stage 1 and Stage 2, 20 real training steps in fp32,
  TF32, bf16 autocast, fp16 autocast with the GradScaler (``precision: fp16``) and EDM-style fp16 (check-only
  hook): finite losses and weights, step-1 loss within tolerance of fp32 on the same inputs;
* bench: Stage-2 / Stage-1 step time and peak-memory ratios per precision (``tcm_core.gpu.bench``);
* ddp: 2 processes under torchrun (nccl on one GPU if NCCL allows it) and a 1-process DDP wrap, each against
  one process at the same global batch (the world-size invariance of tests/test_ddp.py);
* sampling: 1024 images in 1 and 2 steps, and their Inception features; images per second;
* release_fid: ``evaluate fid`` (the fid rule's command) of a ddpmpp on synthetic weights, 1000 images in 1 and 2
  steps with Inception features, timed, and the hours the full CIFAR-10 ``released_tables`` takes at that speed;
* train_speed: images per second of real training iterations (``bench --train``) of each paper job at its
  per-GPU batch and precision (config.yaml; the paper's GPU counts), with the run's peak memory vs the GPU's;
* memory: the largest per-GPU Stage-2 batch that fits, per preset (bounded search, OOM caught).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import platform
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tcm_core.errors import ConfigError
from tcm_core.gpu import cases as checks
from tcm_core.gpu.cases import NetSpec, TrainSpec
from tcm_core.io.atomic import write_text_atomic
from tcm_core.training.setup import cpu_autocast_allowed

# The paper's GPUs per job (TCM README: CIFAR-10 on 1 node x 8, ImageNet-64 on 8 nodes x 8 A100) and the
# architecture of each preset's init checkpoint.
PAPER_GPUS = {"cifar10": 8, "imagenet64_s": 64, "imagenet64_xl": 64}
PRESET_NETS = {"cifar10": "ddpmpp", "imagenet64_s": "edm2_s", "imagenet64_xl": "edm2_xl"}
MICRO_ARCH = {"model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [8], "dropout": 0.1}
CHECKS = ("precision", "bench", "ddp", "sampling", "release_fid", "train_speed", "memory")
BUDGET_SHARES = {"precision": 0.25, "bench": 0.17, "ddp": 0.12, "sampling": 0.12, "release_fid": 0.08,
                 "train_speed": 0.2, "memory": 0.14}
RELEASE_PRESET = "cifar10"  # the release_fid check times a ddpmpp FID and projects this preset's released_tables
# the order of importance of the precision cases per net (the preset's own precision right after fp32), and of
# the bench cases as (index into Plan.precision_nets, precision): ddpmpp's fp32/TF32 ratios are the acceptance figures
PRECISION_ORDER = {"ddpmpp": ("fp32", "tf32", "fp16", "edm_fp16", "bf16"),
                   "edm2_s": ("fp32", "fp16", "edm_fp16", "bf16", "tf32")}
BENCH_ORDER = [(0, "fp32"), (0, "tf32"), (1, "fp16"), (0, "bf16"), (0, "fp16"), (1, "bf16"), (1, "tf32"), (1, "fp32")]
DEFAULT_BUDGET_S = 300.0  # ~5 minutes of checks: the device budget is 15 minutes including the machine's start
DRY_RUN_BUDGET_S = 3600.0  # the dry run's time varies 5x with the load of a shared CPU: its budget only stops hangs
HARD_LIMIT = 1.4  # nothing starts after 1.4 x the budget
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "config.yaml"


@dataclass
class Plan:
    """What the run checks and at which sizes (:func:`gpu_plan` or :func:`dry_run_plan`)."""

    dry_run: bool
    device: str
    budget_s: float
    precision_nets: list[NetSpec]
    precision_steps: int
    bench_repeats: int
    bench_warmup: int
    train_specs: list[TrainSpec]
    train_repeats: int
    train_warmup: int
    ddp: NetSpec
    ddp_batch_gpu: int
    ddp_iterations: int
    ddp_timeout_s: float
    samples: list[tuple[NetSpec, float]]  # (net, the preset's two-step mid time)
    sample_num: int
    sample_batch: int
    feature_batch: int
    memory_tries: int
    cost_jobs: list[dict[str, Any]]
    release: tuple[NetSpec, float]  # the release-sized net and its two-step middle time
    release_num: int  # images of the timed FID (per NFE)
    release_ref_images: int  # synthetic data set images the FID's reference statistics are made from
    release_workload: dict[str, Any]  # what released_tables generates for RELEASE_PRESET
    checks: tuple[str, ...] = CHECKS  # --only

    def budget(self, check: str) -> float:
        """Seconds for ``check``: its share of the budget, the shares renormalised over the checks selected."""
        return BUDGET_SHARES[check] / sum(BUDGET_SHARES[c] for c in self.checks) * self.budget_s


@dataclass
class Case:
    check: str
    name: str
    run: Callable[[checks.Context], dict[str, Any]]
    needs_cuda: bool = False


# ---------------------------------------------------------------------------------------------------------- plans


def precision_name(cfg: Any) -> str:
    """bench's precision name of a TrainConfig: fp32, tf32 (fp32 with tf32: true), bf16 or fp16."""
    return "tf32" if cfg.precision == "fp32" and cfg.tf32 else cfg.precision


def paper_jobs(config: Path) -> list[TrainSpec]:
    """Stage 1 and Stage 2 of each GPU preset at the paper's per-GPU batch (global batch / the paper's GPUs)."""
    from tcm_core.presets import resolve_config

    specs = []
    for preset, gpus in PAPER_GPUS.items():
        for mode in ("stage1", "stage2"):
            cfg = resolve_config(config, mode, preset)
            specs.append(TrainSpec(preset, mode, NetSpec(PRESET_NETS[preset], cfg.batch // gpus, label=preset),
                                   precision_name(cfg), cfg.iterations, cfg.batch, gpus))
    return specs


def cost_jobs(config: Path) -> list[dict[str, Any]]:
    """The training jobs of each preset's ``all`` target (and a CIFAR-10 ablation cell) that the cost table sums."""
    from tcm_core.presets import read_yaml, resolve_config

    presets = read_yaml(config)["presets"]
    jobs = []
    for preset in PAPER_GPUS:
        trained = ["stage1_continued", "stage2"]
        if (presets[preset].get("init") or {}).get("provides") != "stage1":
            trained.insert(0, "stage1")
        for job in trained:
            cfg = resolve_config(config, job, preset)
            jobs.append({"target": preset, "job": job, "speed_of": "stage2" if job == "stage2" else "stage1",
                         "iterations": cfg.iterations, "batch": cfg.batch, "gpus": PAPER_GPUS[preset]})
    ablation = presets["cifar10"].get("ablation") or {}
    jobs.append({"target": "cifar10_ablation_cell", "job": "stage2", "speed_of": "stage2", "iterations": 1000,
                 "batch": int(ablation.get("batch", 128)), "gpus": 1, "preset": "cifar10"})
    return jobs


def _mid_t(config: Path, preset: str) -> float:
    from tcm_core.presets import read_yaml

    return float(read_yaml(config)["presets"][preset]["eval"]["mid_t"])


def gpu_plan(config: Path, budget_s: float) -> Plan:
    jobs = paper_jobs(config)
    nets = [NetSpec("ddpmpp", 128, label="cifar10"), NetSpec("edm2_s", 32, label="imagenet64_s")]
    return Plan(dry_run=False, device="cuda", budget_s=budget_s, precision_nets=nets, precision_steps=20,
                bench_repeats=12, bench_warmup=1, train_specs=jobs, train_repeats=5, train_warmup=2,
                ddp=NetSpec("ddpmpp", 16, label="cifar10"), ddp_batch_gpu=4, ddp_iterations=3, ddp_timeout_s=240,
                samples=[(nets[0], _mid_t(config, "cifar10")), (nets[1], _mid_t(config, "imagenet64_s"))],
                sample_num=1024, sample_batch=256, feature_batch=256, memory_tries=5, cost_jobs=cost_jobs(config),
                release=(nets[0], _mid_t(config, RELEASE_PRESET)), release_num=1000, release_ref_images=2048,
                release_workload=checks.release_workload(config, RELEASE_PRESET))


def dry_run_plan(config: Path, budget_s: float) -> Plan:
    """The GPU plan at micro sizes on CPU: every net is the micro ``tiny`` (batch 4), 3 steps, 16 images."""
    plan = gpu_plan(config, budget_s)

    def micro(spec: NetSpec, batch: int = 4) -> NetSpec:
        return NetSpec("tiny", batch, dict(MICRO_ARCH), label=f"{spec.net} in the GPU run")

    plan.dry_run, plan.device = True, "cpu"
    plan.precision_nets = [micro(plan.precision_nets[0])]
    plan.precision_steps, plan.bench_repeats, plan.bench_warmup = 3, 1, 0
    plan.train_specs = [TrainSpec(s.preset, s.mode, micro(s.net), s.precision, s.iterations, s.batch, s.gpus)
                        for s in plan.train_specs]
    plan.train_repeats, plan.train_warmup = 1, 1
    plan.ddp, plan.ddp_batch_gpu = micro(plan.ddp, 8), 2
    plan.samples = [(micro(plan.samples[0][0]), plan.samples[0][1])]
    plan.sample_num, plan.sample_batch, plan.feature_batch, plan.memory_tries = 16, 8, 8, 4
    plan.release, plan.release_num, plan.release_ref_images = (micro(plan.release[0]), plan.release[1]), 8, 8
    return plan


def precision_cases(plan: Plan) -> list[Case]:
    """fp32 first (the reference), then round robin over the nets in each net's order of importance."""
    orders = [PRECISION_ORDER.get(spec.net, checks.CHECK_PRECISIONS) for spec in plan.precision_nets]
    cases = []
    for rank in range(len(checks.CHECK_PRECISIONS)):
        for spec, order in zip(plan.precision_nets, orders):
            prec = order[rank]
            cases += [Case("precision", f"{spec.net} batch {spec.batch} {mode} {prec}",
                           functools.partial(checks.precision_case, spec=spec, precision=prec, mode=mode),
                           needs_cuda=prec in checks.CUDA_ONLY_PRECISIONS) for mode in ("stage1", "stage2")]
    return cases


def build_cases(plan: Plan) -> list[Case]:
    p = functools.partial
    cases = precision_cases(plan)
    nets = plan.precision_nets
    cases += [Case("bench", f"{nets[i].net} batch {nets[i].batch} {prec}", p(checks.bench_case, spec=nets[i],
                   precision=prec), needs_cuda=prec in checks.CUDA_ONLY_PRECISIONS)
              for i, prec in BENCH_ORDER if i < len(nets)]
    two = "2 processes, nccl on one GPU" if plan.device == "cuda" else "2 processes, gloo on CPU"
    cases += [Case("ddp", f"{plan.ddp.net} batch {plan.ddp.batch} stage2: {two}", checks.ddp_two_process_case),
              Case("ddp", f"{plan.ddp.net} batch {plan.ddp.batch} stage2: 1-process DDP wrap", checks.ddp_wrap_case)]
    for spec, mid_t in plan.samples:
        for steps in ([80.0], [80.0, mid_t]):
            cases.append(Case("sampling", f"{spec.net}: {plan.sample_num} images, {len(steps)} step(s)",
                              p(checks.sampling_case, spec=spec, steps=steps)))
            cases.append(Case("sampling", f"{spec.net}: Inception features of the {len(steps)}-step images",
                              p(checks.features_case, spec=spec, steps=len(steps))))
    release, mid_t = plan.release
    name = f"{release.net}: FID of {plan.release_num} images in 1 and 2 steps, {RELEASE_PRESET} released_tables"
    cases.append(Case("release_fid", name, p(checks.release_fid_case, spec=release, mid_t=mid_t)))
    cases += [Case("train_speed", f"{s.preset} {s.mode}: {s.net.net} per-GPU batch {s.net.batch} {s.precision}",
                   p(checks.train_speed_case, spec=s))
              for s in sorted(plan.train_specs, key=lambda s: (s.preset, s.mode != "stage2"))]
    stage2 = [s for s in plan.train_specs if s.mode == "stage2"]
    cases += [Case("memory", f"{s.preset} ({s.net.net}, {s.precision}): largest per-GPU Stage-2 batch from "
                   f"{s.net.batch}", p(checks.largest_batch_case, spec=s.net, precision=s.precision))
              for s in stage2]
    return [case for case in cases if case.check in plan.checks]


# ---------------------------------------------------------------------------------------------------------- running


def run_case(case: Case, ctx: checks.Context) -> dict[str, Any]:
    """Run one case; a failure is recorded (never raised) and memory is freed afterwards."""
    record: dict[str, Any] = {"check": case.check, "name": case.name, "status": "pass", "reason": None,
                              "figures": {}}
    start = time.perf_counter()
    try:
        record["figures"] = case.run(ctx)
    except checks.CheckFailed as failed:
        record.update(status="fail", reason=failed.reason, figures=failed.figures)
    except checks.Skip as skipped:
        record.update(status="skipped", reason=str(skipped))
    except Exception as error:  # a bug or a CUDA error: recorded, and the other cases still run
        record.update(status="fail", reason=f"{type(error).__name__}: {str(error)[:600]}",
                      traceback=traceback.format_exc()[-3000:])
    finally:
        from tcm_core.gpu.bench import free_memory

        free_memory(torch.device(ctx.device))
    record["seconds"] = round(time.perf_counter() - start, 3)
    return record


def skip_reason(case: Case, plan: Plan, check_elapsed: float, total_elapsed: float) -> str | None:
    if case.needs_cuda and plan.device != "cuda":
        return "skipped: needs CUDA"
    budget = plan.budget(case.check)
    if check_elapsed >= budget:
        return f"skipped: the {case.check} check's time budget ({budget:.0f} s) was spent"
    if total_elapsed >= HARD_LIMIT * plan.budget_s:
        return f"skipped: the run's time limit ({HARD_LIMIT * plan.budget_s:.0f} s) was reached"
    return None


def run_all(plan: Plan, cases: list[Case], on_record: Callable[[list[dict[str, Any]]], None]) -> list[dict]:
    records: list[dict[str, Any]] = []
    started = time.perf_counter()
    check_started: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        work = stack.enter_context(tempfile.TemporaryDirectory(prefix="tcm-gpucheck-"))
        if plan.dry_run:  # bf16/fp16 cases under CPU autocast (training itself refuses them on CPU)
            stack.enter_context(cpu_autocast_allowed())
        ctx = checks.Context(plan, Path(work))
        for case in cases:
            now = time.perf_counter()
            check_started.setdefault(case.check, now)
            reason = skip_reason(case, plan, now - check_started[case.check], now - started)
            if reason is not None:
                record = {"check": case.check, "name": case.name, "status": "skipped", "reason": reason,
                          "figures": {}, "seconds": 0.0}
            else:
                print(f"gpucheck: {case.check}: {case.name} ...", file=sys.stderr, flush=True)
                record = run_case(case, ctx)
                print(f"gpucheck:   {record['status']} ({record['seconds']:.1f} s)"
                      + (f": {record['reason']}" if record["reason"] else ""), file=sys.stderr, flush=True)
            records.append(record)
            on_record(records)
    return records


def environment(plan: Plan) -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                            "cuda": torch.version.cuda, "threads": torch.get_num_threads(), "kind": plan.device}
    if plan.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(name=props.name, total_memory_bytes=props.total_memory,
                    capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count,
                    cudnn=torch.backends.cudnn.version(), device_count=torch.cuda.device_count())
        try:
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except (AttributeError, RuntimeError):  # a build without NCCL
            info["nccl"] = None
    else:
        info["name"] = "cpu"
    return info


def output_stem(plan: Plan, date: str, device_name: str) -> str:
    slug = "cpu-dry-run" if plan.dry_run else re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    return f"{date}-{slug}"


def run_plan(plan: Plan, out_root: Path) -> tuple[int, Path]:
    """Run every case, writing the JSON and Markdown after each; returns (exit code, JSON path)."""
    from tcm_core.gpu import report as gpu_report
    env = environment(plan)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    stem = output_stem(plan, date, env["name"])
    folder = out_root / stem
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    doc: dict[str, Any] = {"tool": "tcm_core gpu-check", "format": 1, "date": date, "dry_run": plan.dry_run,
                           "environment": env, "budget_s": plan.budget_s, "complete": False,
                           "tolerances": {"loss_rel_vs_fp32": checks.LOSS_TOLERANCE,
                                          "ddp_weight_diff_over_change": checks.DDP_MOVE_TOLERANCE},
                           "cost_jobs": plan.cost_jobs, "cases": []}

    def write(records: list[dict[str, Any]], complete: bool = False) -> None:
        doc.update(cases=records, complete=complete, seconds=round(time.perf_counter() - started, 1),
                   counts={s: sum(r["status"] == s for r in records) for s in ("pass", "fail", "skipped")})
        write_text_atomic(folder / f"{stem}.json", json.dumps(doc, indent=2, default=str) + "\n")
        write_text_atomic(folder / f"{stem}.md", gpu_report.markdown(doc))

    records = run_all(plan, build_cases(plan), write)
    write(records, complete=True)
    return (1 if doc["counts"]["fail"] else 0), folder / f"{stem}.json"


# ---------------------------------------------------------------------------------------------------------- CLI


def add_gpucheck_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true", help="CPU, micro sizes, same functions (CUDA-only skipped)")
    parser.add_argument("--out-root", type=Path, default=Path("gpu-check"), help="parent of the <date>-<gpu> folder")
    parser.add_argument("--budget-s", type=float, default=None, help=f"seconds of checks, shared out (default "
                        f"{DEFAULT_BUDGET_S:.0f}; --dry-run {DRY_RUN_BUDGET_S:.0f})")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="config.yaml (paper batch sizes)")
    parser.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated checks (of {', '.join(CHECKS)})")
    parser.add_argument("--cost-table", type=Path, default=None, metavar="JSON",
                        help="print the README cost-table rows computed from a gpucheck JSON, and exit")


def run_gpucheck(args: argparse.Namespace) -> int:
    from tcm_core.gpu import report as gpu_report
    if args.cost_table is not None:
        print(gpu_report.cost_table(json.loads(Path(args.cost_table).read_text())), end="")
        return 0
    if not args.dry_run and not torch.cuda.is_available():
        raise ConfigError("no CUDA device is visible", "python -m tcm_core gpu-check",
                          "run it on a GPU machine, or pass --dry-run for the CPU run at micro sizes")
    budget = args.budget_s or (DRY_RUN_BUDGET_S if args.dry_run else DEFAULT_BUDGET_S)
    plan = (dry_run_plan if args.dry_run else gpu_plan)(args.config, budget)
    plan.checks = tuple(c.strip() for c in args.only.split(",") if c.strip())
    unknown = sorted(set(plan.checks) - set(CHECKS))
    if unknown or not plan.checks:
        raise ConfigError(f"unknown check {unknown[0] if unknown else '(none)'}", "--only", f"use {', '.join(CHECKS)}")
    code, path = run_plan(plan, args.out_root)
    counts = json.loads(path.read_text())["counts"]
    print(f"gpucheck: {counts['pass']} passed, {counts['fail']} failed, {counts['skipped']} skipped -> {path} "
          f"and {path.with_suffix('.md')}")
    return code
