"""scripts/profile-suite.sh's parts: a process records its CPU and command at exit; the summary sums them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "scripts" / "suite_profile"


def test_a_process_records_itself_and_the_summary_sums_by_command_and_test(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(PROFILE), "TCM_PROCLOG_DIR": str(tmp_path),
           "PYTEST_CURRENT_TEST": "tests/test_x.py::test_y (call)"}
    burn = "import proclog_site, time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass"
    for _ in range(2):
        subprocess.run([sys.executable, "-c", burn], env=env, check=True, timeout=60)
    records = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    assert len(records) == 2 and all(r["cpu_s"] >= 0.3 and r["test"] == "tests/test_x.py::test_y" for r in records)
    summary = subprocess.run([sys.executable, str(PROFILE / "summarize.py"), str(tmp_path)], capture_output=True,
                             text=True, check=True, timeout=60).stdout
    assert summary.startswith("2 Python processes")
    [row] = [line for line in summary.splitlines() if line.endswith("| tests/test_x.py::test_y |")]
    assert float(row.split("|")[1]) >= 0.6 and row.split("|")[2].strip() == "2"
    assert row.split("|")[3].strip() == "0 / 0 / 0"  # neither torch, dynamo nor MLflow was imported


def test_commands_are_named_as_the_pipeline_runs_them():
    sys.path.insert(0, str(PROFILE))
    try:
        import summarize
    finally:
        sys.path.remove(str(PROFILE))
    main = "/x/tcm_core/__main__.py"
    assert summarize.command([main, "evaluate", "fid", "--ckpt", "n"]) == "tcm_core evaluate fid"
    assert summarize.command([main, "train", "--mode", "stage2"]) == "tcm_core train"
    assert summarize.command(["/v/snakemake/__main__.py", "--snakefile", "S"]) == "snakemake (job side)"
    assert summarize.command(["/v/bin/snakemake", "all"]) == "snakemake"
