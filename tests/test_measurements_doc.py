"""docs/MEASUREMENTS.md and scripts/record_measurement.py: the tables the timing scripts write exist, and a
recorded row lands first in its own table, dated, with the commit, or the call fails in one line."""

from __future__ import annotations

import datetime
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "record_measurement.py"
DOC = REPO / "docs" / "MEASUREMENTS.md"
# table -> the cells its script passes after the date and the commit (scripts/time-ci.sh, time-default-run.sh)
WRITTEN_BY_SCRIPTS = {"ci": 4, "default-run": 5, "paper-tables": 5, "headline": 4}


def _module():
    spec = importlib.util.spec_from_file_location("record_measurement", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tables(text: str) -> dict[str, list[str]]:
    """table name -> its lines (header, separator, rows) under its marker."""
    lines, tables = text.splitlines(), {}
    for i, line in enumerate(lines):
        if match := re.fullmatch(r"<!-- table: ([\w-]+) -->", line.strip()):
            rows = []
            for row in lines[i + 1:]:
                if not row.startswith("|"):
                    break
                rows.append(row)
            tables[match.group(1)] = rows
    return tables


def _cells(row: str) -> int:
    return len(re.split(r"(?<!\\)\|", row.strip().strip("|")))


def test_the_documents_tables_are_the_ones_the_scripts_write():
    tables = _tables(DOC.read_text())
    for name, cells in WRITTEN_BY_SCRIPTS.items():
        assert name in tables, f"docs/MEASUREMENTS.md has no table {name!r}"
        header, separator, *rows = tables[name]
        assert separator.startswith("|---")
        assert _cells(header) == cells + 2 and header.startswith("| date | commit |"), header
        assert rows, f"table {name!r} has no measured row"
        for row in rows:
            assert _cells(row) == cells + 2, row
            assert re.match(r"\| \d{4}-\d\d-\d\d \| ", row), row


def test_the_timing_scripts_record_into_these_tables():
    calls = {"time-ci.sh": ["record_measurement.py ci "],
             "time-default-run.sh": ['record_measurement.py "$table" ', "record_measurement.py headline ",
                                     "all) table=default-run", "paper_tables) table=paper-tables"]}
    for script, needles in calls.items():
        text = (REPO / "scripts" / script).read_text()
        for needle in needles:
            assert needle in text, (script, needle)


def test_a_row_goes_first_in_its_own_table(tmp_path):
    doc = tmp_path / "m.md"
    doc.write_text("# M\n\n<!-- table: a -->\n| date | commit | x |\n|---|---|---|\n| 2026-01-01 | abc | old |\n\n"
                   "<!-- table: b -->\n| date | commit | y | z |\n|---|---|---|---|\n| 2026-01-02 | def | 1 | 2 |\n")
    proc = subprocess.run([sys.executable, str(SCRIPT), "b", "3 | 4", "5", "--doc", str(doc), "--commit", "1234567"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    tables = _tables(doc.read_text())
    assert tables["a"][2:] == ["| 2026-01-01 | abc | old |"]
    assert tables["b"][2:] == [f"| {today} | 1234567 | 3 \\| 4 | 5 |", "| 2026-01-02 | def | 1 | 2 |"]


@pytest.mark.parametrize(("table", "cells", "says"), [("b", ["1"], "has 4 columns, the row has 3 cells"),
                                                      ("c", ["1"], "no marker '<!-- table: c -->'")])
def test_a_wrong_call_fails_in_one_line_and_writes_nothing(tmp_path, table, cells, says):
    doc = tmp_path / "m.md"
    text = "<!-- table: b -->\n| date | commit | y | z |\n|---|---|---|---|\n"
    doc.write_text(text)
    proc = subprocess.run([sys.executable, str(SCRIPT), table, *cells, "--doc", str(doc)], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and says in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert doc.read_text() == text


def test_the_commit_label_marks_a_changed_tree(tmp_path):
    module = _module()
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "f").write_text("1\n")
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "add", "f"], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert module.commit_label(tmp_path) == head
    (tmp_path / "f").write_text("2\n")
    assert module.commit_label(tmp_path) == head + "+dirty"
