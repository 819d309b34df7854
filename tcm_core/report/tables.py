"""Tables 1-6 of the paper with our measured values beside the paper's, as Markdown and CSV."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from tcm_core.presets import INTERMEDIATE_VARIANTS
from tcm_core.report.confidence import CONFIDENCE
from tcm_core.report.intermediate import DfidComparison, default_stage2, dfid_before_after, variant_vs_default
from tcm_core.report.measurements import ablation_baseline, ablation_slice, final_fid
from tcm_core.report.paired import FidComparison, cd_stage2_vs_control
from tcm_core.report.paper import PAPER_METRIC, PAPER_SETUP, PaperRow, paper_row
from tcm_core.report.results import DISTILL_GRID, Measured, Results, TrainingRun
from tcm_core.report.values import MISSING, fmt, fmt_diff, fmt_g, same_value

# Every table ``tables`` writes (the claims table is built in claims.py), by file name.
TABLES = {
    "table1_cifar10": "Table 1: CIFAR-10, FID / NFE / # params",
    "table2_imagenet64": "Table 2: ImageNet 64x64, FID / NFE / # params",
    "table3_tprime": "Table 3: FID vs the dividing time t'",
    "table4_stages": "Table 4: FID for training stages 1, 2, 3",
    "table5_distillation": "Table 5: Stage 1 vs Stage 2 under consistency distillation",
    "table6_intermediate": "Table 6: adding an intermediate training stage (App. B)",
    "mid_t_sweep": "The 2-step FID vs the middle time t_mid, per arm (the paper tuned t_mid, App. C.3)",
    "claims": "Claims check",
}
DELTA = "Δ (ours − paper)"  # only in a table where some measured FID is the paper's metric (_drop_delta)
MAIN_HEADER = [
    "Method",
    "NFE",
    "FID (ours)",
    "FID (paper)",
    DELTA,
    "# param. (M, ours)",
    "# param. (M, paper)",
    "our metric",
    "paper source",
    "run",
]
QUOTED_HEADER = ["Method", "NFE", "FID (paper)", "# param. (M, paper)", "category", "paper source"]
ABLATION_HEADER = ["setting", "FID (ours)", "FID (paper)", DELTA, "our metric", "paper source", "run"]
RowSpec = tuple[str, str, str, str, str]  # method, stage, NFE, metric, key of the paper_values.csv row to compare
TABLE1_ROWS: list[RowSpec] = [
    ("Stage 1 (standard consistency training)", "stage1", "1", "fid_1step", "t1_stage1_1"),
    ("Stage 1 (standard consistency training)", "stage1", "2", "fid_2step", ""),
    ("Stage 1 continued (control)", "stage1_continued", "1", "fid_1step", ""),
    ("Stage 1 continued (control)", "stage1_continued", "2", "fid_2step", ""),
    ("TCM (Stage 2)", "stage2", "1", "fid_1step", "t1_tcm_1"),
    ("TCM (Stage 2)", "stage2", "2", "fid_2step", "t1_tcm_2"),
]
TABLE2_NETWORKS = (("EDM2-S", "imagenet64_s", "s"), ("EDM2-XL", "imagenet64_xl", "xl"))  # network, preset, key


@dataclass
class Table:
    name: str
    title: str
    header: list[str]
    rows: list[list[str]]
    intro: list[str] = field(default_factory=list)
    quoted_header: list[str] = field(default_factory=list)
    quoted: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"# {self.title}", ""]
        lines += [*self.intro, ""] if self.intro else []
        lines += _md_table(self.header, self.rows)
        if self.quoted:
            lines += ["", "## Baselines quoted from the paper (not rerun here)", ""]
            lines += _md_table(self.quoted_header, self.quoted)
        if self.notes:
            lines += ["", "Notes:", ""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def csv_text(self) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["kind", *self.header])
        for row in self.rows:
            writer.writerow(["measured", *row])
        for row in self.quoted:
            # quoted rows fill the same columns: method, NFE, paper FID, paper params, source
            record = dict(zip(self.quoted_header, row))
            writer.writerow(["quoted from paper", *[record.get(h, "") for h in self.header]])
        return buffer.getvalue()


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return lines


# ----------------------------------------------------------------------------------------------------------------
# Cells and paragraphs shared by the tables


def _params_m(n: int | None) -> str:
    return MISSING if n is None else (f"{n / 1e6:.2f}" if n < 1e7 else f"{n / 1e6:.1f}")


def _run_cell(measured: Measured | None) -> str:
    if measured is None:
        return MISSING
    return f"{measured.run} @ it {measured.iteration}" if measured.iteration is not None else measured.run


def paper_metric(measured: Measured | None, preset: str, paper: PaperRow | None) -> bool:
    """Whether a measured FID is the paper's metric (same extractor and sample count, on the paper row's data
    set): only then is a Δ shown."""
    return (measured is not None and paper is not None and tuple(measured.setup[:2]) == PAPER_SETUP
            and same_dataset(preset, paper.dataset))


def same_dataset(preset: str, dataset: str) -> bool:
    """Whether the preset trains on the data set a paper row was measured on (cifar10 | imagenet64)."""
    return (preset, dataset) == ("cifar10", "cifar10") or (preset.startswith("imagenet64") and dataset == "imagenet64")


def _delta(measured: Measured | None, paper: PaperRow | None, preset: str) -> str:
    if not paper_metric(measured, preset, paper):
        return MISSING
    return fmt_diff(measured.value, paper.fid)


def _drop_delta(table: Table) -> Table:
    """Without one Δ that compares like with like, the column is left out (a Δ between a LeNet FID on MNIST and
    the paper's Inception FID on CIFAR-10 would compare nothing)."""
    if DELTA not in table.header:
        return table
    column = table.header.index(DELTA)
    if any(row[column] != MISSING for row in table.rows):
        table.intro.append(f"{DELTA} is shown only where our metric is the paper's (same extractor and samples).")
        return table
    table.header = [h for i, h in enumerate(table.header) if i != column]
    table.rows = [[c for i, c in enumerate(row) if i != column] for row in table.rows]
    table.intro.append(f"No {DELTA} column: no measured FID here is the paper's metric (extractor and sample count "
                       "differ), so a difference would compare nothing.")
    return table


def _measured_row(
    name: str, nfe: str, measured: Measured | None, paper: PaperRow | None, run: TrainingRun | None, preset: str
) -> list[str]:
    ours = measured.value if measured else None
    return [
        name,
        nfe,
        fmt(ours),
        fmt(paper.fid if paper else None),
        _delta(measured, paper, preset),
        _params_m(run.n_params if run else None),
        fmt(paper.params_m, 1) if paper and paper.params_m is not None else MISSING,
        measured.label if measured else MISSING,
        paper.source if paper else MISSING,
        _run_cell(measured),
    ]


def _ablation_row(setting: str, m: Measured | None, p: PaperRow | None, preset: str) -> list[str]:
    ours = m.value if m else None
    return [
        setting,
        fmt(ours),
        fmt(p.fid if p else None),
        _delta(m, p, preset),
        m.label if m else MISSING,
        p.source if p else MISSING,
        m.run if m else MISSING,
    ]


def _metric_intro(preset: str, measured: Iterable[Measured | None], dataset_note: str) -> list[str]:
    labels = sorted({m.label for m in measured if m is not None})
    ours = "; ".join(labels) if labels else f"{MISSING} (no evaluation yet)"
    return [
        f"Preset: `{preset}`. {dataset_note}",
        "",
        f"Our metric: **{ours}**. Paper metric: **{PAPER_METRIC}**.",
        f"Values are training seed 0 (the runs of `all`; the claims table reports every seed). A cell with no run "
        f"is shown as {MISSING}.",
    ]


def _quoted(rows: Sequence[PaperRow], source: str, compared: Sequence[RowSpec]) -> list[list[str]]:
    """The paper's rows of ``source`` that no measured row of the table compares (baselines, and the releases'
    rows that only ``released_tables`` measures)."""
    keys = {spec[4] for spec in compared if spec[4]}
    return [
        [f"{r.method} [quoted]", r.nfe, fmt(r.fid), fmt(r.params_m, 1), r.category, r.source]
        for r in rows
        if r.source == source and r.key not in keys
    ]


def _dataset_note(preset: str, table_dataset: str) -> str:
    if same_dataset(preset, table_dataset) and table_dataset == "cifar10":
        return "Dataset: CIFAR-10, as in the paper."
    if same_dataset(preset, table_dataset):
        return "Dataset: ImageNet 64x64, as in the paper."
    return (
        f"This preset is a scaled-down stand-in for the paper's {table_dataset} setting "
        "(different data, network and metric): compare trends, not absolute values."
    )


def _main_rows(
    results: Results, paper: Sequence[PaperRow], spec: Sequence[RowSpec], fills: bool
) -> tuple[list[list[str]], list[Measured | None]]:
    """The rows of the main runs' final FIDs (no measured value unless ``fills``) and the values they show."""
    rows, measured = [], []
    for name, stage, nfe, metric, key in spec:
        run = results.main_run(stage) if fills else None
        m = final_fid(results, run, metric)
        measured.append(m)
        rows.append(_measured_row(name, nfe, m, paper_row(paper, key) if key else None, run, results.preset))
    return rows, measured


def _main_table(
    results: Results,
    name: str,
    title: str,
    dataset: str,
    rows: list[list[str]],
    measured: list[Measured | None],
    quoted: list[list[str]],
    notes: list[str],
) -> Table:
    """Table 1 or 2: the main runs' rows, then the paper's other baselines, quoted."""
    return _drop_delta(Table(
        name,
        f"{title} — preset {results.preset}",
        MAIN_HEADER,
        rows,
        intro=_metric_intro(results.preset, measured, _dataset_note(results.preset, dataset)),
        quoted_header=QUOTED_HEADER,
        quoted=quoted,
        notes=notes,
    ))


# ----------------------------------------------------------------------------------------------------------------
# The tables


def table1(results: Results, paper: Sequence[PaperRow]) -> Table:
    fills = not results.preset.startswith("imagenet64")
    rows, measured = _main_rows(results, paper, TABLE1_ROWS, fills)
    notes = [] if fills else [f"preset {results.preset} is an ImageNet preset: its numbers are in Table 2"]
    title = "Table 1 (CIFAR-10): NFE, FID and # params"
    quoted = _quoted(paper, "Table 1", TABLE1_ROWS)
    return _main_table(results, "table1_cifar10", title, "cifar10", rows, measured, quoted, notes)


def _table2_rows(network: str, suffix: str) -> list[RowSpec]:
    return [
        (f"Stage 1 ({network})", "stage1", "1", "fid_1step", ""),
        (f"Stage 1 ({network})", "stage1", "2", "fid_2step", ""),
        (f"TCM ({network})", "stage2", "1", "fid_1step", f"t2_tcm_{suffix}_1"),
        (f"TCM ({network})", "stage2", "2", "fid_2step", f"t2_tcm_{suffix}_2"),
    ]


def table2(results: Results, paper: Sequence[PaperRow]) -> Table:
    rows, measured, notes = [], [], []
    for network, preset, suffix in TABLE2_NETWORKS:
        fills = results.preset == preset
        if not fills:
            notes.append(f"{network} rows are measured by preset {preset} (this report is preset {results.preset})")
        network_rows, network_measured = _main_rows(results, paper, _table2_rows(network, suffix), fills)
        rows += network_rows
        measured += network_measured
    title = "Table 2 (ImageNet 64x64): NFE, FID and # params"
    specs = [spec for network, _, suffix in TABLE2_NETWORKS for spec in _table2_rows(network, suffix)]
    quoted = _quoted(paper, "Table 2", specs) + _quoted(paper, "Appendix E", specs)
    return _main_table(results, "table2_imagenet64", title, "imagenet64", rows, measured, quoted, notes)


def table3(results: Results, paper: Sequence[PaperRow]) -> Table:
    paper_rows = {r.setting.split("=")[1]: r for r in paper if r.source == "Table 3"}
    runs = ablation_slice(results, ["t_prime"])
    ours = {round(v, 9): r for r in runs if (v := r.param("t_prime")) is not None}
    values = sorted({round(float(k), 9) for k in paper_rows} | set(ours))
    rows, measured = [], []
    for t in values:
        p = next((r for k, r in paper_rows.items() if same_value(float(k), t)), None)
        m = final_fid(results, ours.get(t), "fid_1step")
        measured.append(m)
        rows.append(_ablation_row(f"t' = {t:g}", m, p, results.preset))
    baseline = ablation_baseline(results)
    fixed = ", ".join(f"{k} = {fmt_g(v)}" for k, v in baseline.items() if k != "t_prime" and v is not None)
    intro = _metric_intro(results.preset, measured, _dataset_note(results.preset, "cifar10"))
    intro.append(f"Ablation grid (Stage 2), other hyperparameters at the grid centre: {fixed or MISSING}.")
    return _drop_delta(Table(
        "table3_tprime",
        f"Table 3: FID vs the dividing time t' — preset {results.preset}",
        ABLATION_HEADER,
        rows,
        intro=intro,
        notes=["The paper uses batch 128 for this table (1024 in its default setting)."],
    ))


def table4(results: Results, paper: Sequence[PaperRow]) -> Table:
    rows, measured = [], []
    for stage_number, stage in ((1, "stage1"), (2, "stage2"), (3, "stage3")):
        # the main runs: Stage 3 continues from the main Stage 2, which starts from the main Stage 1
        m = final_fid(results, results.main_run(stage), "fid_1step")
        measured.append(m)
        rows.append(_ablation_row(f"Stage {stage_number}", m, paper_row(paper, f"t4_stage_{stage_number}"),
                                  results.preset))
    intro = _metric_intro(results.preset, measured, _dataset_note(results.preset, "cifar10"))
    intro.append("Stage 3 continues from Stage 2 with t' = 4 (paper Sec. 4.4).")
    return _drop_delta(Table(
        "table4_stages",
        f"Table 4: FID for training stages 1, 2, 3 — preset {results.preset}",
        ABLATION_HEADER,
        rows,
        intro=intro,
    ))


# ----------------------------------------------------------------------------------------------------------------
# Table 5 (App. A): consistency distillation

TABLE5_HEADER = ["Stage", "NFE", "FID (ours, CD)", "training seeds", "per seed (ours)", "our metric",
                 "guidance w (ours)", "ODE solver (ours)", "FID (paper, MSCOCO)", "paper metric",
                 "batch × iterations (ours)", "run"]
TABLE5_ROWS: list[RowSpec] = [
    ("Stage 1 (consistency distillation)", "stage1", "1", "fid_1step", "t5_stage1"),
    ("Stage 1 (consistency distillation)", "stage1", "2", "fid_2step", ""),
    ("Stage 1 continued (CD control)", "stage1_continued", "1", "fid_1step", ""),
    ("Stage 1 continued (CD control)", "stage1_continued", "2", "fid_2step", ""),
    ("TCM Stage 2 (consistency distillation)", "stage2", "1", "fid_1step", "t5_stage2"),
    ("TCM Stage 2 (consistency distillation)", "stage2", "2", "fid_2step", ""),
]
TABLE5_DIFFERENCE = "TCM Stage 2 − CD control (paired by seed, claim S5)"
TABLE5_PAPER_METRIC = "zero-shot FID on MSCOCO, 30k samples (text-to-image, Stable Diffusion 1.5 teacher)"
TABLE5_PAIRED_ARMS = {"stage2": "a", "stage1_continued": "b"}  # their 1-step rows: the seeds of the S5 comparison


def distill_fid(results: Results, run: TrainingRun | None, metric: str) -> Measured | None:
    """The FID of a Table-5 cell that is not paired by seed: the run's (training seed 0's) final evaluation."""
    return final_fid(results, run, metric)


def _guidance_cell(run: TrainingRun | None) -> str:
    if run is None:
        return MISSING
    w = run.param("guidance")
    return fmt_g(w) if w is not None else "none (teacher as is)"


def _size_cell(run: TrainingRun | None) -> str:
    """The run's global batch and the iterations it trained (its params): the CD arm's size is its own."""
    if run is None:
        return MISSING
    return f"{fmt_g(run.param('batch'))} × {fmt_g(run.param('iterations'))}"


def _per_seed(values: Sequence[tuple[int, float]]) -> str:
    return "; ".join(f"seed {j}: {fmt(v)}" for j, v in values) or MISSING


def _table5_values(comparison: FidComparison, stage: str, nfe: str, m: Measured | None
                   ) -> tuple[float | None, str, str]:
    """(value, training seeds, per seed) of a stage row: the seed mean of the S5 comparison for the 1-step rows of
    its two arms, else the run's own (seed 0's) value."""
    side = TABLE5_PAIRED_ARMS.get(stage) if nfe == "1" and comparison.pairs else None
    if side is None:
        return (m.value if m else None), ("1" if m else MISSING), MISSING
    return comparison.arm_mean(side), str(comparison.seeds), _per_seed(comparison.arm(side))


def _table5_difference_row(comparison: FidComparison) -> list[str]:
    cells = [TABLE5_DIFFERENCE, "1", comparison.interval_text(), str(comparison.seeds) if comparison.pairs else MISSING,
             _per_seed(comparison.differences()), comparison.label]
    return cells + [MISSING] * (len(TABLE5_HEADER) - len(cells))  # no guidance, solver, paper value, size or run


def _table5_intro(results: Results, measured: Sequence[Measured | None], shown: dict[str, float | None],
                  comparison: FidComparison) -> list[str]:
    labels = sorted({m.label for m in measured if m is not None})
    ours = f"{fmt(shown.get('stage1'))} → {fmt(shown.get('stage2'))}"
    return [
        f"Preset: `{results.preset}`. **A different data set, teacher and metric from the paper's**: the paper "
        "distils Stable Diffusion 1.5 on COYO with classifier-free guidance 6 and reports zero-shot FID on "
        "MSCOCO; here the teacher is this preset's own diffusion model and the FID is this preset's metric. "
        "Compare the direction Stage 1 → Stage 2, never the values (hence no Δ column).",
        "",
        f"Our metric: **{'; '.join(labels) if labels else MISSING + ' (no evaluation yet)'}**. "
        f"Paper metric: **{TABLE5_PAPER_METRIC}**.",
        f"Stage 1 → Stage 2, 1-step FID: ours {ours}; paper 18.32 → 16.07 (lower is better).",
        "Stage 1 is one run; every training seed of the control and of Stage 2 starts from it. The 1-step FIDs of "
        "the control and of Stage 2 are the mean over their training seeds (`training_seeds`), paired by seed as "
        "claim S5; their 2-step FIDs are seed 0's (the other seeds are evaluated with 1 step only).",
        f"{TABLE5_DIFFERENCE}, 1-step FID over {comparison.seeds} training seed(s): {comparison.interval_text()} "
        f"(mean [{CONFIDENCE:.0%} paired t interval]); verdict: **{comparison.verdict}** (holds if the interval < 0).",
        f"A cell with no run is shown as {MISSING}.",
    ]


def table5(results: Results, paper: Sequence[PaperRow]) -> Table:
    comparison = cd_stage2_vs_control(results)  # claim S5's numbers (claims.claim_s5 reads the same function)
    rows, measured, shown = [], [], {}
    for name, stage, nfe, metric, key in TABLE5_ROWS:
        run = results.distill_run(stage)
        m = distill_fid(results, run, metric)
        value, seeds, per_seed = _table5_values(comparison, stage, nfe, m)
        if nfe == "1":
            measured.append(m)
            shown[stage] = value
        p = paper_row(paper, key) if key else None
        solver = run.params.get("ode_solver") if run is not None else None
        rows.append([name, nfe, fmt(value), seeds, per_seed, m.label if m else MISSING, _guidance_cell(run),
                     str(solver) if solver else MISSING, fmt(p.fid if p else None),
                     TABLE5_PAPER_METRIC if p else MISSING, _size_cell(run), _run_cell(m)])
    rows.append(_table5_difference_row(comparison))
    notes = ["The paper does not state the NFE of Table 5; its Fig. 6 shows one-step samples, so its two numbers "
             "stand beside our 1-step rows.",
             "The CD control is CD Stage 1 continued from its final training state for as long as Stage 2 runs "
             "(as the CT control); the paper's Table 5 has no such row, so its numbers compare Stage 2 with Stage 1.",
             "The run column names training seed 0's run; seed j > 0 is `<run>/seed~j`.",
             "The batch × iterations column is each run's own (its MLflow params): a preset may size the CD arm "
             "apart from the CT arms (tiny: 200 iterations per run, a quick validation as App. A calls its own); "
             "within the arm the control and Stage 2 continue Stage 1 with its batch for equally many iterations."]
    if not any(r.grid == DISTILL_GRID for r in results.runs):
        notes.append(f"Preset {results.preset} has no distillation run yet (a `distill` block and a `teacher` in "
                     "config.yaml plan one).")
    return Table("table5_distillation",
                 f"Table 5 (App. A): Stage 1 vs Stage 2 under consistency distillation — preset {results.preset}",
                 TABLE5_HEADER, rows, intro=_table5_intro(results, measured, shown, comparison), notes=notes)



# ----------------------------------------------------------------------------------------------------------------
# Table 6 (App. B): the intermediate training stage

TABLE6_HEADER = ["network", "metric", "ours (seed mean)", "training seeds", "per seed (ours)",
                 f"difference, paired by seed [{CONFIDENCE:.0%} interval]", "paper", "our metric",
                 "batch × iterations (global iterations)", "run"]
TABLE6_VARIANTS = {"init_stage1": "Stage 2, boundary f_θ0' (fine-tuned), init f_θ0 (Stage 1)",
                   "init_finetune": "Stage 2, boundary f_θ0' (fine-tuned), init f_θ0' (fine-tuned)"}
assert set(TABLE6_VARIANTS) == set(INTERMEDIATE_VARIANTS)


def _paper_cell(paper: Sequence[PaperRow], key: str) -> str:
    p = paper_row(paper, key)
    if p is None:
        return MISSING
    return ("> " if p.note.startswith("lower bound") else "") + fmt(p.fid)


def _span_cell(run: TrainingRun | None) -> str:
    """``batch × iterations (it start → end)`` of a run, from its params."""
    if run is None:
        return MISSING
    span = f" (it {fmt_g(run.param('start_iteration'))} → {fmt_g(run.param('end_iteration'))})"
    return _size_cell(run) + (span if run.param("end_iteration") is not None else "")


def _table6_dfid_rows(dfid: DfidComparison, results: Results, paper: Sequence[PaperRow]) -> list[list[str]]:
    metric = f"dFID_t' (t' = {fmt_g(dfid.t_prime)})"
    before, finetuned = results.main_run("stage1"), results.intermediate_run("finetune")
    after = [m.value for _, m in dfid.after]
    label = dfid.before.label if dfid.before else MISSING
    return [
        ["f_θ0 (Stage 1), before the intermediate stage", metric, fmt(dfid.before.value if dfid.before else None),
         "1" if dfid.before else MISSING, MISSING, MISSING, _paper_cell(paper, "t6_dfid_stage1"), label,
         _span_cell(before), dfid.before.run if dfid.before else MISSING],
        ["f_θ0' (fine-tuned on [t_min, t'))", metric, fmt(sum(after) / len(after) if after else None),
         str(dfid.seeds) if after else MISSING, _per_seed([(j, m.value) for j, m in dfid.after]),
         dfid.interval.text() if dfid.interval else MISSING, _paper_cell(paper, "t6_dfid_finetuned"), label,
         _span_cell(finetuned), finetuned.key if finetuned else MISSING],
    ]


def _table6_fid_row(name: str, comparison: FidComparison, side: str, run: TrainingRun | None, paper_key: str,
                    paper: Sequence[PaperRow]) -> list[str]:
    """A Stage-2 row: the seed mean of its side of ``comparison`` (``a``: the variant, ``b``: the default)."""
    mean = comparison.arm_mean(side)
    difference = comparison.interval_text() if side == "a" and comparison.pairs else MISSING
    return [name, "1-step FID", fmt(mean), str(comparison.seeds) if comparison.pairs else MISSING,
            _per_seed(comparison.arm(side)), difference, _paper_cell(paper, paper_key), comparison.label,
            _span_cell(run), run.key if run else MISSING]


def table6(results: Results, paper: Sequence[PaperRow]) -> Table:
    """dFID_t' before / after the intermediate stage and the final 1-step FIDs of Stage 2 with the fine-tuned
    boundary (two inits) vs the default Stage 2: the numbers of claim S6 (``report.intermediate``)."""
    dfid = dfid_before_after(results)
    comparisons = {v: variant_vs_default(results, v) for v in INTERMEDIATE_VARIANTS}
    default = default_stage2(results)
    reference = next((c for c in comparisons.values() if c.pairs), comparisons[INTERMEDIATE_VARIANTS[0]])
    rows = _table6_dfid_rows(dfid, results, paper)
    rows.append(_table6_fid_row("Stage 2, default: boundary f_θ0, init f_θ0", reference, "b", default, "t6_default",
                                paper))
    for variant, name in TABLE6_VARIANTS.items():
        rows.append(_table6_fid_row(name, comparisons[variant], "a", results.intermediate_run(variant),
                                    "t6_finetuned_boundary", paper))
    intro = [
        f"Preset: `{results.preset}`. {_dataset_note(results.preset, 'cifar10')}",
        "",
        "The intermediate stage continues Stage 1's final training state for K iterations with its times drawn on "
        "[t_min, t') only (the truncated log-normal of Stage 1); each variant's Stage 2 then runs with the default "
        "Stage 2's (the ablation grid centre's) hyperparameters, the fine-tuned network f_θ0' as its frozen "
        "boundary, from f_θ0 or f_θ0', for M − K of the default's M iterations (equal total iterations).",
        "Differences: f_θ0' − f_θ0 (dFID_t', seed j vs the one Stage-1 network) and variant − default (1-step "
        f"FID, seed j vs seed j); claim S6 judges them. Values are means over training seeds; {MISSING}: no run.",
    ]
    notes = ["The paper's row for both variants is a lower bound: it reports a final FID \"> 2.7\" for either init.",
             "Paper numbers: CIFAR-10, Inception FID (dFID_t' at t' = 1); ours are this preset's metric."]
    return Table("table6_intermediate", f"Table 6 (App. B): adding an intermediate training stage — preset "
                 f"{results.preset}", TABLE6_HEADER, rows, intro=intro, notes=notes)
