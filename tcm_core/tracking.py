"""Experiment tracking: ``metrics.jsonl`` in the run folder is the source of truth.

A :class:`Tracker` appends every metric record to ``metrics.jsonl`` and may mirror it into MLflow
(see :func:`open_tracker`). Training, evaluation and reporting only use this interface.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any, Protocol

# Telemetry posts to a public endpoint; this project runs offline and never wants it.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

#: Prefix of the metrics a training run's periodic evaluation logs (``periodic/fid_1step``, ``periodic/dfid_t0.5``):
#: cheaper than the evaluation jobs, which log ``fid_1step``, ``fid_2step``, ``dfid_t<t>`` on the same run at the
#: checkpoint's iteration, so one metric history never mixes two sample counts.
PERIODIC_PREFIX = "periodic/"
#: The params that tell runs apart, logged under these names on every training AND evaluation run.
COMPARED_PARAMS = ("mode", "t_prime", "rho", "w_b", "student_nu", "student_sigma", "seed", "init")
#: MLflow 3's experiment type: the UI opens a model-training experiment on its runs table, not on traces.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
#: A saved view of the runs table (MLflow's own "share view" record, an experiment tag read by the UI's
#: ``viewStateShareKey`` URL parameter): the training runs of the main grid with their FIDs and compared params.
COMPARE_VIEW = "tcm-compare"
COMPARE_VIEW_STATE = {
    "searchFilter": "tags.`tcm.stage` LIKE 'stage%' AND tags.`tcm.grid` = 'main'",
    "orderByKey": "attributes.start_time",
    "orderByAsc": True,
    "selectedColumns": [*(f"metrics.`{m}`" for m in ("fid_1step", "fid_2step")),
                        *(f"params.`{p}`" for p in COMPARED_PARAMS)],
    "columnOrder": ["attributes.`Run Name`"],
    "columnWidths": {"attributes.`Run Name`": 340},  # applied to the columns of columnOrder: the run keys are long
}


def compare_view_url(server: str, experiment_id: str) -> str:
    """The UI address of the compare view in the model-training workflow, e.g. for ``http://127.0.0.1:5000``."""
    return (f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
            f"&viewStateShareKey={COMPARE_VIEW}")


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
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(line) + "\n" for line in kept))
            os.replace(tmp, self.path)
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 - closed in close()

    def log_params(self, params: dict[str, Any]) -> None:
        (self.path.parent / "params.json").write_text(json.dumps(params, indent=2, sort_keys=True, default=str))

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

_TRANSIENT_MARKERS = (
    "database is locked",
    "database table is locked",
    "disk i/o error",
    "unable to open database",
    "connection",
    "timed out",
    "temporarily unavailable",
    "too many requests",
    "503",
    "502",
    "504",
)


def _is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying: SQLite lock contention and network hiccups of a server."""
    text = f"{type(exc).__name__}: {exc}".lower()
    if "already exists" in text or "changing param values" in text:
        return False
    return any(marker in text for marker in _TRANSIENT_MARKERS)


# what SQLite or a server answers when the store cannot take writes (not a bug of ours)
_STORAGE_MARKERS = ("readonly database", "read-only file system", "unable to open database", "disk is full",
                    "disk i/o error", "permission denied")


def _error_chain(exc: BaseException) -> str:
    parts, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        parts.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    return " | ".join(parts)


def store_error(exc: BaseException, tracking_uri: str | None) -> Exception | None:
    """The expected-failure form of an MLflow store error, naming the store: a StorageError when SQLite refuses
    to write (read-only database file or folder, disk full), an OfflineError when a server cannot be reached."""
    from tcm_core.errors import OfflineError, StorageError, one_line

    text = _error_chain(exc).lower()
    db = _sqlite_path(tracking_uri or "")
    where = f"MLflow store {db or tracking_uri}"
    found = next((m for m in _STORAGE_MARKERS if m in text), None)
    if found is not None:
        return StorageError(f"the MLflow database refused a write ({found})", where,
                            "make the database file and its folder writable, free disk space, or set tracking_uri")
    if db is None and tracking_uri and _is_transient(exc):
        return OfflineError(f"the MLflow server did not answer ({one_line(exc)[:160]})", where,
                            "start it or set tracking_uri to a reachable server")
    return None


def with_retry(fn, *args, attempts: int = 10, base_delay: float = 0.1, max_delay: float = 5.0, **kwargs):
    """Call ``fn`` and retry transient MLflow/SQLite/HTTP failures with jittered exponential backoff. A failure
    of the store itself (read-only, full, unreachable after the retries) is raised as :func:`store_error`."""
    import random
    import time

    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - classified below
            if attempt == attempts - 1 or not _is_transient(exc):
                uri = getattr(getattr(fn, "__self__", None), "tracking_uri", None) or kwargs.get("tracking_uri")
                expected = store_error(exc, uri) if isinstance(uri, str) else None
                if expected is None:
                    raise
                raise expected from exc
            delay = min(max_delay, base_delay * 2**attempt) * (0.5 + random.random())
            time.sleep(delay)
    raise AssertionError("unreachable")


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


def _quote(value: str) -> str:
    if "'" in value or "\\" in value:
        raise ValueError(f"run_key / ids must not contain quotes or backslashes, got {value!r}")
    return f"'{value}'"


def _sqlite_path(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :])
    return None


def default_artifact_location(tracking_uri: str) -> str | None:
    """For a SQLite store, artifacts go to ``<db folder>/mlartifacts`` (never ``./mlruns`` of the cwd)."""
    db = _sqlite_path(tracking_uri)
    if db is None:
        return None  # a tracking server decides (``--artifacts-destination``)
    return (db.resolve().parent / "mlartifacts").as_uri()


class _WithoutTraceback:
    """A logging filter dropping records that carry an exception (MLflow logs each SQLAlchemy error it re-raises
    with a full traceback; the error itself reaches us: retried, raised as one line by :func:`store_error`, or
    as a bug with its own traceback, so the log only repeats it)."""

    @staticmethod
    def filter(record) -> bool:
        return record.exc_info is None


def _quiet_store_errors() -> None:
    import logging

    store_log = logging.getLogger("mlflow.store.db.utils")
    if not any(isinstance(f, _WithoutTraceback) for f in store_log.filters):
        store_log.addFilter(_WithoutTraceback())


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    _quiet_store_errors()

    db = _sqlite_path(tracking_uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    return with_retry(MlflowClient, tracking_uri=tracking_uri)


@contextlib.contextmanager
def store_lock(tracking_uri: str):
    """An exclusive lock on a SQLite store (``<db>.lock`` beside it, flock) for read-then-write of what must exist
    once: the schema and study parent (``mlflow-init``), metrics on another job's run. None for a server."""
    import fcntl

    db = _sqlite_path(tracking_uri)
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def init_study(tracking_uri: str, experiment: str, study: str) -> dict[str, str]:
    """Create (or reuse) the experiment and the study's parent run; return the parent record. Idempotent and safe
    concurrently: SQLite is locked for the whole call (schema included); through a server the earliest parent wins.
    The parent stays RUNNING: its children reopen it when they start and close it when the last of them ends."""
    with store_lock(tracking_uri):
        client = _client(tracking_uri)
        exp = _experiment(client, tracking_uri, experiment)
        parent_id = _study_parent(client, exp.experiment_id, study)
    return {
        "tracking_uri": tracking_uri,
        "experiment_name": experiment,
        "experiment_id": exp.experiment_id,
        "study": study,
        "parent_run_id": parent_id,
    }


def _experiment(client, tracking_uri: str, name: str):
    """The experiment ``name`` (created, or restored when deleted), tagged as a model-training experiment with the
    compare view."""
    from mlflow.exceptions import MlflowException

    exp = with_retry(client.get_experiment_by_name, name)
    if exp is None:
        try:
            with_retry(client.create_experiment, name, artifact_location=default_artifact_location(tracking_uri),
                       tags={"tcm.project": "tcm-pipeline", **EXPERIMENT_KIND})
        except MlflowException as exc:  # created concurrently through a tracking server
            if "already exists" not in str(exc).lower():
                raise
        exp = with_retry(client.get_experiment_by_name, name)
    if exp.lifecycle_stage == "deleted":
        with_retry(client.restore_experiment, exp.experiment_id)
    tags = {**EXPERIMENT_KIND, f"mlflow.sharedViewState.{COMPARE_VIEW}": json.dumps(COMPARE_VIEW_STATE)}
    for key, value in tags.items():
        if exp.tags.get(key) != value:
            with_retry(client.set_experiment_tag, exp.experiment_id, key, value)
    return exp


def _parents(client, experiment_id: str, study: str) -> list:
    runs = with_retry(
        client.search_runs,
        [experiment_id],
        filter_string=f"tags.`tcm.study` = {_quote(study)} AND tags.`tcm.role` = 'parent'",
        order_by=["attributes.start_time ASC"],
    )
    return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))


def _study_parent(client, experiment_id: str, study: str) -> str:
    """The study's parent run id: the earliest one; a parent this call created is deleted again when another
    starter's is earlier (concurrent starts through a tracking server converge on one parent)."""
    parents = _parents(client, experiment_id, study)
    if parents:
        return parents[0].info.run_id
    run = with_retry(
        client.create_run,
        experiment_id,
        run_name=study,
        tags={"tcm.study": study, "tcm.role": "parent", "mlflow.note.content": f"TCM study {study}"},
    )
    earliest = _parents(client, experiment_id, study)[0].info.run_id
    if earliest != run.info.run_id:
        with_retry(client.delete_run, run.info.run_id)
    return earliest


def reopen_parent(client, parent_run_id: str) -> None:
    """A job starts: the study's parent run is RUNNING while any child runs."""
    if with_retry(client.get_run, parent_run_id).info.status != "RUNNING":
        with_retry(client.update_run, parent_run_id, status="RUNNING")


def close_parent_if_idle(client, experiment_id: str, parent_run_id: str) -> bool:
    """A job ended (its run already terminated): the parent ends now unless another child still runs. Each job
    terminates its own run BEFORE looking, so of two jobs ending at once the later look sees both ended."""
    running = with_retry(
        client.search_runs,
        [experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = {_quote(parent_run_id)} AND attributes.status = 'RUNNING'",
        max_results=1,
    )
    if running:
        return False
    with_retry(client.set_terminated, parent_run_id, "FINISHED")
    return True


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
        import time

        try:
            record = parent if isinstance(parent, dict) else json.loads(Path(parent).read_text())
            self.parent_run_id, self.experiment_id = record["parent_run_id"], record["experiment_id"]
        except (ValueError, KeyError, TypeError) as exc:
            from tcm_core.errors import RefusedFileError

            raise RefusedFileError(f"not a study record of mlflow-init ({type(exc).__name__})", str(parent),
                                   "run mlflow-init again (or delete the file and rerun the workflow)") from None
        self.tracking_uri = tracking_uri
        self.run_key = run_key
        self.client = _client(tracking_uri)
        self._pending: list = []
        self._artifacts_logged: set[str] = set()
        self._closed = False

        run = self._find_run()
        if run is not None and resume_step is None and run.data.metrics:
            # A fresh start (not a resume) must not mix its curve with the previous attempt's.
            superseded = f"{run_key}#superseded@{int(time.time())}"
            with_retry(self.client.set_tag, run.info.run_id, "tcm.run_key", superseded)
            with_retry(self.client.set_tag, run.info.run_id, "tcm.superseded", "true")
            if run.info.status == "RUNNING":
                with_retry(self.client.set_terminated, run.info.run_id, "KILLED")
            run = None
        all_tags = {
            "mlflow.parentRunId": self.parent_run_id,
            "tcm.run_key": run_key,
            "mlflow.runName": run_key,
            **{k: str(v) for k, v in (tags or {}).items()},
        }
        if run is None:
            run = with_retry(self.client.create_run, self.experiment_id, tags=all_tags, run_name=run_key)
            self.run_id = run.info.run_id
            self._last_step: dict[str, int] = {}
            self._params: dict[str, str] = {}
            attempts = 1
        else:
            self.run_id = run.info.run_id
            with_retry(self.client.update_run, self.run_id, status="RUNNING")
            self._params = dict(run.data.params)
            self._last_step = {}
            for key in run.data.metrics:
                history = with_retry(self.client.get_metric_history, self.run_id, key)
                self._last_step[key] = max((m.step for m in history), default=-1)
            attempts = int(run.data.tags.get("tcm.attempts", "1")) + 1
        from mlflow.entities import RunTag

        extra = {**all_tags, "tcm.attempts": str(attempts)}
        extra.pop("mlflow.runName", None)
        if resume_step is not None:
            extra["tcm.resumed_from_step"] = str(int(resume_step))
        with_retry(self.client.log_batch, self.run_id, tags=[RunTag(k, v) for k, v in extra.items()])
        reopen_parent(self.client, self.parent_run_id)

    def _find_run(self):
        runs = with_retry(
            self.client.search_runs,
            [self.experiment_id],
            filter_string=(
                f"tags.`tcm.run_key` = {_quote(self.run_key)} "
                f"AND tags.`mlflow.parentRunId` = {_quote(self.parent_run_id)}"
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
        import time

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


def _same_value(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b or math.isclose(a, b, rel_tol=1e-9)


def log_on_run(tracking_uri: str, parent: str | Path | dict, run_key: str, metrics: dict[str, float], step: int,
               timestamp_ms: int) -> str | None:
    """Log ``metrics`` at ``step`` on ANOTHER job's run (an evaluation's result on the training run it evaluated);
    return that run's id, or None when the store has no such run.

    Idempotent: a point already there (same key, step, value) is not logged again; concurrent jobs read and write
    under the store lock (SQLite), and through a server two jobs logging one value at once write the same (key,
    value, step, ``timestamp_ms``) row, which MLflow keeps once. A changed value at a step is logged with the
    current time (so it is the latest) and flagged by a ``tcm.metric_replaced.<key>`` tag."""
    import time

    from mlflow.entities import Metric, RunTag

    record = parent if isinstance(parent, dict) else json.loads(Path(parent).read_text())
    client = _client(tracking_uri)
    with store_lock(tracking_uri):
        runs = with_retry(
            client.search_runs,
            [record["experiment_id"]],
            filter_string=(f"tags.`tcm.run_key` = {_quote(run_key)} "
                           f"AND tags.`mlflow.parentRunId` = {_quote(record['parent_run_id'])}"),
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if not runs:
            return None
        run_id = runs[0].info.run_id
        new, replaced = [], []
        for key, value in metrics.items():
            at_step = [m.value for m in with_retry(client.get_metric_history, run_id, key) if m.step == int(step)]
            if any(_same_value(v, float(value)) for v in at_step):
                continue
            when = int(time.time() * 1000) if at_step else int(timestamp_ms)
            new.append(Metric(key, float(value), when, int(step)))
            if at_step:
                replaced.append(RunTag(f"tcm.metric_replaced.{key}"[:250], f"step {step}: was {at_step[-1]}"))
        if new or replaced:
            with_retry(client.log_batch, run_id, metrics=new, tags=replaced)
    return run_id


def log_on_parent(tracking_uri: str, parent: str | Path | dict, files: list[Path]) -> str:
    """Files as artifacts of the study's parent run (under their folder's name, e.g. ``tables/``, ``figures/``);
    the parent then ends unless a job still runs. Returns the parent's run id."""
    record = parent if isinstance(parent, dict) else json.loads(Path(parent).read_text())
    client = _client(tracking_uri)
    for path in files:
        with_retry(client.log_artifact, record["parent_run_id"], str(path), Path(path).parent.name)
    close_parent_if_idle(client, record["experiment_id"], record["parent_run_id"])
    return record["parent_run_id"]


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
    tmp = info.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"run_id": mirror.run_id, "run_key": run_key, "tracking_uri": mlflow_uri}))
    os.replace(tmp, info)
    return _MirroredTracker(jsonl, mirror, run_dir, artifacts)


# --------------------------------------------------------------------------------------------
# CLI: python -m tcm_core mlflow-init
# --------------------------------------------------------------------------------------------


def add_mlflow_init_arguments(parser) -> None:
    parser.add_argument("--tracking-uri", required=True, help="sqlite:///ABS/PATH/mlflow.db or http://host:port")
    parser.add_argument("--experiment", required=True, help="experiment name (one per preset)")
    parser.add_argument("--study", required=True, help="study name: the parent run of every job")
    parser.add_argument("--out", required=True, type=Path, help="where to write the parent record (JSON)")


def run_mlflow_init(args) -> int:
    from tcm_core.atomic import write_text_atomic

    record = init_study(args.tracking_uri, args.experiment, args.study)  # locks the store, not the output file
    write_text_atomic(args.out, json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))
    return 0
