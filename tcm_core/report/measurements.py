"""Which measured numbers a table, figure or claim uses: final FIDs, metric and dFID curves, ablation slices."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from tcm_core.report.paper import PAPER_DEFAULTS
from tcm_core.report.results import SWEPT_PARAMS, Measured, Results, TrainingRun, dfid_t
from tcm_core.report.values import as_float, same_value
from tcm_core.tracking.mlflow_store import PERIODIC_PREFIX

Points = list[tuple[int, float]]  # (global iteration, value), sorted by iteration
# The run each stage starts from: its final checkpoint is the first point of the next stage's curves.
INIT_OF = {"stage1_continued": "stage1", "intermediate": "stage1", "stage2": "stage1", "stage3": "stage2"}


def final_fid(results: Results, run: TrainingRun | None, metric: str = "fid_1step") -> Measured | None:
    """The FID of a run's final evaluation JSON; else the last value of its periodic evaluation history."""
    if run is None:
        return None
    evals = [e for e in results.evaluations_of(run, metric) if e.value is not None]
    if evals:
        best = max(evals, key=lambda e: (e.iteration if e.iteration is not None else -1, e.source == "files"))
        return Measured(best.value, best.label, run.key, best.iteration, best.source, best.setup)
    points = run.periodic(metric)
    if points:
        step, value = points[-1]
        label = f"{periodic_label(run)} (periodic evaluation during training)"
        return Measured(value, label, run.key, step, "/".join(sorted(run.sources)), ("periodic",))
    return None


def final_dfid(results: Results, run: TrainingRun | None, t: float) -> Measured | None:
    """dFID_t of a run's final network: its newest ``evaluate dfid`` JSON that measured t (files before MLflow)."""
    if run is None:
        return None
    evals = [e for e in results.evaluations_of(run, "dfid") if any(same_value(s, t) for s in e.values)]
    if not evals:
        return None
    best = max(evals, key=lambda e: (e.iteration if e.iteration is not None else -1, e.source == "files"))
    value = next(v for s, v in best.values.items() if same_value(s, t))
    return Measured(value, best.label, run.key, best.iteration, best.source, best.setup)


def periodic_label(run: TrainingRun | None) -> str:
    """What the run's periodic curves measure, e.g. "FID (LeNet features, 256)" (``eval_label`` param)."""
    label = run.params.get("eval_label") if run else None
    return str(label) if label else "periodic FID"


# ----------------------------------------------------------------------------------------------------------------
# Curves


def metric_series(
    results: Results, run: TrainingRun | None, metric: str, source: str = "history", with_init: bool = True
) -> Points:
    """A run's curve of ``metric`` from one source, so that one curve never mixes two evaluation setups:
    ``history`` (periodic evaluation during training) or ``evaluations`` (the evaluation JSONs of its
    checkpoints). With ``with_init`` the curve starts at the checkpoint the run started from."""
    if run is None:
        return []
    if source == "history":
        points = dict(run.periodic(metric))
    else:
        evals = [e for e in results.evaluations_of(run, metric) if e.iteration is not None and e.value is not None]
        points = {e.iteration: e.value for e in sorted(evals, key=lambda e: e.source != "files")[::-1]}
    parent = _init_run(results, run) if with_init else None
    if parent is not None:
        parent_points = metric_series(results, parent, metric, source, False)
        points = _with_start_point(points, parent_points, _start(run))
    return sorted(points.items())


def curve(results: Results, run: TrainingRun | None, metric: str) -> tuple[Points, str]:
    """The periodic-evaluation curve when it has two points or more, else the evaluation JSONs' curve; and a
    label of its source (with the sample count of the periodic evaluation)."""
    history = metric_series(results, run, metric, "history")
    if len(history) >= 2:
        return history, f"periodic, {periodic_label(run)}"
    return metric_series(results, run, metric, "evaluations"), "evaluation JSONs of checkpoints"


def dfid_series(
    results: Results, run: TrainingRun | None, source: str = "history", with_init: bool = True
) -> dict[float, Points]:
    """dFID_t by t from one source: the ``dfid_t*`` histories or the ``evaluate dfid`` JSONs of the run's
    checkpoints; with ``with_init``, starting at the dFID of the checkpoint the run started from."""
    if run is None:
        return {}
    series = _dfid_history(run) if source == "history" else _dfid_evaluations(results, run)
    parent = _init_run(results, run) if with_init else None
    if parent is not None:
        parent_series = dfid_series(results, parent, source, False)
        for t in series:
            series[t] = _with_start_point(series[t], parent_series.get(t, []), _start(run))
    return {t: sorted(points.items()) for t, points in sorted(series.items())}


def dfid_curve(results: Results, run: TrainingRun | None) -> tuple[dict[float, Points], str]:
    history = dfid_series(results, run, "history")
    if any(len(points) >= 2 for points in history.values()):
        return history, f"periodic, d{periodic_label(run)}"
    return dfid_series(results, run, "evaluations"), "evaluate dfid JSONs"


def _dfid_history(run: TrainingRun) -> dict[float, dict[int, float]]:
    series: dict[float, dict[int, float]] = {}
    for key, points in run.histories.items():
        t = dfid_t(key[len(PERIODIC_PREFIX):]) if key.startswith(PERIODIC_PREFIX) else None
        if t is not None:
            series.setdefault(t, {}).update(dict(points))
    return series


def _dfid_evaluations(results: Results, run: TrainingRun) -> dict[float, dict[int, float]]:
    series: dict[float, dict[int, float]] = {}
    for e in sorted(results.evaluations_of(run, "dfid"), key=lambda e: e.source == "files"):
        if e.iteration is not None:
            for t, value in e.values.items():
                series.setdefault(t, {})[e.iteration] = value  # files (sorted last) win over MLflow
    return series


def _init_run(results: Results, run: TrainingRun) -> TrainingRun | None:
    parent = INIT_OF.get(run.stage)
    return results.run_like(parent, run.grid) if parent else None


def _start(run: TrainingRun) -> float | None:
    return as_float(run.params.get("start_iteration"))


def _with_start_point(
    points: dict[int, float], parent_points: Sequence[tuple[int, float]], start: float | None
) -> dict[int, float]:
    """Add the parent's last point at or before the run's start (the checkpoint the run started from)."""
    if not points:
        return points
    first = min(points) if start is None else start
    before = [(s, v) for s, v in parent_points if s <= first]
    if before:
        points.setdefault(*before[-1])
    return points


# ----------------------------------------------------------------------------------------------------------------
# The ablation grid


def ablation_runs(results: Results, stage: str = "stage2") -> list[TrainingRun]:
    """The ablation grid's runs, training seed 0 (the other seeds: ``results.seeds_of``)."""
    return results.runs_of(stage, "ablation")


# ----------------------------------------------------------------------------------------------------------------
# Training seeds


def seed_curves(results: Results, run: TrainingRun | None, metric: str) -> tuple[dict[int, Points], str]:
    """The ``curve`` of ``metric`` of every training seed of ``run``'s arm, by seed index, and its source."""
    curves, source = {}, ""
    for index, seed_run in results.seeds_of(run).items():
        points, source_j = curve(results, seed_run, metric)
        if points:
            curves[index] = points
            source = source or source_j
    return curves, source


def seed_dfid_curves(results: Results, run: TrainingRun | None) -> tuple[dict[int, dict[float, Points]], str]:
    """``dfid_curve`` of every training seed of ``run``'s arm, by seed index, and its source."""
    curves, source = {}, ""
    for index, seed_run in results.seeds_of(run).items():
        series, source_j = dfid_curve(results, seed_run)
        if series:
            curves[index] = series
            source = source or source_j
    return curves, source


def mean_band(curves: Sequence[Points]) -> list[tuple[int, float, float, float]]:
    """(step, mean, min, max) over the curves at every step all of them have (the seeds' common schedule)."""
    if not curves:
        return []
    by_curve = [dict(points) for points in curves]
    steps = sorted(set.intersection(*(set(c) for c in by_curve)))
    rows = []
    for step in steps:
        values = [c[step] for c in by_curve]
        rows.append((step, statistics.fmean(values), min(values), max(values)))
    return rows


def ablation_baseline(results: Results) -> dict[str, float | None]:
    """The centre of the ablation grid: the main Stage-2 run's hyperparameters (the grid is built around them);
    without that run, the most common value of each swept hyperparameter among the grid's runs."""
    main = next(iter(results.runs_of("stage2", "main")), None)
    runs = ablation_runs(results) or results.runs_of("stage2")
    baseline: dict[str, float | None] = {}
    for name in SWEPT_PARAMS:
        if main is not None and main.param(name) is not None:
            baseline[name] = main.param(name)
        else:
            baseline[name] = _most_common(name, [v for r in runs if (v := r.param(name)) is not None])
    return baseline


def _most_common(name: str, values: list[float]) -> float | None:
    """The most common value (ties: the paper's default, else the first seen); None without values."""
    if not values:
        return None
    modes = statistics.multimode(round(v, 9) for v in values)
    default = PAPER_DEFAULTS.get(name)
    return next((m for m in modes if same_value(m, default)), modes[0])


def ablation_slice(results: Results, vary: Sequence[str], stage: str = "stage2") -> list[TrainingRun]:
    """Ablation runs whose hyperparameters, other than those in ``vary``, sit at the baseline."""
    baseline = ablation_baseline(results)
    return [
        run
        for run in ablation_runs(results, stage)
        if all(
            name in vary or baseline[name] is None or same_value(run.param(name), baseline[name])
            for name in SWEPT_PARAMS
        )
    ]
