"""profiles/slurm against a real one-node SLURM cluster on localhost (scripts/slurm-up.sh).

Three workflow runs go through the very profile users get, concurrently on one cluster (so the whole
module stays within a few minutes on 2 cores), each in its own copy of the checkout:
  main     the slice of the ci preset's `all` that runs every kind of its jobs once (CI_SLICE, as
           tests/test_workflow_run.py); every job must be a SLURM job, GPU rules with GPU flags, and the
           outputs and the MLflow server's store complete;
  preempt  stage 1 with more iterations; its running job is `scancel`ed after it saved a state, and the
           profile's retry must resume from that state;
  fail     a dataset that is not a zip: the first job fails (every attempt) and Snakemake must exit
           non-zero naming the job's log files;
  multinode  Stage 2 on the cluster's two nodes (two slurmd on this machine) x 1 process: srun starts one
           torchrun per node, they meet in a c10d rendezvous on the first host and train with gloo; the
           network must equal the one a plain single process trains (`single`, a local run of the same
           target without SLURM) at the same batch and batch_gpu.
The command line changes only the status-check timing (--slurm-init-seconds-before-status-checks 2:
jobs take seconds here, not hours) and the partition (TCM_SLURM_PARTITION). The ci preset asks for no
GPUs (it runs on CPUs anywhere), so a config file gives its train/eval rules one GPU each, as the GPU
presets do; the cluster has fake GPUs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from slurm_helpers import (
    REPO,
    MlflowServer,
    SlurmCluster,
    copy_workflow,
    job_env,
    planned_jobs,
    profile_gpu_rules,
    run_uuid,
    sacct_steps,
    skip_reason,
    snakemake_cmd,
    submissions,
    submitted_jobids,
    wait_sacct_final,
)
from training_helpers import load_weights, make_small_mnist, save_micro_checkpoint
from workflow_helpers import CI_SLICE

pytestmark = pytest.mark.slow

PARTITION = "tcmci"
STATUS_TIMING = ["--slurm-init-seconds-before-status-checks", "2"]
KILL_AFTER = 900  # seconds; Snakemake is SIGKILLed after this (it can hang on a job it never sees end)
TRACKED_RULES = {"pretrain_edm", "stage1", "stage1_continued", "stage2", "stage3", "fid", "dfid", "sample_grid",
                 "evaluate_network"}
# the MLflow child runs of one evaluate_network job, by the rule that would run each alone (ci: 2 dFID sweeps)
NETWORK_EVALUATIONS = {"fid": 2, "sample_grid": 2, "dfid": 2}
PREEMPT_ITERATIONS = 30  # stage 1 of the preempt run: long enough to be cancelled after a saved state
TRAIN_RULES = {"pretrain_edm", "stage1", "stage1_continued", "stage2", "stage3"}
STAGE2_MAIN = "results/ci/stage2/main/network.safetensors"


def _ci_preset() -> dict:
    return yaml.safe_load((REPO / "config.yaml").read_text())["presets"]["ci"]


def _gpu_overrides() -> dict:
    """One GPU per train/eval job unless the ci preset already asks for GPUs."""
    res = _ci_preset()["resources"]
    return {k: {"gpu": 1} for k in ("train", "eval") if not res[k]["gpu"]}


def _stage2_alone(stage1: Path, data: Path, nodes: int, gpu: int) -> dict:
    """The ci preset's main Stage 2 alone: from a given Stage-1 network and data set (no pretraining, no Stage 1,
    no prepare_dataset), at an explicit batch_gpu: 2 ranks and 1 process then cut the global batch into the same
    loss calls (tcm_core.training.global_batch).
    ema_beta=0 makes the saved network the trained weights themselves; the ablation batch is one the planned
    ablation points split over 2 ranks (they are checked at the preset's world size too)."""
    return {"init": {"kind": "path", "path": str(stage1), "provides": "stage1"}, "dataset": {"path": str(data)},
            "distill": None,  # ci's distillation arm trains its own Stage 1, which a Stage-1 init cannot give
            "resources": {"train": {"gpu": gpu, "nodes": nodes}},
            "stage2": {"batch_gpu": 2, "ema_beta": 0, "lr": 1.0e-3}, "ablation": {"batch": 12}}


def _write_config(folder: Path, ci: dict) -> Path:
    path = folder / "test-config.yaml"
    path.write_text(yaml.safe_dump({"presets": {"ci": ci}}))
    return path


# ---------------------------------------------------------------------------------------------------
# No cluster needed: profile resolution, rendering and the dry-run plan


def test_profile_name_resolves_and_plans_gpu_requests(tmp_path):
    """`snakemake --profile slurm -n all_ablations --config preset=cifar10` from the repo root: the
    relative name finds ./slurm, site values come from the environment, and the plan shows each rule's
    GPU and runtime request. Dry runs submit nothing: SLURM_CONF points nowhere, so any SLURM client
    call would fail (and this test runs before the cluster fixture starts one)."""
    work = copy_workflow(tmp_path / "wf")
    assert (work / "slurm").resolve() == (work / "profiles" / "slurm").resolve()
    env = job_env(TCM_SLURM_PARTITION="gpu", TCM_SLURM_ACCOUNT="proj42", TCM_SLURM_GPU_MODEL="a100",
                  TCM_SLURM_TRAIN_RUNTIME="24h", SLURM_CONF="/nonexistent")
    proc = subprocess.run(snakemake_cmd("--profile", "slurm", "-n", "all_ablations", "--config", "preset=cifar10",
                                        kill_after=120), cwd=work, env=env, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert re.search(r"Using profiles? slurm\b", out), out[:2000]
    assert "$TCM" not in out
    cifar = yaml.safe_load((REPO / "config.yaml").read_text())["presets"]["cifar10"]["resources"]
    resources = {}
    for m in re.finditer(r"^rule (\w+):\n(?:.*\n)*?\s+resources: (.*)$", out, re.MULTILINE):
        resources.setdefault(m.group(1), dict(kv.split("=", 1) for kv in m.group(2).split(", ")))
    for rule in ("stage1", "stage1_continued", "stage2", "stage3"):
        r = resources[rule]
        assert r["gpu"] == str(cifar["train"]["gpu"]) and r["nodes"] == "1", (rule, r)
        assert r["runtime"] == "1440" and r["gpu_model"] == "a100", (rule, r)  # 24h from the environment
        assert r["slurm_partition"] == "gpu" and r["slurm_account"] == "proj42", (rule, r)
    for rule in ("fid", "dfid", "reference_stats", "evaluate_network"):  # sample_grid: no job of this plan
        r = resources[rule]
        runs = 6 if rule == "evaluate_network" else 1  # cifar10's main networks: 2 FIDs, 2 grids, 2 dFID sweeps
        assert r["gpu"] == "1" and r["runtime"] == str(runs * cifar["eval"]["runtime"]), (rule, r)
        assert r["slurm_partition"] == "gpu" and r["gpu_model"] == "a100", (rule, r)
    assert resources["prepare_dataset"]["gpu"] == "0" and "gpu_model" not in resources["prepare_dataset"]
    assert resources["prepare_dataset"]["slurm_partition"] == "gpu"

    # Without the site variables nothing site-specific is requested (the cluster's defaults apply).
    env = {k: v for k, v in env.items() if not k.startswith("TCM_SLURM_")}
    proc = subprocess.run(snakemake_cmd("--profile", "slurm", "-n", "all", "--config", "preset=ci", kill_after=120),
                          cwd=work, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "slurm_partition" not in proc.stdout and "slurm_account" not in proc.stdout and "$" not in proc.stdout


MULTINODE_LAUNCH = (
    "srun --nodes=2 --ntasks-per-node=1 --cpus-per-task=32 --kill-on-bad-exit=1 bash -c 'exec torchrun"
    " --nnodes=$SLURM_NNODES --nproc_per_node=8 --rdzv_backend=c10d"
    ' --rdzv_endpoint=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1):$((29400 + SLURM_JOB_ID % 1000))'
    """ --rdzv_id=$SLURM_JOB_ID -m "$@"' torchrun-node tcm_core train --mode stage1 """
)


def test_multinode_plan_starts_one_torchrun_per_node(tmp_path):
    """TCM_SLURM_TRAIN_NODES=2 on cifar10 (8 GPUs per node): each training job asks for 2 nodes, one task per
    node and 16 GPUs, and its command is one srun over both nodes starting a torchrun of 8 processes on each.
    Evaluation stays on one node. (Dry run: nothing is submitted.)"""
    work = copy_workflow(tmp_path / "wf")
    env = job_env(TCM_SLURM_TRAIN_NODES="2", SLURM_CONF="/nonexistent")
    proc = subprocess.run(snakemake_cmd("--profile", "slurm", "-n", "-p", "results/cifar10/stage1/network.safetensors",
                                        "--config", "preset=cifar10", kill_after=120),
                          cwd=work, env=env, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    resources = {m.group(1): dict(kv.split("=", 1) for kv in m.group(2).split(", "))
                 for m in re.finditer(r"^rule (\w+):\n(?:.*\n)*?\s+resources: (.*)$", out, re.MULTILINE)}
    stage1 = resources["stage1"]
    assert (stage1["nodes"], stage1["gpu"], stage1["tasks"], stage1["tasks_per_gpu"], stage1["mpi"]) == (
        "2", "16", "2", "0", "srun"), stage1
    assert resources["reference_stats"]["nodes"] == "1" and "mpi" not in resources["reference_stats"]
    assert MULTINODE_LAUNCH in out, out[-4000:]


def test_workflow_profile_does_not_override_the_slurm_profile():
    """Snakemake applies profiles/default on top of --profile slurm and it wins per top-level key, so a
    key both set must agree (else e.g. keep-going or latency-wait silently change on the cluster)."""
    slurm = set(yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())) - {"__use_yte__",
                                                                                              "__definitions__"}
    rendered = {k: v for k, v in __import__("yte").process_yaml(
        open(REPO / "profiles" / "slurm" / "config.yaml"), require_use_yte=True).items()}
    default_file = next(p for p in (REPO / "profiles" / "default").iterdir() if p.suffix == ".yaml")
    default = yaml.safe_load(default_file.read_text())
    clashes = {k: (default[k], rendered[k]) for k in slurm & set(default) if default[k] != rendered[k]}
    assert not clashes, f"profiles/default overrides profiles/slurm (default, slurm): {clashes}"
    assert "default-resources" not in default or "set-resources" not in default


def test_profile_covers_every_remote_rule():
    """Partition/account are set per rule, so every rule that runs as a SLURM job must be listed (cifar10's
    rules, and ci's, which add the distillation arm's)."""
    rules = set()
    for preset in ("cifar10", "ci"):
        proc = subprocess.run(snakemake_cmd("--list-rules", "--config", f"preset={preset}", kill_after=120),
                              cwd=REPO, env=job_env(), capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rules |= {line.split()[0] for line in proc.stdout.splitlines() if line[:1].strip()}  # docstrings indent
    assert {"cd_stage1", "cd_stage1_continued", "cd_stage2"} <= rules
    local = {"all", "all_ablations", "all_distillation", "mlflow_init", "fetch_checkpoint", "fetch_dataset",
             "fetch_teacher", "paper_tables", "study", "release_check", "released_table", "released_tables"}
    missing = rules - local - set(profile_gpu_rules())
    assert not missing, f"rules missing from profiles/slurm set-resources: {missing}"


# ---------------------------------------------------------------------------------------------------
# The real cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("slurm")
    server = MlflowServer(base / "mlflow")
    slurm = SlurmCluster(base / "cluster", partition=PARTITION)
    # A SIGTERM (CI timeout) must still stop the daemons: turn it into an exception so `finally` runs.
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    server.start()  # starts in the background while the cluster comes up
    try:
        slurm.up()
        server.wait_healthy()
        yield slurm, server, base
    finally:
        server.stop()
        slurm.down()
        signal.signal(signal.SIGTERM, previous)


FAIL_RETRIES = 1


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


class Run:
    """One Snakemake process through profiles/slurm (or, slurm=False, a plain local run) in its own copy of the
    checkout."""

    def __init__(self, name: str, base: Path, server: MlflowServer, target: str | tuple[str, ...], ci: dict,
                 extra: tuple[str, ...] = (), slurm: bool = True) -> None:
        self.name = name
        self.work = copy_workflow(base / name)
        self.experiment = f"tcm-ci-{name}"
        config = _write_config(self.work, ci)
        targets = [target] if isinstance(target, str) else list(target)
        common = [*targets, "--configfile", str(config), "--config", "preset=ci", f"tracking_uri={server.uri}",
                  f"experiment={self.experiment}", f"study=ci-{name}", *extra]
        self.args = (["--profile", "profiles/slurm", *common, *STATUS_TIMING, "--verbose"] if slurm
                     else [*common, "--cores", "1"])
        env = job_env(TCM_SLURM_PARTITION=PARTITION) if slurm else job_env()
        self.log = self.work / "snakemake-run.log"
        self.started = time.monotonic()
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen(snakemake_cmd(*self.args, kill_after=KILL_AFTER), cwd=self.work,
                                         env=env, stdout=f,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        self.seconds = None

    def kill(self) -> None:
        """End this run's `timeout` + Snakemake (their own process group) if it is still going."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def wait(self) -> int:
        rc = self.proc.wait(timeout=KILL_AFTER + 30)
        self.seconds = self.seconds or time.monotonic() - self.started
        return rc

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")


def _cancel_stage1_after_first_state(run: Run, record: dict) -> None:
    """Watch the preempt run: once its stage-1 SLURM job is running and has saved a training state,
    scancel it (what a preemption without requeue, a node loss or a user does)."""
    deadline = time.monotonic() + KILL_AFTER
    state_root = run.work / "results" / "ci" / "_state" / "stage1"
    while time.monotonic() < deadline and run.proc.poll() is None:
        states = sorted(state_root.glob("*/state-*.pt"))
        if states:
            jobs = subprocess.run(["squeue", "-h", "-t", "R", "-o", "%i|%k|%Z"], capture_output=True,
                                  text=True).stdout.split()
            # the plugin's --comment: rule_<rule> or rule_<rule>_wildcards_<...>
            mine = [j.split("|")[0] for j in jobs
                    if re.fullmatch(r"rule_stage1(_wildcards_.*)?", j.split("|")[1])
                    and Path(j.split("|")[2]) == run.work]
            if mine:
                record["iteration"] = int(states[-1].stem.split("-")[1])
                subprocess.run(["scancel", mine[0]], check=True)
                record["jobid"] = mine[0]
                return
        time.sleep(0.2)


@pytest.fixture(scope="module")
def runs(cluster):
    _, server, base = cluster
    gpu = _gpu_overrides()
    bad_data = base / "not-a-dataset.zip"
    bad_data.write_bytes(b"this is not a zip archive\n")
    started = time.monotonic()
    main = Run("main", base, server, CI_SLICE, {"resources": gpu})
    # Enough iterations that stage 1 runs for a while after its first saved state.
    stage1_start = 0  # Stage 1 restarts the global counter: its init (the pretraining) is a diffusion model
    preempt = Run("preempt", base, server, "results/ci/stage1/network.safetensors",
                  {"resources": gpu, "stage1": {"iterations": PREEMPT_ITERATIONS, "state_every": 3, "log_every": 1}})
    # One retry (not the profile's 3): each failed attempt costs a growing status-poll interval, and two
    # attempts already show that retries happen and that the run fails with its logs named.
    fail = Run("fail", base, server, "results/ci/pretrain/network.safetensors",
               {"resources": gpu, "dataset": {"path": str(bad_data)}}, extra=("--retries", str(FAIL_RETRIES)))
    # Stage 2 on 2 nodes x 1 process (one fake GPU each: --gpus=2 --nodes=2), and one plain local process
    stage1 = save_micro_checkpoint(base / "stage1-micro.safetensors", iteration=10, seed=4)
    digits = make_small_mnist(base / "mnist16.zip", count=32)
    multinode = Run("multinode", base, server, STAGE2_MAIN, _stage2_alone(stage1, digits, nodes=2, gpu=1))
    single = Run("single", base, server, STAGE2_MAIN, _stage2_alone(stage1, digits, nodes=1, gpu=0), slurm=False)
    every = (main, preempt, fail, multinode, single)
    cancelled: dict = {}
    watcher = threading.Thread(target=_cancel_stage1_after_first_state, args=(preempt, cancelled), daemon=True)
    watcher.start()
    try:
        codes = _wait_all(every)
    finally:
        for r in every:
            r.kill()
    watcher.join(timeout=5)
    total = time.monotonic() - started
    print(f"\nSLURM workflow runs: {({r.name: round(r.seconds) for r in every})} s, together {total:.0f} s")
    return {"main": main, "preempt": preempt, "fail": fail, "multinode": multinode, "single": single,
            "codes": codes, "cancelled": cancelled, "stage1_start": stage1_start, "stage1_micro": stage1,
            "server": server}


def _wait_all(runs: tuple[Run, ...]) -> dict[str, int]:
    """Exit codes, each run's own duration recorded when it ends (each ends by KILL_AFTER: snakemake_cmd)."""
    while any(r.seconds is None for r in runs):
        for r in runs:
            if r.seconds is None and r.proc.poll() is not None:
                r.seconds = time.monotonic() - r.started
        time.sleep(0.5)
    return {r.name: r.wait() for r in runs}


def _mlflow_children(server: MlflowServer, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(server.uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment}"
    all_runs = client.search_runs([exp.experiment_id], max_results=5000)
    parents = [r for r in all_runs if r.data.tags.get("tcm.role") == "parent"]
    assert len(parents) == 1, [r.data.tags for r in all_runs]
    children = [r for r in all_runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    return client, children


SLICE_LOCAL_RULES = {"all", "mlflow_init"}  # the rules of the slice that run beside Snakemake, not on SLURM


def test_ci_all_runs_every_job_on_slurm(runs):
    run: Run = runs["main"]
    out = run.output
    assert runs["codes"]["main"] == 0, out[-6000:]
    remote, local = planned_jobs(out)
    subs = submissions(out)
    submitted: dict[str, int] = {}
    for s in subs:
        submitted[s.rule] = submitted.get(s.rule, 0) + 1
    # every non-local job went through sbatch exactly once, into the partition from the environment
    assert remote and submitted == remote, (submitted, remote)
    assert set(local) <= SLICE_LOCAL_RULES, local
    elsewhere = [s.sbatch for s in subs if f"-p {PARTITION}" not in s.sbatch]
    assert not elsewhere, elsewhere
    # GPU rules carried GPU flags (and one node, for torchrun), CPU rules none
    for s in subs:
        gpu_rule = s.rule in TRACKED_RULES | {"reference_stats", "train_feature_net"}
        assert ("--gpus=1" in s.sbatch) == gpu_rule, s.sbatch
        if gpu_rule:
            assert "--nodes=1" in s.sbatch and "--requeue" in s.sbatch, s.sbatch
    # SLURM's own records: one completed allocation per submission, GPU TRES on the GPU jobs
    ids = submitted_jobids(out)
    assert len(ids) == len(subs)
    recs = {r["JobIDRaw"]: r for r in wait_sacct_final(run_uuid(out), len(ids))}
    assert set(ids) <= set(recs), (ids, recs)
    for jobid, slurm_log in ids.items():
        rec = recs[jobid]
        rule = re.search(r"slurm_logs/rule_(\w+?)/", slurm_log).group(1)  # rule_<rule>[/<wildcards>]/<id>.log
        assert rec["State"] == "COMPLETED" and rec["Partition"] == PARTITION, rec
        assert ("gres/gpu=1" in rec["AllocTRES"]) == (rule not in {"prepare_dataset"}), (rule, rec)
        assert Path(slurm_log).is_file(), slurm_log  # kept by slurm-keep-successful-logs
    # outputs complete: a second (dry) run through the same profile has nothing to do
    dry = subprocess.run(snakemake_cmd(*[a for a in run.args if a != "--verbose"], "-n", kill_after=120),
                         cwd=run.work, env=job_env(TCM_SLURM_PARTITION=PARTITION), capture_output=True, text=True)
    assert dry.returncode == 0 and "Nothing to be done" in dry.stdout + dry.stderr, dry.stdout[-3000:]
    # the slice ran every rule that `all` runs as a SLURM job (the same profile plans `all` from scratch)
    plan = [a for a in run.args if a not in {"--verbose", *CI_SLICE}]
    everything = subprocess.run(snakemake_cmd("all", *plan, "-n", "--forceall", kill_after=120), cwd=run.work,
                                env=job_env(TCM_SLURM_PARTITION=PARTITION), capture_output=True, text=True)
    assert everything.returncode == 0, everything.stderr[-3000:]
    assert set(planned_jobs(everything.stdout + everything.stderr)[0]) - SLICE_LOCAL_RULES == set(submitted)
    # the MLflow server holds one finished child run per tracked job, with the job's metrics
    _, children = _mlflow_children(runs["server"], run.experiment)
    by_rule: dict[str, list] = {}
    for child in children:
        by_rule.setdefault(child.data.tags.get("tcm.rule"), []).append(child)
    expected: dict[str, int] = {}  # child runs by tcm.rule: one per job, an evaluate_network job's per evaluation
    for rule, count in submitted.items():
        for each, n in (NETWORK_EVALUATIONS if rule == "evaluate_network" else {rule: 1}).items():
            expected[each] = expected.get(each, 0) + n * count
    for rule, count in expected.items():
        if rule not in TRACKED_RULES:
            continue
        got = by_rule.get(rule, [])
        assert len(got) == count, (rule, count, [c.data.tags.get("tcm.run_key") for c in got])
        for child in got:
            assert child.info.status == "FINISHED", child.data.tags
            metrics = set(child.data.metrics)
            if rule in TRAIN_RULES:
                assert {"loss", "grad_norm"} <= metrics, (rule, metrics)
            elif rule == "fid":
                assert any(m.startswith("fid_") for m in metrics), metrics
            elif rule == "dfid":
                assert any(m.startswith("dfid_t") for m in metrics), metrics
    # metrics.jsonl (source of truth) and the MLflow mirror agree for a training run
    client, _ = _mlflow_children(runs["server"], run.experiment)
    stage1 = by_rule["stage1"][0]
    jsonl = [json.loads(line) for line in (run.work / "results/ci/stage1/metrics.jsonl").read_text().splitlines()]
    history = client.get_metric_history(stage1.info.run_id, "loss")
    assert sorted(m.step for m in history) == [r["step"] for r in jsonl if r.get("loss") is not None]


def test_cancelled_training_job_resumes_from_its_state(runs):
    run: Run = runs["preempt"]
    out = run.output
    cancelled = runs["cancelled"]
    assert cancelled.get("jobid"), f"the stage-1 job was never seen running with a saved state\n{out[-4000:]}"
    assert runs["codes"]["preempt"] == 0, out[-6000:]
    stage1 = [s for s in submissions(out) if s.rule == "stage1"]
    assert len(stage1) == 2, [s.sbatch for s in stage1]  # the cancelled attempt and the profile's retry
    recs = wait_sacct_final(run_uuid(out), len(submitted_jobids(out)))
    states = {r["JobIDRaw"]: r["State"] for r in recs}
    assert states[cancelled["jobid"]].startswith("CANCELLED"), states
    log = (run.work / "results/ci/logs/stage1.log").read_text()
    m = re.search(r"finished at global iteration (\d+) \(started at (\d+).*resumed from (\d+)", log, re.DOTALL)
    assert m, log[-2000:]
    end, start, resumed = (int(g) for g in m.groups())
    assert start == runs["stage1_start"] and end == start + PREEMPT_ITERATIONS
    assert start < cancelled["iteration"] <= resumed < end, (cancelled, m.groups())
    metrics = _jsonl(run.work / "results/ci/stage1/metrics.jsonl")
    # no step twice, none lost at the end: the training records, and the periodic evaluations (which share a step
    # with the training record of the same iteration)
    for kind in ("loss", "periodic/fid_1step"):
        steps = [r["step"] for r in metrics if kind in r]
        assert steps == sorted(set(steps)) and steps[-1] == end, (kind, steps)
    _, children = _mlflow_children(runs["server"], run.experiment)
    child = next(c for c in children if c.data.tags.get("tcm.rule") == "stage1")
    assert child.info.status == "FINISHED"
    assert child.data.tags.get("tcm.attempts") == "2" and int(child.data.tags["tcm.resumed_from_step"]) == resumed


def test_failing_job_fails_the_run_and_names_its_logs(runs):
    run: Run = runs["fail"]
    out = run.output
    assert runs["codes"]["fail"] not in (0, -9, 137), out[-6000:]  # non-zero, and not killed by timeout
    failed = [s for s in submissions(out) if s.rule == "pretrain_edm"]
    assert len(failed) == FAIL_RETRIES + 1, [s.sbatch for s in failed]  # each retry is a new SLURM job
    assert "Error in rule pretrain_edm" in out
    rule_log = run.work / "results/ci/logs/pretrain_edm.log"
    assert str(rule_log.relative_to(run.work)) in out and rule_log.is_file()
    slurm_logs = re.findall(r"(\S*\.snakemake/slurm_logs/rule_pretrain_edm/(?:[^/\s]+/)*\d+\.log)", out)
    assert slurm_logs and all(Path(p if os.path.isabs(p) else run.work / p).is_file() for p in slurm_logs)
    assert re.search(r"SLURM-job '\d+' failed, SLURM status is: 'FAILED'", out), out[-4000:]
    recs = wait_sacct_final(run_uuid(out), FAIL_RETRIES + 1)
    assert [r["State"] for r in recs].count("FAILED") == FAIL_RETRIES + 1, recs


def test_two_nodes_train_what_one_process_trains(runs):
    """Stage 2 as one SLURM job on 2 nodes x 1 process (gloo): one srun step across both nodes starts a
    torchrun on each; the trained network and the logged losses equal the plain single-process run's within
    the tolerance of tests/test_ddp.py, and only global rank 0 wrote (one finish line, one metrics row per step)."""
    run, single = runs["multinode"], runs["single"]
    assert runs["codes"]["single"] == 0, single.output[-6000:]
    assert runs["codes"]["multinode"] == 0, run.output[-6000:]
    out = run.output
    stage2 = [s.sbatch for s in submissions(out) if s.rule == "stage2"]
    assert len(stage2) == 1, stage2
    assert all(f in stage2[0] for f in ("--nodes=2", "--ntasks=2", "--gpus=2")), stage2[0]
    assert "--ntasks-per-gpu" not in stage2[0], stage2[0]
    ids = submitted_jobids(out)
    jobid = next(j for j, log in ids.items() if "/rule_stage2/" in log)
    rec = next(r for r in wait_sacct_final(run_uuid(out), len(ids)) if r["JobIDRaw"] == jobid)
    assert rec["State"] == "COMPLETED" and rec["NodeList"] == "localhost,tcmnode2", rec
    assert "node=2" in rec["AllocTRES"] and "gres/gpu=2" in rec["AllocTRES"], rec
    steps = [s for s in sacct_steps(jobid) if re.fullmatch(rf"{jobid}\.\d+", s["JobID"])]
    assert [(s["NNodes"], s["State"]) for s in steps] == [("2", "COMPLETED")], steps  # the launcher's srun

    two, one = run.work / "results/ci/stage2/main", single.work / "results/ci/stage2/main"
    assert json.loads((two / "config.json").read_text())["world_size"] == 2
    assert json.loads((one / "config.json").read_text())["world_size"] == 1
    initial = load_weights(runs["stage1_micro"])
    w1, w2 = load_weights(one / "network.safetensors"), load_weights(two / "network.safetensors")
    assert max((w1[k] - initial[k]).abs().max().item() for k in w1) > 1e-3  # the runs did train
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=0, atol=1e-5, msg=name)
    rows1, rows2 = (_jsonl(d / "metrics.jsonl") for d in (one, two))
    m1, m2 = ([r for r in rows if "loss" in r] for rows in (rows1, rows2))  # training records (not periodic evals)
    assert [r["step"] for r in m2] == [r["step"] for r in m1] and m2, (m1, m2)
    for a, b in zip(m1, m2):
        for key in ("loss", "loss_regular", "loss_boundary", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (key, a, b)
    periodic1, periodic2 = ([r["step"] for r in rows if "periodic/fid_1step" in r] for rows in (rows1, rows2))
    assert periodic2 == periodic1, (periodic1, periodic2)  # rank 0 evaluated, once per point
    log = (run.work / "results/ci/logs/stage2/main.log").read_text()
    assert log.count("train: stage2 finished") == 1, log[-3000:]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]
