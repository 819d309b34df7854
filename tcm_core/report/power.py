"""Power analysis of the paired FID claims (S1, S5): the seeds K and the evaluation size that make the minimum
detectable effect (MDE, ``confidence``) at most a wanted share of the control's FID, from a measured spread.

A per-seed difference d_j = FID(a_j) − FID(b_j) varies for two reasons: the training seed (the two networks of seed
j differ from those of seed k) and the evaluation (one network's FID over sampling seeds, at ``num`` generated
images). The evaluation part is measured directly, as the standard deviation of one network's FID over S sampling
seeds (σ_a and σ_b, seed 0 of each arm); the training part is what the spread of the d_j leaves:

    sd(d)² = σ_train² + σ_a² + σ_b²       (the two evaluations of a difference are independent)

More training seeds shrink the MDE as 1/sqrt(K) (through the noncentral t); more evaluation images shrink only σ_a
and σ_b: a projection at ``scale`` x the images assumes σ ∝ 1/sqrt(images), which is the leading order of the FID's
sampling error (its bias falls as 1/images as well, but cancels in a paired difference at equal ``num``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass

from tcm_core.report.confidence import POWER, minimum_detectable_effect, seeds_for_mde
from tcm_core.report.paired import FidComparison, cd_stage2_vs_control, compare_fids
from tcm_core.report.results import Results
from tcm_core.report.tables import Table
from tcm_core.report.values import MISSING

WANTED_SHARE = 0.15  # issue 28: the MDE of S1 and S5 at most 15 % of the control's mean FID


@dataclass(frozen=True)
class PowerRow:
    claim: str
    seeds: int  # K measured
    sd_difference: float  # sd of the d_j
    control_mean: float  # mean FID of arm b over the K seeds
    eval_sd: tuple[float, float] | None  # (σ_a, σ_b): one network's FID over sampling seeds, None: not measured

    @property
    def mde(self) -> float:
        return minimum_detectable_effect(self.sd_difference, self.seeds)

    @property
    def train_sd(self) -> float | None:
        """σ_train = sqrt(sd(d)² − σ_a² − σ_b²), clipped at 0 (the evaluation noise can explain all the spread)."""
        if self.eval_sd is None:
            return None
        return math.sqrt(max(self.sd_difference**2 - self.eval_sd[0] ** 2 - self.eval_sd[1] ** 2, 0.0))

    def projected_sd(self, scale: float) -> float:
        """sd(d) with ``scale`` x the evaluation images (σ_a, σ_b / sqrt(scale)); the measured sd without eval_sd."""
        if self.eval_sd is None:
            return self.sd_difference
        return math.sqrt(self.train_sd**2 + (self.eval_sd[0] ** 2 + self.eval_sd[1] ** 2) / scale)

    def seeds_needed(self, share: float = WANTED_SHARE, scale: float = 1.0) -> int | None:
        """The fewest K with MDE <= share x the control's mean FID at the (projected) spread; None: over 200."""
        return seeds_for_mde(self.projected_sd(scale), share * self.control_mean)


def power_row(claim: str, comparison: FidComparison, eval_sd: tuple[float, float] | None = None) -> PowerRow | None:
    """The row of one comparison; None when it has fewer than 2 finite differences or no positive control mean."""
    differences = [d for _, d in comparison.differences()]
    control = comparison.arm_mean("b")
    if len(differences) < 2 or not all(math.isfinite(d) for d in differences) or not control or control <= 0:
        return None
    return PowerRow(claim, len(differences), statistics.stdev(differences), control, eval_sd)


def power_rows(results: Results, eval_sd: Mapping[str, tuple[float, float]] | None = None) -> list[PowerRow]:
    """S1 (CT Stage 2 vs its control) and S5 (the distillation arm's), with their evaluation spreads if given."""
    eval_sd = eval_sd or {}
    comparisons = {"S1": compare_fids(results, results.main_run("stage2"), results.main_run("stage1_continued")),
                   "S5": cd_stage2_vs_control(results)}
    rows = [power_row(claim, comparison, eval_sd.get(claim)) for claim, comparison in comparisons.items()]
    return [row for row in rows if row is not None]


def evaluation_sd(per_seed: list[float]) -> float:
    """The sd of one network's FID over its sampling seeds (an ``evaluate fid --seeds S`` JSON's per_seed)."""
    if len(per_seed) < 2:
        raise ValueError(f"the evaluation spread needs at least 2 sampling seeds, got {len(per_seed)}")
    return statistics.stdev(per_seed)


def _fmt(value: float | None) -> str:
    return MISSING if value is None else f"{value:.3g}"


def power_table(rows: list[PowerRow], images: int, scale: float = 4.0, share: float = WANTED_SHARE) -> Table:
    """One row per claim: the measured spread, its two sources, the MDE at K, and the K for ``share`` now and
    with ``scale`` x the evaluation images."""
    header = ["claim", "K", "sd(d)", "σ_eval (a, b)", "σ_train", "control mean FID", f"MDE at K ({POWER:.0%} power)",
              f"K for MDE <= {share:.0%}", f"K for MDE <= {share:.0%} at {scale:g}x images"]
    body = []
    for r in rows:
        evals = MISSING if r.eval_sd is None else f"{_fmt(r.eval_sd[0])}, {_fmt(r.eval_sd[1])}"
        needed = [r.seeds_needed(share), r.seeds_needed(share, scale) if r.eval_sd else None]
        body.append([r.claim, str(r.seeds), _fmt(r.sd_difference), evals, _fmt(r.train_sd), _fmt(r.control_mean),
                     f"{_fmt(r.mde)} ({r.mde / r.control_mean:.0%})",
                     *(MISSING if k is None else str(k) for k in needed)])
    intro = [f"Evaluation at {images} generated images per FID; σ_eval: the sd of seed 0's FID over sampling seeds "
             "(each arm); σ_train = sqrt(sd(d)² − σ_a² − σ_b²); projections assume σ_eval ∝ 1/sqrt(images)."]
    return Table("power", "Power analysis of the paired FID claims", header, body, intro=intro)
