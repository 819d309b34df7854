"""Workflow dry runs: every target of every preset plans the expected jobs; bad configs fail early."""

from __future__ import annotations

import shlex

import pytest

from tests.workflow_helpers import REPO, job_counts, make_workdir, snakemake, write_overlay

pytestmark = pytest.mark.slow

EVALS_MAIN = {"evaluate_network": 3}  # 3 runs, one job each: 1/2-step FID, their 2 grids, 2 dFID sweeps
OWN_PRETRAIN = {"mlflow_init": 1, "prepare_dataset": 1, "pretrain_edm": 1, "train_feature_net": 1,
                "reference_stats": 1}
TRAIN_MAIN = {"stage1": 1, "stage1_continued": 1, "stage2": 1}
# 14 distinct ablation points (baseline + 3 t' + 8 rho x w_b + 2 (sigma, nu)) + the main Stage-2 run
# the main runs' 1- and 2-step FIDs; the 1-step FID (Tables 3, 4, Fig. 4) of each ablation point and Stage 3;
# the intermediate arm (App. B): the fine-tuning, its 2 Stage-2 variants with their 1-step FIDs, and dFID_t' of
# Stage 1's network and of the fine-tuned one (before / after)
INTERMEDIATE = {"intermediate": 1, "intermediate_stage2": 2}
ABLATIONS = {"stage2": 15, "stage3": 1, "fid": 14 + 1 + 2, "dfid": 2, **INTERMEDIATE}

EXPECTED = {
    ("tiny", "all"): {**OWN_PRETRAIN, **TRAIN_MAIN, **EVALS_MAIN, "all": 1},
    ("ci", "all"): {**OWN_PRETRAIN, **TRAIN_MAIN, **EVALS_MAIN, "all": 1},
    ("ci", "all_ablations"): {**OWN_PRETRAIN, **TRAIN_MAIN, **EVALS_MAIN, **ABLATIONS, "all_ablations": 1},
    ("cifar10", "all"): {"fetch_checkpoint": 1, "fetch_dataset": 1, "mlflow_init": 1, "prepare_dataset": 1,
                         "reference_stats": 1, **TRAIN_MAIN, **EVALS_MAIN, "all": 1},
    ("cifar10", "all_ablations"): {"fetch_checkpoint": 1, "fetch_dataset": 1, "mlflow_init": 1,
                                   "prepare_dataset": 1, "reference_stats": 1, **TRAIN_MAIN, **EVALS_MAIN,
                                   **ABLATIONS, "all_ablations": 1},
    ("imagenet64_s", "all"): {"fetch_checkpoint": 1, "mlflow_init": 1, "reference_stats": 1, **TRAIN_MAIN,
                              **EVALS_MAIN, "all": 1},
    ("imagenet64_s", "all_ablations"): {"fetch_checkpoint": 1, "mlflow_init": 1, "reference_stats": 1,
                                        **TRAIN_MAIN, **EVALS_MAIN, **ABLATIONS, "all_ablations": 1},
    # XL: Stage 1 is the given ECM-XL checkpoint, so there is no stage1 job
    ("imagenet64_xl", "all"): {"mlflow_init": 1, "reference_stats": 1, "stage1_continued": 1, "stage2": 1,
                               **EVALS_MAIN, "all": 1},
    ("imagenet64_xl", "all_ablations"): {"mlflow_init": 1, "reference_stats": 1, "stage1_continued": 1,
                                         **EVALS_MAIN, **ABLATIONS, "all_ablations": 1},
}


DISTILL = {"cd_stage1": 1, "cd_stage1_continued": 1, "cd_stage2": 1, "evaluate_distill_network": 3}  # 2 FIDs + grid
CIFAR_SOURCES = {"fetch_checkpoint": 1, "fetch_dataset": 1, "mlflow_init": 1, "prepare_dataset": 1,
                 "reference_stats": 1}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    wd = make_workdir(tmp_path_factory.mktemp("wf"))
    # ImageNet has no converter here: the presets take an existing dataset (and XL the ECM-XL checkpoint)
    (wd / "imagenet64.zip").write_bytes(b"")
    (wd / "ecm-xl.pkl").write_bytes(b"")
    write_overlay(
        wd / "imagenet.yaml",
        "presets:\n"
        "  imagenet64_s: {dataset: {path: imagenet64.zip}}\n"
        "  imagenet64_xl: {dataset: {path: imagenet64.zip}, init: {kind: path, path: ecm-xl.pkl, provides: stage1}}\n",
    )
    return wd


@pytest.mark.parametrize(("preset", "target"), sorted(EXPECTED))
def test_planned_jobs(workdir, preset, target):
    args = ["-n", "-p", "--config", f"preset={preset}"]
    if preset.startswith("imagenet"):
        args += ["--configfile", "config.yaml", "imagenet.yaml"]
    out = snakemake(workdir, *args, "--", target, check=True).stdout
    assert job_counts(out) == EXPECTED[(preset, target)]
    assert f"results/{preset}/_state/" in out  # training state outside the declared outputs
    if preset in ("tiny", "ci"):
        assert "torchrun" not in out and "--device cpu" in out
    else:
        assert "torchrun --standalone --nproc_per_node 8 -m tcm_core train" in out
    if target == "all_ablations":
        # ablation points train at the ablation batch; the main run does not
        batch = {"tiny": 16, "ci": 10}.get(preset, 128)
        assert "stage2/ablation/t_prime~0.17/rho~0.25/w_b~0.1/student_sigma~0.2/student_nu~0.01" in out
        assert f" batch={batch} " in out
        # the intermediate arm (App. B): Stage 1's state continued; XL has none, so the named variant restarts
        finetune = next(x for x in out.splitlines() if "--mode intermediate " in x)
        foreign = preset == "imagenet64_xl"
        assert (" control=ema_restart " in finetune) == foreign and ("--init-state " in finetune) != foreign
        assert f"results/{preset}/stage1/eval/dfid_tprime.json" in out  # dFID_t' before the fine-tuning


RELEASE_TABLES = {"mlflow_init": 1, "reference_stats": 1, "released_table": 1, "released_tables": 1}
# per preset: the release jobs (release_check each, fid per NFE, dfid each) and the data the FIDs need
RELEASED = {
    "cifar10": {**RELEASE_TABLES, "fetch_dataset": 1, "prepare_dataset": 1, "release_check": 3, "fid": 4, "dfid": 3},
    "imagenet64_s": {**RELEASE_TABLES, "release_check": 2, "fid": 2, "dfid": 2},
    "imagenet64_xl": {**RELEASE_TABLES, "release_check": 3, "fid": 4, "dfid": 3},
    "tiny": {**RELEASE_TABLES, "prepare_dataset": 1, "train_feature_net": 1, "release_check": 1, "fid": 2, "dfid": 1},
}
# (release, 2-step times, paper rows the table compares): the paper's middle times (App. E), eval.mid_t
RELEASE_ROWS = {
    "cifar10": [("tcm_stage2", "80,1.0", "cifar-stage2-2.46.pkl"), ("ect_stage1", "80,1.0", "ect-cifar10.pkl")],
    "imagenet64_s": [("tcm_stage2", "80,1.526", "imgnet-stage2-edm2s-2.88.pkl")],
    "imagenet64_xl": [("tcm_stage2", "80,1.526", "tcm-img64-edm2-xl.pkl"), ("ecm_stage1", "80,1.526",
                                                                           "ect-img64-xl.pkl")],
}


@pytest.mark.parametrize("preset", sorted(RELEASED))
def test_released_tables_plans_the_papers_rows(workdir, preset):
    """No file is in place: the dry run plans every row anyway and names each missing file once."""
    args = ["-n", "-p", "--config", f"preset={preset}"]
    if preset.startswith("imagenet"):
        args += ["--configfile", "config.yaml", "imagenet.yaml"]
    rows = RELEASE_ROWS.get(preset, [])
    placed = workdir / "resources" / "releases" / rows[0][2] if rows else None
    if placed is not None:  # one file in place (a dry run reads nothing); the others are missing
        placed.parent.mkdir(parents=True, exist_ok=True)
        placed.write_bytes(b"")
    try:
        proc = snakemake(workdir, *args, "--", "released_tables", check=True)
    finally:
        if placed is not None:
            placed.unlink()
    out = proc.stdout
    assert job_counts(out) == RELEASED[preset]
    assert "train " not in out and "--target-run-key" not in out  # no training; a release has no training run
    notes = [line for line in proc.stderr.splitlines() if line.startswith("note (dry run, planned anyway)")]
    assert len(notes) == RELEASED[preset]["release_check"] - bool(rows), proc.stderr[-2000:]
    if preset == "tiny":
        assert "--extractor lenet" in out and "resources/releases/tiny-stage2.pkl" in notes[0]
        return
    assert "--num 50000 --seeds 3 --extractor inception" in out  # the paper's protocol: 50k, min of 3
    for index, (key, two_step, file) in enumerate(rows):
        fid2 = next(x for x in out.splitlines() if f"--out results/{preset}/releases/{key}/eval/fid_2step.json" in x)
        ckpt = f"resources/releases/{file}" if index == 0 else ""  # a missing file: planned without it
        assert f"--ckpt {ckpt} --steps {two_step} " in fid2, fid2
        assert '"tcm.grid": "release"' in fid2 and f"--run-key fid:{preset}:releases/{key}:2step " in fid2
        assert index == 0 or any(f"resources/releases/{file}," in n for n in notes), notes


@pytest.fixture(scope="module")
def tiny_paper_tables(workdir) -> str:
    """The plan (`-n -p`) of tiny's paper_tables, shared by the tests that read it."""
    return snakemake(workdir, "-n", "-p", "--", "paper_tables", check=True).stdout


def test_paper_tables_trains_three_seeds_of_the_claim_bearing_arms(tiny_paper_tables):
    """tiny's training_seeds {all: 1, paper_tables: 3}: the control and the main Stage 2 (both from the one Stage 1),
    the 5 ablation cells the claims read (centre, 3 other t', w_b = 0.01), the CD control and CD Stage 2 (both
    from the one CD Stage 1, claim S5), and the intermediate arm (claim S6) get seeds 1 and 2 in R/seed~j."""
    out = tiny_paper_tables
    counts = job_counts(out)
    # 106 before the intermediate arm (3 + 6 training, 6 fid, 4 dfid jobs), 125 before the middle-time sweeps (6),
    # 131 before the main networks' 18 evaluations became 3 evaluate_network jobs, 116 before the distillation arm's
    # 9 became 3 evaluate_distill_network jobs
    assert sum(counts.values()) == 110
    assert (counts["stage1"], counts["stage1_continued"], counts["stage2"]) == (1, 1 + 2, 15 + 2 * (1 + 5))
    assert (counts["cd_stage1"], counts["cd_stage1_continued"], counts["cd_stage2"]) == (1, 1 + 2, 1 + 2)
    assert (counts["intermediate"], counts["intermediate_stage2"]) == (1 + 2, 2 * (1 + 2))
    # 1- and 2-step FIDs of the main and distillation runs, 1-step of each ablation cell, Stage 3 and intermediate
    # variant, and the 1-step FID of each extra seed (2 x (2 CT arms + 5 ablation cells + 2 CD arms + 2 variants))
    assert counts["fid"] == ABLATIONS["fid"] + 2 * (2 + 5 + 2 + 2)
    assert counts["dfid"] == 1 + 3  # dFID_t' of Stage 1 and of 3 fine-tuned seeds (the main runs': evaluate_network)
    assert counts["evaluate_network"] == 3
    d = "results/tiny/distill"
    for j in (1, 2):
        for stage, rule in (("stage1_continued", "cd_stage1_continued"), ("stage2", "cd_stage2")):
            line = next(x for x in out.splitlines() if f"--out {d}/{stage}/seed~{j} " in x)
            assert f" seed={101 + j} " in line and " method=cd " in line and f'"tcm.rule": "{rule}"' in line, line
            assert f"--run-key '{rule}:tiny:distill/{stage}/seed~{j}'" in line, line
            # compared by final FIDs (S5, Table 5): no mid-run evaluation; seed 0 keeps its curves
            assert " eval_points=0 " in line and " eval_every=0 " in line, line
            seed0 = next(x for x in out.splitlines() if f"--out {d}/{stage} " in x)
            assert " eval_points=5 " in seed0, seed0
            assert f"--state-dir results/tiny/_state/distill/{stage}/seed~{j}/" in line, line
            assert f"--init {d}/stage1/network.safetensors" in line  # the one CD Stage 1
            start = f"--init-state {d}/stage1/train_state.pt" if stage == "stage1_continued" else (
                f"--boundary-model {d}/stage1/network.safetensors")
            assert start in line, line
        assert f"{d}/stage2/seed~{j}/eval/fid_1step.json" in out
    r = "results/tiny"
    for j in (1, 2):
        assert f"--out {r}/stage1_continued/seed~{j} " in out and f"--out {r}/stage2/main/seed~{j} " in out
        assert f"{r}/stage2/ablation/t_prime~1.0/rho~0.25/w_b~0.01/student_sigma~0.2/student_nu~0.01/seed~{j}" in out
    control = next(line for line in out.splitlines() if f"--out {r}/stage1_continued/seed~2 " in line)
    assert " seed=103 " in control and f"--init-state {r}/stage1/train_state.pt" in control  # Stage 1's state
    assert " eval_points=5 " in control and " eval_num=1000 " in control  # periodic: 5 points, 1000 samples
    assert f"{r}/stage2/ablation/t_prime~1.0/rho~0.1/w_b~0.1/student_sigma~0.2/student_nu~0.01/seed~1" not in out
    # periodic curves only where a figure draws them: the (sigma, nu) grid of Fig. 4b, not the t' cells
    cell = "stage2/ablation/t_prime~1.0/rho~0.25/w_b~0.1/student_sigma~{}/student_nu~{} "
    for sigma, nu, points in (("2.0", "10000.0", 5), ("0.2", "2.0", 5), ("0.2", "0.01", 5)):
        line = next(x for x in out.splitlines() if f"--out {r}/" + cell.format(sigma, nu) in x)
        assert f" eval_points={points} " in line, line
    t_cell = next(x for x in out.splitlines() if f"--out {r}/stage2/ablation/t_prime~0.17/" in x)
    assert " eval_points=0 " in t_cell and " eval_every=0 " in t_cell, t_cell
    assert "t_prime~0.17/rho~0.25/w_b~0.1/student_sigma~0.2/student_nu~0.01/eval/fid_2step.json" not in out
    assert "stage3/main/eval/fid_1step.json" in out and "stage3/main/eval/fid_2step.json" not in out


def _train_line(out: str, run: str) -> str:
    return next(x for x in out.splitlines() if f"--out {run} " in x and " tcm_core train " in x)


def _keys(line: str) -> dict[str, str]:
    """The key=value settings of a train command line (shell-quoted ones included)."""
    words = shlex.split(line.split(" tcm_core train ", 1)[1].split(" > ", 1)[0])
    return dict(w.split("=", 1) for w in words if "=" in w and not w.startswith("-"))


def test_paper_tables_sweeps_the_middle_time_of_each_arm(tiny_paper_tables):
    """One `evaluate mid-t-sweep` per main and distillation arm (seed 0), at tiny's eval.mid_t_sweep, on the arm's
    final network, with the FID protocol of its fid jobs; the tables job reads every sweep."""
    out = tiny_paper_tables
    assert job_counts(out)["mid_t_sweep"] == 6
    r = "results/tiny"
    for run in ("stage1", "stage1_continued", "stage2/main", "distill/stage1", "distill/stage1_continued",
                "distill/stage2"):
        [line] = [x for x in out.splitlines() if f"--out {r}/{run}/eval/fid_2step_sweep.json" in x]
        assert f"evaluate mid-t-sweep --ckpt {r}/{run}/network.safetensors --mid-ts 0.3,0.6,1,1.5,2,3,5,10 " in line
        assert "--num 1000 --seeds 1 --extractor lenet" in line and f"--run-key mid_t_sweep:tiny:{run}:sweep" in line
    tables_inputs = out.split("rule tables:")[1].split("input:")[1].split("\n")[0]
    assert tables_inputs.count("fid_2step_sweep.json") == 6, tables_inputs


def test_intermediate_arm_is_wired_to_the_finetuned_boundary(tiny_paper_tables):
    """Per training seed j: the intermediate stage continues Stage 1's state with seed + j; both Stage-2 variants
    take intermediate/finetune of seed j as their frozen boundary, init_stage1 starts from Stage 1's network and
    init_finetune from the fine-tuned one, and both have the grid centre's keys (its seed j) but its curves and
    with M - K of its M iterations."""
    out, r = tiny_paper_tables, "results/tiny"
    centre = "stage2/ablation/t_prime~1.0/rho~0.25/w_b~0.1/student_sigma~0.2/student_nu~0.01"
    stage1 = _keys(_train_line(out, f"{r}/stage1"))
    observability = {"eval_every", "eval_points", "iterations"}
    for j in (0, 1, 2):
        seed = "" if j == 0 else f"/seed~{j}"
        finetune = _train_line(out, f"{r}/intermediate/finetune{seed}")
        assert "--mode intermediate " in finetune and f"--init-state {r}/stage1/train_state.pt" in finetune
        assert f"--init {r}/stage1/network.safetensors" in finetune and "--boundary-model" not in finetune
        keys = _keys(finetune)
        assert (keys["t_prime"], keys["iterations"], keys.get("seed", "101"), keys["eval_points"]) == (
            "1.0", "100", str(101 + j), "0")  # seed 0: TrainConfig's default seed 101
        assert {k: v for k, v in keys.items() if k not in observability | {"t_prime", "seed"}} == {
            k: v for k, v in stage1.items() if k not in observability | {"seed"}}
        boundary = f"--boundary-model {shlex.quote(f'{r}/intermediate/finetune{seed}/network.safetensors')} "
        default = _keys(_train_line(out, f"{r}/{centre}{seed}"))
        for variant, init in (("init_stage1", f"{r}/stage1"), ("init_finetune", f"{r}/intermediate/finetune{seed}")):
            line = _train_line(out, f"{r}/intermediate/stage2_{variant}{seed}")
            assert "--mode stage2 " in line and boundary in line, line
            assert f"--init {shlex.quote(f'{init}/network.safetensors')} " in line, line
            key = shlex.quote(f"intermediate_stage2:tiny:intermediate/stage2_{variant}{seed}")
            assert f"--run-key {key} " in line and '"tcm.grid": "intermediate"' in line, line
            assert {k: v for k, v in _keys(line).items() if k not in observability} == {
                k: v for k, v in default.items() if k not in observability}
            # equal total iterations: K = 100 of the fine-tuning and M - K = 100 of the variant, the default's M = 200
            assert (_keys(line)["iterations"], default["iterations"]) == ("100", "200"), line
            assert f"{r}/intermediate/stage2_{variant}{seed}/eval/fid_1step.json" in out
        assert f"{r}/intermediate/finetune{seed}/eval/dfid_tprime.json" in out
    dfid = next(x for x in out.splitlines() if f"--out {r}/stage1/eval/dfid_tprime.json" in x)
    assert " --ts 1 " in dfid and f"--ckpt {r}/stage1/network.safetensors" in dfid  # dFID_t' before fine-tuning
    assert f"{r}/tables/table6_intermediate.md" in out and f"{r}/tables/table6_intermediate.csv" in out


@pytest.mark.parametrize("preset", ["tiny", "ci"])
def test_distillation_arm_distils_the_pretrained_teacher(workdir, preset):
    out = snakemake(workdir, "-n", "-p", "--config", f"preset={preset}", "--", "all_distillation", check=True).stdout
    assert job_counts(out) == {**OWN_PRETRAIN, **DISTILL, "all_distillation": 1}
    teacher = f"--teacher results/{preset}/pretrain/network.safetensors"
    for stage in ("stage1", "stage1_continued", "stage2"):
        line = next(x for x in out.splitlines() if f"--out results/{preset}/distill/{stage} " in x)
        solver = {"tiny": "euler", "ci": "heun"}[preset]
        assert teacher in line and f" method=cd ode_solver={solver} " in line and " guidance=1.5 " in line, line
        assert '"tcm.grid": "distill"' in line and f'"tcm.rule": "cd_{stage}"' in line
    assert f"--boundary-model results/{preset}/distill/stage1/network.safetensors" in out
    assert f"--init-state results/{preset}/distill/stage1/train_state.pt" in out
    pretrain = next(x for x in out.splitlines() if "--mode pretrain" in x)
    assert " label_dropout=0.1 " in pretrain and "label_dim: 10" in pretrain


def test_paper_tables_plans_the_distillation_arm(workdir):
    out = snakemake(workdir, "-n", "--config", "preset=ci", "--", "paper_tables", check=True).stdout
    counts = job_counts(out)
    assert {k: counts[k] for k in ("cd_stage1", "cd_stage1_continued", "cd_stage2")} == {
        "cd_stage1": 1, "cd_stage1_continued": 2, "cd_stage2": 2}  # ci's training_seeds.paper_tables: 2
    assert "results/ci/distill/stage2/seed~1/eval/fid_1step.json" in out
    assert "results/ci/tables/table5_distillation.md" in out


def test_study_trains_its_own_seed_count_and_reports_in_its_folder(workdir):
    """`study` is paper_tables at training_seeds.study for the arms of S1 and S5 (seeds 1 .. KS-1 of the control,
    Stage 2 and the CD arm's two; paper_tables' K of the other seeded arms), and its tables read KS seeds
    (--training-seeds) into results/<preset>/study; paper_tables keeps its own K."""
    write_overlay(workdir / "study.yaml", "presets:\n  ci: {training_seeds: {paper_tables: 2, study: 4}}\n")
    out = snakemake(workdir, "-n", "-p", "--configfile", "config.yaml", "study.yaml", "--config", "preset=ci",
                    "--", "study", check=True).stdout
    counts = job_counts(out)
    assert (counts["stage1_continued"], counts["cd_stage1_continued"], counts["cd_stage2"]) == (4, 4, 4)
    assert (counts["study_tables"], counts["study"]) == (1, 1) and "tables" not in counts
    for j in (1, 2, 3):
        assert f"results/ci/stage2/main/seed~{j}/eval/fid_1step.json" in out
        assert f"results/ci/distill/stage2/seed~{j}/eval/fid_1step.json" in out
    assert "results/ci/stage2/main/seed~4/" not in out
    cell = "results/ci/stage2/ablation/t_prime~1.0/rho~0.25/w_b~0.01/student_sigma~0.2/student_nu~0.01"
    assert f"{cell}/seed~1/eval/fid_1step.json" in out and f"{cell}/seed~2/" not in out  # S3's cell: K = 2
    assert "results/ci/intermediate/finetune/seed~1/" in out and "intermediate/finetune/seed~2/" not in out
    assert "--out results/ci/study --training-seeds 4 " in out and "results/ci/study/tables/claims.md" in out
    quick = snakemake(workdir, "-n", "-p", "--configfile", "config.yaml", "study.yaml", "--config", "preset=ci",
                      "--", "paper_tables", check=True).stdout
    assert "--out results/ci --training-seeds 2 " in quick and "results/ci/stage2/main/seed~2/" not in quick


def test_cifar10_distils_edms_uncond_vp_model_from_the_inits_file(workdir):
    write_overlay(workdir / "cd.yaml", "presets:\n  cifar10: {distill: {method: cd, ode_solver: heun}}\n")
    out = snakemake(workdir, "-n", "-p", "--configfile", "config.yaml", "cd.yaml", "--config", "preset=cifar10",
                    "--", "all_distillation", check=True).stdout
    assert job_counts(out) == {**CIFAR_SOURCES, **DISTILL, "all_distillation": 1}  # one fetch: teacher = init
    assert out.count("--teacher resources/checkpoints/edm-cifar10-uncond-vp") == 3
    assert "torchrun --standalone --nproc_per_node 8 -m tcm_core train --mode stage1 " in out


def test_cifar10_main_arm_by_distillation_from_a_teacher_url(workdir):
    write_overlay(workdir / "cd-main.yaml", "presets:\n  cifar10:\n"
                  "    teacher: {kind: checkpoint, name: null, url: https://example.org/models/teacher.pkl}\n"
                  "    stage1: {method: cd, ode_solver: euler}\n    stage2: {method: cd}\n")
    out = snakemake(workdir, "-n", "-p", "--configfile", "config.yaml", "cd-main.yaml", "--config",
                    "preset=cifar10", "--", "all", check=True).stdout
    assert job_counts(out) == {**CIFAR_SOURCES, "fetch_teacher": 1, **TRAIN_MAIN, **EVALS_MAIN, "all": 1}
    assert "fetch --url https://example.org/models/teacher.pkl --out resources/checkpoints/teacher.pkl" in out
    for run in ("stage1", "stage1_continued", "stage2/main"):
        line = next(x for x in out.splitlines() if f"--out results/cifar10/{run} " in x)
        assert "--teacher resources/checkpoints/teacher.pkl" in line and " method=cd " in line, line


def test_default_target_is_tiny_all(workdir):
    out = snakemake(workdir, "-n", check=True).stdout
    assert job_counts(out) == EXPECTED[("tiny", "all")]  # training_seeds.all = 1: no extra seed, no CD job
    assert "seed~" not in out and "results/tiny/distill/" not in out
    assert "results/tiny/stage2/main/network.safetensors" in out


BAD_CONFIGS = [
    ("presets:\n  ci:\n    stage2: {lrr: 1}\n", "presets.ci.stage2", "'lrr' was unexpected"),
    ("presets:\n  ci:\n    stage2: {weighting: foo}\n", "presets.ci.stage2.weighting", "inv_delta_t"),
    ("presets:\n  ci:\n    stage2: {rho: 1.5}\n", "presets.ci.stage2.rho", "maximum of 1"),
    ("presets:\n  ci:\n    ablation: {batch: 0}\n", "presets.ci.ablation.batch", "minimum of 1"),
    ("presets:\n  ci:\n    stage2: {t_prime: 100.0}\n", "presets.ci.stage2: config key 't_prime'", "(t_min, t_max)"),
    ("presets:\n  ci:\n    eval: {extractor: vgg}\n", "presets.ci.eval.extractor", "'lenet', 'inception'"),
    ("tracking_uri: ./mlruns\n", "tracking_uri", "sqlite:///"),
    # everything a job would refuse is refused before any job runs (tcm_core.presets.check_preset)
    ("presets:\n  ci:\n    stage2: {rho: 0.05}\n", "presets.ci.stage2: config key 'rho'", "floor(batch * rho)"),
    ("presets:\n  ci:\n    ablation: {batch: 4}\n", "presets.ci.ablation (point", "floor(batch * rho)"),
    ("presets:\n  ci:\n    stage1: {batch: 8, batch_gpu: 3}\n", "presets.ci.stage1: config key 'batch_gpu'",
     "a divisor of"),
    ("presets:\n  ci:\n    stage2: {precision: bf16}\n", "presets.ci.stage2.precision", "needs CUDA"),
    ("presets:\n  ci:\n    stage1: {lr: .inf}\n", "presets.ci.stage1: config key 'lr'", "finite"),
    ("presets:\n  ci:\n    arch: {preset: tiny, model_channels: 1000000}\n", "presets.ci.arch", "parameters"),
    ("presets:\n  ci:\n    eval: {dfid_ts: [0.001, 1.0]}\n", "presets.ci.eval.dfid_ts", "[t_min, t_max]"),
    # consistency distillation: every setting checked before any job
    ("presets:\n  ci:\n    distill: {method: ct}\n", "presets.ci.distill.method", "set method: cd"),
    ("presets:\n  ci:\n    distill: {ode_solver: rk4}\n", "presets.ci.distill.ode_solver", "'heun'"),
    ("presets:\n  ci:\n    pretrain: {label_dropout: 0.0}\n", "presets.ci.pretrain.label_dropout", "label dropout"),
    ("presets:\n  ci:\n    stage1: {label_dropout: 0.1}\n", "presets.ci.stage1: config key 'label_dropout'",
     "0 in the consistency modes"),
    ("presets:\n  ci:\n    stage2: {ode_solver: euler}\n", "presets.ci.stage2: config key 'ode_solver'",
     "unless method is cd"),
    ("presets:\n  ci:\n    teacher: {kind: path}\n", "presets.ci.teacher.path", "set it"),
    # the intermediate arm: K >= 1; its t' is Stage 2's (not a key of its own); it needs the grid centre
    ("presets:\n  ci:\n    intermediate: {iterations: 0}\n", "presets.ci.intermediate.iterations", "minimum of 1"),
    ("presets:\n  ci:\n    intermediate: {iterations: 3, t_prime: 2.0}\n", "presets.ci.intermediate",
     "'t_prime' was unexpected"),
    ("presets:\n  ci:\n    intermediate: {iterations: 2}\n", "presets.ci.intermediate.iterations",
     "equal total iterations"),
    ("presets:\n  ci:\n    ablation: {t_prime: [], rho: [], w_b: [], sigma_nu: []}\n", "presets.ci.ablation",
     "the intermediate arm is compared with the ablation grid's centre"),
]


# The Snakefile's check (common.smk: checked_config) is the schema, then tcm_core.presets.check_preset, the same
# functions check-config runs: every case goes through those in-process, and one case of each kind (schema,
# range, check_preset, architecture, distillation) through a real Snakemake, which must refuse it before any job.
SNAKEMAKE_CASES = [BAD_CONFIGS[i] for i in (0, 4, 7, 12, 14)]


@pytest.mark.parametrize(("overlay", "key", "allowed"), BAD_CONFIGS)
def test_bad_config_is_refused_by_the_workflows_check(tmp_path, overlay, key, allowed):
    from tcm_core.presets import check_config_files

    write_overlay(tmp_path / "bad.yaml", overlay)
    problems = check_config_files([REPO / "config.yaml", tmp_path / "bad.yaml"], preset="ci")
    assert problems, overlay
    line = problems[0].line()
    assert key in line and allowed in line, line


@pytest.mark.parametrize(("overlay", "key", "allowed"), SNAKEMAKE_CASES)
def test_bad_config_fails_before_any_job(tmp_path, overlay, key, allowed):
    wd = make_workdir(tmp_path / "wf")
    write_overlay(wd / "bad.yaml", overlay)
    proc = snakemake(wd, "--cores", "1", "--configfile", "config.yaml", "bad.yaml", "--config", "preset=ci")
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "tcm: error: " in text and key in text and allowed in text, text[-2000:]
    assert not (wd / "results").exists()  # nothing ran, not even mlflow_init


def test_nested_config_values_on_the_command_line_are_numbers(tmp_path):
    wd = make_workdir(tmp_path / "wf")
    proc = snakemake(wd, "-n", "-p", "--config", "preset=ci", "presets={ci: {stage2: {rho: 0.5}}}", check=True)
    assert " rho=0.5 " in proc.stdout  # the main Stage-2 run got the number (a string would fail the schema)


@pytest.mark.parametrize(
    ("config", "key", "allowed"),
    [
        ("preset=nope", "unknown preset 'nope'", "use one of tiny, ci"),
        ("preset=imagenet64_xl", "presets.imagenet64_xl.init.path", "ECM-XL"),
    ],
)
def test_bad_preset_choice_fails_early(workdir, config, key, allowed):
    proc = snakemake(workdir, "-n", "--config", config)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "tcm: error: " in text and key in text and allowed in text, text[-2000:]


OWN_RULE_FILES = ("common", "jobs", "data", "init", "training", "distillation", "evaluation", "releases")


@pytest.mark.parametrize("preset", ["ci", "cifar10"])
def test_lint_and_format(preset):
    """`snakemake --lint` reports nothing for these rule files; snakefmt --check passes."""
    import subprocess

    from tests.workflow_helpers import BIN, env

    proc = snakemake(REPO, "--lint", "--config", f"preset={preset}")
    text = proc.stdout + proc.stderr
    lint_heads = [line for line in text.splitlines() if line.startswith("Lints for")]
    own = [h for h in lint_heads if "Snakefile" in h or any(f"rules/{n}.smk" in h for n in OWN_RULE_FILES)]
    assert not own, text
    files = ["Snakefile", *(f"workflow/rules/{n}.smk" for n in OWN_RULE_FILES)]
    fmt = subprocess.run([str(BIN / "snakefmt"), "--check", *files], cwd=REPO, env=env(), capture_output=True,
                         text=True)
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_registry_names_match_schema():
    import yaml

    from tcm_core.io.downloads import REGISTRY

    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    usable = {name for name, entry in REGISTRY.items() if entry["format"] != "folder"}
    assert set(schema["$defs"]["init"]["properties"]["name"]["enum"]) == usable


def test_schema_train_keys_match_trainconfig():
    import yaml

    from tcm_core.training.config import FIELD_NAMES

    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    # `arch` comes from the preset's own `arch` block (pretraining from scratch only)
    assert set(schema["$defs"]["train"]["properties"]) == set(FIELD_NAMES) - {"arch"}
