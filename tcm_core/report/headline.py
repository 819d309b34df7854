"""The headline results printed at the end of a `snakemake` run: 1- and 2-step FID of Stage 1, the control and
Stage 2 (TCM), read from the evaluation files (a run that has not been evaluated yet shows "—")."""

from __future__ import annotations

import json
from pathlib import Path

from tcm_core.report.values import MISSING

HEADLINE_RUNS = (("stage1", "Stage 1"), ("stage1_continued", "control (Stage 1 continued)"),
                 ("stage2/main", "Stage 2 (TCM)"))


def _fid(path: Path) -> tuple[float | None, str | None]:
    try:
        record = json.loads(path.read_text())
        return float(record["min"]), str(record.get("label") or "")
    except (OSError, ValueError, KeyError, TypeError):
        return None, None


def headline_values(results_dir: str | Path) -> tuple[str | None, dict[str, tuple[str, str]]]:
    """The metric's label and, per headline run, its 1-step and 2-step FID as text ("—" where missing)."""
    results_dir = Path(results_dir)
    values, label = {}, None
    for run, name in HEADLINE_RUNS:
        pair = []
        for steps in ("1step", "2step"):
            value, found = _fid(results_dir / run / "eval" / f"fid_{steps}.json")
            label = label or found
            pair.append(MISSING if value is None else f"{value:.2f}")
        values[name] = (pair[0], pair[1])
    return label, values


def headline_lines(results_dir: str | Path) -> list[str]:
    """A small table: one line per run with its 1-step and 2-step FID and the metric's label."""
    label, values = headline_values(results_dir)
    lines = [f"  {name:30s} 1-step {one:>8s}   2-step {two:>8s}" for name, (one, two) in values.items()]
    return [f"Headline results ({label or 'FID'}, lower is better):", *lines]
