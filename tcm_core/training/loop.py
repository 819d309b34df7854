"""The one training loop for every mode: pretrain, stage1, stage1_continued, intermediate, stage2, stage3.

    run = setup(cfg, mode, paths)          # train_setup: networks, loss, optimiser, resume / Stage-1 state
    while run.iteration < run.end_iteration:
        stats = train_step(run)            # train_step: forward, backward, clip once, step, EMA
        outputs.after_step(stats)          # train_outputs: metrics, progress line, state files, periodic eval
    outputs.finish()                       # the EMA network (+ Stage 1's final state)

* pretrain: EDM denoising loss. stage1: consistency training (Stage 1). stage1_continued: the paper's control,
  Stage 1 continued from its final training state for as long as Stage 2 runs. intermediate (paper App. B): Stage 1
  continued from that state with its times drawn on [t_min, t') only, the boundary of a Stage-2 variant. stage2 /
  stage3: truncated
  consistency training; the frozen boundary model (``--boundary-model``: the Stage-1 EMA for stage2, the
  Stage-2 result for stage3) has ``requires_grad=False``, stays in train mode (dropout active, as in the
  official code) and always runs with EDM2 forced weight normalisation off and without autograd.
* ``method: cd`` (any consistency mode): x_s is one PF-ODE step of the frozen teacher (``--teacher``, eval mode,
  no autograd; ``tcm_core.distillation``) instead of y + s·ε; everything else is as under ``method: ct``.
* Every schedule (Δt curriculum, LR decay, power-EMA count) uses the GLOBAL iteration; where each mode starts
  is in ``train_setup``. Randomness is world-size invariant (``global_batch``). Only rank 0 writes files.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tcm_core.presets import resolve_config
from tcm_core.training.config import MODES, TrainConfig
from tcm_core.training.distributed import finish_distributed
from tcm_core.training.outputs import PeriodicEval, RunOutputs, Tracking
from tcm_core.training.setup import Run, RunPaths, setup
from tcm_core.training.step import train_step

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    start_iteration: int
    end_iteration: int
    resumed_from: int | None
    nonfinite_skipped: int
    seconds_per_iteration: float | None
    network: Path | None
    iteration_seconds: list[float] = field(default_factory=list)  # wall time of each iteration run
    iteration_cpu_seconds: list[float] = field(default_factory=list)  # this process's CPU time


def train(cfg: TrainConfig, *, mode: str, data: str | Path, out: str | Path, init: str | Path | None = None,
          boundary_model: str | Path | None = None, init_state: str | Path | None = None,
          final_state: str | Path | None = None, state_dir: str | Path | None = None,
          teacher: str | Path | None = None, device: str = "auto",
          tracking: Tracking | None = None, periodic: PeriodicEval | None = None,
          after_backward: Callable[[Run], None] | None = None, progress: bool = True) -> TrainResult:
    """Run ``cfg.iterations`` iterations of ``mode`` (resuming from ``state_dir`` when a state exists)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    paths = RunPaths(data=Path(data), out=Path(out), init=_path(init), boundary_model=_path(boundary_model),
                     init_state=_path(init_state), state_dir=_path(state_dir), final_state=_path(final_state),
                     teacher=_path(teacher))
    run = setup(cfg, mode, paths, device)
    outputs = RunOutputs(run, tracking or Tracking(), periodic or PeriodicEval(), progress=progress)
    seconds: list[float] = []
    cpu_seconds: list[float] = []
    status, network = "FAILED", None
    try:
        outputs.start()
        while run.iteration < run.end_iteration:
            stats = train_step(run, after_backward)
            seconds.append(stats.seconds)
            cpu_seconds.append(stats.cpu_seconds)
            outputs.after_step(stats)
        network = outputs.finish()
        status = "FINISHED"
    finally:
        outputs.close(status)
        finish_distributed(run.dist, status == "FINISHED")
    return TrainResult(run.start_iteration, run.iteration, run.resumed_from, run.nonfinite_skipped,
                       sum(seconds) / len(seconds) if seconds else None, network, seconds, cpu_seconds)


def _path(value: str | Path | None) -> Path | None:
    return Path(value) if value else None


# ----------------------------------------------------------------------------------------------------------
# CLI


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", required=True, choices=MODES)
    parser.add_argument("--config", default=None, help="YAML: presets (config.yaml layout) or flat TrainConfig keys")
    parser.add_argument("--preset", default=None, help="preset name in the YAML (default: its `preset` key)")
    parser.add_argument("--init", default=None, help="checkpoint to start from (pretrain: optional)")
    parser.add_argument("--boundary-model", default=None, help="stage2/stage3: frozen model used below t_prime")
    parser.add_argument("--init-state", default=None, help="stage1_continued / intermediate: Stage 1's final "
                        "train_state.pt")
    parser.add_argument("--final-state", default=None, help="also write the final training state here (stage1)")
    parser.add_argument("--teacher", default=None, help="method cd: the diffusion model whose PF-ODE gives x_s")
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
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--no-progress", action="store_true", help=argparse.SUPPRESS)  # old name of --quiet
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="TrainConfig overrides")


def run_train(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = resolve_config(args.config, args.mode, args.preset, args.overrides)
    result = train(cfg, mode=args.mode, data=args.data, out=args.out, init=args.init,
                   boundary_model=args.boundary_model, init_state=args.init_state, final_state=args.final_state,
                   teacher=args.teacher,
                   state_dir=args.state_dir, device=args.device,
                   tracking=Tracking(args.mlflow_uri, args.mlflow_parent, args.run_key),
                   periodic=PeriodicEval(args.eval_ref_stats, args.eval_extractor, args.eval_feature_net),
                   progress=not (args.quiet or args.no_progress))
    if int(os.environ.get("RANK", "0")) == 0:
        spi = result.seconds_per_iteration
        print(f"train: {args.mode} finished at global iteration {result.end_iteration} (started at "
              f"{result.start_iteration}" + (f", resumed from {result.resumed_from}" if result.resumed_from else "")
              + f"; {result.nonfinite_skipped} non-finite steps skipped"
              + (f"; {spi:.3f} s/iteration" if spi else "") + f") -> {result.network}", file=sys.stderr)
    return 0
