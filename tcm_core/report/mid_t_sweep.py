"""The 2-step middle-time sweep of each arm (``evaluate mid-t-sweep``): its table, and what its figure plots.

The paper reports 2-step FIDs at a middle time it tuned per model (App. C.3: 1.0 on CIFAR-10, 1.526 on
ImageNet-64). The table gives, per arm (Stage 1, the control, Stage 2; and the distillation arm's), the 2-step
FID at every middle time swept, the best middle time with its FID (the arm's "2 steps, t_mid tuned") and, beside
them, the 2-step FID at ``eval.mid_t`` and the 1-step FID of the same network (training seed 0). A Stage-2
network was trained on [t', T] only, so its sweep starts at t'.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from tcm_core.evaluation.mid_t_sweep import SWEEP_METRIC
from tcm_core.report.measurements import final_fid
from tcm_core.report.results import Results, TrainingRun
from tcm_core.report.tables import Table
from tcm_core.report.values import MISSING, fmt_g

SWEEP_FILE = Path("eval") / "fid_2step_sweep.json"
SWEEP_TABLE = "mid_t_sweep"
SWEEP_ARMS = (("Stage 1", "main", "stage1"), ("Stage 1 continued (control)", "main", "stage1_continued"),
              ("Stage 2 (TCM)", "main", "stage2"), ("CD Stage 1", "distill", "stage1"),
              ("CD Stage 1 continued (CD control)", "distill", "stage1_continued"),
              ("CD Stage 2", "distill", "stage2"))


@dataclass(frozen=True)
class Sweep:
    arm: str
    run: TrainingRun
    mid_ts: tuple[float, ...]
    fids: tuple[float, ...]
    skipped: tuple[float, ...]  # below the network's t'
    best_mid_t: float
    best: float
    label: str


def _run_of(results: Results, grid: str, stage: str) -> TrainingRun | None:
    return results.main_run(stage) if grid == "main" else results.distill_run(stage)


def read_sweep(arm: str, run: TrainingRun) -> Sweep | None:
    """The sweep JSON in the run's folder, or None (no folder, no file, or not a sweep record)."""
    if run.run_dir is None:
        return None
    try:
        data = json.loads((Path(run.run_dir) / SWEEP_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("metric") != SWEEP_METRIC:
        return None
    return Sweep(arm, run, tuple(data["mid_ts"]), tuple(data["fids"]), tuple(data.get("skipped_below_t_prime", [])),
                 float(data["best_mid_t"]), float(data["best"]), str(data.get("label", MISSING)))


def sweeps(results: Results) -> list[Sweep]:
    """Every arm's sweep that exists, in SWEEP_ARMS' order."""
    found = []
    for arm, grid, stage in SWEEP_ARMS:
        run = _run_of(results, grid, stage)
        sweep = read_sweep(arm, run) if run is not None else None
        if sweep is not None:
            found.append(sweep)
    return found


def _fid_cell(value: float) -> str:
    return f"{value:.2f}" if math.isfinite(value) else str(value)


def sweep_table(results: Results) -> Table:
    found = sweeps(results)
    grid = sorted({m for s in found for m in s.mid_ts + s.skipped})
    header = ["arm", *[f"t_mid = {fmt_g(m)}" for m in grid], "best t_mid", "2-step FID, best",
              "2-step FID at eval.mid_t", "1-step FID", "our metric", "run"]
    rows = []
    for s in found:
        values = dict(zip(s.mid_ts, s.fids))
        cells = [_fid_cell(values[m]) if m in values else ("below t'" if m in s.skipped else MISSING) for m in grid]
        two, one = final_fid(results, s.run, "fid_2step"), final_fid(results, s.run)
        rows.append([s.arm, *cells, fmt_g(s.best_mid_t), _fid_cell(s.best),
                     _fid_cell(two.value) if two else MISSING, _fid_cell(one.value) if one else MISSING, s.label,
                     s.run.key])
    intro = [
        f"Preset: `{results.preset}`. The 2-step FID (times T, then t_mid) of each arm's final network (training "
        "seed 0) at every middle time of `eval.mid_t_sweep`, the same sampling seeds at every t_mid; the best is "
        "the arm's 2-step FID with t_mid tuned, as the paper tuned it (1.0 on CIFAR-10, 1.526 on ImageNet-64). "
        "A truncated network (Stage 2) is not swept below its t' (\"below t'\"): it was never trained there.",
        "Choosing the best of the grid on the samples that measure it favours it slightly; every point is shown.",
    ]
    if not found:
        intro.append("No sweep yet: `snakemake paper_tables` runs them (eval.mid_t_sweep).")
    return Table(SWEEP_TABLE, f"2-step FID vs the middle time — preset {results.preset}", header, rows, intro=intro)
