"""The paper's numbers: ``tcm_core/report/paper_values.csv`` (transcribed once, each with the table or figure that
prints it) and the paper's own setting where the report needs one."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tcm_core.report.values import as_float

PAPER_VALUES = Path(__file__).parent / "paper_values.csv"
PAPER_METRIC = "FID (Inception, 50k; paper)"
PAPER_SETUP = ("inception", 50000)  # (extractor, samples) of the paper's FIDs: a Δ column needs ours to equal it
# The paper's Stage-2 setting (Sec. 4.1 and 4.4); used only to break ties when guessing the ablation baseline.
PAPER_DEFAULTS = {"t_prime": 1.0, "rho": 0.25, "w_b": 0.1, "student_sigma": 0.2, "student_nu": 0.01}
# The three (sigma, nu) cases of the paper's Fig. 4a (drawn while a preset has no (sigma, nu) grid runs).
PAPER_FIG4A_SIGMA_NU = ((2.0, 10000.0), (0.2, 0.01), (0.2, 2.0))


@dataclass
class PaperRow:
    key: str  # the id a table row of ours compares with ("" for a baseline only quoted)
    source: str
    dataset: str
    category: str
    method: str
    network: str
    nfe: str
    fid: float | None
    params_m: float | None
    setting: str
    note: str


TEXT_COLUMNS = ("key", "source", "dataset", "category", "method", "network", "nfe", "setting", "note")


def load_paper_values(path: Path | None = None) -> list[PaperRow]:
    """Rows of ``paper_values.csv`` (lines starting with # are comments)."""
    path = path or PAPER_VALUES
    lines = [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return [
        PaperRow(
            **{name: raw[name].strip() for name in TEXT_COLUMNS},
            fid=as_float(raw["fid"] or None),
            params_m=as_float(raw["params_m"] or None),
        )
        for raw in csv.DictReader(lines)
    ]


def paper_row(rows: Sequence[PaperRow], key: str) -> PaperRow | None:
    return next((r for r in rows if r.key == key), None)
