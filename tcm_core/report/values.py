"""Numbers as the report reads, compares and writes them: a value may be absent, non-finite or a string."""

from __future__ import annotations

import math
from typing import Any

MISSING = "—"  # a cell with no measurement: never an estimate


def as_float(value: Any) -> float | None:
    """``value`` as a float, or None when it is absent, a bool or not a number."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def nan_if_none(value: Any) -> float:
    """``as_float``, with NaN for no number (result files write a non-finite value as null)."""
    number = as_float(value)
    return math.nan if number is None else number


def is_finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def same_value(a: float | None, b: float | None) -> bool:
    """Both known and equal up to float noise (hyperparameters read back from JSON or MLflow strings)."""
    return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None:
        return MISSING
    if not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return f"{value:.{digits}f}"


def fmt_diff(ours: float | None, paper: float | None) -> str:
    """ours − paper, signed; "—" when either is missing or ours is not finite."""
    if ours is None or paper is None:
        return MISSING
    return f"{ours - paper:+.2f}" if math.isfinite(ours) else MISSING


def fmt_g(value: float | None) -> str:
    return MISSING if value is None else f"{value:g}"


def fmt_precise(value: float | None) -> str:
    """Six significant digits: claims compare values that may differ only in the third decimal."""
    return MISSING if value is None else f"{value:.6g}"
