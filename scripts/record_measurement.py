"""Add one measured row to a table of docs/MEASUREMENTS.md, newest first (the scripts that measure call it).

    python scripts/record_measurement.py TABLE CELL [CELL ...] [--doc docs/MEASUREMENTS.md] [--commit C]

TABLE names a table by the marker line ``<!-- table: TABLE -->`` above its header; the row goes right under
the header's separator line, so the first row of every table is the current figure and the rows below it are
its history. The date (UTC) and the commit (``git rev-parse --short HEAD``, ``+dirty`` when the tree has
changes) are the row's first two cells. The cells must fill the table's other columns exactly.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "MEASUREMENTS.md"


def commit_label(repo: Path) -> str:
    """The short commit of HEAD, with ``+dirty`` when tracked files differ from it."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True)
    if head.returncode != 0:
        return "unknown"
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=repo).returncode != 0
    return head.stdout.strip() + ("+dirty" if dirty else "")


def insert_row(text: str, table: str, cells: list[str]) -> str:
    """``text`` with the row ``| cells |`` first in the table under ``<!-- table: TABLE -->``."""
    lines = text.splitlines(keepends=True)
    marker = f"<!-- table: {table} -->"
    where = [i for i, line in enumerate(lines) if line.strip() == marker]
    if len(where) != 1:
        raise ValueError(f"{'no' if not where else 'more than one'} marker {marker!r}")
    header = where[0] + 1
    if header + 1 >= len(lines) or not lines[header + 1].lstrip().startswith("|---"):
        raise ValueError(f"the line after {marker!r} is not a table header with its separator")
    columns = lines[header].strip().strip("|").count("|") + 1
    if len(cells) != columns:
        raise ValueError(f"table {table!r} has {columns} columns, the row has {len(cells)} cells")
    row = "| " + " | ".join(c.replace("|", "\\|").strip() for c in cells) + " |\n"
    return "".join(lines[: header + 2] + [row] + lines[header + 2:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table")
    parser.add_argument("cells", nargs="+", help="the row's cells after the date and the commit")
    parser.add_argument("--doc", type=Path, default=DOC)
    parser.add_argument("--commit", default=None, help="the measured commit (default: this checkout's HEAD)")
    args = parser.parse_args(argv)
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    try:
        text = args.doc.read_text()
        new = insert_row(text, args.table, [today, args.commit or commit_label(REPO), *args.cells])
    except (OSError, ValueError) as error:
        print(f"record_measurement: error: {error}, {args.doc}, fix the table or the call", file=sys.stderr)
        return 2
    args.doc.write_text(new)
    print(f"record_measurement: {args.table}: {today} row added to {args.doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
