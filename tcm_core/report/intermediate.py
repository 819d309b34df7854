"""The intermediate-stage arm (paper App. B) paired by training seed: what Table 6 and claim S6 both read.

The arm (``tcm_core.presets.INTERMEDIATE_RUNS``): the fine-tuned boundary f_θ0' (Stage 1's training state continued
on [t_min, t'), seed j in ``intermediate/finetune/seed~j``) and two Stage-2 runs with f_θ0' of seed j as their
frozen boundary, initialised from Stage 1's network (``init_stage1``) or from f_θ0' (``init_finetune``). They are
compared with

* dFID_t' of Stage 1's network f_θ0 (one run) against that of f_θ0' of each seed: d_j = after_j − before;
* the final 1-step FID of each variant against the default Stage 2 at the same hyperparameters, the ablation grid's
  centre cell, seed j with seed j: d_j = FID(variant_j) − FID(default_j).
"""

from __future__ import annotations

from dataclasses import dataclass

from tcm_core.presets import INTERMEDIATE_VARIANTS
from tcm_core.report.confidence import NOT_MEASURED, Interval, paired_interval, verdict
from tcm_core.report.measurements import ablation_runs, final_dfid
from tcm_core.report.paired import FidComparison, compare_fids
from tcm_core.report.results import SWEPT_PARAMS, Measured, Results, TrainingRun
from tcm_core.report.values import MISSING, fmt_precise, same_value


@dataclass(frozen=True)
class DfidComparison:
    """dFID_t' of Stage 1's network (before) and of the fine-tuned network of each seed j (after)."""

    t_prime: float | None
    before: Measured | None
    after: tuple[tuple[int, Measured], ...]  # (seed j, dFID_t' of f_θ0' of seed j), same setup as ``before``
    interval: Interval | None  # of after_j − before; None: nothing measured on both sides
    verdict: str  # "improves": the interval lies below 0

    @property
    def seeds(self) -> int:
        return len(self.after)

    def differences(self) -> list[tuple[int, float]]:
        return [(j, m.value - self.before.value) for j, m in self.after] if self.before else []

    def measured(self) -> str:
        before = fmt_precise(self.before.value) if self.before else MISSING
        return "; ".join(f"seed {j}: {fmt_precise(m.value)} vs {before}" for j, m in self.after) or MISSING


def t_prime_of(results: Results) -> float | None:
    """t' of the arm: the fine-tuned network's upper time (its ``t_prime`` param), else a variant's."""
    for name in ("finetune", *INTERMEDIATE_VARIANTS):
        run = results.intermediate_run(name)
        if run is not None and run.param("t_prime") is not None:
            return run.param("t_prime")
    return None


def dfid_before_after(results: Results) -> DfidComparison:
    """dFID_t' before (Stage 1's network) and after the intermediate stage, per seed; verdict "after is lower"."""
    t_prime = t_prime_of(results)
    if t_prime is None:
        return DfidComparison(None, None, (), None, NOT_MEASURED)
    before = final_dfid(results, results.main_run("stage1"), t_prime)
    after = []
    for j, run in results.seeds_of(results.intermediate_run("finetune")).items():
        measured = final_dfid(results, run, t_prime)
        if measured is not None and before is not None and measured.setup == before.setup:
            after.append((j, measured))
    if not after:
        return DfidComparison(t_prime, before, (), None, NOT_MEASURED)
    interval = paired_interval([m.value - before.value for _, m in after])
    return DfidComparison(t_prime, before, tuple(after), interval, verdict(interval, 0.0, "below"))


def default_stage2(results: Results) -> TrainingRun | None:
    """The default Stage 2 the variants are compared with: the ablation cell whose swept hyperparameters are the
    variants' (the grid centre: the preset's Stage 2 at the ablation batch and iterations)."""
    variant = next((r for v in INTERMEDIATE_VARIANTS if (r := results.intermediate_run(v)) is not None), None)
    if variant is None:
        return None
    same = [r for r in ablation_runs(results)
            if all(same_value(r.param(k), variant.param(k)) for k in SWEPT_PARAMS if variant.param(k) is not None)]
    return same[0] if same else None


def variant_vs_default(results: Results, variant: str) -> FidComparison:
    """Stage 2 with the fine-tuned boundary (``variant``: init_stage1 | init_finetune) vs the default Stage 2,
    per seed (d_j = FID(variant_j) − FID(default_j)); its own verdict is "the variant is lower"."""
    return compare_fids(results, results.intermediate_run(variant), default_stage2(results))
