"""One set of results from two sources: the result files first, MLflow second, compared value by value."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from tcm_core.report.mlflow_source import load_mlflow
from tcm_core.report.result_files import load_result_files
from tcm_core.report.results import DFID_PREFIX, SWEPT_PARAMS, TRAIN_STAGES, Evaluation, Results, TrainingRun
from tcm_core.report.values import same_value

CROSSCHECK_COLUMNS = ["run", "metric", "step", "files", "mlflow", "agree"]


def collect(results_dir: Path, preset: str, tracking_uri: str | None) -> tuple[Results, dict[str, float]]:
    """The results of ``preset`` from its result files and the MLflow store, and how long each read took."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    file_runs, file_evals = load_result_files(results_dir) if results_dir.exists() else ([], [])
    timings["read result files"] = time.perf_counter() - start
    ml_runs: list[TrainingRun] = []
    ml_evals: list[Evaluation] = []
    start = time.perf_counter()
    if tracking_uri and tracking_uri.lower() != "none":
        try:
            ml_runs, ml_evals, notes = load_mlflow(tracking_uri, preset)
        except Exception as error:  # noqa: BLE001 - the files alone still make every table
            notes = [f"MLflow store {tracking_uri} could not be read ({type(error).__name__}: {error})"]
    else:
        notes = ["no tracking URI given: tables use the result files only"]
    timings["read MLflow"] = time.perf_counter() - start
    results = merge(preset, file_runs, file_evals, ml_runs, ml_evals)
    results.notes[:0] = notes
    return results, timings


def merge(
    preset: str,
    file_runs: list[TrainingRun],
    file_evals: list[Evaluation],
    ml_runs: list[TrainingRun],
    ml_evals: list[Evaluation],
) -> Results:
    """Files are the source of truth; MLflow fills in what the files lack and is compared where both exist."""
    results = Results(preset=preset, runs=list(file_runs), evaluations=list(file_evals))
    taken: set[int] = set()
    for ml_run in ml_runs:
        match = _find_match(ml_run, file_runs, taken)
        if match is None:
            results.runs.append(ml_run)
            continue
        taken.add(id(match))
        _adopt_mlflow_identity(results, match, ml_run)
        _merge_histories(results, match, ml_run)
    for ml_eval in ml_evals:
        _merge_evaluation(results, ml_eval)
    results.runs.sort(key=lambda r: (TRAIN_STAGES.index(r.stage), r.grid != "main", r.key))
    return results


# ----------------------------------------------------------------------------------------------------------------
# Which files run an MLflow run is


def _find_match(ml_run: TrainingRun, file_runs: list[TrainingRun], taken: set[int]) -> TrainingRun | None:
    free = [run for run in file_runs if id(run) not in taken]
    for run in free:  # 1. the same run key
        if ml_run.key in run.names():
            return run
    for run in free:  # 2. an MLflow param that names the run folder
        if run.run_dir is not None and _names_run_folder(ml_run.params, run.run_dir):
            return run
    same = [r for r in free if _compatible(r, ml_run)]
    return same[0] if len(same) == 1 else None  # 3. the only run with the same stage, grid and hyperparameters


def _names_run_folder(params: dict[str, Any], run_dir: Path) -> bool:
    """Whether a param value is the path of ``run_dir`` or of its network."""
    for value in params.values():
        if isinstance(value, str) and value and ("/" in value):
            try:
                if Path(value).resolve() in (run_dir, run_dir / "network.safetensors"):
                    return True
            except (OSError, ValueError):
                continue
    return False


def _compatible(a: TrainingRun, b: TrainingRun) -> bool:
    """Same stage, grid and training seed, and no swept hyperparameter known on both sides with different values."""
    if (a.stage, a.grid, a.seed_index) != (b.stage, b.grid, b.seed_index):
        return False
    for name in SWEPT_PARAMS:
        va, vb = a.param(name), b.param(name)
        if va is not None and vb is not None and not same_value(va, vb):
            return False
    return True


# ----------------------------------------------------------------------------------------------------------------
# Merging a matched pair, and the cross-check


def _adopt_mlflow_identity(results: Results, match: TrainingRun, ml_run: TrainingRun) -> None:
    """The files run takes the MLflow run's key (the deterministic tcm.run_key names the run everywhere)."""
    old_key = match.key
    match.aliases |= {match.key, *ml_run.aliases}
    match.key = ml_run.key
    match.aliases.discard(match.key)
    match.mlflow_run_id = ml_run.mlflow_run_id
    match.sources.add("mlflow")
    match.n_params = match.n_params or ml_run.n_params
    for e in results.evaluations:
        if e.target == old_key:
            e.target = match.key


def _merge_histories(results: Results, match: TrainingRun, ml_run: TrainingRun) -> None:
    """Histories the files lack come from MLflow; the others are compared at their last common step."""
    for metric, ml_points in ml_run.histories.items():
        points = match.histories.get(metric)
        if not points:
            match.histories[metric] = ml_points
            continue
        file_by_step = dict(points)
        common = [s for s, _ in ml_points if s in file_by_step]
        if common:
            step = max(common)
            _compare(results.crosscheck, match.key, metric, step, file_by_step[step], dict(ml_points)[step])
        else:
            results.notes.append(f"cross-check: {match.key} {metric}: no common step between files and MLflow")


def _merge_evaluation(results: Results, ml_eval: Evaluation) -> None:
    """An MLflow evaluation with no files twin is added; else it is compared with the twin."""
    twins = [
        e
        for e in results.evaluations
        if e.source == "files"
        and e.metric == ml_eval.metric
        and e.target == ml_eval.target
        and (ml_eval.iteration is None or e.iteration is None or e.iteration == ml_eval.iteration)
    ]
    if not twins:
        results.evaluations.append(ml_eval)
        return
    twin = twins[0]
    run = str(twin.target)
    if ml_eval.metric == "dfid":
        for t, value in ml_eval.values.items():
            if t in twin.values:
                _compare(results.crosscheck, run, f"{DFID_PREFIX}{t:g}", twin.iteration, twin.values[t], value)
    elif twin.value is not None and ml_eval.value is not None:
        _compare(results.crosscheck, run, ml_eval.metric, twin.iteration, twin.value, ml_eval.value)


def _compare(rows: list[dict[str, Any]], run: str, metric: str, step: Any, files: float, mlflow_value: float) -> None:
    agree = (math.isnan(files) and math.isnan(mlflow_value)) or math.isclose(
        files, mlflow_value, rel_tol=1e-4, abs_tol=1e-6
    )
    row = (run, metric, step, files, mlflow_value, agree)
    rows.append(dict(zip(CROSSCHECK_COLUMNS, row)))
