"""A real run of the ci preset through Snakemake: outputs, the MLflow store, a no-op second run, and a
job killed in the middle of Stage 1 that resumes (same MLflow run, iteration > 0) instead of restarting."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tcm_core.tracking import read_metrics
from tests.workflow_helpers import SNAKEMAKE, env, job_counts, make_workdir, snakemake, write_overlay

pytestmark = pytest.mark.slow

R = "results/ci"
# A slice of `all` that still runs every kind of job once (CI time): data, LeNet, reference stats,
# pretraining, Stage 1, the control, Stage 2, FID 1/2-step, dFID and a sample grid.
TARGETS = [
    f"{R}/stage2/main/eval/fid_1step.json",
    f"{R}/stage2/main/eval/fid_2step.json",
    f"{R}/stage2/main/eval/dfid.json",
    f"{R}/stage2/main/eval/grid_2step.png",
    f"{R}/stage1_continued/eval/fid_1step.json",
]
EXPECTED_JOBS = {"mlflow_init": 1, "prepare_dataset": 1, "pretrain_edm": 1, "train_feature_net": 1,
                 "reference_stats": 1, "stage1": 1, "stage1_continued": 1, "stage2": 1, "fid": 3, "dfid": 1,
                 "sample_grid": 1}


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
    # one child run per job that logs (training and evaluation), each under the study parent
    assert len(children) == 4 + 5, sorted(children)
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


def test_second_run_does_nothing(ran):
    wd, _ = ran
    proc = snakemake(wd, "--cores", "2", "--config", "preset=ci", "--", *TARGETS, check=True)
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_killed_stage1_resumes(ran):
    wd, _ = ran
    # A longer Stage 1 so the kill lands between saved states (changed settings -> a fresh state folder).
    write_overlay(wd / "long.yaml", "presets:\n  ci:\n    stage1: {iterations: 60, state_every: 5, log_every: 5}\n")
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
            if any(int(p.stem.split("-")[1]) >= 10 for p in state_files):
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
    assert steps == sorted(set(steps)) and steps[-1] == 60

    client, record, runs = _store(wd)
    stage1 = [r for r in runs if r.data.tags.get("tcm.run_key") == "stage1:ci:stage1"]
    assert [r.info.run_id for r in stage1] == [run_info["run_id"]]  # continued, not duplicated
    tags = stage1[0].data.tags
    assert int(tags["tcm.resumed_from_step"]) == resumed_from and stage1[0].info.status == "FINISHED"
    mlflow_steps = [m.step for m in client.get_metric_history(run_info["run_id"], "loss")]
    assert sorted(mlflow_steps) == sorted(set(mlflow_steps)) and max(mlflow_steps) == 60
