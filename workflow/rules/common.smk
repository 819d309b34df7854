# The chosen preset, validated before any job runs (JSON schema, then tcm_core.presets: every check a job
# would make), and the path, wildcard and target helpers. No science and no settings logic here: the
# resolved keys of every job come from tcm_core.presets.

import os
from pathlib import Path

import pandas as pd
from snakemake.exceptions import WorkflowError
from snakemake.utils import Paramspace, validate

from tcm_core import presets, releases
from tcm_core.errors import ConfigError
from tcm_core.report.results import RELEASE_GRID


def checked_config(cfg):
    """JSON-schema validation naming the failing key (tcm_core.presets, as check-config does),
    Snakemake's (which fills defaults), then every cross-field and TrainConfig check of tcm_core."""
    cfg.update(presets.normalise_cli_values(cfg))  # nested --config values arrive as strings
    schema_file = Path(workflow.basedir) / "workflow" / "schemas" / "config.schema.yaml"
    problems = presets.schema_problems(dict(cfg), schema_file)
    if problems:
        raise problems[0]
    validate(cfg, schema="../schemas/config.schema.yaml")
    # a cluster job's Snakemake (remote mode) re-reads the config its submitting Snakemake checked whole
    return presets.check_preset(
        cfg, cfg["preset"], schema_path=None, architecture=not workflow.remote_exec
    )


try:
    CONFIGS = checked_config(config)  # TrainConfig of each planned mode
except ConfigError as error:
    raise WorkflowError(error.line()) from None

PRESET = config["preset"]
P = config["presets"][PRESET]
EVAL = P["eval"]
ABL = P["ablation"]
RESULTS = f"results/{PRESET}"
FOREIGN_STAGE1 = P["init"].get("provides") == "stage1"  # e.g. ECM-XL: Stage 1 is a given checkpoint
# released checkpoints (released_tables), by key; evaluated as the run folder releases/<key>
RELEASES = {r.key: r for r in releases.release_entries(P, f"presets.{PRESET}")}
RELEASE_RUN = "releases/"


wildcard_constraints:
    preset=PRESET,
    steps="1step|2step",
    sweep="dfid|dfid_wide|dfid_tprime",
    extractor=P["eval"]["extractor"],
    run="stage1|stage1_continued(/seed~[1-9][0-9]*)?|stage2/main(/seed~[1-9][0-9]*)?|stage3/main|stage2/ablation/.+"
    "|distill/(stage1|stage1_continued(/seed~[1-9][0-9]*)?|stage2(/seed~[1-9][0-9]*)?)"
    "|intermediate/(finetune|stage2_init_stage1|stage2_init_finetune)(/seed~[1-9][0-9]*)?"
    "|releases/[A-Za-z0-9_]+",
    release="[A-Za-z0-9_]+",


# MLflow: the tracking URI is infrastructure, not an experiment setting, so jobs read it from the
# environment (changing it must not retrain anything); the parent record comes from mlflow_init.
TRACKING_URI = config.get("tracking_uri") or f"sqlite:///{Path.cwd().resolve()}/{RESULTS}/mlflow.db"
os.environ.update(TCM_MLFLOW_URI=TRACKING_URI)
EXPERIMENT = config.get("experiment") or f"tcm-{PRESET}"
STUDY = config.get("study") or f"{PRESET}-study"

# Ablation grid: the DISTINCT Stage-2 configurations of every grid (tcm_core.presets.ablation_points),
# trained under stage2/ablation/<point>; all start from the one Stage-1 checkpoint.
ABLATION = Paramspace(
    pd.DataFrame(presets.ablation_points(P), columns=presets.ABLATION_FACTORS, dtype=float),
    single_wildcard="cfg",
)
ABLATION_RUNS = [f"stage2/ablation/{cfg}" for cfg in ABLATION.instance_patterns]
# The consistency-distillation arm (distillation.smk), when the preset has a `distill` block.
DISTILL_RUNS = (
    [f"distill/{m}" for m in presets.DISTILL_MODES] if presets.has_distillation(P) else []
)
# The intermediate-stage arm (paper App. B; training.smk), when the preset has an `intermediate` block: the fine-tuned
# boundary and the two Stage-2 variants (tcm_core.presets.INTERMEDIATE_RUNS), compared with the ablation grid's centre.
INTERMEDIATE = presets.INTERMEDIATE_RUNS if presets.has_intermediate(P) else {}
INTERMEDIATE_STAGE2_RUNS = (
    [INTERMEDIATE[v] for v in presets.INTERMEDIATE_VARIANTS] if INTERMEDIATE else []
)
# The arms the claims read get independent training seeds (training_seeds): the control and Stage 2 from the one
# Stage-1 run, the ablation cells of tcm_core.presets.seeded_ablation_points, and the distillation arm's control
# and Stage 2 from the one CD Stage-1 run (claim S5). Seed j > 0 of run folder R is R/seed~j
# (tcm_core.presets.seed_run); seed 0 is R.
# The arms of claims S1 and S5, which the power analysis sizes: `study` trains training_seeds.study seeds of these
# and paper_tables' K of the other seeded arms (docs/STUDY.md).
POWERED_RUNS = ["stage1_continued", "stage2/main"] + (
    [f"distill/{m}" for m in presets.DISTILL_SEEDED_MODES] if DISTILL_RUNS else []
)
SEEDED_RUNS = (
    POWERED_RUNS
    + [
        run
        for run, point in zip(ABLATION_RUNS, presets.ablation_points(P))
        if point in presets.seeded_ablation_points(P)
    ]
    + INTERMEDIATE_STAGE2_RUNS  # claim S6 (their boundary, intermediate/finetune, is seeded with them)
)


# ---------------------------------------------------------------------------------------------
# Paths


def dataset_path(wildcards=None):
    return P["dataset"].get("path") or f"{RESULTS}/data/dataset.zip"


def feature_net_path(wildcards=None):
    return f"{RESULTS}/data/lenet.pt" if EVAL["extractor"] == "lenet" else []


def ref_stats_path(wildcards=None):
    return f"{RESULTS}/data/ref_stats_{EVAL['extractor']}.npz"


def init_file_name():
    init = P["init"]
    return init["name"] if init.get("name") else (Path(init["url"]).name or "checkpoint")


def init_checkpoint(wildcards=None):
    """The checkpoint Stage 1 starts from."""
    init = P["init"]
    if init["kind"] == "pretrain":
        return f"{RESULTS}/pretrain/network.safetensors"
    if init["kind"] == "path":
        return init["path"]
    return f"resources/checkpoints/{init_file_name()}"


def stage1_network(wildcards=None):
    return init_checkpoint() if FOREIGN_STAGE1 else f"{RESULTS}/stage1/network.safetensors"


def stage1_state(wildcards=None):
    """Stage 1's final training state (the control's start); none for a foreign Stage-1 checkpoint."""
    return [] if FOREIGN_STAGE1 else f"{RESULTS}/stage1/train_state.pt"


def release_of(run):
    """The release a run folder releases/<key> evaluates (None for a training run)."""
    return RELEASES[run[len(RELEASE_RUN) :]] if run.startswith(RELEASE_RUN) else None


def release_record(key):
    """What release_check writes: the release's path, pinned sha256 and architecture."""
    return f"{RESULTS}/{RELEASE_RUN}{key}/release.json"


def network_of(run):
    """Network file of a run folder (stage1, stage1_continued, stage2/main, stage2/ablation/..., releases/<key>)."""
    release = release_of(run)
    if release is not None:
        return str(releases.locate(release) or release.path)
    return stage1_network() if run == "stage1" else f"{RESULTS}/{run}/network.safetensors"


def verified(path, sha256=None):
    """A download: Snakemake checks the sha256 when it is pinned (fetch verifies it too), else non-empty."""
    return ensure(path, sha256=sha256) if sha256 else ensure(path, non_empty=True)


def weights(path):
    return protected(path) if P.get("protect_weights") else path


def train_outputs(run_dir):
    return {
        "ckpt": weights(f"{run_dir}/network.safetensors"),
        "meta": f"{run_dir}/network.json",
        "config": f"{run_dir}/config.json",
    }


def is_ablation(run):
    return run.startswith("stage2/ablation/")


def grid_of(run):
    if run.startswith(RELEASE_RUN):
        return (
            RELEASE_GRID  # a released checkpoint (released_tables), no training run of this study
        )
    if run.startswith("distill/"):
        return "distill"  # the consistency-distillation arm (distillation.smk)
    if run.startswith("intermediate/"):
        return "intermediate"  # the intermediate-stage arm (training.smk)
    return "ablation" if is_ablation(run) else "main"


def ablation_evaluation(run):
    """Whether a run is evaluated as the ablation cells are (ablation eval_num / eval_seeds): the cells, and the
    intermediate arm's runs, whose FIDs are paired with the grid centre's."""
    return grid_of(run) in ("ablation", "intermediate")


def res(kind, key):
    return P["resources"][kind][key]


# ---------------------------------------------------------------------------------------------
# Targets


def main_runs():
    return ["stage1", "stage1_continued", "stage2/main"]


def dfid_sweeps():
    return ["dfid"] + (["dfid_wide"] if EVAL.get("dfid_ts_wide") else [])


def main_targets():
    out = []
    for run in main_runs():
        out += [f"{RESULTS}/{run}/eval/fid_{s}.json" for s in ("1step", "2step")]
        out += [f"{RESULTS}/{run}/eval/{sweep}.json" for sweep in dfid_sweeps()]
        out += [f"{RESULTS}/{run}/eval/grid_{s}.png" for s in ("1step", "2step")]
    return out + seed_targets("all", [r for r in SEEDED_RUNS if grid_of(r) in ("main", "ablation")])


def extra_seed_runs(target, runs=SEEDED_RUNS):
    """Run folders of the training seeds 1 .. K-1 of `runs` the target needs (K = training_seeds of the
    target)."""
    count = presets.training_seeds(P, target)
    return [presets.seed_run(run, j) for j in range(1, count) for run in runs]


def seed_targets(target, runs=SEEDED_RUNS):
    """What the claims read of each extra seed: its 1-step FID, and its config.json, which stands in for the
    metrics.jsonl (periodic curves) it is written with."""
    return [
        f"{RESULTS}/{run}/{name}"
        for run in extra_seed_runs(target, runs)
        for name in ("eval/fid_1step.json", "config.json")
    ]


def distill_targets():
    """The arm's 1- and 2-step FIDs (Table 5) and its 1-step sample grids, and its extra training seeds of
    `all_distillation` (training_seeds of `all`)."""
    out = []
    for run in DISTILL_RUNS:
        out += [f"{RESULTS}/{run}/eval/fid_{s}.json" for s in ("1step", "2step")]
        out.append(f"{RESULTS}/{run}/eval/grid_1step.png")
    return out + seed_targets("all", [r for r in SEEDED_RUNS if grid_of(r) == "distill"])


def mid_t_sweep_targets():
    """The 2-step middle-time sweep of each arm's final networks (seed 0): the main arms and the distillation
    arm's (eval.mid_t_sweep; none when it is empty)."""
    if not EVAL.get("mid_t_sweep"):
        return []
    return [f"{RESULTS}/{run}/eval/fid_2step_sweep.json" for run in main_runs() + DISTILL_RUNS]


def release_targets():
    """The evaluations of every release: its FIDs at its NFEs (the paper's protocol: eval.num samples, min over
    eval.seeds) and its dFID sweep at eval.dfid_ts."""
    out = []
    for release in RELEASES.values():
        run = f"{RESULTS}/{RELEASE_RUN}{release.key}"
        out += [f"{run}/eval/fid_{n}step.json" for n in release.steps]
        out += [f"{run}/eval/dfid.json"] if release.dfid else []
    return out


def ablation_targets():
    """The 1-step FID of every ablation cell and of Stage 3: what Tables 3 and 4 and Fig. 4 report (a cell's
    2-step FID is still one `snakemake results/.../eval/fid_2step.json` away)."""
    runs = list(ABLATION_RUNS) + (["stage3/main"] if 3 in ABL.get("stages", []) else [])
    return [f"{RESULTS}/{run}/eval/fid_1step.json" for run in runs]


# ---------------------------------------------------------------------------------------------
# Released checkpoints (releases.smk)


MISSING_NOTED = set()  # the dry run names each missing release once


def release_file(wildcards):
    """The dropped file (release_check's input); a missing one stops a real run here, before any job runs."""
    release = RELEASES[wildcards["release"]]
    try:
        found = releases.locate(release)
    except ConfigError as error:
        raise WorkflowError(error.line()) from None
    if found is not None:
        return str(found)
    line = releases.missing_error(release).line()
    if not workflow.dryrun:
        raise WorkflowError(line)
    if release.key not in MISSING_NOTED:
        MISSING_NOTED.add(release.key)
        print(f"note (dry run, planned anyway): {line}", file=sys.stderr)
    return []


def released_tables_input(wildcards):
    """The target's input: the table, once every release file is in place. The target's input function always
    runs when the target is asked for, so a missing file stops the run here, before any job (Snakemake would
    skip a missing input of a table that exists already); a dry run plans anyway and names the missing files.
    """
    for key in RELEASES:
        release_file({"release": key})
    return [f"{RESULTS}/tables/released.md", f"{RESULTS}/tables/released.csv"]


def release_entry(wildcards):
    return shlex.quote(json.dumps(RELEASES[wildcards.release].as_dict(), sort_keys=True))


def intermediate_targets(target):
    """The intermediate arm (Table 6, claim S6) for `target`: dFID_t' of Stage 1's network and of each training
    seed of the fine-tuned one (before / after), and the final 1-step FIDs of both Stage-2 variants, with their
    extra seeds (training_seeds of the target). Their comparator, the ablation grid's centre, is an ablation cell.
    """
    if not INTERMEDIATE:
        return []
    seeds = range(presets.training_seeds(P, target))
    finetuned = [presets.seed_run(INTERMEDIATE["finetune"], j) for j in seeds]
    out = [f"{RESULTS}/{run}/eval/dfid_tprime.json" for run in ["stage1", *finetuned]]
    out += [f"{RESULTS}/{run}/config.json" for run in finetuned]
    out += [f"{RESULTS}/{run}/eval/fid_1step.json" for run in INTERMEDIATE_STAGE2_RUNS]
    return out + seed_targets(target, INTERMEDIATE_STAGE2_RUNS)


def intermediate_init(wildcards):
    """The init of an intermediate-arm Stage-2 variant: Stage 1's network, or the fine-tuned one of its seed."""
    if wildcards.variant == "init_stage1":
        return stage1_network()
    return f"{RESULTS}/{INTERMEDIATE['finetune']}{wildcards.seed}/network.safetensors"


# ---------------------------------------------------------------------------------------------
# The report targets: paper_tables (training_seeds.paper_tables seeds) and study (training_seeds.study),
# each the same tables and figures in its own folder.
PAPER_TABLE_RUNS = [
    run
    for run in main_runs()
    + list(ABLATION_RUNS)
    + (["stage3/main"] if 3 in ABL.get("stages", []) else [])
    + DISTILL_RUNS
    + list(INTERMEDIATE.values())
    if not (run == "stage1" and P["init"].get("provides") == "stage1")
]
# Tables (Markdown + CSV) and figures: tcm_core.report.cli.output_files() lists the same names.
PAPER_TABLES = {
    "table1_cifar10": ("table1.rst", "Table 1 (CIFAR-10)"),
    "table2_imagenet64": ("table2.rst", "Table 2 (ImageNet 64x64)"),
    "table3_tprime": ("table3.rst", "Table 3 (t')"),
    "table4_stages": ("table4.rst", "Table 4 (stages)"),
    "table5_distillation": ("table5.rst", "Table 5 (distillation)"),
    "table6_intermediate": ("table6.rst", "Table 6 (intermediate stage)"),
    "mid_t_sweep": ("mid_t_sweep.rst", "2-step middle-time sweep"),
    "claims": ("claims.rst", "Claims check"),
}
PAPER_FIGURES = {
    "fig1b_fid_stages": ("fig1b.rst", "Fig. 1b"),
    "fig2_dfid_stage1": ("fig2.rst", "Fig. 2"),
    "fig3_dfid_stage2": ("fig3.rst", "Fig. 3"),
    "fig4a_time_density": ("fig4a.rst", "Fig. 4a"),
    "fig4b_fid_sigma_nu": ("fig4b.rst", "Fig. 4b"),
    "fig4c_fid_rho_wb": ("fig4c.rst", "Fig. 4c"),
    "fig7_grad_norm": ("fig7.rst", "Fig. 7"),
    "fig8_dfid_vs_t": ("fig8.rst", "Fig. 8"),
    "fig_mid_t_sweep": ("fig_mid_t_sweep.rst", "2-step middle-time sweep"),
}


def report_inputs(target):
    """What the tables of `target` read: every main, ablation and distillation run with its evaluations and
    training seeds 1 .. K-1 of the claim-bearing arms (K = training_seeds of the target)."""
    return sorted(
        set(
            main_targets()
            + ablation_targets()
            + distill_targets()
            + [f"{RESULTS}/{run}/config.json" for run in PAPER_TABLE_RUNS]
            + report_seed_targets(target)
            + intermediate_targets("paper_tables" if target == "study" else target)
            + mid_t_sweep_targets()
        )
    )


def report_seed_targets(target):
    """The extra training seeds the tables of `target` read: K of the target for every seeded arm; for `study`,
    training_seeds.study of the S1 and S5 arms (POWERED_RUNS) and paper_tables' K of the others."""
    if target != "study":
        return seed_targets(target)
    others = [run for run in SEEDED_RUNS if run not in POWERED_RUNS]
    return seed_targets("study", POWERED_RUNS) + seed_targets("paper_tables", others)


def report_outputs(folder, table_category, figure_category):
    """The tables rule's named outputs under `folder` (a pattern with {preset}), as report() items."""
    tables = {
        f"{name}_{ext}": report(
            f"{folder}/tables/{name}.{ext}",
            caption=f"../report/{caption}",
            category=table_category,
            labels={"table": label, "format": ext},
        )
        for name, (caption, label) in PAPER_TABLES.items()
        for ext in ("md", "csv")
    }
    figures = {
        name: report(
            f"{folder}/figures/{name}.png",
            caption=f"../report/{caption}",
            category=figure_category,
            labels={"figure": label},
        )
        for name, (caption, label) in PAPER_FIGURES.items()
    }
    crosscheck = report(
        f"{folder}/tables/crosscheck.csv",
        caption="../report/crosscheck.rst",
        category=table_category,
        labels={"table": "Files vs MLflow", "format": "csv"},
    )
    return {**tables, **figures, "crosscheck": crosscheck}


def report_files(folder):
    """Every file report_outputs names, for one preset's concrete `folder` (a target's input)."""
    return [str(path) for path in report_outputs(folder, None, None).values()]
