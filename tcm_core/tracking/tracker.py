"""Experiment tracking of one job: ``metrics.jsonl`` in the run folder is the source of truth.

A :class:`Tracker` appends every metric record to ``metrics.jsonl`` and may mirror it into the job's child run
of the study's parent (see :func:`open_tracker`; the store, its parent run and the compare view are
:mod:`tcm_core.tracking.mlflow_store`). Training, evaluation and reporting only use this interface.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Protocol

from tcm_core.errors import RefusedFileError
from tcm_core.io.atomic import write_text_atomic
from tcm_core.tracking.mlflow_store import (
    close_parent_if_idle,
    quoted,
    reopen_parent,
    store_client,
    study_record,
    with_retry,
)


class Tracker(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | Path) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...


class JsonlTracker:
    """Appends ``{"step": s, **metrics}`` lines to ``<run_dir>/metrics.jsonl``.

    On resume from iteration ``resume_step`` the lines written after that step by the interrupted
    attempt are dropped first, so the file never holds a step twice.
    """

    def __init__(self, run_dir: str | Path, resume_step: int | None = None) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [line for line in read_metrics(self.path) if line.get("step", 0) <= resume_step]
            write_text_atomic(self.path, "".join(json.dumps(line) + "\n" for line in kept))
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 - closed in close()

    def log_params(self, params: dict[str, Any]) -> None:
        write_text_atomic(self.path.parent / "params.json", json.dumps(params, indent=2, sort_keys=True, default=str))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        clean = {k: (float(v) if math.isfinite(float(v)) else None) for k, v in metrics.items()}
        self._file.write(json.dumps({"step": int(step), **clean}) + "\n")

    def log_artifact(self, path: str | Path) -> None:
        pass  # artifacts already live in the run folder

    def close(self, status: str = "FINISHED") -> None:
        if not self._file.closed:
            self._file.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All complete records of a ``metrics.jsonl`` (a torn last line from a kill is skipped)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


# --------------------------------------------------------------------------------------------
# MLflow mirror
# --------------------------------------------------------------------------------------------

#: Extra run tags as a JSON object, set by the workflow for each job (rule, preset, stage, grid, ...).
ENV_TAGS = "TCM_MLFLOW_TAGS"
#: Extra files to log as artifacts when the run closes, as a JSON list (e.g. a job's declared outputs).
ENV_ARTIFACTS = "TCM_MLFLOW_ARTIFACTS"

def _flatten(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts become dotted keys; every value becomes the string MLflow stores."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, prefix=f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            flat[name] = text[:6000]  # MLflow's limit for a param value
    return flat


def _parent_ids(parent: str | Path | dict) -> tuple[str, str]:
    """(parent run id, experiment id) of the study record ``mlflow-init`` wrote; any other file is refused."""
    try:
        record = study_record(parent)
        return record["parent_run_id"], record["experiment_id"]
    except (ValueError, KeyError, TypeError) as exc:
        raise RefusedFileError(f"not a study record of mlflow-init ({type(exc).__name__})", str(parent),
                               "run mlflow-init again (or delete the file and rerun the workflow)") from None


class MlflowTracker:
    """Mirrors a job's params, metrics and artifacts into a child run of the study's parent run.

    The child run is identified by ``tcm.run_key`` under ``mlflow.parentRunId``. A job that resumes
    (``resume_step`` given) continues that run: metric steps at or below the last step already logged
    for a key are skipped, and params are only added (a changed value is kept as it was and flagged by
    a ``tcm.param_conflict.<key>`` tag). A job that starts afresh although its run already holds metrics
    (its inputs or settings changed) supersedes the old run, which keeps its data under a renamed key.
    """

    def __init__(
        self,
        tracking_uri: str,
        parent: str | Path | dict,
        run_key: str,
        *,
        tags: dict[str, str] | None = None,
        resume_step: int | None = None,
    ) -> None:
        self.parent_run_id, self.experiment_id = _parent_ids(parent)
        self.tracking_uri = tracking_uri
        self.run_key = run_key
        self.client = store_client(tracking_uri)
        self._pending: list = []
        self._artifacts_logged: set[str] = set()
        self._closed = False
        self._last_step: dict[str, int] = {}
        self._params: dict[str, str] = {}

        run = self._find_run()
        if run is not None and resume_step is None and run.data.metrics:
            self._supersede(run)  # a fresh start (not a resume) must not mix its curve with the previous attempt's
            run = None
        all_tags = {
            "mlflow.parentRunId": self.parent_run_id,
            "tcm.run_key": run_key,
            "mlflow.runName": run_key,
            **{k: str(v) for k, v in (tags or {}).items()},
        }
        attempts = self._start_run(all_tags) if run is None else self._continue_run(run)
        self._tag_attempt(all_tags, attempts, resume_step)
        reopen_parent(self.client, self.parent_run_id)

    def _supersede(self, run) -> None:
        """The old run keeps its data under a renamed key, flagged ``tcm.superseded``, and ends as KILLED."""
        superseded = f"{self.run_key}#superseded@{int(time.time())}"
        with_retry(self.client.set_tag, run.info.run_id, "tcm.run_key", superseded)
        with_retry(self.client.set_tag, run.info.run_id, "tcm.superseded", "true")
        if run.info.status == "RUNNING":
            with_retry(self.client.set_terminated, run.info.run_id, "KILLED")

    def _start_run(self, all_tags: dict[str, str]) -> int:
        """A new child run; returns its attempt number (1)."""
        run = with_retry(self.client.create_run, self.experiment_id, tags=all_tags, run_name=self.run_key)
        self.run_id = run.info.run_id
        return 1

    def _continue_run(self, run) -> int:
        """Reopen the job's run, remembering its params and each metric's last step; returns the attempt number."""
        self.run_id = run.info.run_id
        with_retry(self.client.update_run, self.run_id, status="RUNNING")
        self._params = dict(run.data.params)
        for key in run.data.metrics:
            history = with_retry(self.client.get_metric_history, self.run_id, key)
            self._last_step[key] = max((m.step for m in history), default=-1)
        return int(run.data.tags.get("tcm.attempts", "1")) + 1

    def _tag_attempt(self, all_tags: dict[str, str], attempts: int, resume_step: int | None) -> None:
        from mlflow.entities import RunTag

        extra = {**all_tags, "tcm.attempts": str(attempts)}
        extra.pop("mlflow.runName", None)
        if resume_step is not None:
            extra["tcm.resumed_from_step"] = str(int(resume_step))
        with_retry(self.client.log_batch, self.run_id, tags=[RunTag(k, v) for k, v in extra.items()])

    def _find_run(self):
        runs = with_retry(
            self.client.search_runs,
            [self.experiment_id],
            filter_string=(
                f"tags.`tcm.run_key` = {quoted(self.run_key)} "
                f"AND tags.`mlflow.parentRunId` = {quoted(self.parent_run_id)}"
            ),
            order_by=["attributes.start_time DESC"],
        )
        return runs[0] if runs else None

    # -- Tracker protocol ----------------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param, RunTag

        new, conflicts = [], []
        for key, value in _flatten(params).items():
            if key not in self._params:
                new.append(Param(key, value))
                self._params[key] = value
            elif self._params[key] != value:
                conflicts.append(RunTag(f"tcm.param_conflict.{key}"[:250], f"logged={self._params[key]} new={value}"))
        for i in range(0, len(new), 100):
            with_retry(self.client.log_batch, self.run_id, params=new[i : i + 100])
        if conflicts:
            conflicts.append(RunTag("tcm.warning", "params changed on resume; kept the first values"))
            with_retry(self.client.log_batch, self.run_id, tags=conflicts)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        step = int(step)
        now = int(time.time() * 1000)
        for key, value in metrics.items():
            if value is None or step <= self._last_step.get(key, -(2**62)):
                continue  # already logged by an earlier attempt of this job
            self._pending.append(Metric(key, float(value), now, step))
            self._last_step[key] = step
        self.flush(raise_errors=False)

    def flush(self, raise_errors: bool = True) -> None:
        """Send pending metrics; on a persistent failure keep them for the next call."""
        while self._pending:
            batch = self._pending[:1000]
            try:
                with_retry(self.client.log_batch, self.run_id, metrics=batch)
            except Exception as exc:
                if raise_errors:
                    raise
                import sys

                print(f"tracking: MLflow unavailable, {len(self._pending)} metrics queued ({exc})", file=sys.stderr)
                return
            del self._pending[: len(batch)]

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if not path.exists() or str(path.resolve()) in self._artifacts_logged:
            return
        with_retry(self.client.log_artifact, self.run_id, str(path), artifact_path)
        self._artifacts_logged.add(str(path.resolve()))

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        with_retry(self.client.log_batch, self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def close(self, status: str = "FINISHED") -> None:
        if self._closed:
            return
        self.flush(raise_errors=True)
        with_retry(self.client.set_terminated, self.run_id, status)
        self._closed = True
        close_parent_if_idle(self.client, self.experiment_id, self.parent_run_id)


class _MirroredTracker:
    """``metrics.jsonl`` first (the source of truth), then the MLflow mirror."""

    def __init__(self, jsonl: JsonlTracker, mirror: MlflowTracker, run_dir: Path, artifacts: list[str]) -> None:
        self.jsonl, self.mirror, self.run_dir, self.artifacts = jsonl, mirror, run_dir, artifacts

    @property
    def run_id(self) -> str:
        return self.mirror.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        self.jsonl.log_params(params)
        self.mirror.log_params(params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.jsonl.log_metrics(metrics, step)
        self.mirror.log_metrics(metrics, step)

    def log_artifact(self, path: str | Path) -> None:
        self.jsonl.log_artifact(path)
        self.mirror.log_artifact(path)

    def close(self, status: str = "FINISHED") -> None:
        self.jsonl.close(status)
        # The resolved config and the metrics record travel with the run, plus whatever the job named.
        for name in ("config.json", "params.json", "metrics.jsonl"):
            self.mirror.log_artifact(self.run_dir / name)
        for path in self.artifacts:
            self.mirror.log_artifact(path)
        self.mirror.close(status)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("FAILED" if exc_type else "FINISHED")


def open_tracker(
    run_dir: str | Path,
    *,
    mlflow_uri: str | None = None,
    parent: str | Path | None = None,
    run_key: str | None = None,
    tags: dict | None = None,
    resume_step: int | None = None,
) -> Tracker:
    """The tracker a job uses: ``metrics.jsonl`` always, mirrored into MLflow when ``mlflow_uri`` is given.

    ``parent`` is the ``mlflow.json`` written by ``mlflow-init``; ``run_key`` identifies the job's child
    run (deterministic: rule + wildcards). Tags from the ``TCM_MLFLOW_TAGS`` environment variable (a JSON
    object set by the workflow) are added to ``tags``; files listed in ``TCM_MLFLOW_ARTIFACTS`` are
    logged as artifacts when the tracker closes.
    """
    run_dir = Path(run_dir)
    jsonl = JsonlTracker(run_dir, resume_step=resume_step)
    if not mlflow_uri:
        return jsonl
    if parent is None or not run_key:
        raise ValueError("open_tracker: mlflow_uri needs parent (mlflow.json from mlflow-init) and run_key")
    env_tags = json.loads(os.environ.get(ENV_TAGS) or "{}")
    artifacts = json.loads(os.environ.get(ENV_ARTIFACTS) or "[]")
    mirror = MlflowTracker(mlflow_uri, parent, run_key, tags={**(tags or {}), **env_tags}, resume_step=resume_step)
    # Lets a later reader (reports, debugging) go from the run folder to the MLflow run.
    info = run_dir / "mlflow_run.json"
    write_text_atomic(info, json.dumps({"run_id": mirror.run_id, "run_key": run_key, "tracking_uri": mlflow_uri}))
    return _MirroredTracker(jsonl, mirror, run_dir, artifacts)
