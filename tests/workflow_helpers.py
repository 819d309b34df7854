"""Helpers for the Snakemake workflow tests: a private copy of the workflow, runs, job-count parsing."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SNAKEMAKE = str(BIN / "snakemake")
WORKFLOW_FILES = ("Snakefile", "config.yaml", "workflow", "profiles", "envs")
# A slice of the ci preset's `all` that still runs every kind of job of it once (CI time): data, LeNet, reference
# stats, pretraining, Stage 1, the control, Stage 2, FID 1/2-step, dFID and a sample grid.
CI_SLICE = (
    "results/ci/stage2/main/eval/fid_1step.json",
    "results/ci/stage2/main/eval/fid_2step.json",
    "results/ci/stage2/main/eval/dfid.json",
    "results/ci/stage2/main/eval/grid_2step.png",
    "results/ci/stage1_continued/eval/fid_1step.json",
    "results/ci/stage1/eval/fid_1step.json",
)


def make_workdir(dest: Path) -> Path:
    """Copy the workflow (not results/) into ``dest``: tests never touch the repository's results."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    return dest


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["MLFLOW_DISABLE_TELEMETRY"] = "true"
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    e["TCM_CACHE_DIR"] = e.get("TCM_CACHE_DIR", "/tmp/tcm-test-cache")
    return e


def snakemake(workdir: Path, *args: str, timeout: float = 600, check: bool = False) -> subprocess.CompletedProcess:
    cmd = [SNAKEMAKE, *args]
    proc = subprocess.run(cmd, cwd=workdir, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        tail = f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{tail}")
    return proc


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a (dry) run as {rule: count}, without the 'total' row."""
    lines = output.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Job stats:")
    except StopIteration:
        raise AssertionError(f"no job stats in output:\n{output[-3000:]}") from None
    counts: dict[str, int] = {}
    for line in lines[start + 3 :]:
        match = re.fullmatch(r"\s*(\S+)\s+(\d+)\s*", line)
        if not match:
            break
        counts[match.group(1)] = int(match.group(2))
    total = counts.pop("total")
    assert total == sum(counts.values()), counts
    return counts


def write_overlay(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
