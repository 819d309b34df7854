"""The paper's claims S1-S4 checked on the runs of one preset, and the claims table."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from tcm_core.report.measurements import ablation_baseline, ablation_slice, curve, dfid_curve, final_fid
from tcm_core.report.results import Results, TrainingRun
from tcm_core.report.tables import Table
from tcm_core.report.values import MISSING, fmt_g, is_finite, same_value

EXPLODE_FACTOR = 2.0  # claim S3: "explodes" = final 1-step FID > EXPLODE_FACTOR x the baseline's, or non-finite


@dataclass
class Claim:
    cid: str
    statement: str
    criterion: str
    measured: str
    verdict: str  # holds | does not hold | not measured
    paper: str


def claims(results: Results) -> list[Claim]:
    return [claim_s1(results), claim_s2(results), claim_s3(results), claim_s4(results)]


def claims_table(results: Results, checked: Sequence[Claim]) -> Table:
    rows = [[c.cid, c.statement, c.criterion, c.measured, c.verdict, c.paper] for c in checked]
    return Table(
        "claims",
        f"Claims check — preset {results.preset}",
        ["claim", "statement", "criterion", "measured", "verdict", "paper"],
        rows,
        intro=[
            f"Preset: `{results.preset}`. Each claim of the paper is checked on the runs of this preset; a claim "
            "that does not hold at this scale is reported as such.",
            "Verdicts: holds / does not hold / not measured (the runs it needs are missing).",
        ],
    )


def _verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("holds" if ok else "does not hold")


def _fmt_claim(value: float | None) -> str:
    """Six significant digits: claims compare values that may differ only in the third decimal."""
    return MISSING if value is None else f"{value:.6g}"


def _lower(ours: float, other: float) -> bool:
    """``ours`` < ``other``, where a non-finite value loses to any finite one."""
    return ours < other if is_finite(ours) and is_finite(other) else is_finite(ours)


def _value_at_common_step(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> tuple[int, float, float] | None:
    common = sorted(set(dict(a)) & set(dict(b)))
    if not common:
        return None
    step = common[-1]
    return step, dict(a)[step], dict(b)[step]


def claim_s1(results: Results) -> Claim:
    statement = "Stage 2 (TCM) reaches a lower 1-step FID than Stage 1 continued for the same iterations"
    criterion = "final 1-step FID of Stage 2 < that of Stage 1 continued (same evaluation, same iteration count)"
    s2, s1c = results.main_run("stage2"), results.main_run("stage1_continued")
    f2, f1c = final_fid(results, s2), final_fid(results, s1c)
    measured, ok = MISSING, None
    if f2 and f1c and f2.setup == f1c.setup:
        measured = f"Stage 2 {_fmt_claim(f2.value)} vs Stage 1 continued {_fmt_claim(f1c.value)} ({f2.label})"
        ok = _lower(f2.value, f1c.value)
    elif s2 and s1c and s2.histories.get("fid_1step") and s1c.histories.get("fid_1step"):
        common = _value_at_common_step(s2.histories["fid_1step"], s1c.histories["fid_1step"])
        if common:
            step, v2, v1c = common
            measured = (
                f"at iteration {step}: Stage 2 {_fmt_claim(v2)} vs Stage 1 continued {_fmt_claim(v1c)} "
                "(fid_1step history)"
            )
            ok = _lower(v2, v1c)
    return Claim("S1", statement, criterion, measured, _verdict(ok), "Fig. 1b, Table 4")


def _dfid_changes(
    results: Results, run: TrainingRun | None, t_prime: float | None
) -> tuple[dict[str, float], list[float], list[float]]:
    """dFID_t at the end of the run − at its start, for each t (t = t' left out), and those below and above t'."""
    series, _ = dfid_curve(results, run)
    changes: dict[str, float] = {}
    below: list[float] = []
    above: list[float] = []
    for t, points in series.items():
        if len(points) < 2 or t_prime is None or same_value(t, t_prime):
            continue
        delta = points[-1][1] - points[0][1]
        changes[f"dFID_t{t:g}"] = delta
        (below if t < t_prime else above).append(delta)
    return changes, below, above


def claim_s2(results: Results) -> Claim:
    statement = "During Stage 2, dFID below t' rises while dFID above t' and the 1-step FID fall"
    criterion = (
        "change = value at the end of Stage 2 − value at its start (the Stage-1 checkpoint it starts from, or its "
        "first periodic evaluation), each curve from one evaluation setup; holds if every dFID_t with t < t' "
        "rises (> 0), every dFID_t with t > t' falls (< 0) and the 1-step FID falls (< 0)"
    )
    run = results.main_run("stage2")
    t_prime = run.param("t_prime") if run else None
    changes, below, above = _dfid_changes(results, run, t_prime)
    fid_points, _ = curve(results, run, "fid_1step")
    fid_delta = fid_points[-1][1] - fid_points[0][1] if len(fid_points) >= 2 else None
    if fid_delta is not None:
        changes["fid_1step"] = fid_delta
    measured = ", ".join(f"{k} {v:+.3g}" for k, v in changes.items()) or MISSING
    if t_prime is not None:
        measured = f"t' = {t_prime:g}: {measured}"
    ok = None
    if below and above and fid_delta is not None:
        ok = all(d > 0 for d in below) and all(d < 0 for d in above) and fid_delta < 0
    elif changes:
        missing = [n for n, v in (("dFID below t'", below), ("dFID above t'", above)) if not v]
        missing += ["1-step FID at two iterations"] if fid_delta is None else []
        measured += f" (not measured: {', '.join(missing)})"
    return Claim("S2", statement, criterion, measured, _verdict(ok), "Fig. 3, Sec. 4.2")


def claim_s3(results: Results) -> Claim:
    statement = "The FID explodes when w_b = 0.01"
    criterion = (
        f"'explodes' = the final 1-step FID with w_b = 0.01 is > {EXPLODE_FACTOR:g}x the FID of the run at the grid "
        "centre (same other hyperparameters), or is not finite"
    )
    runs = ablation_slice(results, ["w_b"])
    baseline = ablation_baseline(results)
    small = next((r for r in runs if same_value(r.param("w_b"), 0.01)), None)
    centre = next(
        (r for r in runs if same_value(r.param("w_b"), baseline["w_b"]) and not same_value(baseline["w_b"], 0.01)),
        None,
    )
    fs, fc = final_fid(results, small), final_fid(results, centre)
    measured, ok = MISSING, None
    if fs and fc and is_finite(fc.value) and fc.value > 0:
        ratio = fs.value / fc.value if is_finite(fs.value) else math.inf
        measured = (
            f"w_b = 0.01: {_fmt_claim(fs.value)} vs w_b = {fmt_g(baseline['w_b'])}: {_fmt_claim(fc.value)} "
            f"(ratio {ratio:.2f}; {fs.label})"
        )
        ok = ratio > EXPLODE_FACTOR
    return Claim("S3", statement, criterion, measured, _verdict(ok), "Fig. 4c, Sec. 4.4")


def claim_s4(results: Results) -> Claim:
    statement = "t' = 1 gives the best FID among the t' grid"
    criterion = "the final 1-step FID at t' = 1 is the lowest over the t' values run (others at the grid centre)"
    runs = ablation_slice(results, ["t_prime"])
    fids = {r.param("t_prime"): final_fid(results, r) for r in runs if r.param("t_prime") is not None}
    fids = {t: m for t, m in fids.items() if m is not None}
    measured, ok = MISSING, None
    if fids:
        measured = ", ".join(f"t' = {t:g}: {_fmt_claim(m.value)}" for t, m in sorted(fids.items()))
        one = next((m for t, m in fids.items() if same_value(t, 1.0)), None)
        if one is not None and len(fids) >= 2:
            finite = {t: m.value for t, m in fids.items() if is_finite(m.value)}
            best = min(finite, key=finite.get) if finite else None
            ok = best is not None and same_value(best, 1.0)
            measured += f"; best t' = {fmt_g(best)}"
        else:
            measured += " (t' = 1 and at least one other t' are needed)"
    return Claim("S4", statement, criterion, measured, _verdict(ok), "Table 3")
