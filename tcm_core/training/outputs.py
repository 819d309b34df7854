"""What a training run writes (global rank 0 only): config.json, metrics (metrics.jsonl, mirrored to MLflow),
a progress line every ``log_every`` iterations, periodic FID/dFID and sample grids, state files, and at the end
the EMA network (``network.safetensors`` + ``.json``) and, for Stage 1, its final training state.

Metric names (step = global iteration): ``loss``, ``loss_regular``, ``loss_boundary`` (Stage 2/3), ``grad_norm``
(means over the log window), and the last step's ``lr`` (as applied), ``ratio`` (curriculum), ``ema_beta``,
``nonfinite_skipped``; periodic evaluation ``periodic/fid_1step``, ``periodic/fid_2step``, ``periodic/dfid_t{t:g}``
(``mlflow_store.PERIODIC_PREFIX``: a cheaper measurement than the evaluation jobs', whose ``fid_1step`` ... the
evaluation jobs log on the same run, see ``evaluation``; one metric history never mixes two setups).

When the periodic evaluation runs (:func:`evaluation_iterations`): with ``eval_points`` = P > 0 at P iterations
evenly spaced from the run's first iteration to its last (both included); else every ``eval_every`` global
iterations, plus the first iteration of the stages in ``CURVE_START_MODES``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tcm_core.errors import NonFiniteTrainingError
from tcm_core.io.atomic import write_text_atomic
from tcm_core.tracking.mlflow_store import PERIODIC_PREFIX
from tcm_core.tracking.progress import format_duration
from tcm_core.training.config import CONSISTENCY_MODES, CONTINUING_MODES
from tcm_core.training.setup import Run
from tcm_core.training.state import save_final_state, save_state, state_of, tensors_finite
from tcm_core.training.step import StepStats

# curves start at the stage's first iteration (Stage 1 at 0, the others at the split point)
CURVE_START_MODES = ("stage1", "stage1_continued", "stage2", "stage3")  # not intermediate: its start is Stage 1's end


@dataclass
class Tracking:
    """Where metrics go besides metrics.jsonl (MLflow child run of the study's parent)."""

    mlflow_uri: str | None = None
    mlflow_parent: str | None = None
    run_key: str | None = None


@dataclass
class PeriodicEval:
    """Periodic FID/dFID during training (needs reference statistics)."""

    ref_stats: str | None = None
    extractor: str | None = None
    feature_net: str | None = None


def progress_line(run: Run, stats: StepStats, metrics: dict[str, float], rate: float) -> str:
    """``stage2 it 450/800 (56%) 2.1 it/s ETA 2m47s loss 5.31 gnorm 281 ratio 0.999 lr 1e-04``."""
    done, total = run.iteration - run.start_iteration, run.cfg.iterations
    eta = (total - done) / rate if rate > 0 else float("nan")
    parts = [f"{run.mode} it {run.iteration}/{run.end_iteration} ({done / max(total, 1):.0%})",
             f"{rate:.2f} it/s", f"ETA {format_duration(eta)}"]
    if "loss" in metrics:
        parts += [f"loss {metrics['loss']:.4g}", f"gnorm {metrics['grad_norm']:.3g}"]
    if stats.ratio is not None:
        parts.append(f"ratio {stats.ratio:.6g}")
    parts.append(f"lr {stats.lr:.3g}")
    if run.nonfinite_skipped:
        parts.append(f"dropped {run.nonfinite_skipped}")
    return " ".join(parts)


class RunOutputs:
    """Rank 0's outputs of one run. Other ranks get an instance whose methods write nothing."""

    def __init__(self, run: Run, tracking: Tracking, periodic: PeriodicEval, progress: bool = True) -> None:
        self.run, self.tracking, self.periodic, self.progress = run, tracking, periodic, progress
        self.writes = run.dist.is_main
        self.tracker: Any = None
        self.evaluator: Any = None
        self.schedule: Callable[[int], bool] = lambda iteration: False
        self.started = time.perf_counter()
        self.started_at = run.iteration

    # ---- start
    def start(self) -> None:
        if not self.writes:
            return
        run = self.run
        if self.periodic.ref_stats:
            self.evaluator = self._periodic_evaluator()
            run.info["eval_label"] = self.evaluator.label  # what the periodic curves measure (figures say it)
        self.schedule = evaluation_iterations(run.cfg, run.mode, run.start_iteration)
        cfg_dict = run.cfg.to_dict()
        write_text_atomic(run.paths.out / "config.json", json.dumps(
            {**cfg_dict, **run.info, "arch": getattr(run.net, "arch", None)}, indent=2, sort_keys=True, default=str))
        self.tracker = self._open_tracker()
        if run.resumed_from is None:
            self.tracker.log_params({**cfg_dict, **run.info})
            self.evaluate(run.iteration)
        if self.progress:
            print(f"{run.mode}: iterations {run.iteration} -> {run.end_iteration}"
                  + (f" (resumed from {run.resumed_from})" if run.resumed_from else ""), file=sys.stderr, flush=True)

    def _open_tracker(self) -> Any:
        from tcm_core.tracking import tracker
        run, key = self.run, self.tracking.run_key
        tags = {"tcm.stage": run.mode, **({"tcm.run_key": key} if key else {})}
        if run.mode in CONTINUING_MODES:
            tags["tcm.control"] = run.info.get("control_resolved", "")
        parent = Path(self.tracking.mlflow_parent) if self.tracking.mlflow_parent else None
        return tracker.open_tracker(run.paths.out, mlflow_uri=self.tracking.mlflow_uri, parent=parent, run_key=key,
                                    tags=tags, resume_step=run.resumed_from)

    def _periodic_evaluator(self) -> Any:
        from tcm_core.evaluation.commands import make_periodic_evaluator

        run, p = self.run, self.periodic
        return make_periodic_evaluator(
            extractor=p.extractor or "lenet", ref_stats=Path(p.ref_stats),
            feature_net=Path(p.feature_net) if p.feature_net else None, data=run.dataset,  # opened once
            num=run.cfg.eval_num, mid_t=run.cfg.eval_mid_t, dfid_ts=tuple(run.cfg.eval_dfid_ts), device=run.device)

    # ---- every iteration
    def after_step(self, stats: StepStats) -> None:
        run = self.run
        if not stats.dropped and stats.ema_beta is not None:
            self._add_to_window(stats)
        if not self.writes:
            return
        last = run.iteration == run.end_iteration
        if run.iteration % run.cfg.log_every == 0 or last:
            self.log(stats)
        if run.iteration % run.cfg.state_every == 0 or last:
            save_state(run.paths.state_folder, state_of(run))
        self.evaluate(run.iteration)

    def _add_to_window(self, stats: StepStats) -> None:
        values = {"loss": stats.loss, "loss_regular": stats.regular, "grad_norm": stats.grad_norm}
        if stats.boundary is not None:
            values["loss_boundary"] = stats.boundary
        for key, value in values.items():
            self.run.log_sums[key] = self.run.log_sums.get(key, 0.0) + value
        self.run.log_count += 1

    def log(self, stats: StepStats) -> None:
        run = self.run
        metrics = {k: v / run.log_count for k, v in run.log_sums.items()} if run.log_count else {}
        metrics.update(lr=stats.lr, nonfinite_skipped=float(run.nonfinite_skipped))
        if stats.ratio is not None and run.mode in CONSISTENCY_MODES:
            metrics["ratio"] = float(stats.ratio)
        if stats.ema_beta is not None:
            metrics["ema_beta"] = float(stats.ema_beta)
        self.tracker.log_metrics(metrics, step=run.iteration)
        run.log_sums, run.log_count = {}, 0
        if self.progress:
            elapsed = time.perf_counter() - self.started
            rate = (run.iteration - self.started_at) / elapsed if elapsed > 0 else 0.0
            print(progress_line(run, stats, metrics, rate), file=sys.stderr, flush=True)

    def evaluate(self, at: int) -> None:
        """Periodic sample grids and FID/dFID of the EMA at global iteration ``at`` (RNG untouched)."""
        run, cfg = self.run, self.run.cfg
        if not self.writes:
            return
        due = run.mode in CURVE_START_MODES if at == run.start_iteration else at % max(cfg.grid_every, 1) == 0
        if cfg.grid_every and due:
            write_grids(run, at)
        if self.evaluator is not None and self.schedule(at):
            started = time.perf_counter()
            with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
                metrics = self.evaluator(run.ema, at)
            self.tracker.log_metrics({PERIODIC_PREFIX + k: float(v) for k, v in metrics.items()}, step=at)
            if self.progress:
                print(f"{run.mode}: evaluated the EMA at iteration {at} ({self.evaluator.label}) in "
                      f"{time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)

    # ---- end
    def finish(self) -> Path | None:
        """The final EMA network (and Stage 1's final state when asked for); returns the network path."""
        run = self.run
        if not self.writes:
            return None
        if not tensors_finite(run.ema.state_dict()):
            raise NonFiniteTrainingError("the EMA weights are non-finite", str(run.paths.out),
                                         "lower lr or set grad_clip; network.safetensors was not written")
        if run.paths.final_state is not None:
            save_final_state(run.paths.final_state, state_of(run))
        from tcm_core.io.network_files import save_network

        network = run.paths.out / "network.safetensors"
        provenance = {"mode": run.mode, "config": run.cfg.to_dict(), **{k: v for k, v in run.info.items()
                                                                         if k not in ("mode",)}}
        save_network(run.ema, network, iteration=run.iteration, provenance=provenance)
        return network

    def close(self, status: str) -> None:
        if self.tracker is not None:
            self.tracker.close(status)


def evaluation_iterations(cfg: Any, mode: str, start: int) -> Callable[[int], bool]:
    """Whether the periodic evaluation runs at a global iteration (see the module docstring)."""
    if cfg.eval_points:
        span, points = cfg.iterations, cfg.eval_points
        chosen = {start + round(k * span / (points - 1)) for k in range(points)}
        return chosen.__contains__
    every = cfg.eval_every

    def due(iteration: int) -> bool:
        if iteration == start:
            return mode in CURVE_START_MODES
        return bool(every and iteration % every == 0)

    return due


def write_grids(run: Run, iteration: int) -> None:
    from tcm_core.evaluation.commands import save_grid
    from tcm_core.sampling import sample_batches

    cfg = run.cfg
    step_sets = {"1step": [cfg.t_max]}
    if cfg.eval_mid_t is not None:
        step_sets["2step"] = [cfg.t_max, cfg.eval_mid_t]
    for name, steps in step_sets.items():
        batches = list(sample_batches(run.ema, num=cfg.grid_num, seed=cfg.seed, steps=steps,
                                      batch_size=min(cfg.grid_num, 64), device=run.device))
        (run.paths.out / "grids").mkdir(parents=True, exist_ok=True)
        save_grid(torch.cat(batches), run.paths.out / "grids" / f"grid-{iteration:09d}-{name}.png")
