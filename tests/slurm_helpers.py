"""Helpers for the SLURM integration tests: a real local cluster, a real MLflow server, Snakemake runs.

The cluster is Debian's slurmctld, two slurmd and munged (+ MariaDB/slurmdbd for accounting) on localhost,
started by scripts/slurm-up.sh and stopped by PID by scripts/slurm-down.sh.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
GPU_RULES_PROFILE = REPO / "profiles" / "slurm" / "config.yaml"

# Everything a workflow run needs from the checkout; outputs, caches and the venv stay behind.
_COPY_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "results", "resources", "logs", ".snakemake", "__pycache__", ".pytest_cache",
    ".ruff_cache", "*.egg-info", "mlruns", "mlartifacts",
)


def skip_reason() -> str | None:
    """Why the real-cluster tests cannot run here, or None. In CI (root, Debian) they always run."""
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root (it writes /etc/slurm and starts daemons)"
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        return "the local SLURM cluster needs Debian's apt-get/dpkg to install slurm and munge"
    return None


def job_env(**extra: str) -> dict[str, str]:
    """Environment for Snakemake and, through sbatch --export=ALL, for the jobs: the venv first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}"
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    for key in ("SLURM_JOB_ID", "SLURM_JOBID", "SNAKEMAKE_PROFILE"):  # never look like a job ourselves
        env.pop(key, None)
    env.update(extra)
    return env


@dataclass
class SlurmCluster:
    """Two nodes (two slurmd, `localhost` and `tcmnode2`) on this machine; `up()` is idempotent, `down()` stops
    only what `up()` started."""

    directory: Path
    partition: str = "tcmci"
    nodes: int = 2
    fake_gpus: int = 2  # per node
    # Each node advertises more CPUs/memory than the CI machine has (like the fake GPUs): jobs of the concurrent
    # test runs then wait on the fake GPUs (4 at once), not on 2 real cores' worth of slots.
    cpus: int = 32
    mem_mb: int = 262144
    log: str = field(default="", init=False)

    def _env(self) -> dict[str, str]:
        return job_env(
            SLURM_DIR=str(self.directory), SLURM_ACCT="dbd", SLURM_NODES=str(self.nodes),
            SLURM_FAKE_GPUS=str(self.fake_gpus),
            SLURM_PARTITION=self.partition, SLURM_NODE_CPUS=str(self.cpus), SLURM_NODE_MEM_MB=str(self.mem_mb),
        )

    def up(self, timeout: float = 240) -> None:
        proc = subprocess.run(
            ["bash", str(REPO / "scripts" / "slurm-up.sh")], env=self._env(), capture_output=True, text=True,
            timeout=timeout, stdin=subprocess.DEVNULL,
        )
        self.log = proc.stdout + proc.stderr
        if proc.returncode != 0:
            raise RuntimeError(f"slurm-up.sh failed ({proc.returncode}):\n{self.log}")

    def down(self) -> None:
        subprocess.run(["bash", str(REPO / "scripts" / "slurm-down.sh")], env=self._env(), timeout=60,
                       capture_output=True, stdin=subprocess.DEVNULL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a SQLite store on local disk; stopped by its process group id."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        env = job_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # no background job workers (CPU)
        self._log = open(self.directory / "server.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.directory}/mlflow.db",
             "--artifacts-destination", str(self.directory / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            env=env, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: stop() ends the server and its workers
        )

    def wait_healthy(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"mlflow server not healthy:\n{(self.directory / 'server.log').read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        else:  # the server exited; end workers it may have left in its group
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        self._log.close()
        self.proc = None


def copy_workflow(dst: Path) -> Path:
    """A copy of the checkout (code, config, profiles, the ./slurm link) to run the workflow in."""
    shutil.copytree(REPO, dst, ignore=_COPY_IGNORE, symlinks=True)
    return dst


def snakemake_cmd(*args: str, kill_after: int) -> list[str]:
    # Snakemake can wait forever on a job it never sees finish and ignores SIGTERM while jobs run.
    return [shutil.which("timeout") or "timeout", "-s", "KILL", str(kill_after), sys.executable, "-m", "snakemake",
            *args]


# ---------------------------------------------------------------------------------------------------
# Reading what happened
# ---------------------------------------------------------------------------------------------------

_SBATCH = re.compile(r"sbatch call: (sbatch .*?) --wrap=")
_SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (\S+?)\)")
_RULE_BLOCK = re.compile(r"^(local)?rule (\w+):\n(?:.*\n)*?\s+jobid: (\d+)", re.MULTILINE)


@dataclass
class Submission:
    rule: str
    sbatch: str        # the sbatch command line without --wrap
    slurm_jobid: str | None = None


def submissions(output: str) -> list[Submission]:
    """Every sbatch call in a `--verbose` Snakemake log, with its rule (from `--comment rule_<name>`)."""
    subs = []
    for m in _SBATCH.finditer(output):
        rule = re.search(r"--comment '?rule_(\w+?)(?:_wildcards_\S*)?'?\s", m.group(1) + " ")
        subs.append(Submission(rule.group(1) if rule else "?", m.group(1)))
    return subs


def submitted_jobids(output: str) -> dict[str, str]:
    """SLURM job id -> SLURM log path, as the plugin reports each submission."""
    return {m.group(2): m.group(3) for m in _SUBMITTED.finditer(output)}


def planned_jobs(output: str) -> tuple[dict[str, int], dict[str, int]]:
    """(remote rule -> job count, local rule -> job count) from the rule blocks Snakemake prints."""
    remote: dict[str, int] = {}
    local: dict[str, int] = {}
    seen: set[str] = set()
    for m in _RULE_BLOCK.finditer(output):
        if m.group(3) in seen:  # a retried job prints its block again
            continue
        seen.add(m.group(3))
        bucket = local if m.group(1) else remote
        bucket[m.group(2)] = bucket.get(m.group(2), 0) + 1
    return remote, local


def run_uuid(output: str) -> str:
    m = re.search(r"--job-name '?([0-9a-f-]{36})", output)
    assert m, "no sbatch call in the Snakemake output"
    return m.group(1)


def sacct_records(name: str) -> list[dict[str, str]]:
    """Accounting records of every allocation whose job name is `name` (the plugin's run uuid)."""
    fields = ["JobIDRaw", "State", "Partition", "AllocTRES", "ExitCode", "Start", "End", "NodeList"]
    out = subprocess.run(
        ["sacct", "-X", "-P", "-n", "--name", name, "--starttime", "now-1days", "--endtime", "now",
         "--format", ",".join(fields)], capture_output=True, text=True, check=True,
    ).stdout
    return [dict(zip(fields, line.split("|"))) for line in out.splitlines() if line.strip()]


def sacct_steps(jobid: str) -> list[dict[str, str]]:
    """The steps of one job (batch, extern, and each srun) with their node counts."""
    fields = ["JobID", "JobName", "NNodes", "NodeList", "State"]
    out = subprocess.run(["sacct", "-P", "-n", "-j", jobid, "--format", ",".join(fields)], capture_output=True,
                         text=True, check=True).stdout
    return [dict(zip(fields, line.split("|"))) for line in out.splitlines() if line.strip()]


def wait_sacct_final(name: str, count: int, timeout: float = 30) -> list[dict[str, str]]:
    """slurmdbd lags slurmctld by a few seconds; wait until `count` records are in a final state."""
    deadline = time.monotonic() + timeout
    while True:
        recs = sacct_records(name)
        final = [r for r in recs if r["State"].split()[0] not in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING")]
        if len(final) >= count or time.monotonic() > deadline:
            return recs
        time.sleep(1)


def squeue_jobs(name: str) -> list[tuple[str, str]]:
    """(job id, state) of this run's jobs that slurmctld still holds."""
    out = subprocess.run(["squeue", "-h", "--name", name, "-o", "%i|%T"], capture_output=True, text=True).stdout
    return [tuple(line.split("|")) for line in out.splitlines() if line.strip()]


def profile_gpu_rules() -> dict[str, dict]:
    """The per-rule `set-resources` of profiles/slurm, rendered as Snakemake renders it (YTE)."""
    import yte

    with open(GPU_RULES_PROFILE) as f:
        profile = yte.process_yaml(f, require_use_yte=True)
    return profile["set-resources"]
