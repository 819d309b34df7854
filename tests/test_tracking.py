"""Tracking: metrics.jsonl + the MLflow mirror on a real SQLite store (resume, params, concurrency)."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tcm_core.cli import main as cli_main
from tcm_core.tracking.mlflow_store import init_study
from tcm_core.tracking.tracker import ENV_ARTIFACTS, ENV_TAGS, JsonlTracker, open_tracker, read_metrics


def _uri(tmp_path: Path) -> str:
    return f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"


@pytest.fixture(scope="module")
def template_store(tmp_path_factory):
    """Creating MLflow's schema costs ~8 s, so each test gets a copy of one fresh store."""
    folder = tmp_path_factory.mktemp("template")
    record = init_study(_uri(folder), "tcm-test", "study-a")
    return folder / "mlflow.db", record


@pytest.fixture
def study(tmp_path, template_store):
    db, record = template_store
    shutil.copy(db, tmp_path / "mlflow.db")
    record = {**record, "tracking_uri": _uri(tmp_path)}
    parent = tmp_path / "mlflow.json"
    parent.write_text(json.dumps(record))
    return record, parent


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _children(uri, record, run_key=None):
    flt = f"tags.`mlflow.parentRunId` = '{record['parent_run_id']}'"
    if run_key:
        flt += f" AND tags.`tcm.run_key` = '{run_key}'"
    return _client(uri).search_runs([record["experiment_id"]], filter_string=flt, max_results=1000)


def test_jsonl_tracker_resume_drops_steps_after_resume_point(tmp_path):
    t = JsonlTracker(tmp_path)
    for s in range(5):
        t.log_metrics({"loss": float(s)}, step=s)
    t.close()
    t = JsonlTracker(tmp_path, resume_step=2)
    t.log_metrics({"loss": 30.0}, step=3)
    t.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [
        (0, 0.0),
        (1, 1.0),
        (2, 2.0),
        (3, 30.0),
    ]


def test_mlflow_init_is_idempotent(tmp_path, study):
    record, _ = study
    out = tmp_path / "init" / "mlflow.json"
    cmd = ["mlflow-init", "--tracking-uri", _uri(tmp_path), "--experiment", "tcm-x", "--study", "s1", "--out", str(out)]
    assert cli_main(cmd) == 0
    first = json.loads(out.read_text())
    assert cli_main(cmd) == 0
    second = json.loads(out.read_text())
    assert first == second
    assert first["experiment_id"] != record["experiment_id"]
    # the existing experiment and study parent are reused, not duplicated
    again = ["mlflow-init", "--tracking-uri", _uri(tmp_path), "--experiment", "tcm-test", "--study", "study-a"]
    assert cli_main([*again, "--out", str(out)]) == 0
    assert json.loads(out.read_text())["parent_run_id"] == record["parent_run_id"]
    client = _client(_uri(tmp_path))
    exp = client.get_experiment_by_name("tcm-x")
    assert exp.experiment_id == first["experiment_id"]
    assert exp.artifact_location.endswith("/mlartifacts")  # next to the DB, never ./mlruns
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`tcm.role` = 'parent'")
    assert [r.info.run_id for r in parents] == [first["parent_run_id"]]
    assert not (Path.cwd() / "mlruns").exists()


def test_resume_continues_run_without_duplicate_steps_or_params(tmp_path, study, monkeypatch):
    record, parent = study
    uri = _uri(tmp_path)
    monkeypatch.setenv(ENV_TAGS, json.dumps({"tcm.rule": "stage1", "tcm.stage": "stage1"}))
    run_dir = tmp_path / "run"
    (run_dir).mkdir()
    (run_dir / "config.json").write_text('{"lr": 0.1}')
    t = open_tracker(run_dir, mlflow_uri=uri, parent=parent, run_key="stage1:preset=ci")
    t.log_params({"lr": 0.1, "opt": {"name": "radam", "betas": [0.9, 0.99]}})
    for s in range(0, 6):
        t.log_metrics({"loss": float(s), "lr": 0.1}, step=s)
    first_id = t.run_id
    # killed here: no close(); the run stays RUNNING

    t = open_tracker(run_dir, mlflow_uri=uri, parent=parent, run_key="stage1:preset=ci", resume_step=3)
    assert t.run_id == first_id
    t.log_params({"lr": 0.2, "opt": {"name": "radam", "betas": [0.9, 0.99]}, "new_key": 1})
    for s in range(4, 9):
        t.log_metrics({"loss": 100.0 + s}, step=s)
    t.log_metrics({"fid_1step": 12.5}, step=8)  # another key at an already-logged step still counts
    t.close()

    runs = _children(uri, record, "stage1:preset=ci")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    hist = _client(uri).get_metric_history(first_id, "loss")
    steps = sorted(m.step for m in hist)
    assert steps == list(range(9))  # every step exactly once
    values = {m.step: m.value for m in hist}
    assert values[5] == 5.0 and values[6] == 106.0  # steps <= last logged kept their first value
    assert run.data.params["lr"] == "0.1"  # not overwritten
    assert run.data.params["opt.betas"] == "[0.9, 0.99]"
    assert run.data.params["new_key"] == "1"
    assert "logged=0.1 new=0.2" in run.data.tags["tcm.param_conflict.lr"]
    assert run.data.tags["tcm.rule"] == "stage1"
    assert run.data.tags["tcm.attempts"] == "2"
    assert run.data.tags["tcm.resumed_from_step"] == "3"
    assert run.data.metrics["fid_1step"] == 12.5
    artifacts = {a.path for a in _client(uri).list_artifacts(first_id)}
    assert {"config.json", "metrics.jsonl", "params.json"} <= artifacts
    # the JSONL record agrees: steps 0..3 of the first attempt, 4..8 of the second
    jsonl = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in jsonl] == list(range(9))


def test_fresh_restart_supersedes_old_run(tmp_path, study, monkeypatch):
    record, parent = study
    uri = _uri(tmp_path)
    grid = tmp_path / "grid.png"
    grid.write_bytes(b"\x89PNG fake")
    monkeypatch.setenv(ENV_ARTIFACTS, json.dumps([str(grid)]))
    t = open_tracker(tmp_path / "ev", mlflow_uri=uri, parent=parent, run_key="fid:run=stage2/main")
    t.log_metrics({"fid_1step": 9.0}, step=100)
    t.close()
    old = t.run_id
    t = open_tracker(tmp_path / "ev", mlflow_uri=uri, parent=parent, run_key="fid:run=stage2/main")
    t.log_metrics({"fid_1step": 8.0}, step=100)
    t.close()
    active = _children(uri, record, "fid:run=stage2/main")
    assert [r.info.run_id for r in active] == [t.run_id] and t.run_id != old
    assert active[0].data.metrics["fid_1step"] == 8.0
    assert _client(uri).get_run(old).data.tags["tcm.superseded"] == "true"
    assert "grid.png" in {a.path for a in _client(uri).list_artifacts(t.run_id)}


def test_retry_without_metrics_reuses_run(tmp_path, study):
    record, parent = study
    uri = _uri(tmp_path)
    t1 = open_tracker(tmp_path / "r", mlflow_uri=uri, parent=parent, run_key="k")
    t1.close("FAILED")
    t2 = open_tracker(tmp_path / "r", mlflow_uri=uri, parent=parent, run_key="k")
    t2.log_metrics({"loss": 1.0}, step=1)
    t2.close()
    assert t1.run_id == t2.run_id
    assert len(_children(uri, record)) == 1


N_WRITERS, N_STEPS = 8, 40


def _writer(args):
    uri, parent, index = args
    t = open_tracker(Path(parent).parent / f"w{index}", mlflow_uri=uri, parent=parent, run_key=f"job{index}")
    t.log_params({"index": index, "lr": 1e-4})
    for s in range(N_STEPS):
        # one call per step, as the training loop does: many small concurrent transactions
        t.log_metrics({"loss": s + index / 10, "lr": 1e-4}, step=s)
    t.close()
    return t.run_id


@pytest.mark.slow
def test_eight_concurrent_writers_lose_no_metric(tmp_path, study):
    record, parent = study
    uri = _uri(tmp_path)
    with mp.get_context("spawn").Pool(N_WRITERS) as pool:
        run_ids = pool.map(_writer, [(uri, str(parent), i) for i in range(N_WRITERS)])
    assert len(set(run_ids)) == N_WRITERS
    runs = _children(uri, record)
    assert len(runs) == N_WRITERS
    client = _client(uri)
    for run in runs:
        index = int(run.data.params["index"])
        hist = client.get_metric_history(run.info.run_id, "loss")
        assert sorted(m.step for m in hist) == list(range(N_STEPS))
        assert {m.step: m.value for m in hist}[N_STEPS - 1] == pytest.approx(N_STEPS - 1 + index / 10)
        assert len(client.get_metric_history(run.info.run_id, "lr")) == N_STEPS
        assert run.info.status == "FINISHED"


# ---------------------------------------------------------------------------------------------- the study's parent


def test_parent_runs_while_a_child_runs_and_ends_with_the_last(tmp_path, study):
    record, parent = study
    uri = _uri(tmp_path)
    client = _client(uri)

    def status():
        return client.get_run(record["parent_run_id"]).info.status

    assert status() == "RUNNING"  # mlflow-init leaves the study open
    a = open_tracker(tmp_path / "a", mlflow_uri=uri, parent=parent, run_key="job-a")
    b = open_tracker(tmp_path / "b", mlflow_uri=uri, parent=parent, run_key="job-b")
    a.close()
    assert status() == "RUNNING"  # b still runs
    b.close()
    parent_run = client.get_run(record["parent_run_id"])
    assert parent_run.info.status == "FINISHED"
    ends = [client.get_run(t.run_id).info.end_time for t in (a, b)]
    assert parent_run.info.end_time >= max(ends) and parent_run.info.start_time <= min(
        client.get_run(t.run_id).info.start_time for t in (a, b))
    c = open_tracker(tmp_path / "c", mlflow_uri=uri, parent=parent, run_key="job-c")  # a later job reopens it
    assert status() == "RUNNING"
    c.close()
    assert status() == "FINISHED"


def test_results_logged_on_another_run_are_idempotent(tmp_path, study):
    from tcm_core.tracking.mlflow_store import log_on_run

    record, parent = study
    uri = _uri(tmp_path)
    train = open_tracker(tmp_path / "train", mlflow_uri=uri, parent=parent, run_key="stage2:ci:stage2/main")
    train.log_metrics({"loss": 1.0}, step=10)
    train.close()
    for _ in range(2):  # a rerun of the evaluation logs nothing twice
        run_id = log_on_run(uri, parent, "stage2:ci:stage2/main", {"fid_1step": 41.5, "dfid_t1": 3.0}, 10, 123)
    assert run_id == train.run_id
    client = _client(uri)
    assert [(m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, "fid_1step")] == [(10, 41.5, 123)]
    log_on_run(uri, parent, "stage2:ci:stage2/main", {"fid_1step": 40.0}, 10, 123)  # evaluated again, other value
    history = client.get_metric_history(run_id, "fid_1step")
    assert sorted(m.value for m in history) == [40.0, 41.5]
    run = client.get_run(run_id)
    assert run.data.metrics["fid_1step"] == 40.0  # the latest is the newest value
    assert "was 41.5" in run.data.tags["tcm.metric_replaced.fid_1step"]
    assert log_on_run(uri, parent, "no-such-run", {"fid_1step": 1.0}, 10, 123) is None


def _init(uri: str, study: str, out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tcm_core", "mlflow-init", "--tracking-uri", uri, "--experiment", "tcm-race",
           "--study", study, "--out", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})


@pytest.mark.slow
def test_eight_concurrent_mlflow_inits_make_one_study(tmp_path):
    """8 real processes at once on a fresh SQLite store (each its own --out), then 8 more on the existing store:
    every one succeeds and they all name one experiment and one parent run."""
    uri = _uri(tmp_path)
    for wave, study in (("fresh", "s1"), ("existing", "s2")):
        procs = [_init(uri, study, tmp_path / wave / f"mlflow{i}.json") for i in range(8)]
        outputs = [p.communicate(timeout=300) for p in procs]
        assert [p.returncode for p in procs] == [0] * 8, [err[-500:] for _, err in outputs]
        assert not any("alembic_version" in err or "Traceback" in err for _, err in outputs)
        records = [json.loads((tmp_path / wave / f"mlflow{i}.json").read_text()) for i in range(8)]
        assert len({(r["experiment_id"], r["parent_run_id"]) for r in records}) == 1
        client = _client(uri)
        parents = client.search_runs([records[0]["experiment_id"]],
                                     filter_string=f"tags.`tcm.role` = 'parent' AND tags.`tcm.study` = '{study}'")
        assert [p.info.run_id for p in parents] == [records[0]["parent_run_id"]]
    exp = client.get_experiment(records[0]["experiment_id"])
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # opens on the runs, not on traces
