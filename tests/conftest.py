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


def _unit(item: pytest.Item) -> str:
    stem = item.path.stem
    return XDIST_UNITS.get(stem, stem)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the xdist_group marks into the node ids
def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(_unit(item), len(rank)))  # stable: file order within each unit
    for item in items:
        item.add_marker(pytest.mark.xdist_group(_unit(item)))
