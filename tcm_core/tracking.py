"""Experiment tracking: ``metrics.jsonl`` in the run folder is the source of truth.

A :class:`Tracker` appends every metric record to ``metrics.jsonl`` and may mirror it into MLflow
(see :func:`open_tracker`). Training, evaluation and reporting only use this interface.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Protocol


class Tracker(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | Path) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...


class JsonlTracker:
    """Appends ``{"step": s, **metrics}`` lines to ``<run_dir>/metrics.jsonl``.

    On resume from iteration ``resume_step`` the lines written after that step by the interrupted
    attempt are dropped first, so the file never holds a step twice.
    """

    def __init__(self, run_dir: str | Path, resume_step: int | None = None) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [line for line in read_metrics(self.path) if line.get("step", 0) <= resume_step]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(line) + "\n" for line in kept))
            os.replace(tmp, self.path)
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 - closed in close()

    def log_params(self, params: dict[str, Any]) -> None:
        (self.path.parent / "params.json").write_text(json.dumps(params, indent=2, sort_keys=True, default=str))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        clean = {k: (float(v) if math.isfinite(float(v)) else None) for k, v in metrics.items()}
        self._file.write(json.dumps({"step": int(step), **clean}) + "\n")

    def log_artifact(self, path: str | Path) -> None:
        pass  # artifacts already live in the run folder

    def close(self, status: str = "FINISHED") -> None:
        if not self._file.closed:
            self._file.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All complete records of a ``metrics.jsonl`` (a torn last line from a kill is skipped)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
