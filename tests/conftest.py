"""Shared pytest settings. Keep fixtures specific to one area in that area's own test helpers."""

import os

import pytest
import torch

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny workloads: on a loaded 2-core machine OpenMP spinning made them
    20-50x slower. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------------
# Parallel runs (scripts/test.sh: pytest-xdist, `--dist loadgroup --no-loadscope-reorder`): one test module is one
# unit of work, so its module fixtures (a workflow run, a SLURM cluster) are built once; the SLURM modules share a
# unit (both touch /etc/slurm and the one cluster). Units start longest first: the SLURM runs mostly wait on the
# scheduler's status polls, so they overlap the CPU-bound modules best when they start at once.
XDIST_UNITS = {"test_slurm_teardown": "test_slurm"}
LONGEST_FIRST = ("test_slurm", "test_workflow_run", "test_reporting", "test_gpucheck", "test_tracking",
                 "test_training", "test_faults", "test_workflow_dryrun")


# The critical path: the ci `paper_tables` run (test_reporting) needs ~8 CPU-minutes; at equal priority it got a
# quarter of the machine beside three other workers and ended last, the other workers idle meanwhile. Workers
# run every other unit (and their jobs, Snakemake and SLURM daemons included: children inherit it) at a lower
# priority, so the critical unit takes the cores it can use and the rest fill the gaps. With Linux autogroups
# (sched_autogroup_enabled) a process that starts its own session shares the CPU equally with the whole test
# run whatever its nice: tests start children in their own process group (process_group=0), not session. SLURM
# jobs still get a session each (slurmstepd): the SLURM module's jobs take a full share while they run.
CRITICAL_UNITS = ("test_reporting",)
NICE_BESIDE_CRITICAL = 10


def _unit(item: pytest.Item) -> str:
    stem = item.path.stem
    return XDIST_UNITS.get(stem, stem)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the xdist_group marks into the node ids
def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(_unit(item), len(rank)))  # stable: file order within each unit
    for item in items:
        item.add_marker(pytest.mark.xdist_group(_unit(item)))


def lower_priority_beside_critical(unit: str) -> None:
    """On an xdist worker, lower this worker's priority for good before its first test outside CRITICAL_UNITS
    (priority cannot be raised back without privileges: a worker that ran the critical unit keeps normal
    priority for what it takes later, when the critical path is done)."""
    if os.environ.get("PYTEST_XDIST_WORKER") and unit not in CRITICAL_UNITS:
        current = os.nice(0)
        if current < NICE_BESIDE_CRITICAL:
            os.nice(NICE_BESIDE_CRITICAL - current)


@pytest.fixture(autouse=True)
def _critical_unit_first(request):
    lower_priority_beside_critical(_unit(request.node))
    yield
