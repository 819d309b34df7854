"""Loading the runs of a preset from MLflow: the runs tagged ``tcm.preset``, with their metric histories."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from tcm_core.report.results import RELEASE_GRID, TRAIN_STAGES, Evaluation, TrainingRun, dfid_t, full_label
from tcm_core.report.values import as_float
from tcm_core.tracking.mlflow_store import PERIODIC_PREFIX, sqlite_path

# The metrics the report reads (their MLflow histories are fetched; dfid_t* and the periodic ones as well).
REPORTED_METRICS = ("fid_1step", "fid_2step", "grad_norm", "loss")
FID_METRICS = ("fid_1step", "fid_2step")


def _reported(key: str) -> bool:
    base = key[len(PERIODIC_PREFIX):] if key.startswith(PERIODIC_PREFIX) else key
    return base in REPORTED_METRICS or dfid_t(base) is not None


@dataclass
class MlflowRow:
    """One row of ``mlflow.search_runs``, with only the columns this run has."""

    run_id: str
    run_key: str  # tcm.run_key, else the run id
    tags: dict[str, Any]
    params: dict[str, Any]
    metric_keys: list[str]  # the reported metrics this run logged


def load_mlflow(uri: str, preset: str) -> tuple[list[TrainingRun], list[Evaluation], list[str]]:
    """Runs tagged ``tcm.preset = preset`` (the newest run per ``tcm.run_key``), with full metric histories."""
    db = sqlite_path(uri)
    if db is not None and not db.exists():
        return [], [], [f"no MLflow store at {db}: tables use the result files only"]
    client, rows = _search_preset(uri, preset)
    if not rows:
        return [], [], [f"MLflow store {uri} holds no run tagged tcm.preset={preset}"]
    runs: list[TrainingRun] = []
    evaluations: list[Evaluation] = []
    seen: set[str] = set()
    superseded = 0
    for row in rows:
        # tcm.superseded: an attempt replaced by a fresh start of the same job (tracking.MlflowTracker);
        # a repeated run key: an older attempt of the same job (rows come newest first, so the newest wins)
        if row.tags.get("tcm.superseded") == "true" or row.run_key in seen:
            superseded += 1
            continue
        seen.add(row.run_key)
        if row.tags.get("tcm.grid") == RELEASE_GRID:
            continue  # a released checkpoint's evaluation (released_tables), no run of this study
        stage = row.tags.get("tcm.stage")
        if stage == "eval":
            evaluations += _evaluations_of_eval_run(client, row)
        elif stage in TRAIN_STAGES:
            runs.append(_training_run(client, row, stage))
    if not superseded:
        return runs, evaluations, []
    return runs, evaluations, [f"MLflow: {superseded} older run(s) with a repeated tcm.run_key ignored (newest kept)"]


def _search_preset(uri: str, preset: str) -> tuple[Any, list[MlflowRow]]:
    """An MLflow client and the preset's runs, newest first."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    frame = mlflow.search_runs(
        search_all_experiments=True,
        filter_string=f"tags.`tcm.preset` = '{preset}'",
        order_by=["attributes.start_time DESC"],
    )
    if frame is None or len(frame) == 0:
        return client, []
    return client, [_row(record) for record in frame.to_dict("records")]


def _row(record: dict[str, Any]) -> MlflowRow:
    # The frame has a column per key of any run: a key this run lacks reads as None or NaN.
    present = {k: v for k, v in record.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}
    tags = {k[len("tags.") :]: v for k, v in present.items() if k.startswith("tags.")}
    params = {k[len("params.") :]: v for k, v in present.items() if k.startswith("params.")}
    metric_keys = [k[len("metrics.") :] for k in present if k.startswith("metrics.")]
    metric_keys = [k for k in metric_keys if _reported(k)]
    run_key = tags.get("tcm.run_key") or record["run_id"]
    return MlflowRow(record["run_id"], run_key, tags, params, metric_keys)


def _training_run(client: Any, row: MlflowRow, stage: str) -> TrainingRun:
    histories = {
        key: sorted((int(m.step), float(m.value)) for m in client.get_metric_history(row.run_id, key))
        for key in row.metric_keys
    }
    n_params = as_float(row.params.get("n_params") or row.params.get("num_params"))
    return TrainingRun(
        key=row.run_key,
        stage=stage,
        grid=row.tags.get("tcm.grid", "main"),
        params=row.params,
        histories=histories,
        mlflow_run_id=row.run_id,
        n_params=int(n_params) if n_params is not None else None,
        aliases={row.run_id},
        sources={"mlflow"},
    )


# ----------------------------------------------------------------------------------------------------------------
# Evaluation runs (tcm.stage = eval)


def _evaluations_of_eval_run(client: Any, row: MlflowRow) -> list[Evaluation]:
    """The FIDs and the dFID (one Evaluation for all t) of an eval run, each at its last logged step."""
    seeds = as_float(row.params.get("seeds"))
    num = as_float(row.params.get("num"))
    extractor = row.params.get("extractor")
    setup = (extractor, int(num) if num else None, int(seeds) if seeds else 1)
    described = _describe_setup(extractor, num, seeds) or "MLflow eval run"
    label = row.params.get("label") or row.tags.get("tcm.label")
    target = row.tags.get("tcm.target_run_key")
    evaluations: list[Evaluation] = []
    dfid_values: dict[float, float] = {}
    dfid_step = None
    for key, last in _last_points(client, row):
        t = dfid_t(key)
        if t is not None:
            dfid_values[t] = last.value
            dfid_step = int(last.step)
        elif key in FID_METRICS:
            evaluations.append(
                Evaluation(
                    metric=key,
                    label=full_label(str(label), int(seeds) if seeds else None) if label else f"FID ({described})",
                    value=last.value,
                    iteration=int(last.step),
                    seeds=int(seeds) if seeds else None,
                    target=target,
                    source="mlflow",
                    setup=setup,
                )
            )
    if dfid_values:
        evaluations.append(
            Evaluation(
                metric="dfid",
                label=str(label or f"dFID ({described})"),
                values=dfid_values,
                iteration=dfid_step,
                target=target,
                source="mlflow",
                setup=setup,
            )
        )
    return evaluations


def _describe_setup(extractor: str | None, num: float | None, seeds: float | None) -> str:
    """What an eval run measured, from its params (``evaluate`` logs no label to MLflow)."""
    parts = (
        extractor,
        f"{int(num)} samples" if num else None,
        f"min of {int(seeds)}" if seeds and seeds > 1 else None,
    )
    return ", ".join(x for x in parts if x)


def _last_points(client: Any, row: MlflowRow) -> list[tuple[str, Any]]:
    """(metric key, its last logged point) for every reported metric with a history."""
    points = []
    for key in row.metric_keys:
        history = client.get_metric_history(row.run_id, key)
        if history:
            points.append((key, max(history, key=lambda m: (m.step, m.timestamp))))
    return points
