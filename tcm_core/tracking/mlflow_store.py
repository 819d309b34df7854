"""The MLflow study store: the experiment, the study's parent run and what is logged on runs of other jobs.

One experiment per preset holds one parent run per study; every job's run is a child of it
(:class:`tcm_core.tracking.tracker.MlflowTracker`). This module creates them (``mlflow-init``), keeps the parent RUNNING
while a child runs, locks a SQLite store for read-then-write, retries transient store failures and raises the
store's own refusals as one expected error, and holds the compare view the UI opens on.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

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
    db = sqlite_path(tracking_uri or "")
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


def quoted(value: str) -> str:
    """``value`` as a quoted literal of an MLflow filter string (run keys and ids never hold quotes)."""
    if "'" in value or "\\" in value:
        raise ValueError(f"run_key / ids must not contain quotes or backslashes, got {value!r}")
    return f"'{value}'"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` store, None for a tracking server."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :])
    return None


def default_artifact_location(tracking_uri: str) -> str | None:
    """For a SQLite store, artifacts go to ``<db folder>/mlartifacts`` (never ``./mlruns`` of the cwd)."""
    db = sqlite_path(tracking_uri)
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


def store_client(tracking_uri: str):
    """An ``MlflowClient`` of the store (a SQLite store's folder is created first)."""
    from mlflow.tracking import MlflowClient

    _quiet_store_errors()

    db = sqlite_path(tracking_uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    return with_retry(MlflowClient, tracking_uri=tracking_uri)


@contextlib.contextmanager
def store_lock(tracking_uri: str):
    """An exclusive lock on a SQLite store (``<db>.lock`` beside it, flock) for read-then-write of what must exist
    once: the schema and study parent (``mlflow-init``), metrics on another job's run. None for a server."""
    import fcntl

    db = sqlite_path(tracking_uri)
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
        client = store_client(tracking_uri)
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
        filter_string=f"tags.`tcm.study` = {quoted(study)} AND tags.`tcm.role` = 'parent'",
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


def study_record(parent: str | Path | dict) -> dict:
    """The parent record ``mlflow-init`` wrote (``mlflow.json``), read from its file unless already a dict."""
    return parent if isinstance(parent, dict) else json.loads(Path(parent).read_text())


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
        filter_string=f"tags.`mlflow.parentRunId` = {quoted(parent_run_id)} AND attributes.status = 'RUNNING'",
        max_results=1,
    )
    if running:
        return False
    with_retry(client.set_terminated, parent_run_id, "FINISHED")
    return True


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

    record = study_record(parent)
    client = store_client(tracking_uri)
    with store_lock(tracking_uri):
        runs = with_retry(
            client.search_runs,
            [record["experiment_id"]],
            filter_string=(f"tags.`tcm.run_key` = {quoted(run_key)} "
                           f"AND tags.`mlflow.parentRunId` = {quoted(record['parent_run_id'])}"),
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


def log_on_parent(tracking_uri: str, parent: str | Path | dict, files: list[Path], root: Path | None = None) -> str:
    """Files as artifacts of the study's parent run, under their folder relative to ``root`` (``tables/``,
    ``study/tables/``; the folder's name for a file outside ``root`` or without one); the parent then ends unless
    a job still runs. Returns the parent's run id."""
    record = study_record(parent)
    client = store_client(tracking_uri)
    base = Path(root).resolve() if root is not None else None
    for path in files:
        folder = Path(path).resolve().parent
        where = folder.relative_to(base).as_posix() if base and folder.is_relative_to(base) else folder.name
        with_retry(client.log_artifact, record["parent_run_id"], str(path), where)
    close_parent_if_idle(client, record["experiment_id"], record["parent_run_id"])
    return record["parent_run_id"]


# --------------------------------------------------------------------------------------------
# CLI: python -m tcm_core mlflow-init
# --------------------------------------------------------------------------------------------


def add_mlflow_init_arguments(parser) -> None:
    parser.add_argument("--tracking-uri", required=True, help="sqlite:///ABS/PATH/mlflow.db or http://host:port")
    parser.add_argument("--experiment", required=True, help="experiment name (one per preset)")
    parser.add_argument("--study", required=True, help="study name: the parent run of every job")
    parser.add_argument("--out", required=True, type=Path, help="where to write the parent record (JSON)")


def run_mlflow_init(args) -> int:
    from tcm_core.io.atomic import write_text_atomic

    record = init_study(args.tracking_uri, args.experiment, args.study)  # locks the store, not the output file
    write_text_atomic(args.out, json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))
    return 0
