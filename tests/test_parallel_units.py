"""scripts/test.sh runs the suite on pytest-xdist workers, one unit of work per module (tests/conftest.py): the
units must really form, or module fixtures would be rebuilt per test and the two SLURM modules would run at once
on the one cluster of this machine."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import conftest

REPO = Path(__file__).resolve().parents[1]


def test_the_slurm_modules_are_one_unit_and_start_first():
    assert conftest.XDIST_UNITS["test_slurm_teardown"] == "test_slurm"
    assert conftest.LONGEST_FIRST[0] == "test_slurm"
    assert "-n" in (REPO / "scripts" / "test.sh").read_text() and "--dist loadgroup" in (
        REPO / "scripts" / "test.sh").read_text()


def test_the_paper_tables_run_is_a_unit_of_its_own_started_at_once():
    [(name, unit)] = conftest.OWN_UNITS.items()
    assert f"def {name}(" in (REPO / "tests" / "test_reporting.py").read_text()
    workers = int(re.search(r'TCM_TEST_WORKERS:-(\d+)', (REPO / "scripts" / "test.sh").read_text()).group(1))
    assert conftest.LONGEST_FIRST.index(unit) < workers  # one of the units the workers start with
    # the unit its worker is handed with it (xdist: while <= 2 tests are pending) is the 2-test test_atomic
    assert conftest.LONGEST_FIRST[workers] == "test_atomic"
    assert (REPO / "tests" / "test_atomic.py").read_text().count("\ndef test_") <= 2


def test_each_module_is_one_unit_on_the_workers():
    modules = ["tests/test_measurements_doc.py", "tests/test_precond.py"]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", "-n", "2", "--dist",
                           "loadgroup", "--no-loadscope-reorder", *modules], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    passed = re.findall(r"^\[(gw\d+)\] .*PASSED (tests/(test_\w+)\.py::\S+)\s*$", proc.stdout, re.M)
    assert len(passed) >= 8, proc.stdout[-3000:]
    workers: dict[str, set[str]] = {}
    for worker, nodeid, stem in passed:
        assert nodeid.endswith(f"@{stem}"), nodeid  # the unit's name, as xdist's loadgroup reads it
        workers.setdefault(stem, set()).add(worker)
    assert all(len(w) == 1 for w in workers.values()), workers  # every test of a module on one worker
