"""A real run of the ci preset through Snakemake: outputs, the MLflow store, what a real `mlflow server` shows a
person comparing the training runs (REST API), a no-op second run, and a job killed in the middle of Stage 1
that resumes (same MLflow run, iteration > 0) instead of restarting."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tcm_core.tracking.tracker import read_metrics
from tests.workflow_helpers import CI_SLICE, SNAKEMAKE, env, job_counts, make_workdir, snakemake, write_overlay

pytestmark = pytest.mark.slow

R = "results/ci"
TARGETS = list(CI_SLICE)
EXPECTED_JOBS = {"mlflow_init": 1, "prepare_dataset": 1, "pretrain_edm": 1, "train_feature_net": 1,
                 "reference_stats": 1, "stage1": 1, "stage1_continued": 1, "stage2": 1, "evaluate_network": 3}


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    wd = make_workdir(tmp_path_factory.mktemp("run"))
    proc = snakemake(wd, "--cores", "2", "--config", "preset=ci", "--", *TARGETS, check=True, timeout=900)
    return wd, proc.stdout + proc.stderr


def _store(wd: Path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{(wd / R / 'mlflow.db').resolve()}"
    client = MlflowClient(tracking_uri=uri)
    record = json.loads((wd / R / "mlflow.json").read_text())
    runs = client.search_runs([record["experiment_id"]], max_results=1000)
    return client, record, runs


def test_outputs_and_mlflow_store(ran):
    wd, log = ran
    assert job_counts(log) == EXPECTED_JOBS
    for target in TARGETS:
        assert (wd / target).stat().st_size > 0
    fid = json.loads((wd / TARGETS[1]).read_text())
    assert fid["metric"] == "fid_2step" and fid["steps"] == [80.0, 1.0] and fid["min"] > 0
    for run in ("pretrain", "stage1", "stage1_continued", "stage2/main"):
        assert (wd / R / run / "network.safetensors").exists() and (wd / R / run / "config.json").exists()
    assert "mlflow ui --backend-store-uri sqlite:///" in log  # onsuccess: where the UI is

    client, record, runs = _store(wd)
    parents = [r for r in runs if r.data.tags.get("tcm.role") == "parent"]
    assert [p.info.run_id for p in parents] == [record["parent_run_id"]]
    children = {r.data.tags["tcm.run_key"]: r for r in runs if r.data.tags.get("mlflow.parentRunId")}
    # one child run per training job and per evaluation (an evaluate_network job: 2 FIDs, 2 grids, 2 dFID sweeps
    # of its network), each under the study parent
    assert len(children) == 4 + 3 * 6, sorted(children)
    assert all(r.data.tags["mlflow.parentRunId"] == record["parent_run_id"] for r in children.values())
    assert all(r.info.status == "FINISHED" and r.data.tags["tcm.preset"] == "ci" for r in children.values())
    s2 = children["stage2:ci:stage2/main"]
    assert s2.data.tags["tcm.stage"] == "stage2" and s2.data.tags["tcm.rule"] == "stage2"
    assert s2.data.tags["tcm.grid"] == "main"
    assert float(s2.data.params["t_prime"]) == 1.0 and int(s2.data.params["batch"]) == 8
    loss_steps = [m.step for m in client.get_metric_history(s2.info.run_id, "loss")]
    assert loss_steps and len(loss_steps) == len(set(loss_steps)) and min(loss_steps) > 6  # global iterations
    assert "config.json" in {a.path for a in client.list_artifacts(s2.info.run_id)}
    ev = children["fid:ci:stage2/main:2step"]
    assert ev.data.tags["tcm.stage"] == "eval" and ev.data.tags["tcm.target_run_key"] == "stage2:ci:stage2/main"
    assert ev.data.metrics["fid_2step"] == pytest.approx(fid["min"])
    grid = children["sample_grid:ci:stage2/main:2step"]
    assert any(a.path.endswith(".png") for a in client.list_artifacts(grid.info.run_id))


@pytest.fixture(scope="module")
def server(ran):
    """A real `mlflow server` on 127.0.0.1 over the finished run's store; yields its REST API address."""
    import socket
    import urllib.request

    wd, _ = ran
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    uri = f"sqlite:///{(wd / R / 'mlflow.db').resolve()}"
    cmd = [str(Path(SNAKEMAKE).parent / "mlflow"), "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]
    proc = subprocess.Popen(cmd, cwd=wd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise AssertionError("mlflow server did not start") from None
                time.sleep(1)
        yield f"{base}/api/2.0/mlflow"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def _rest(api: str, path: str, body: dict | None = None) -> dict:
    import urllib.request

    if body is None:
        return json.loads(urllib.request.urlopen(f"{api}/{path}", timeout=30).read())
    request = urllib.request.Request(f"{api}/{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(request, timeout=30).read())


def test_rest_api_compares_the_training_runs_with_their_fids(ran, server):
    """What a person comparing Stage 1, the control and Stage 2 sees: each training run carries the FIDs of its
    final network (at step = that network's iteration) beside its losses, and the params that tell the runs apart
    have the same names (and values) on the training runs and on the evaluation runs of their networks."""
    from tcm_core.tracking.mlflow_store import COMPARE_VIEW, COMPARED_PARAMS

    wd, _ = ran
    experiment = _rest(server, "experiments/get-by-name?experiment_name=tcm-ci")["experiment"]
    tags = {t["key"]: t["value"] for t in experiment["tags"]}
    assert tags["mlflow.experimentKind"] == "custom_model_development"  # the model-training view
    view = json.loads(tags[f"mlflow.sharedViewState.{COMPARE_VIEW}"])
    assert "metrics.`fid_1step`" in view["selectedColumns"]
    runs = _rest(server, "runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 1000,
                                         "filter": view["searchFilter"]})["runs"]

    def values(run, kind):
        return {item["key"]: item["value"] for item in run["data"].get(kind, [])}

    training = {values(r, "tags")["tcm.stage"]: r for r in runs}
    assert set(training) == {"stage1", "stage1_continued", "stage2"}  # exactly the three training runs
    for stage, run in training.items():
        metrics, params = values(run, "metrics"), values(run, "params")
        folder = "stage2/main" if stage == "stage2" else stage
        fid = json.loads((wd / R / folder / "eval" / "fid_1step.json").read_text())
        assert metrics["fid_1step"] == pytest.approx(fid["min"]) and "loss" in metrics
        assert set(COMPARED_PARAMS) <= set(params) and params["mode"] == stage
        history = _rest(server, f"metrics/get-history?run_id={run['info']['run_id']}&metric_key=fid_1step")
        iteration = json.loads((wd / R / folder / "network.json").read_text())["iteration"]
        assert [(m["step"], m["value"]) for m in history["metrics"]] == [(iteration, pytest.approx(fid["min"]))]
        assert len(values(run, "metrics")) > 5  # periodic/fid_1step, grad_norm, ... beside it
    p1, p2 = values(training["stage1_continued"], "params"), values(training["stage2"], "params")
    assert (p1["t_prime"], p2["t_prime"]) == ("null", "1.0") and p1["seed"] == p2["seed"] and p1["init"] == p2["init"]
    evaluations = _rest(server, "runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 1000,
                                                "filter": "tags.`tcm.run_key` = 'fid:ci:stage2/main:1step'"})["runs"]
    assert [values(e, "params")[k] for e in evaluations for k in COMPARED_PARAMS] == [p2[k] for k in COMPARED_PARAMS]

    parent_id = values(training["stage2"], "tags")["mlflow.parentRunId"]
    parent = _rest(server, f"runs/get?run_id={parent_id}")["run"]["info"]
    children = _rest(server, "runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 1000,
                                             "filter": f"tags.`mlflow.parentRunId` = '{parent_id}'"})["runs"]
    assert parent["status"] == "FINISHED"  # it ended with the last of its children, not 72 ms after it began
    assert int(parent["start_time"]) <= min(int(c["info"]["start_time"]) for c in children)
    assert int(parent["end_time"]) >= max(int(c["info"]["end_time"]) for c in children)


def test_second_run_does_nothing(ran):
    wd, _ = ran
    proc = snakemake(wd, "--cores", "2", "--config", "preset=ci", "--", *TARGETS, check=True)
    assert "Nothing to be done" in proc.stdout + proc.stderr


LONG_STAGE1 = 24  # iterations: the kill lands after the state of iteration 6, well before the end


def test_killed_stage1_resumes(ran):
    wd, _ = ran
    # A longer Stage 1 so the kill lands between saved states (changed settings -> a fresh state folder).
    stage1 = f"{{iterations: {LONG_STAGE1}, state_every: 3, log_every: 3}}"
    write_overlay(wd / "long.yaml", f"presets:\n  ci:\n    stage1: {stage1}\n")
    args = ["--cores", "2", "--configfile", "config.yaml", "long.yaml", "--config", "preset=ci", "--",
            f"{R}/stage1/network.safetensors"]
    proc = subprocess.Popen([SNAKEMAKE, *args], cwd=wd, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    states = sorted((wd / R / "_state" / "stage1").glob("*"), key=os.path.getmtime)
    deadline = time.time() + 300
    state_files: list[Path] = []
    try:
        while time.time() < deadline and proc.poll() is None:
            folders = [f for f in (wd / R / "_state" / "stage1").glob("*") if f not in states]
            state_files = [p for f in folders for p in f.glob("state-*.pt")]
            if any(int(p.stem.split("-")[1]) >= 6 for p in state_files):
                break
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole job dies: Snakemake and the training process
        proc.wait()
    assert state_files, "Stage 1 never saved a state before the deadline"
    run_info = json.loads((wd / R / "stage1" / "mlflow_run.json").read_text())
    snakemake(wd, "--unlock", "--config", "preset=ci", check=True)

    proc = snakemake(wd, *args, check=True, timeout=900)
    log = (wd / R / "logs" / "stage1.log").read_text()
    assert "resumed from" in log, log[-2000:]
    resumed_from = int(log.split("resumed from ")[1].split(";")[0].split(")")[0])
    assert resumed_from > 0  # Stage 1 restarts the global counter at 0 (its init is a diffusion model)
    assert json.loads((wd / R / "stage1" / "mlflow_run.json").read_text())["run_id"] == run_info["run_id"]
    steps = [r["step"] for r in read_metrics(wd / R / "stage1" / "metrics.jsonl") if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == LONG_STAGE1

    client, record, runs = _store(wd)
    stage1 = [r for r in runs if r.data.tags.get("tcm.run_key") == "stage1:ci:stage1"]
    assert [r.info.run_id for r in stage1] == [run_info["run_id"]]  # continued, not duplicated
    tags = stage1[0].data.tags
    assert int(tags["tcm.resumed_from_step"]) == resumed_from and stage1[0].info.status == "FINISHED"
    mlflow_steps = [m.step for m in client.get_metric_history(run_info["run_id"], "loss")]
    assert sorted(mlflow_steps) == sorted(set(mlflow_steps)) and max(mlflow_steps) == LONG_STAGE1
