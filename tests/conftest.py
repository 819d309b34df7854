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
# The ci `paper_tables` run is the suite's longest test (about 12 of its 14 minutes on 2 cores): a unit of its own,
# started at once, so the rest of its module runs beside it instead of after it. xdist hands a worker one more unit
# at the start when it has at most 2 tests pending, and that unit waits behind the run: test_atomic (2 tests,
# about a second) is that one.
XDIST_UNITS = {"test_slurm_teardown": "test_slurm"}
OWN_UNITS = {"test_ci_paper_tables_builds_every_file_and_the_report": "test_reporting_paper_tables"}
LONGEST_FIRST = ("test_slurm", "test_reporting_paper_tables", "test_workflow_run", "test_gpucheck", "test_atomic",
                 "test_reporting", "test_tracking", "test_training", "test_faults", "test_workflow_dryrun")


def _unit(item: pytest.Item) -> str:
    name = getattr(item, "originalname", item.name)
    if name in OWN_UNITS:
        return OWN_UNITS[name]
    stem = item.path.stem
    return XDIST_UNITS.get(stem, stem)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the xdist_group marks into the node ids
def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(_unit(item), len(rank)))  # stable: file order within each unit
    for item in items:
        item.add_marker(pytest.mark.xdist_group(_unit(item)))
