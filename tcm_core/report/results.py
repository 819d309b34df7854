"""The result model the tables, figures and claims read: training runs, evaluations and measured values."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tcm_core.presets import INTERMEDIATE_RUNS, split_seed
from tcm_core.report.values import as_float
from tcm_core.tracking.mlflow_store import PERIODIC_PREFIX

TRAIN_STAGES = ("pretrain", "stage1", "stage1_continued", "intermediate", "stage2", "stage3")
# the Stage-2 hyperparameters the ablation grid varies
SWEPT_PARAMS = ("t_prime", "rho", "w_b", "student_sigma", "student_nu")
DISTILL_GRID = "distill"  # the consistency-distillation arm (Table 5): never a main run of the CT tables
RELEASE_GRID = "release"  # evaluations of released checkpoints (released_tables): no run of this study
INTERMEDIATE_GRID = "intermediate"  # the intermediate-stage arm (App. B, Table 6): never a main or ablation run
ARM_GRIDS = (DISTILL_GRID, INTERMEDIATE_GRID)  # arms of their own, never a stand-in for a main run
DFID_PREFIX = "dfid_t"  # dFID at noise level t is logged as the metric dfid_t<t>, e.g. dfid_t0.2


@dataclass
class TrainingRun:
    key: str  # tcm.run_key when known, else the run folder relative to the results folder
    stage: str
    grid: str
    params: dict[str, Any] = field(default_factory=dict)
    histories: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    run_dir: Path | None = None
    mlflow_run_id: str | None = None
    n_params: int | None = None
    aliases: set[str] = field(default_factory=set)
    sources: set[str] = field(default_factory=set)

    def param(self, name: str) -> float | None:
        return as_float(self.params.get(name))

    def names(self) -> set[str]:
        return {self.key, *self.aliases}

    @property
    def seed_index(self) -> int:
        """j of training seed j (the run key or folder ends in ``/seed~j``); 0 for the run of ``all``."""
        return split_seed(self.key)[1]

    @property
    def arm(self) -> str:
        """The key without the training-seed suffix: every seed of one arm shares it."""
        return split_seed(self.key)[0]

    def periodic(self, metric: str) -> list[tuple[int, float]]:
        """The periodic-evaluation history of ``metric`` (e.g. ``fid_1step``: ``periodic/fid_1step``)."""
        return self.histories.get(PERIODIC_PREFIX + metric, [])


@dataclass
class Evaluation:
    metric: str  # fid_1step | fid_2step | dfid
    label: str
    value: float | None = None  # FID: the min over seeds
    values: dict[float, float] = field(default_factory=dict)  # dFID by t
    iteration: int | None = None
    seeds: int | None = None
    target: str | None = None  # the key of the training run evaluated
    path: Path | None = None
    source: str = "files"
    setup: tuple = ()  # (extractor, num, seeds): two FIDs compare only when their setups agree


@dataclass
class Measured:
    value: float
    label: str
    run: str
    iteration: int | None
    source: str
    setup: tuple = ()


@dataclass
class Results:
    preset: str
    runs: list[TrainingRun]
    evaluations: list[Evaluation]
    crosscheck: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def first_seeds(self, count: int) -> Results:
        """The study as if each arm had trained ``count`` seeds: training seeds 0 .. count-1 of every run and their
        evaluations (a target's K, so that `paper_tables` reads K seeds however many a longer `study` left)."""
        return Results(
            self.preset,
            [r for r in self.runs if r.seed_index < count],
            [e for e in self.evaluations if e.target is None or split_seed(e.target)[1] < count],
            [c for c in self.crosscheck if split_seed(str(c.get("run", "")))[1] < count],
            [*self.notes, f"training seeds 0 .. {count - 1} of each arm (--training-seeds {count})"],
        )

    def runs_of(self, stage: str, grid: str | None = None, all_seeds: bool = False) -> list[TrainingRun]:
        """The runs of a stage (and grid): training seed 0 only, unless ``all_seeds``."""
        return [r for r in self.runs if r.stage == stage and (grid is None or r.grid == grid)
                and (all_seeds or r.seed_index == 0)]

    def main_run(self, stage: str) -> TrainingRun | None:
        """The main-grid run of a stage, seed 0 (falling back to any grid but the distillation and intermediate
        arms' when the main grid has none)."""
        runs = self.runs_of(stage, "main") or [r for r in self.runs_of(stage) if r.grid not in ARM_GRIDS]
        return runs[0] if runs else None

    def seeds_of(self, run: TrainingRun | None) -> dict[int, TrainingRun]:
        """Every training seed of ``run``'s arm, by seed index (``run`` itself among them)."""
        if run is None:
            return {}
        same = [r for r in self.runs if r.stage == run.stage and r.grid == run.grid and r.arm == run.arm]
        return {r.seed_index: r for r in sorted(same, key=lambda r: r.seed_index)}

    def distill_run(self, stage: str) -> TrainingRun | None:
        """The distillation arm's run of a stage (``results/<preset>/distill/<stage>``)."""
        runs = self.runs_of(stage, DISTILL_GRID)
        return runs[0] if runs else None

    def intermediate_run(self, name: str) -> TrainingRun | None:
        """Training seed 0 of the intermediate arm's run ``name`` (``presets.INTERMEDIATE_RUNS``: finetune,
        init_stage1, init_finetune), found by its folder."""
        folder = INTERMEDIATE_RUNS[name]
        runs = [r for r in self.runs if r.grid == INTERMEDIATE_GRID and r.seed_index == 0
                and any(n == folder or n.endswith(f":{folder}") for n in r.names())]
        return runs[0] if runs else None

    def run_like(self, stage: str, grid: str) -> TrainingRun | None:
        """The run of ``stage`` in the arm of a run of ``grid``: the distillation arm's, or the main run."""
        return self.distill_run(stage) if grid == DISTILL_GRID else self.main_run(stage)

    def evaluations_of(self, run: TrainingRun, metric: str) -> list[Evaluation]:
        names = run.names()
        return [e for e in self.evaluations if e.metric == metric and e.target in names]


def dfid_t(key: str) -> float | None:
    """The noise level t of a ``dfid_t<t>`` metric key; None for any other key."""
    return as_float(key[len(DFID_PREFIX) :]) if key.startswith(DFID_PREFIX) else None


def full_label(label: str, seeds: int | None) -> str:
    """The evaluation's label, with "min of N" added when the value is the minimum over N seeds."""
    if seeds and seeds > 1 and "min" not in label:
        return label[:-1] + f", min of {seeds})" if label.endswith(")") else f"{label}, min of {seeds}"
    return label
