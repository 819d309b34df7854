"""Two arms' final 1-step FIDs paired by training seed: per-seed values, differences, interval and verdict.

Seed j of arm a is compared with seed j of arm b (both train with the same seed from one Stage-1 run,
``tcm_core.presets``). Claim S1 compares the CT Stage 2 with its control this way, claim S5 the distillation arm's
(:func:`cd_stage2_vs_control`), and Table 5 shows that same comparison beside its rows.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from tcm_core.report.confidence import NOT_MEASURED, Interval, paired_interval, verdict
from tcm_core.report.measurements import final_fid
from tcm_core.report.results import Measured, Results, TrainingRun
from tcm_core.report.values import MISSING, fmt_precise


def worst_if_not_finite(value: float) -> float:
    """A non-finite FID (a diverged run) counts as the worst possible: +inf."""
    return value if math.isfinite(value) else math.inf


def paired_runs(results: Results, a: TrainingRun | None, b: TrainingRun | None
                ) -> list[tuple[int, TrainingRun, TrainingRun]]:
    """(seed index, seed j of a, seed j of b) for every seed both arms have."""
    seeds_a, seeds_b = results.seeds_of(a), results.seeds_of(b)
    return [(j, seeds_a[j], seeds_b[j]) for j in sorted(set(seeds_a) & set(seeds_b))]


def paired_fids(results: Results, a: TrainingRun | None, b: TrainingRun | None
                ) -> list[tuple[int, Measured, Measured]]:
    """The final 1-step FIDs of both arms per seed, where both exist and come from the same evaluation setup."""
    pairs = []
    for j, run_a, run_b in paired_runs(results, a, b):
        fa, fb = final_fid(results, run_a), final_fid(results, run_b)
        if fa and fb and fa.setup == fb.setup:
            pairs.append((j, fa, fb))
    return pairs


def _difference(fa: Measured, fb: Measured) -> float:
    return worst_if_not_finite(fa.value) - worst_if_not_finite(fb.value)


@dataclass(frozen=True)
class FidComparison:
    """Arm a vs arm b per training seed j: d_j = FID(a_j) − FID(b_j) (a non-finite FID counts as +inf), the mean
    of the d_j with its interval, and the verdict "a is lower"."""

    pairs: tuple[tuple[int, Measured, Measured], ...]  # (seed j, final 1-step FID of a, of b)
    interval: Interval | None  # None: no seed is measured on both arms
    verdict: str

    @property
    def seeds(self) -> int:
        return len(self.pairs)

    @property
    def label(self) -> str:
        """What the values measure (the evaluation label of arm a's seed 0)."""
        return self.pairs[0][1].label if self.pairs else MISSING

    def differences(self) -> list[tuple[int, float]]:
        return [(j, _difference(fa, fb)) for j, fa, fb in self.pairs]

    def arm(self, side: str) -> list[tuple[int, float]]:
        """(seed j, final 1-step FID) of arm ``"a"`` or ``"b"`` over the paired seeds."""
        return [(j, (fa if side == "a" else fb).value) for j, fa, fb in self.pairs]

    def arm_mean(self, side: str) -> float | None:
        values = [v for _, v in self.arm(side)]
        return statistics.fmean(values) if values else None

    def measured(self) -> str:
        """``seed 0: 38 vs 43; seed 1: ...`` (six significant digits)."""
        return "; ".join(f"seed {j}: {fmt_precise(fa.value)} vs {fmt_precise(fb.value)}" for j, fa, fb in self.pairs)

    def interval_text(self) -> str:
        return MISSING if self.interval is None else self.interval.text()

    def mde_text(self, b_name: str = "the control") -> str:
        """The minimum detectable effect, also as a share of arm b's mean FID (``b_name``: what arm b is)."""
        if self.interval is None:
            return MISSING
        mde, reference = self.interval.mde, self.arm_mean("b")
        if mde is None or reference is None or not math.isfinite(reference) or reference <= 0:
            return self.interval.mde_text()
        return f"{self.interval.mde_text()} ({mde / reference:.0%} of {b_name}'s mean FID {reference:.4g})"


def compare_fids(results: Results, a: TrainingRun | None, b: TrainingRun | None) -> FidComparison:
    """Arm a (e.g. Stage 2) vs arm b (its control): holds if the interval of FID(a) − FID(b) lies below 0."""
    pairs = tuple(paired_fids(results, a, b))
    if not pairs:
        return FidComparison(pairs, None, NOT_MEASURED)
    interval = paired_interval([_difference(fa, fb) for _, fa, fb in pairs])
    return FidComparison(pairs, interval, verdict(interval, 0.0, "below"))


def cd_stage2_vs_control(results: Results) -> FidComparison:
    """Claim S5 and Table 5: the distillation arm's Stage 2 vs its control (CD Stage 1 continued), per seed."""
    return compare_fids(results, results.distill_run("stage2"), results.distill_run("stage1_continued"))
