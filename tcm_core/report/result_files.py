"""Loading the declared result files under ``results/<preset>/``: training run folders and evaluation JSONs."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from tcm_core.report.results import ARM_GRIDS, TRAIN_STAGES, Evaluation, TrainingRun, full_label
from tcm_core.report.values import nan_if_none

# Folders under results/<preset>/ that hold no results of their own: MLflow's artifact copies, logs; and the
# released checkpoints' evaluations (released_tables reads those, the paper tables compare this study's runs).
NOT_RESULTS = {"mlartifacts", "mlruns", "logs", "releases"}
EVALUATED_METRICS = ("fid_1step", "fid_2step", "dfid")  # the ``metric`` of an evaluation JSON
MAX_EVALUATION_JSON_BYTES = 5_000_000  # a larger .json is no evaluation record: not even parsed


def load_result_files(results_dir: Path) -> tuple[list[TrainingRun], list[Evaluation]]:
    """Training runs (folders with ``metrics.jsonl`` and a training ``config.json``) and evaluation JSONs."""
    results_dir = Path(results_dir)
    runs: list[TrainingRun] = []
    for metrics_path in _walk(results_dir, lambda name: name == "metrics.jsonl"):
        run = _training_run(results_dir, metrics_path)
        if run is not None:
            runs.append(run)
    runs_by_dir = {run.run_dir: run for run in runs}
    evaluations: list[Evaluation] = []
    for path in _walk(results_dir, lambda name: name.endswith(".json")):
        data = _evaluation_record(results_dir, path)
        if data is not None:
            target = _evaluated_run_key(data, path, results_dir, runs, runs_by_dir)
            evaluations.append(_evaluation(data, path, target))
    return runs, evaluations


# ----------------------------------------------------------------------------------------------------------------
# Walking the results folder


def _skipped(parts: Sequence[str]) -> bool:
    """Mid-run state, hidden folders, an evaluation job's tracking folder, MLflow artifact copies."""
    return any(p.startswith(("_", ".")) or p.endswith(".tracking") or p in NOT_RESULTS for p in parts)


def _walk(results_dir: Path, wanted: Callable[[str], bool]) -> list[Path]:
    """Files under ``results_dir`` whose name satisfies ``wanted``, never descending into skipped folders."""
    found = []
    for folder, dirs, files in os.walk(results_dir):
        dirs[:] = sorted(d for d in dirs if not _skipped([d]))
        found += [Path(folder) / f for f in sorted(files) if wanted(f)]
    return found


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _infer_stage(config: dict[str, Any], parts: Sequence[str]) -> str | None:
    for key in ("mode", "stage"):
        if config.get(key) in TRAIN_STAGES:
            return config[key]
    for part in reversed(parts):  # the deepest folder naming a stage wins ("stage1_continued" before "stage1")
        for stage in sorted(TRAIN_STAGES, key=len, reverse=True):
            if part == stage or part.startswith(stage + "_") or part.startswith(stage + "-"):
                return stage
    return None


def _infer_grid(config: dict[str, Any], parts: Sequence[str]) -> str:
    grid = config.get("grid") or config.get("tcm.grid")
    if isinstance(grid, str) and grid:
        return grid
    for arm in ARM_GRIDS:  # the workflow's distillation and intermediate arms: results/<preset>/<arm>/...
        if arm in parts:
            return arm
    return "ablation" if any(p.startswith("ablation") for p in parts) else "main"


# ----------------------------------------------------------------------------------------------------------------
# Training runs


def _training_run(results_dir: Path, metrics_path: Path) -> TrainingRun | None:
    """The run of a folder holding ``metrics.jsonl``, or None when its ``config.json`` is no training config."""
    from tcm_core.tracking.tracker import read_metrics

    run_dir = metrics_path.parent
    rel = run_dir.relative_to(results_dir)
    if _skipped(rel.parts):
        return None
    config = _read_json(run_dir / "config.json")
    if not isinstance(config, dict):
        return None  # ``train`` always writes config.json; anything else is not a training run
    params_file = _read_json(run_dir / "params.json") or {}
    merged = {**params_file, **config} if isinstance(params_file, dict) else config
    stage = _infer_stage(merged, rel.parts)
    if stage is None:
        return None
    mlflow_run = _read_json(run_dir / "mlflow_run.json") or {}  # written by tracking.open_tracker
    return TrainingRun(
        key=str(mlflow_run.get("run_key") or merged.get("run_key") or rel.as_posix()),
        stage=stage,
        grid=_infer_grid(merged, rel.parts),
        params={k: v for k, v in merged.items() if not isinstance(v, dict | list)},
        histories=_history_from_records(read_metrics(metrics_path)),
        run_dir=run_dir.resolve(),
        mlflow_run_id=mlflow_run.get("run_id"),
        n_params=_n_params_from_meta(_read_json(run_dir / "network.json")),
        aliases={rel.as_posix()},
        sources={"files"},
    )


def _history_from_records(records: Iterable[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    histories: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        step = record.get("step")
        if step is None:
            continue
        for key, value in record.items():
            if key == "step":
                continue
            # metrics.jsonl writes non-finite values as null: keep them as NaN (an exploded FID is a result)
            histories.setdefault(key, []).append((int(step), nan_if_none(value)))
    for points in histories.values():
        points.sort(key=lambda p: p[0])
    return histories


_N_PARAMS: dict[str, int | None] = {}  # parameter count by arch (JSON), counted once per report


def _n_params_from_meta(meta: dict[str, Any] | None) -> int | None:
    if not meta:
        return None
    for key in ("n_params", "num_params", "parameters", "param_count"):
        if isinstance(meta.get(key), int):
            return meta[key]
    arch = meta.get("arch")
    if not isinstance(arch, dict):
        return None
    key = json.dumps(arch, sort_keys=True, default=str)
    if key not in _N_PARAMS:
        _N_PARAMS[key] = _count_parameters(arch)
    return _N_PARAMS[key]


def _count_parameters(arch: dict[str, Any]) -> int | None:
    try:  # counting needs the network code; building on the meta device allocates nothing
        import torch

        from tcm_core.networks import build_precond, count_parameters

        with torch.device("meta"):
            return int(count_parameters(build_precond(arch)))
    except Exception:  # noqa: BLE001 - a table cell then shows "—"; never fail the report for it
        return None


# ----------------------------------------------------------------------------------------------------------------
# Evaluations


def _evaluation_record(results_dir: Path, path: Path) -> dict[str, Any] | None:
    """The content of an evaluation JSON (``evaluate fid`` / ``evaluate dfid``), or None for any other file."""
    rel = path.relative_to(results_dir)
    if _skipped(rel.parts[:-1]) or path.stat().st_size > MAX_EVALUATION_JSON_BYTES:
        return None
    data = _read_json(path)
    if not isinstance(data, dict) or data.get("metric") not in EVALUATED_METRICS:
        return None
    return data


def _evaluated_run_key(
    data: dict[str, Any],
    path: Path,
    results_dir: Path,
    runs: list[TrainingRun],
    runs_by_dir: dict[Path | None, TrainingRun],
) -> str | None:
    """The key of the run an evaluation measured: named in the JSON, else found by its checkpoint or folder."""
    target = data.get("target_run_key") or data.get("run_key")
    if target is None and data.get("ckpt"):
        target = _run_key_of_checkpoint(Path(data["ckpt"]), results_dir, runs_by_dir)
    if target is None and path.parent.name == "eval":  # the workflow's layout: <run folder>/eval/<metric>.json
        run = _run_of_eval_folder(path, results_dir, runs, runs_by_dir)
        target = run.key if run is not None else None
    return target


def _run_key_of_checkpoint(ckpt: Path, results_dir: Path, runs_by_dir: dict[Path | None, TrainingRun]) -> str | None:
    """The run whose folder holds ``ckpt`` (a relative path is tried from here and from the results folders)."""
    ckpt_dir = ckpt.parent
    candidates = [ckpt_dir] if ckpt_dir.is_absolute() else [Path.cwd() / ckpt_dir, results_dir / ckpt_dir]
    candidates += [results_dir.parent / ckpt_dir, results_dir.parent.parent / ckpt_dir]
    for candidate in candidates:
        run = runs_by_dir.get(candidate.resolve())
        if run is not None:
            return run.key
    return None


def _run_of_eval_folder(
    path: Path, results_dir: Path, runs: list[TrainingRun], runs_by_dir: dict[Path | None, TrainingRun]
) -> TrainingRun | None:
    """The run of ``<run folder>/eval/``; an evaluated checkpoint that no training job here produced (e.g. a
    downloaded Stage-1 model) becomes a run without history, added to ``runs``."""
    folder = path.parent.parent.resolve()
    run_parts = path.relative_to(results_dir).parts[:-2]
    run = runs_by_dir.get(folder)
    stage = _infer_stage({}, run_parts)
    if run is None and stage is not None:
        run = TrainingRun(
            key=Path(*run_parts).as_posix(),
            stage=stage,
            grid=_infer_grid({}, run_parts),
            run_dir=folder,
            sources={"files"},
        )
        runs.append(run)
        runs_by_dir[folder] = run
    return run


def _seed_count(seeds: Any) -> int | None:
    """``seeds`` of an evaluation JSON: the list of seeds or their number."""
    return len(seeds) if isinstance(seeds, list) else (int(seeds) if isinstance(seeds, int | float) else None)


def _evaluation(data: dict[str, Any], path: Path, target: str | None) -> Evaluation:
    seeds = _seed_count(data.get("seeds"))
    label = str(data.get("label") or data["metric"])
    is_fid = data["metric"] != "dfid"
    values = {}
    if isinstance(data.get("values"), dict):
        values = {float(t): nan_if_none(v) for t, v in data["values"].items()}
    return Evaluation(
        metric=data["metric"],
        label=full_label(label, seeds) if is_fid else label,
        value=nan_if_none(data.get("min")) if is_fid else None,
        values=values,
        iteration=int(data["iteration"]) if isinstance(data.get("iteration"), int | float) else None,
        seeds=seeds,
        target=str(target) if target else None,
        path=path,
        source="files",
        setup=(
            data.get("extractor"),
            int(data["num"]) if isinstance(data.get("num"), int) else None,
            seeds or 1,
        ),
    )
