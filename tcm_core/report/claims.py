"""The paper's claims S1-S6 checked on the runs of one preset over its training seeds, and the claims table.

Each claim is a paired comparison per training seed j (``tcm_core.presets``: the arms of a claim train seed j with
the same seed from the one Stage-1 run): a per-seed difference d_j, its mean with a 95 % interval and a verdict
against a threshold (``confidence``). One seed gives no interval: its verdict is inconclusive.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from tcm_core.presets import EXPLODING_W_B, INTERMEDIATE_VARIANTS
from tcm_core.report.confidence import (
    CONFIDENCE,
    MDE_METHOD,
    METHOD,
    NOT_MEASURED,
    POWER,
    all_of,
    paired_interval,
    verdict,
)
from tcm_core.report.intermediate import dfid_before_after, variant_vs_default
from tcm_core.report.measurements import ablation_baseline, ablation_slice, curve, dfid_curve, final_fid
from tcm_core.report.paired import FidComparison, cd_stage2_vs_control, compare_fids, paired_fids, worst_if_not_finite
from tcm_core.report.results import Results, TrainingRun
from tcm_core.report.tables import Table
from tcm_core.report.values import MISSING, fmt_g, fmt_precise, same_value

MDE_COLUMN = f"MDE ({POWER:.0%} power)"
EXPLODE_FACTOR = 2.0  # claim S3: "explodes" = final 1-step FID > EXPLODE_FACTOR x the baseline's, or non-finite
#: The paper's regime for S1: Stage 2 starts from a Stage 1 that has plateaued. Checked on Stage 1's periodic
#: 1-step FID: over the last SPLIT_TAIL of its iterations it improved by less than PLATEAU_LIMIT (relative).
SPLIT_TAIL = 0.25
PLATEAU_LIMIT = 0.10


@dataclass
class Claim:
    cid: str
    statement: str
    criterion: str
    measured: str  # each seed's values
    interval: str  # the mean difference with its 95 % interval
    verdict: str  # holds | does not hold | inconclusive | not measured
    paper: str
    seeds: int = 0  # K: training seeds measured on every arm of the claim
    metric: str = MISSING  # what the values measure (extractor, sample count)
    mde: str = MISSING  # the minimum detectable effect of each interval (confidence.py), at the measured spread


@dataclass
class SplitRegime:
    """Stage 1's periodic 1-step FID at the start of its last SPLIT_TAIL and at the split (its last iteration)."""

    first: int  # the first evaluated iteration
    tail_start: int  # the last evaluated iteration at or before first + (1 − SPLIT_TAIL)·(split − first)
    split: int
    fid_tail_start: float
    fid_split: float
    source: str

    @property
    def improvement(self) -> float:
        """(FID at the tail's start − FID at the split) / FID at the tail's start: > 0 when it still improved."""
        return (self.fid_tail_start - self.fid_split) / self.fid_tail_start

    @property
    def tail_share(self) -> float:
        """The share of Stage 1's evaluated iterations the comparison spans (SPLIT_TAIL when a point falls there)."""
        return (self.split - self.tail_start) / (self.split - self.first)

    @property
    def plateaued(self) -> bool:
        return self.improvement < PLATEAU_LIMIT

    def line(self) -> str:
        state = "plateaued" if self.plateaued else "NOT plateaued: the control gains by still-running Stage 1"
        return (f"Stage 1 at the split: the last {self.tail_share:.0%} of its iterations "
                f"({self.tail_start} -> {self.split}) improved 1-step FID by {self.improvement:.1%} "
                f"({self.fid_tail_start:.2f} -> {self.fid_split:.2f}; {self.source}); {state} "
                f"(limit {PLATEAU_LIMIT:.0%})")


def stage1_at_split(results: Results) -> SplitRegime | None:
    """The regime check of S1 on the main Stage-1 run's 1-step FID curve; None without two finite points."""
    points, source = curve(results, results.main_run("stage1"), "fid_1step")
    points = sorted((int(step), value) for step, value in points if math.isfinite(value))
    if len(points) < 2 or points[0][0] == points[-1][0]:
        return None
    (first, _), (split, fid_split) = points[0], points[-1]
    bound = first + (1 - SPLIT_TAIL) * (split - first)
    tail_start, fid_tail_start = max(p for p in points if p[0] <= bound)
    return SplitRegime(first, tail_start, split, fid_tail_start, fid_split, source)


def split_line(results: Results) -> str:
    regime = stage1_at_split(results)
    return regime.line() if regime else "Stage 1 at the split: no 1-step FID curve of Stage 1 (not measured)"


def claims(results: Results) -> list[Claim]:
    return [claim_s1(results), claim_s2(results), claim_s3(results), claim_s4(results), claim_s5(results),
            claim_s6(results)]


def claims_table(results: Results, checked: Sequence[Claim]) -> Table:
    rows = [[c.cid, c.statement, c.criterion, str(c.seeds), c.measured, c.interval, c.mde, c.verdict,
             c.metric, c.paper] for c in checked]
    header = ["claim", "statement", "criterion", "seeds", "measured", f"mean difference [{CONFIDENCE:.0%} interval]",
              MDE_COLUMN, "verdict", "our metric", "paper"]
    return Table(
        "claims",
        f"Claims check — preset {results.preset}",
        header,
        rows,
        intro=[
            f"Preset: `{results.preset}`. Each claim of the paper is checked on the runs of this preset, paired by "
            "training seed (`training_seeds`: seed j of each arm trains with the same seed from the one Stage-1 run of "
            "its arm, CT or consistency distillation); "
            "a claim that does not hold at this scale is reported as such.",
            f"Interval: {METHOD}. Verdicts: holds (the interval lies on the claimed side of the threshold) / does "
            "not hold (on the other side) / inconclusive (it contains the threshold, or one seed gives none) / not "
            "measured (the runs it needs are missing).",
            f"MDE: the minimum detectable effect, the smallest true mean difference in the claimed direction that "
            f"these seeds would call \"holds\" with {POWER:.0%} probability at the spread measured ({MDE_METHOD}); "
            "an inconclusive claim thus rules out, at that power, any effect larger than its MDE.",
            f"{split_line(results)}. S1 is the paper's comparison only when Stage 1 has plateaued.",
        ],
    )


# ----------------------------------------------------------------------------------------------------------------
# Shared pieces


def _not_measured(cid: str, statement: str, criterion: str, paper: str, why: str = MISSING) -> Claim:
    return Claim(cid, statement, criterion, why, MISSING, NOT_MEASURED, paper)


# ----------------------------------------------------------------------------------------------------------------
# The claims


def _lower_fid_claim(cid: str, statement: str, criterion: str, paper: str, comparison: FidComparison,
                     b_name: str) -> Claim:
    """A claim "arm a reaches a lower final 1-step FID than arm b", from their comparison paired by seed."""
    if not comparison.pairs:
        return _not_measured(cid, statement, criterion, paper)
    return Claim(cid, statement, criterion, comparison.measured(), comparison.interval_text(), comparison.verdict,
                 paper, comparison.seeds, comparison.label, comparison.mde_text(b_name))


def claim_s1(results: Results) -> Claim:
    return _lower_fid_claim(
        "S1", "Stage 2 (TCM) reaches a lower 1-step FID than Stage 1 continued for the same iterations",
        "d_j = final 1-step FID of Stage 2 − that of Stage 1 continued (seed j); holds if the interval < 0",
        "Fig. 1b, Table 4", compare_fids(results, results.main_run("stage2"), results.main_run("stage1_continued")),
        "the control")


def claim_s5(results: Results) -> Claim:
    return _lower_fid_claim(
        "S5", "Under consistency distillation, TCM Stage 2 reaches a lower 1-step FID than the CD control (Stage 1 "
        "continued) for the same iterations",
        "d_j = final 1-step FID of CD Stage 2 − that of the CD control (seed j; both from the one CD Stage-1 run, "
        "distilling the same teacher); holds if the interval < 0",
        "App. A, Table 5 (18.32 → 16.07 on MSCOCO, a different data set and metric)", cd_stage2_vs_control(results),
        "the CD control")


def _changes(results: Results, run: TrainingRun, t_prime: float) -> dict[str, float]:
    """Value at the end of the run − at its start, per dFID_t (t = t' left out) and for the 1-step FID."""
    series, _ = dfid_curve(results, run)
    changes = {f"dFID_t{t:g}": points[-1][1] - points[0][1]
               for t, points in series.items() if len(points) >= 2 and not same_value(t, t_prime)}
    fid_points, _ = curve(results, run, "fid_1step")
    if len(fid_points) >= 2:
        changes["fid_1step"] = fid_points[-1][1] - fid_points[0][1]
    return changes


def _s2_side(name: str, t_prime: float) -> str:
    """The side of 0 a change is claimed on: dFID below t' rises, dFID above t' and the 1-step FID fall."""
    if name == "fid_1step":
        return "below"
    return "above" if float(name[len("dFID_t"):]) < t_prime else "below"


def claim_s2(results: Results) -> Claim:
    statement = "During Stage 2, dFID below t' rises while dFID above t' and the 1-step FID fall"
    criterion = (
        "per seed, change = value at the end of Stage 2 − at its start (its first periodic evaluation, or the "
        "Stage-1 checkpoint it starts from), each curve from one evaluation setup; holds if the interval of every "
        "dFID_t change with t < t' is > 0, with t > t' is < 0, and of the 1-step FID change is < 0"
    )
    paper = "Fig. 3, Sec. 4.2"
    main = results.main_run("stage2")
    t_prime = main.param("t_prime") if main else None
    if main is None or t_prime is None:
        return _not_measured("S2", statement, criterion, paper)
    per_seed = {j: _changes(results, run, t_prime) for j, run in results.seeds_of(main).items()}
    per_seed = {j: c for j, c in per_seed.items() if c}
    names = sorted(set.intersection(*(set(c) for c in per_seed.values())), key=_change_order) if per_seed else []
    dfid_times = [float(n[len("dFID_t"):]) for n in names if n != "fid_1step"]
    measured = "; ".join(f"seed {j}: " + ", ".join(f"{n} {c[n]:+.3g}" for n in names) for j, c in per_seed.items())
    missing = [what for what, there in (("dFID below t'", any(t < t_prime for t in dfid_times)),
                                        ("dFID above t'", any(t > t_prime for t in dfid_times)),
                                        ("1-step FID at two iterations", "fid_1step" in names)) if not there]
    if missing:
        return Claim("S2", statement, criterion, f"t' = {t_prime:g}: {measured or MISSING} (not measured: "
                     f"{', '.join(missing)})", MISSING, NOT_MEASURED, paper, len(per_seed))
    intervals = {n: paired_interval([c[n] for c in per_seed.values()]) for n in names}
    verdicts = [verdict(intervals[n], 0.0, _s2_side(n, t_prime)) for n in names]
    text = "; ".join(f"{n} {intervals[n].text()}" for n in names)
    mde = "; ".join(f"{n} {intervals[n].mde_text()}" for n in names)
    return Claim("S2", statement, criterion, f"t' = {t_prime:g}: {measured}", text, all_of(verdicts), paper,
                 len(per_seed), dfid_curve(results, main)[1], mde)


def _change_order(name: str) -> tuple[int, float]:
    return (1, 0.0) if name == "fid_1step" else (0, float(name[len("dFID_t"):]))


def claim_s3(results: Results) -> Claim:
    statement = f"The FID explodes when w_b = {EXPLODING_W_B:g}"
    criterion = (
        f"'explodes' = the final 1-step FID with w_b = {EXPLODING_W_B:g} is > {EXPLODE_FACTOR:g}x the FID of the run "
        f"at the grid centre (same other hyperparameters), or is not finite; d_j = FID(w_b = {EXPLODING_W_B:g}) − "
        f"{EXPLODE_FACTOR:g} x FID(centre) (seed j); holds if the interval > 0"
    )
    paper = "Fig. 4c, Sec. 4.4"
    runs = ablation_slice(results, ["w_b"])
    baseline = ablation_baseline(results)
    small = next((r for r in runs if same_value(r.param("w_b"), EXPLODING_W_B)), None)
    centre = next((r for r in runs if same_value(r.param("w_b"), baseline["w_b"])
                   and not same_value(baseline["w_b"], EXPLODING_W_B)), None)
    pairs = [(j, fs, fc) for j, fs, fc in paired_fids(results, small, centre) if math.isfinite(fc.value)]
    if not pairs:
        return _not_measured("S3", statement, criterion, paper)
    diffs = [worst_if_not_finite(fs.value) - EXPLODE_FACTOR * fc.value for _, fs, fc in pairs]
    measured = "; ".join(
        f"seed {j}: {fmt_precise(fs.value)} vs w_b = {fmt_g(baseline['w_b'])}: {fmt_precise(fc.value)} (ratio "
        f"{worst_if_not_finite(fs.value) / fc.value:.2f})" for j, fs, fc in pairs)
    interval = paired_interval(diffs)
    return Claim("S3", statement, criterion, measured, interval.text(), verdict(interval, 0.0, "above"), paper,
                 len(pairs), pairs[0][1].label, interval.mde_text())


def claim_s4(results: Results) -> Claim:
    statement = "t' = 1 gives the best FID among the t' grid"
    criterion = (
        "d_j = final 1-step FID at t' = 1 − the lowest final 1-step FID of the other t' values run (seed j; others "
        "at the grid centre); holds if the interval < 0"
    )
    paper = "Table 3"
    runs = {r.param("t_prime"): r for r in ablation_slice(results, ["t_prime"]) if r.param("t_prime") is not None}
    one = next((r for t, r in runs.items() if same_value(t, 1.0)), None)
    others = {t: r for t, r in runs.items() if not same_value(t, 1.0)}
    if one is None or not others:
        listed = ", ".join(f"t' = {t:g}" for t in sorted(runs)) or MISSING
        return _not_measured("S4", statement, criterion, paper,
                             f"{listed} (t' = 1 and at least one other t' are needed)")
    seeds = set(results.seeds_of(one))
    for run in others.values():
        seeds &= set(results.seeds_of(run))
    rows = []
    for j in sorted(seeds):
        fids = {t: final_fid(results, results.seeds_of(r)[j]) for t, r in {1.0: one, **others}.items()}
        if all(m is not None for m in fids.values()) and len({m.setup for m in fids.values()}) == 1:
            rows.append((j, fids))
    if not rows:
        return _not_measured("S4", statement, criterion, paper)
    diffs = [worst_if_not_finite(f[1.0].value) - min(worst_if_not_finite(m.value) for t, m in f.items() if t != 1.0)
             for _, f in rows]
    measured = "; ".join(f"seed {j}: " + ", ".join(f"t' = {t:g}: {fmt_precise(m.value)}" for t, m in sorted(f.items()))
                         + f" (best t' = {fmt_g(min(f, key=lambda t: worst_if_not_finite(f[t].value)))})"
                         for j, f in rows)
    interval = paired_interval(diffs)
    return Claim("S4", statement, criterion, measured, interval.text(), verdict(interval, 0.0, "below"), paper,
                 len(rows), rows[0][1][1.0].label, interval.mde_text())



S6_FID_SIDE = "above"  # claim S6: Stage 2 with the fine-tuned boundary is worse (the paper: FID > 2.7 vs 2.61)


def claim_s6(results: Results) -> Claim:
    statement = ("The intermediate stage (f_θ0 fine-tuned on [t_min, t')) improves dFID_t' but not the final 1-step "
                 "FID of Stage 2, initialised from Stage 1 or from the fine-tuned network")
    criterion = (
        "d_j = dFID_t' of the fine-tuned network (seed j) − that of Stage 1's; e_j = final 1-step FID of Stage 2 "
        "with the fine-tuned boundary − that of the default Stage 2 (the ablation grid's centre, same iterations; "
        "seed j), for each init; holds if the interval of d < 0 and both intervals of e > 0"
    )
    paper = "App. B (dFID_t' 1.51 → 1.43; final FID > 2.7 vs 2.61 for both inits)"
    dfid = dfid_before_after(results)
    fids = {variant: variant_vs_default(results, variant) for variant in INTERMEDIATE_VARIANTS}
    missing = ([] if dfid.interval is not None else ["dFID_t' before and after"]) + [
        f"FIDs of {variant} and the default Stage 2" for variant, c in fids.items() if not c.pairs]
    if missing:
        return _not_measured("S6", statement, criterion, paper, f"not measured: {', '.join(missing)}")
    verdicts = [dfid.verdict] + [verdict(c.interval, 0.0, S6_FID_SIDE) for c in fids.values()]
    measured = "; ".join([f"dFID_t'={dfid.t_prime:g} {dfid.measured()}"]
                         + [f"FID {variant} vs default: {c.measured()}" for variant, c in fids.items()])
    interval = "; ".join([f"dFID_t' {dfid.interval.text()}"]
                         + [f"FID {variant} {c.interval_text()}" for variant, c in fids.items()])
    mde = "; ".join([f"dFID_t' {dfid.interval.mde_text()}"]
                    + [f"FID {variant} {c.mde_text('the default Stage 2')}" for variant, c in fids.items()])
    seeds = min([dfid.seeds] + [c.seeds for c in fids.values()])
    metric = f"{dfid.before.label}; {fids[INTERMEDIATE_VARIANTS[0]].label}"
    return Claim("S6", statement, criterion, measured, interval, all_of(verdicts), paper, seeds, metric, mde)
