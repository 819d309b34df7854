"""Paper tables, figures and claims (tcm_core.report) on a synthetic results folder and a real MLflow store."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image
from reporting_helpers import DISTILL_FIDS, LABEL, Scenario, build_synthetic, mirror_to_mlflow

from tcm_core.presets import split_seed
from tcm_core.report import figures, measurements
from tcm_core.report.claims import MDE_COLUMN
from tcm_core.report.cli import build_report, format_summary, output_files
from tcm_core.report.paper import load_paper_values
from tcm_core.report.tables import DELTA
from tcm_core.report.values import MISSING
from tcm_core.tracking.tracker import read_metrics

REPO = Path(__file__).resolve().parents[1]
PAPER_TEXT = REPO.parent / "shared" / "paper" / "tcm-paper.txt"
FULL_LABEL = LABEL


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """results/tiny with every run of the default scenario, mirrored into a real SQLite MLflow store."""
    root = tmp_path_factory.mktemp("reporting")
    results = root / "results" / "tiny"
    specs = build_synthetic(results)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mirror_to_mlflow(specs, uri)
    return SimpleNamespace(root=root, results=results, uri=uri, specs=specs)


@pytest.fixture(scope="session")
def full(synthetic, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    report = build_report("tiny", synthetic.results, out, synthetic.uri)
    return SimpleNamespace(report=report, out=out)


def _rows(md: str) -> list[list[str]]:
    """The cells of every Markdown table row (header and separator rows included)."""
    return [
        [c.strip() for c in line.strip().strip("|").split(" | ")] for line in md.splitlines() if line.startswith("|")
    ]


def _row(md: str, *first_cells: str) -> list[str]:
    matches = [r for r in _rows(md) if r[: len(first_cells)] == list(first_cells)]
    assert len(matches) == 1, (first_cells, matches)
    return matches[0]


def _csv(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


# ------------------------------------------------------------------------------------------ paper values


def _paper_block(text: str, start: str, end: str) -> list[list[str]]:
    block = text[text.index(start) : text.index(end, text.index(start))]
    return [line.split("\t") for line in block.splitlines() if line.count("\t") >= 3]


def _num(cell: str) -> float:
    return float(re.sub(r"[^0-9.]", "", cell))


@pytest.mark.skipif(not PAPER_TEXT.exists(), reason="paper text not beside the repository")
def test_paper_values_match_the_paper_text():
    text = PAPER_TEXT.read_text()
    rows = load_paper_values()
    for source, start, end in (
        ("Table 1", "Method\tNFE\tFID\t# param. (M)\nDiffusion models", "loss. We discuss"),
        ("Table 2", "Method\tNFE\tFID\t# param. (M)\nDiffusion models\t\t\t\nEDM2-S", "imposing boundary"),
    ):
        printed = sorted(
            (_num(c[1]), _num(c[2]), _num(c[3]))
            for c in _paper_block(text, start, end)
            if c[1].strip() and c[1] != "NFE"
        )
        ours = sorted((float(r.nfe), r.fid, r.params_m) for r in rows if r.source == source)
        assert ours == printed, source
    # Table 3: the t' row and the FID row, in the printed order
    t_line = next(line for line in text.splitlines() if line.startswith("t' value\t"))
    f_line = text.splitlines()[text.splitlines().index(t_line) + 1]
    printed3 = dict(zip(map(float, t_line.split("\t")[1:]), map(float, f_line.split("\t")[1:])))
    assert printed3 == {0.17: 2.70, 0.8: 2.69, 1.0: 2.56, 1.5: 2.79}
    ours3 = {float(r.setting.split("=")[1]): r.fid for r in rows if r.source == "Table 3"}
    assert ours3 == printed3
    stages = text[text.index("Table 4: CIFAR-10 FID") :].splitlines()
    printed4 = [float(v) for v in next(line for line in stages if line.startswith("FID\t")).split("\t")[1:]]
    assert [r.fid for r in rows if r.key.startswith("t4_stage_")] == printed4 == [2.77, 2.46, 2.46]


@pytest.mark.skipif(not PAPER_TEXT.exists(), reason="paper text not beside the repository")
def test_appendix_b_values_match_the_paper_text():
    sentence = next(line for line in PAPER_TEXT.read_text().splitlines() if "intermedate training stage" in line)
    keyed = {r.key: r for r in load_paper_values() if r.key.startswith("t6_")}
    assert "from 1.51 to 1.43" in sentence and "FID of >2.7" in sentence and "FID of 2.61" in sentence
    assert {k: r.fid for k, r in keyed.items()} == {"t6_dfid_stage1": 1.51, "t6_dfid_finetuned": 1.43,
                                                    "t6_default": 2.61, "t6_finetuned_boundary": 2.7}
    assert keyed["t6_finetuned_boundary"].note.startswith("lower bound")


def test_paper_values_have_a_source_and_the_compared_rows():
    rows = load_paper_values()
    assert all(r.source for r in rows)
    keyed = {r.key: r.fid for r in rows if r.key}
    assert keyed["t1_tcm_1"] == 2.46 and keyed["t1_tcm_2"] == 2.05
    assert keyed["t2_tcm_s_1"] == 2.88 and keyed["t2_tcm_s_2"] == 2.31
    assert keyed["t2_tcm_xl_1"] == 2.20 and keyed["t2_tcm_xl_2"] == 1.62
    methods = {r.method for r in rows}
    assert {"ECM (Geng et al. 2024)", "iCT (Song & Dhariwal 2023)", "TCM (ours)"} <= methods


# ------------------------------------------------------------------------------------------ tables


def test_table1_shows_ours_and_the_paper_without_a_difference_of_other_metrics(full):
    md = (full.out / "tables" / "table1_cifar10.md").read_text()
    assert DELTA not in md.split("## Baselines")[0].replace("No " + DELTA, "")  # LeNet on MNIST vs Inception
    assert f"No {DELTA} column" in md
    tcm1 = _row(md, "TCM (Stage 2)", "1")
    assert tcm1[2:4] == [f"{Scenario().stage2_final:.2f}", "2.46"]
    assert tcm1[6] == FULL_LABEL
    tcm2 = _row(md, "TCM (Stage 2)", "2")
    assert tcm2[2:4] == [f"{Scenario().stage2_final * 0.8:.2f}", "2.05"]
    assert _row(md, "Stage 1 (standard consistency training)", "1")[3] == "2.77"  # Table 4's Stage 1
    assert f"Our metric: **{FULL_LABEL}**" in md
    # baselines are quoted and labelled as such
    assert _row(md, "ECM (Geng et al. 2024) [quoted]", "1")[2] == "3.60"
    quoted = [r for r in _csv(full.out / "tables" / "table1_cifar10.csv") if r["kind"] == "quoted from paper"]
    assert {"iCT (Song & Dhariwal 2023) [quoted]", "ECM (Geng et al. 2024) [quoted]"} <= {r["Method"] for r in quoted}


def test_table1_counts_our_parameters_from_the_checkpoint_arch(full):
    from tcm_core.networks import arch_preset, build_precond, count_parameters

    expected = count_parameters(build_precond(arch_preset("tiny")))
    assert 1e5 < expected < 1e7
    md = (full.out / "tables" / "table1_cifar10.md").read_text()
    assert _row(md, "TCM (Stage 2)", "1")[4] == f"{expected / 1e6:.2f}"
    assert _row(md, "TCM (Stage 2)", "1")[5] == "55.7"


def test_table2_on_a_non_imagenet_preset_has_no_measured_value(full):
    md = (full.out / "tables" / "table2_imagenet64.md").read_text()
    row = _row(md, "TCM (EDM2-S)", "1")
    assert row[2] == MISSING and row[3] == "2.88" and row[4] == MISSING and DELTA not in _rows(md)[0]
    assert _row(md, "TCM (EDM2-XL)", "2")[3] == "1.62"


def test_tables_3_and_4(full):
    md3 = (full.out / "tables" / "table3_tprime.md").read_text()
    assert _row(md3, "t' = 1")[1:3] == ["25.00", "2.56"] and DELTA not in _rows(md3)[0]
    assert _row(md3, "t' = 0.17")[1:3] == [MISSING, "2.70"]  # paper value, not run here
    assert _row(md3, "t' = 2")[1:3] == ["27.00", MISSING]  # run here, not in the paper
    md4 = (full.out / "tables" / "table4_stages.md").read_text()
    assert _row(md4, "Stage 3")[1:3] == ["19.50", "2.46"]
    csv4 = _csv(full.out / "tables" / "table4_stages.csv")
    assert [r["FID (paper)"] for r in csv4] == ["2.77", "2.46", "2.46"]


def test_table5_shows_the_cd_arm_beside_the_papers_mscoco_numbers_without_a_delta(full):
    md = (full.out / "tables" / "table5_distillation.md").read_text()
    header = _rows(md)[0]
    assert not any("Δ" in cell for cell in header)
    s1 = _row(md, "Stage 1 (consistency distillation)", "1")
    s2 = _row(md, "TCM Stage 2 (consistency distillation)", "1")
    control = _row(md, "Stage 1 continued (CD control)", "1")
    # Stage 1 is one run; the control and Stage 2 show the mean over 3 training seeds (seed j: +0.2 j / -0.1 j)
    assert s1[2:9] == [f"{DISTILL_FIDS['stage1']:.2f}", "1", MISSING, FULL_LABEL, "1.5", "heun", "18.32"]
    s2_seeds, control_seeds = [38.0, 38.2, 38.4], [43.0, 42.9, 42.8]
    assert s2[2:9] == [f"{sum(s2_seeds) / 3:.2f}", "3", "seed 0: 38.00; seed 1: 38.20; seed 2: 38.40", FULL_LABEL,
                       "1.5", "heun", "16.07"]
    assert control[2:5] == [f"{sum(control_seeds) / 3:.2f}", "3", "seed 0: 43.00; seed 1: 42.90; seed 2: 42.80"]
    assert control[8] == MISSING
    assert s1[10] == "16 × 400" and s2[10] == control[10] == "16 × 400"  # each run's batch and iterations (params)
    assert _row(md, "TCM Stage 2 (consistency distillation)", "2")[2:5] == [f"{DISTILL_FIDS['stage2'] * 0.8:.2f}",
                                                                           "1", MISSING]  # seed 0's 2-step FID
    # the paired difference Stage 2 − control: d = -5.0, -4.7, -4.4, mean -4.7 ± t(0.975, 2) 4.303 x 0.3 / √3
    diff = _row(md, "TCM Stage 2 − CD control (paired by seed, claim S5)", "1")
    assert diff[2:5] == ["-4.7 [-5.45, -3.95]", "3", "seed 0: -5.00; seed 1: -4.70; seed 2: -4.40"]
    assert "over 3 training seed(s): -4.7 [-5.45, -3.95]" in md and "verdict: **holds**" in md
    s5 = next(c for c in full.report.claims if c.cid == "S5")
    assert (s5.interval, s5.verdict, s5.seeds) == (diff[2], "holds", 3)  # the same numbers as claim S5
    assert "A different data set, teacher and metric" in md and "MSCOCO" in md
    assert "ours 45.00 → 38.20; paper 18.32 → 16.07" in md
    # the CT tables never show the distillation arm's numbers
    for name in ("table1_cifar10", "table4_stages"):
        text = (full.out / "tables" / f"{name}.md").read_text()
        assert not any(f"{v:.2f}" in text for v in DISTILL_FIDS.values()), name
    csv5 = _csv(full.out / "tables" / "table5_distillation.csv")
    assert [r["FID (paper, MSCOCO)"] for r in csv5] == ["18.32", MISSING, MISSING, MISSING, "16.07", MISSING, MISSING]
    assert [r["training seeds"] for r in csv5] == ["1", "1", "3", "1", "3", "1", "3"]


def test_table5_and_claim_s5_with_one_training_seed_are_inconclusive(tmp_path):
    results = tmp_path / "results" / "tiny"
    build_synthetic(results, scenario=Scenario(seeds=1, ablations=False))
    report = build_report("tiny", results, tmp_path / "out", tracking_uri=None, figures=False)
    s5 = next(c for c in report.claims if c.cid == "S5")
    assert (s5.verdict, s5.seeds, s5.interval) == ("inconclusive", 1, "-5 (1 seed, no interval)")
    assert s5.measured == "seed 0: 38 vs 43" and "Table 5" in s5.paper and "MSCOCO" in s5.paper
    md = (tmp_path / "out" / "tables" / "table5_distillation.md").read_text()
    assert _row(md, "TCM Stage 2 (consistency distillation)", "1")[2:5] == ["38.00", "1", "seed 0: 38.00"]
    diff = _row(md, "TCM Stage 2 − CD control (paired by seed, claim S5)", "1")
    assert diff[2:4] == ["-5 (1 seed, no interval)", "1"] and "verdict: **inconclusive**" in md


def test_training_seeds_reports_the_first_k_seeds_as_a_study_of_k_would(tmp_path):
    """`tables --training-seeds K` (paper_tables' K beside a longer study's seeds in one folder): the claims and
    tables equal those of a folder that holds only those K seeds; without it every seed found counts."""
    three, two = tmp_path / "three" / "results" / "tiny", tmp_path / "two" / "results" / "tiny"
    build_synthetic(three, scenario=Scenario(seeds=3))
    build_synthetic(two, scenario=Scenario(seeds=2))
    cut = build_report("tiny", three, tmp_path / "cut", tracking_uri=None, figures=False, training_seeds=2)
    alone = build_report("tiny", two, tmp_path / "alone", tracking_uri=None, figures=False)
    every = build_report("tiny", three, tmp_path / "every", tracking_uri=None, figures=False)

    def rows(report):
        return [(c.cid, c.verdict, c.seeds, c.interval, c.mde, c.measured) for c in report.claims]

    assert rows(cut) == rows(alone) and {c.seeds for c in cut.claims if c.cid in ("S1", "S5")} == {2}
    assert {c.seeds for c in every.claims if c.cid in ("S1", "S5")} == {3}
    for name in ("claims.csv", "table5_distillation.csv", "table6_intermediate.csv", "table3_tprime.csv"):
        assert (tmp_path / "cut" / "tables" / name).read_text() == (tmp_path / "alone" / "tables" / name).read_text()
    assert not any(r.seed_index >= 2 for r in cut.results.runs)
    assert every.results.evaluations != cut.results.evaluations  # and no evaluation of a seed left out:
    assert not any(split_seed(e.target)[1] >= 2 for e in cut.results.evaluations if e.target)
    assert "training seeds 0 .. 1 of each arm (--training-seeds 2)" in cut.results.notes


def test_training_seeds_below_one_is_one_error_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tcm_core", "tables", "--preset", "tiny", "--results",
                           str(tmp_path / "results"), "--out", str(tmp_path / "out"), "--training-seeds", "0"],
                          capture_output=True, text=True, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "tcm: error: tables: --training-seeds 0: give K >= 1 (the target's training_seeds)"], proc.stderr
    assert not (tmp_path / "out").exists()


def test_table5_without_a_distillation_arm_says_so(tmp_path):
    results = tmp_path / "results" / "tiny"
    build_synthetic(results, scenario=Scenario(distill={}, ablations=False))
    build_report("tiny", results, tmp_path / "out", tracking_uri=None, figures=False)
    md = (tmp_path / "out" / "tables" / "table5_distillation.md").read_text()
    assert _row(md, "Stage 1 (consistency distillation)", "1")[2] == MISSING
    assert _row(md, "TCM Stage 2 − CD control (paired by seed, claim S5)", "1")[2:4] == [MISSING, MISSING]
    assert "has no distillation run yet" in md and "verdict: **not measured**" in md


def test_table6_shows_the_intermediate_arm_with_claim_s6s_numbers(full):
    md = (full.out / "tables" / "table6_intermediate.md").read_text()
    before = _row(md, "f_θ0 (Stage 1), before the intermediate stage", "dFID_t' (t' = 1)")
    after = _row(md, "f_θ0' (fine-tuned on [t_min, t'))", "dFID_t' (t' = 1)")
    assert before[2:7] == ["2.50", "1", MISSING, MISSING, "1.51"] and before[9] == "stage1:tiny:stage1"
    # seed j: 2.2 - 0.1 j, each minus the one Stage-1 value 2.5: -0.3, -0.4, -0.5 -> -0.4 ± 4.303 x 0.1 / √3
    assert after[2:7] == ["2.10", "3", "seed 0: 2.20; seed 1: 2.10; seed 2: 2.00", "-0.4 [-0.648, -0.152]", "1.43"]
    default = _row(md, "Stage 2, default: boundary f_θ0, init f_θ0", "1-step FID")
    assert default[2:7] == ["25.20", "3", "seed 0: 25.00; seed 1: 25.20; seed 2: 25.40", MISSING, "2.61"]
    assert default[9].startswith("stage2:tiny:stage2/ablation/t_prime~1.0/rho~0.25/w_b~0.1/")  # the grid centre
    for variant, fid in (("init f_θ0 (Stage 1)", 27.25), ("init f_θ0' (fine-tuned)", 27.75)):
        row = _row(md, f"Stage 2, boundary f_θ0' (fine-tuned), {variant}", "1-step FID")
        assert row[2:4] == [f"{fid + 0.2:.2f}", "3"] and row[6] == "> 2.70", row
        assert row[5] == f"{fid - 25.0:+.3g} [{fid - 25.0:+.3g}, {fid - 25.0:+.3g}]", row  # d_j constant: no spread
    assert "200 (it 500 → 700)" in _row(md, "Stage 2, boundary f_θ0' (fine-tuned), init f_θ0' (fine-tuned)",
                                        "1-step FID")[8]  # from the fine-tuned network: K = 100 iterations on top
    s6 = next(c for c in full.report.claims if c.cid == "S6")
    assert s6.verdict == "holds" and s6.seeds == 3 and s6.interval.startswith(f"dFID_t' {after[5]}; ")
    assert "seed 0: 2.2 vs 2.5" in s6.measured and "App. B" in s6.paper
    csv6 = _csv(full.out / "tables" / "table6_intermediate.csv")
    assert [r["paper"] for r in csv6] == ["1.51", "1.43", "2.61", "> 2.70", "> 2.70"]


def test_claim_s6_with_one_seed_is_inconclusive_and_without_the_arm_not_measured(tmp_path):
    results = tmp_path / "one" / "results" / "tiny"
    build_synthetic(results, scenario=Scenario(seeds=1))
    s6 = next(c for c in build_report("tiny", results, tmp_path / "out1", None, figures=False).claims if c.cid == "S6")
    assert (s6.verdict, s6.seeds) == ("inconclusive", 1) and "1 seed, no interval" in s6.interval
    results = tmp_path / "none" / "results" / "tiny"
    build_synthetic(results, scenario=Scenario(intermediate=False))
    report = build_report("tiny", results, tmp_path / "out2", None, figures=False)
    s6 = next(c for c in report.claims if c.cid == "S6")
    assert s6.verdict == "not measured" and "dFID_t' before and after" in s6.measured
    md = (tmp_path / "out2" / "tables" / "table6_intermediate.md").read_text()
    assert _row(md, "f_θ0' (fine-tuned on [t_min, t'))")[1:3] == [f"dFID_t' (t' = {MISSING})", MISSING]


def test_missing_runs_show_a_dash_and_no_invented_number(tmp_path):
    results = tmp_path / "results" / "tiny"
    no_cd_stage2 = {k: v for k, v in DISTILL_FIDS.items() if k != "stage2"}
    build_synthetic(results, scenario=Scenario(skip_stages=("stage2", "stage3"), ablations=False, distill=no_cd_stage2))
    report = build_report("tiny", results, tmp_path / "out", tracking_uri=None)
    md = (tmp_path / "out" / "tables" / "table1_cifar10.md").read_text()
    for nfe in ("1", "2"):
        row = _row(md, "TCM (Stage 2)", nfe)
        assert row[2] == MISSING and row[4] == MISSING and row[6] == MISSING and row[8] == MISSING
    md3 = (tmp_path / "out" / "tables" / "table3_tprime.md").read_text()
    assert all(r[1] == MISSING for r in _rows(md3)[2:])
    assert {c.cid: c.verdict for c in report.claims} == {f"S{i}": "not measured" for i in range(1, 7)}
    md5 = (tmp_path / "out" / "tables" / "table5_distillation.md").read_text()
    assert _row(md5, "TCM Stage 2 (consistency distillation)", "1")[2:5] == [MISSING] * 3
    assert _row(md5, "Stage 1 continued (CD control)", "1")[2:5] == ["43.00", "1", MISSING]  # seed 0, unpaired
    assert {"fig4b_fid_sigma_nu", "fig4c_fid_rho_wb"} <= set(report.empty_figures)
    assert "fig1b_fid_stages" not in report.empty_figures  # Stage 1 curves are still there


def test_an_evaluated_checkpoint_without_training_run_is_reported(tmp_path):
    """imagenet64_xl: Stage 1 is the downloaded ECM-XL checkpoint, evaluated but not trained here."""
    results = tmp_path / "results" / "imagenet64_xl"
    build_synthetic(results, preset="imagenet64_xl", scenario=Scenario(ablations=False))
    for name in ("config.json", "metrics.jsonl", "params.json", "network.json"):
        (results / "stage1" / name).unlink()
    report = build_report("imagenet64_xl", results, tmp_path / "out", tracking_uri=None, figures=False)
    md = (tmp_path / "out" / "tables" / "table2_imagenet64.md").read_text()
    assert _row(md, "Stage 1 (EDM2-XL)", "1")[2] == "40.00"
    assert _row(md, "TCM (EDM2-XL)", "1")[2:4] == [f"{Scenario().stage2_final:.2f}", "2.20"]
    assert _row(md, "TCM (EDM2-S)", "1")[2] == MISSING  # measured by preset imagenet64_s, not this one
    assert report.results.main_run("stage1").histories == {}


def test_output_files_lists_exactly_what_is_written(full):
    declared = output_files(full.out)
    assert sorted(declared["tables"] + declared["figures"]) == sorted(str(p) for p in full.report.files)


# ------------------------------------------------------------------------------------------ figures


def _check_png(path: Path, min_bytes: int) -> None:
    assert path.stat().st_size > min_bytes, (path, path.stat().st_size)
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (
            int(figures.FIG_SIZE_IN[0] * figures.FIG_DPI),
            int(figures.FIG_SIZE_IN[1] * figures.FIG_DPI),
        )


def test_figures_are_sane_pngs(full):
    assert full.report.empty_figures == []
    for name in figures.FIGURES:
        _check_png(full.out / "figures" / f"{name}.png", 20_000)


def test_figures_without_data_say_so_and_are_still_pngs(tmp_path):
    report = build_report("tiny", tmp_path / "nothing", tmp_path / "out", tracking_uri=None)
    # Fig. 4a is analytic (the paper's three (sigma, nu) cases); every other figure has no run to show
    assert sorted(report.empty_figures) == sorted(set(figures.FIGURES) - {"fig4a_time_density"})
    for name in figures.FIGURES:
        _check_png(tmp_path / "out" / "figures" / f"{name}.png", 5_000)
    summary = format_summary(report, 0.0)
    assert "figures with no data yet: " in summary and "fig7_grad_norm" in summary


# ------------------------------------------------------------------------------------------ claims


def test_claims_hold_on_the_default_scenario(full):
    verdicts = {c.cid: c.verdict for c in full.report.claims}
    assert verdicts == {"S1": "holds", "S2": "holds", "S3": "holds", "S4": "holds", "S5": "holds", "S6": "holds"}
    md = (full.out / "tables" / "claims.md").read_text()
    assert "ratio 3.60" in _row(md, "S3")[4]
    assert "> 2x the FID" in _row(md, "S3")[2]  # "explodes" is defined in the table itself


def test_every_measured_claim_prints_its_minimum_detectable_effect(full):
    """The MDE column is there and filled for every claim (issue 28). S1: d_j = FID(Stage 2_j) − FID(control_j) with
    seed jitters +0.2 j and −0.1 j, so sd(d) = 0.3 over 3 seeds; d/sd at 80 % power, K = 3, one-sided 0.025:
    3.2640 (noncentral t, tests/test_confidence.py) -> MDE 0.979, 3 % of the control's mean 30 − 0.1 = 29.9."""
    rows = {r["claim"]: r for r in _csv(full.out / "tables" / "claims.csv")}
    assert all(row[MDE_COLUMN] not in ("", MISSING) for row in rows.values()), rows
    assert rows["S1"][MDE_COLUMN] == "0.979 (3% of the control's mean FID 29.9)"
    assert rows["S5"][MDE_COLUMN].startswith("0.979 (2% of the CD control's mean FID 42.9)")
    assert rows["S6"][MDE_COLUMN].startswith("dFID_t' 0.326; FID init_stage1 ")  # after_j spread 0.1
    md = (full.out / "tables" / "claims.md").read_text()
    assert MDE_COLUMN in _rows(md)[0] and "minimum detectable effect" in md
    assert "MDE 0.979" in format_summary(full.report, 1.0)


def test_stage1_at_the_split_line_reads_the_last_quarter_of_its_curve(full):
    """Issue 28's regime line: the synthetic Stage 1 falls linearly 80 -> 40 over iterations 0-400, evaluated every
    100, so its last 25 % (300 -> 400) improved 1-step FID by (50 − 40) / 50 = 20 %: not plateaued (limit 10 %)."""
    from tcm_core.report.claims import stage1_at_split

    regime = stage1_at_split(full.report.results)
    assert (regime.first, regime.tail_start, regime.split) == (0, 300, 400)
    assert regime.improvement == pytest.approx(0.2) and regime.tail_share == 0.25 and not regime.plateaued
    line = ("Stage 1 at the split: the last 25% of its iterations (300 -> 400) improved 1-step FID by 20.0% "
            "(50.00 -> 40.00; periodic")
    assert line in (full.out / "tables" / "claims.md").read_text()
    assert line in format_summary(full.report, 1.0) and "NOT plateaued" in format_summary(full.report, 1.0)


def test_stage1_at_the_split_uses_the_last_point_before_the_tail_and_says_its_share():
    """Points at 0, 80, ..., 400 (6 points): none at 300, so the comparison starts at 240 and says 40 %; a curve
    flat within 10 % over it is plateaued; no curve: not measured."""
    from tcm_core.report.claims import split_line, stage1_at_split
    from tcm_core.report.results import Results, TrainingRun

    fids = {0: 90.0, 80: 40.0, 160: 25.0, 240: 21.0, 320: 20.5, 400: 20.0}
    run = TrainingRun("stage1:tiny:stage1", "stage1", "main", histories={"periodic/fid_1step": list(fids.items())})
    regime = stage1_at_split(Results("tiny", [run], []))
    assert (regime.tail_start, regime.tail_share, regime.fid_tail_start) == (240, 0.4, 21.0)
    assert regime.improvement == pytest.approx(1 / 21) and regime.plateaued
    assert "the last 40% of its iterations (240 -> 400) improved 1-step FID by 4.8%" in split_line(
        Results("tiny", [run], []))
    assert "; plateaued (limit 10%)" in split_line(Results("tiny", [run], []))
    assert split_line(Results("tiny", [], [])).endswith("(not measured)")


def test_power_table_of_the_synthetic_study(full):
    """S1 and S5 on the synthetic runs: sd(d) = 0.3 over 3 seeds (jitters +0.2 j and −0.1 j), MDE 0.979 at K = 3,
    3 % of the control's 29.9: 2 seeds already reach 15 %; with σ_eval = 0.1 per arm, σ_train = sqrt(0.07)."""
    from tcm_core.report.power import power_rows, power_table

    rows = {r.claim: r for r in power_rows(full.report.results, {"S1": (0.1, 0.1)})}
    assert set(rows) == {"S1", "S5"} and rows["S1"].seeds == 3
    assert rows["S1"].sd_difference == pytest.approx(0.3) and rows["S1"].control_mean == pytest.approx(29.9)
    assert rows["S1"].train_sd == pytest.approx(math.sqrt(0.07)) and rows["S5"].eval_sd is None
    md = power_table(list(rows.values()), 1000).markdown()
    assert "| S1 | 3 | 0.3 | 0.1, 0.1 | 0.265 | 29.9 | 0.979 (3%) | 2 | 2 |" in md, md


def test_mid_t_sweep_table_and_figure(tmp_path):
    """The sweep JSONs of two arms: the table lays every middle time out as a column ("below t'" where Stage 2 was
    not swept), names each arm's best beside its 2-step FID at eval.mid_t and its 1-step FID; the figure draws it."""
    from tcm_core.evaluation.mid_t_sweep import SWEEP_METRIC

    results = tmp_path / "results" / "tiny"
    build_synthetic(results, scenario=Scenario(ablations=False, intermediate=False))
    sweeps = {"stage2/main": ([1.0, 2.0, 5.0], [31.0, 27.5, 29.0], [0.5]),
              "stage1_continued": ([0.5, 1.0, 2.0, 5.0], [33.0, 30.5, 32.0, 35.0], [])}
    for run, (mid_ts, fids, skipped) in sweeps.items():
        best = min(range(len(fids)), key=fids.__getitem__)
        (results / run / "eval" / "fid_2step_sweep.json").write_text(json.dumps({
            "metric": SWEEP_METRIC, "label": "FID (LeNet features, 1000)", "mid_ts": mid_ts, "fids": fids,
            "skipped_below_t_prime": skipped, "best_mid_t": mid_ts[best], "best": fids[best]}))
    build_report("tiny", results, tmp_path / "out", tracking_uri=None)
    md = (tmp_path / "out" / "tables" / "mid_t_sweep.md").read_text()
    assert _rows(md)[0][:5] == ["arm", "t_mid = 0.5", "t_mid = 1", "t_mid = 2", "t_mid = 5"]
    s2 = _row(md, "Stage 2 (TCM)")
    assert s2[1:7] == ["below t'", "31.00", "27.50", "29.00", "2", "27.50"] and s2[-1].endswith("stage2/main")
    control = _row(md, "Stage 1 continued (control)")
    assert control[1:7] == ["33.00", "30.50", "32.00", "35.00", "1", "30.50"]
    assert float(control[8]) == pytest.approx(Scenario().stage1_continued_final)  # its 1-step FID beside it
    assert _row(md, "CD Stage 2")[1] == "below t'" and _row(md, "Stage 1")[3] == _row(md, "Stage 1")[6]  # best at 2
    _check_png(tmp_path / "out" / "figures" / "fig_mid_t_sweep.png", 5_000)


def test_claims_that_do_not_hold_are_reported(tmp_path):
    scenario = Scenario(
        stage2_final=35.0,  # worse than Stage 1 continued (30)
        distill={"stage1": 45.0, "stage1_continued": 40.0, "stage2": 41.0},  # CD Stage 2 worse than its control
        wb001_final=45.0,  # 1.8x the centre (25): not "> 2x", so no explosion
        tprime_fids={0.5: 22.0, 1.0: 25.0, 2.0: 27.0},  # t' = 0.5 best
        dfid_below_rises=False,
        dfid_tprime=(2.5, 2.8),  # the intermediate stage made dFID_t' worse ...
        intermediate_fids={"init_stage1": 23.0, "init_finetune": 23.5},  # ... and both variants beat the centre (25)
    )
    results = tmp_path / "results" / "tiny"
    build_synthetic(results, scenario=scenario)
    report = build_report("tiny", results, tmp_path / "out", tracking_uri=None, figures=False)
    verdicts = {c.cid: c.verdict for c in report.claims}
    assert verdicts == {f"S{i}": "does not hold" for i in range(1, 7)}
    rows = {r["claim"]: r for r in _csv(tmp_path / "out" / "tables" / "claims.csv")}
    assert rows["S4"]["verdict"] == "does not hold" and "best t' = 0.5" in rows["S4"]["measured"]
    assert "ratio 1.80" in rows["S3"]["measured"]


def test_without_periodic_evaluation_curves_come_from_the_checkpoint_evaluations(tmp_path):
    """eval.every = 0 (the ci preset): no fid/dFID history, only the evaluation JSONs of final checkpoints.
    Stage 2 then starts at the Stage-1 checkpoint's evaluation and ends at its own."""
    results = tmp_path / "results" / "tiny"
    build_synthetic(results, scenario=Scenario(histories=False))
    for metrics in results.rglob("metrics.jsonl"):  # evaluations must map to runs by their folder alone
        if "eval" not in metrics.parts:
            assert "fid_1step" not in metrics.read_text()
    report = build_report("tiny", results, tmp_path / "out", tracking_uri=None)
    s2 = next(c for c in report.claims if c.cid == "S2")
    assert s2.verdict == "holds"
    assert "dFID_t0.2 +1.5" in s2.measured and "dFID_t2 -0.8" in s2.measured and "fid_1step -20" in s2.measured
    stage2 = report.results.main_run("stage2")
    assert measurements.curve(report.results, stage2, "fid_1step") == (
        [(400, 40.0), (800, Scenario().stage2_final)],
        "evaluation JSONs of checkpoints",
    )
    assert "fig1b_fid_stages" not in report.empty_figures and "fig3_dfid_stage2" not in report.empty_figures
    assert "fig4b_fid_sigma_nu" not in report.empty_figures  # final points of each (sigma, nu) run


def test_claim_s3_counts_a_non_finite_fid_as_exploded(tmp_path):
    results = tmp_path / "results" / "tiny"
    build_synthetic(results, scenario=Scenario(wb001_final=float("nan")))
    report = build_report("tiny", results, tmp_path / "out", tracking_uri=None, figures=False)
    assert next(c for c in report.claims if c.cid == "S3").verdict == "holds"


# ------------------------------------------------------------------------------------------ MLflow


def test_mlflow_fills_in_missing_files_and_is_cross_checked(synthetic, tmp_path):
    results = tmp_path / "results" / "tiny"
    shutil.copytree(synthetic.results, results)
    shutil.rmtree(results / "stage2" / "main")  # only MLflow knows this run now
    metrics = results / "stage1" / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    records[-1]["periodic/fid_1step"] += 1.0  # the files disagree with MLflow on one value
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))

    report = build_report("tiny", results, tmp_path / "out", synthetic.uri, figures=False)
    md = (tmp_path / "out" / "tables" / "table1_cifar10.md").read_text()
    row = _row(md, "TCM (Stage 2)", "1")
    assert row[2] == f"{Scenario().stage2_final:.2f}"
    assert row[6] == "FID (lenet, 5000 samples, min of 3)"  # rebuilt from the eval run's params
    stage2 = report.results.main_run("stage2")
    assert stage2.sources == {"mlflow"} and stage2.key == "stage2:tiny:stage2/main"
    crosscheck = _csv(tmp_path / "out" / "tables" / "crosscheck.csv")
    differ = [r for r in crosscheck if r["agree"] == "False"]
    assert [(r["run"], r["metric"], r["step"]) for r in differ] == [("stage1:tiny:stage1", "periodic/fid_1step", "400")]
    assert sum(r["agree"] == "True" for r in crosscheck) > 50
    assert "1 differ" in format_summary(report, 0.0)


def test_every_run_is_matched_between_files_and_mlflow(full, synthetic):
    runs = full.report.results.runs
    assert sorted(r.key for r in runs) == sorted(spec.run_key for spec in synthetic.specs)
    assert all(r.sources == {"files", "mlflow"} for r in runs)
    # evaluation tracking folders (metrics.jsonl beside fid_1step.json) are not training runs
    assert not any(".tracking" in alias for r in runs for alias in r.aliases)


def test_runs_of_another_preset_are_ignored(synthetic, tmp_path):
    report = build_report("ci", tmp_path / "empty", tmp_path / "out", synthetic.uri, figures=False)
    assert report.results.runs == [] and report.results.evaluations == []
    assert any("no run tagged tcm.preset=ci" in n for n in report.results.notes)


@pytest.mark.slow
def test_cli_prints_where_each_file_is(synthetic, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.run(
        [sys.executable, "-m", "tcm_core", "tables", "--preset", "tiny", "--results", str(synthetic.results),
         "--tracking-uri", synthetic.uri, "--out", str(out), "--no-figures"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for path in output_files(out)["tables"]:
        assert path in proc.stdout
    assert "timing:" in proc.stdout and "S1 holds" in proc.stdout


# ------------------------------------------------------------------------------------------ the real DAG

# A lean ablation grid for CI: the grid centre, one other t', w_b = 0.01 and Stage 3 (every table, figure and
# claim has data), at a batch where every rho keeps at least one boundary sample.
SMALL_GRID = """presets:
  ci:
    ablation: {batch: 8, iterations: 2, t_prime: [0.8, 1.0], rho: [0.25], w_b: [0.01, 0.1],
               sigma_nu: [[0.2, 0.01]], stages: [1, 2, 3]}
"""


_CI_COLUMN = "mean difference [95% interval]"


@pytest.fixture
def ci_workdir(request, tmp_path):
    """A workflow copy for the ci preset: a shared one when the workflow tests provide it (its main runs are
    then reused, not rerun), else a fresh one."""
    try:
        return Path(request.getfixturevalue("ci_shared_workdir"))
    except pytest.FixtureLookupError:
        from workflow_helpers import make_workdir

        return make_workdir(tmp_path / "wd")


@pytest.mark.slow
@pytest.mark.skipif(not (REPO / "Snakefile").exists(), reason="the workflow is not in this checkout")
def test_ci_paper_tables_builds_every_file_and_the_report(ci_workdir):
    import zipfile

    from workflow_helpers import snakemake, write_overlay

    write_overlay(ci_workdir / "small_grid.yaml", SMALL_GRID)
    args = ["--cores", "2", "--configfile", "config.yaml", "small_grid.yaml", "--config", "preset=ci"]
    proc = snakemake(ci_workdir, *args, "--", "paper_tables", check=True, timeout=1800)
    log = proc.stdout + proc.stderr
    out = ci_workdir / "results" / "ci"
    for path in output_files(out)["tables"]:
        assert Path(path).stat().st_size > 0, path
    for path in output_files(out)["figures"]:
        _check_png(Path(path), 5_000)
    assert "tables: preset ci" in log and "timing:" in log  # the summary reaches the console

    md1 = (out / "tables" / "table1_cifar10.md").read_text()
    tcm = _row(md1, "TCM (Stage 2)", "1")
    assert float(tcm[2]) > 0 and tcm[3] == "2.46" and tcm[6].startswith("FID (LeNet features, 32")
    md3 = (out / "tables" / "table3_tprime.md").read_text()
    assert float(_row(md3, "t' = 0.8")[1]) > 0 and float(_row(md3, "t' = 1")[1]) > 0
    assert _row(md3, "t' = 0.17")[1] == MISSING  # in the paper, not in this grid
    assert float(_row((out / "tables" / "table4_stages.md").read_text(), "Stage 3")[1]) > 0
    md6 = (out / "tables" / "table6_intermediate.md").read_text()  # the intermediate arm (App. B), 2 seeds each
    for network in ("f_θ0 (Stage 1), before the intermediate stage", "f_θ0' (fine-tuned on [t_min, t'))"):
        assert float(_row(md6, network, "dFID_t' (t' = 1)")[2]) > 0
    for variant in ("init f_θ0 (Stage 1)", "init f_θ0' (fine-tuned)"):
        row = _row(md6, f"Stage 2, boundary f_θ0' (fine-tuned), {variant}", "1-step FID")
        assert float(row[2]) > 0 and row[3] == "2" and "[" in row[5] and row[9].startswith("intermediate_stage2:"), row
    claims = {r["claim"]: r for r in _csv(out / "tables" / "claims.csv")}
    assert set(claims) == {"S1", "S2", "S3", "S4", "S5", "S6"}
    for row in claims.values():  # every claim (S5: the distillation arm, S6: the intermediate one) on 2 seeds
        assert row["verdict"] in ("holds", "does not hold", "inconclusive") and row["seeds"] == "2", row
        assert "seed 0: " in row["measured"] and "seed 1: " in row["measured"] and "[" in row[_CI_COLUMN], row
    for run in ("stage1", "stage1_continued", "stage2/main", "stage2/main/seed~1"):  # ci: 3 periodic points
        records = read_metrics(out / run / "metrics.jsonl")
        for key in ("periodic/fid_1step", "periodic/dfid_t0.5", "periodic/dfid_t4"):
            steps = [r["step"] for r in records if key in r]
            assert len(steps) == 3 and steps[0] == (0 if run == "stage1" else 6), (run, key, steps)
    crosscheck = _csv(out / "tables" / "crosscheck.csv")
    assert crosscheck and all(r["agree"] == "True" for r in crosscheck)

    from mlflow.tracking import MlflowClient

    record = json.loads((out / "mlflow.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{(out / 'mlflow.db').resolve()}")
    parent = record["parent_run_id"]
    logged = {a.path for folder in ("tables", "figures") for a in client.list_artifacts(parent, folder)}
    assert "tables/claims.md" in logged and "figures/fig1b_fid_stages.png" in logged  # on the study's parent
    assert client.get_run(parent).info.status == "FINISHED"

    # the report holds the outputs of the target's DAG: name paper_tables (the default target is `all`)
    snakemake(ci_workdir, *args, "--report", "report.zip", "--", "paper_tables", check=True, timeout=600)
    with zipfile.ZipFile(ci_workdir / "report.zip") as report:
        names = "\n".join(report.namelist())
    for name in ("fig1b_fid_stages.png", "fig4a_time_density.png", "table1_cifar10.csv", "claims.md"):
        assert name in names, name


# ------------------------------------------------------------------------------------------ released_tables


def _release_folder(root: Path, key: str, role: str, paper_row: str, steps: list[int], fids: dict[int, list[float]],
                    num: int = 50000, extractor: str = "inception", dfid: dict[str, float] | None = None) -> Path:
    """A release folder as release-check and evaluate fid|dfid write it, by hand."""
    folder = root / key
    (folder / "eval").mkdir(parents=True)
    record = {"key": key, "role": role, "paper_row": paper_row, "steps": steps, "mid_t": 1.0,
              "class_conditional": False, "dfid": dfid is not None, "sha256_pinned": "ab" * 32,
              "sha256_source": "recorded at first use", "parameter_count": 55_732_739}
    (folder / "release.json").write_text(json.dumps(record))
    for n, per_seed in fids.items():
        label = f"FID ({'Inception' if extractor == 'inception' else 'LeNet features'}, {num // 1000}k, min of 3)"
        (folder / "eval" / f"fid_{n}step.json").write_text(json.dumps(
            {"metric": f"fid_{n}step", "label": label, "extractor": extractor, "num": num, "seeds": len(per_seed),
             "per_seed": per_seed, "min": min(per_seed), "steps": [80.0, 1.0][:n]}))
    if dfid is not None:
        (folder / "eval" / "dfid.json").write_text(json.dumps(
            {"metric": "dfid", "label": "dFID (Inception, 10k)", "values": dfid, "num": 10000}))
    return folder


def test_released_table_puts_paper_ours_difference_and_matches_side_by_side(tmp_path):
    from tcm_core.report.released import MATCH_TOLERANCE_FID, MATCHES, released_table

    assert MATCH_TOLERANCE_FID == 0.1 and MATCHES == "matches (±0.1 FID)"
    folders = [
        # Stage 2: 1-step 0.06 above the paper (matches), 2-step 0.15 below it (does not: either side counts)
        _release_folder(tmp_path, "tcm_stage2", "stage2", "t1_tcm", [1, 2],
                        {1: [2.60, 2.52, 2.55], 2: [1.95, 1.90, 2.0]}, dfid={"1": 0.71, "2": 1.5}),
        # Stage 1 measured at 10k samples: not the paper's metric, so no difference and no verdict
        _release_folder(tmp_path, "ect_stage1", "stage1", "t1_ecm", [1, 2], {1: [3.9, 3.8, 4.0], 2: [2.2, 2.3, 2.25]},
                        num=10000),
        # the teacher: dFID only; the paper's 35-step FID has no measurement of ours
        _release_folder(tmp_path, "edm_teacher", "teacher", "t1_edm", [], {}, dfid={"1": 0.2}),
    ]
    table = released_table("cifar10", folders)
    md = table.markdown()
    header = _rows(md)[0]
    assert header[:8] == ["release", "role", "NFE", "metric", "paper", "ours", "difference (ours − paper)", MATCHES]
    assert _row(md, "tcm_stage2", "TCM Stage 2", "1", "FID")[4:8] == ["2.46", "2.52", "+0.06", "yes"]  # min of 3
    assert _row(md, "tcm_stage2", "TCM Stage 2", "2", "FID")[4:8] == ["2.05", "1.90", "-0.15", "no"]
    assert _row(md, "ect_stage1", "Stage 1 (ECT/ECM)", "1", "FID")[4:8] == ["3.60", "3.80", MISSING,
                                                                          "n/a (not the paper's metric)"]
    teacher = _row(md, "edm_teacher", "teacher (diffusion)", "35", "FID")
    assert teacher[4:8] == ["1.97", MISSING, MISSING, MISSING] and teacher[8].startswith("not measured")
    assert _row(md, "tcm_stage2", "TCM Stage 2", "1", "dFID_t (t = 2)")[4:6] == [MISSING, "1.50"]
    assert _row(md, "edm_teacher", "teacher (diffusion)", "1", "dFID_t (t = 1)")[5] == "0.20"
    assert "55.7 / 55.7" in _row(md, "tcm_stage2", "TCM Stage 2", "1", "FID")[10]
    assert "|ours − paper| <= 0.1 FID" in md
    rows = list(csv.DictReader(io.StringIO(table.csv_text())))
    assert {(r["release"], r["NFE"], r["metric"]) for r in rows} >= {("tcm_stage2", "1", "FID"),
                                                                   ("edm_teacher", "35", "FID")}


def test_released_table_on_imagenet_compares_table_2():
    from tcm_core.report.released import released_table

    with __import__("tempfile").TemporaryDirectory() as tmp:
        folder = _release_folder(Path(tmp), "tcm_stage2", "stage2", "t2_tcm_s", [1, 2], {1: [2.93, 2.95, 2.97],
                                                                                      2: [2.31, 2.4, 2.35]})
        md = released_table("imagenet64_s", [folder]).markdown()
    assert _row(md, "tcm_stage2", "TCM Stage 2", "1", "FID")[4:8] == ["2.88", "2.93", "+0.05", "yes"]
    assert _row(md, "tcm_stage2", "TCM Stage 2", "2", "FID")[4:8] == ["2.31", "2.31", "+0.00", "yes"]
    assert "Table 2" in _row(md, "tcm_stage2", "TCM Stage 2", "1", "FID")[9]
