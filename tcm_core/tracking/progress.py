"""Progress a person can read in a log file: one plain line every few seconds (no carriage-return bars).

    fid_1step: 512/1000 img (51%), 118 img/s, ETA 0m04s

On a terminal tqdm's bar is nicer and is used instead (``progress_bar``).
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


def format_duration(seconds: float) -> str:
    """``4m07s`` or ``1h02m03s``; ``?`` for an unknown (NaN or infinite) duration."""
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m{rest % 60:02d}s" if hours else f"{rest // 60}m{rest % 60:02d}s"


class LineProgress:
    """``update(n)`` counts work done; a line is written at most every ``every`` seconds, and at the end."""

    def __init__(self, total: int, desc: str, unit: str = "img", every: float = 10.0,
                 stream: TextIO | None = None) -> None:
        self.total, self.desc, self.unit, self.every = int(total), desc, unit, float(every)
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self.start = self.last = time.perf_counter()

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        share = f" ({self.done / self.total:.0%})" if self.total else ""
        return (f"{self.desc}: {self.done}/{self.total} {self.unit}{share}, {rate:.3g} {self.unit}/s, "
                f"ETA {format_duration(eta)}")

    def update(self, n: int = 1) -> None:
        self.done += int(n)
        now = time.perf_counter()
        if now - self.last >= self.every or self.done >= self.total:
            self.last = now
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, unit: str = "img") -> Any:
    """tqdm on a terminal, plain lines in a log file."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, mininterval=1.0)
    return LineProgress(total, desc, unit)
