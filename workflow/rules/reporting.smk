# The paper's tables, figures and claims check for the chosen preset (tcm_core.report; no science
# here). `paper_tables` builds whatever is missing first: every main and ablation run with its
# evaluations. The tables rule reads the declared result files (its inputs, so it reruns when any of
# them changes) and the MLflow store (filled in where files are absent, and cross-checked).
#
# Inputs: every evaluation JSON and each training run's config.json, the extra training seeds' included
# (training_seeds). A run's metrics.jsonl is rewritten together with its config.json whenever the run
# reruns, but is not a declared output of the training rules, so config.json stands in for it here.

PAPER_TABLE_RUNS = [
    run
    for run in main_runs()
    + list(ABLATION_RUNS)
    + (["stage3/main"] if 3 in ABL.get("stages", []) else [])
    + DISTILL_RUNS
    + list(INTERMEDIATE.values())
    if not (run == "stage1" and P["init"].get("provides") == "stage1")
]
PAPER_TABLE_INPUTS = sorted(
    set(
        main_targets()
        + ablation_targets()
        + distill_targets()
        + [f"{RESULTS}/{run}/config.json" for run in PAPER_TABLE_RUNS]
        + seed_targets("paper_tables")  # training seeds 1 .. K-1 of the claim-bearing arms
        + intermediate_targets("paper_tables")
        + mid_t_sweep_targets()
    )
)
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


rule tables:
    """Paper tables 1-6, the claims check and figures 1b, 2, 3, 4a-c, 7, 8 of one preset."""
    input:
        results=PAPER_TABLE_INPUTS,
        mlflow=ancient("results/{preset}/mlflow.json"),
    output:
        **{
            f"{name}_{ext}": report(
                f"results/{{preset}}/tables/{name}.{ext}",
                caption=f"../report/{caption}",
                category="Paper tables",
                labels={"table": label, "format": ext},
            )
            for name, (caption, label) in PAPER_TABLES.items()
            for ext in ("md", "csv")
        },
        **{
            name: report(
                f"results/{{preset}}/figures/{name}.png",
                caption=f"../report/{caption}",
                category="Paper figures",
                labels={"figure": label},
            )
            for name, (caption, label) in PAPER_FIGURES.items()
        },
        crosscheck=report(
            "results/{preset}/tables/crosscheck.csv",
            caption="../report/crosscheck.rst",
            category="Paper tables",
            labels={"table": "Files vs MLflow", "format": "csv"},
        ),
    log:
        "results/{preset}/logs/tables.log",
    localrule: True
    conda:
        "../../envs/tcm.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        # the preset's results folder, derived from an input so the path follows the workflow's layout
        results=lambda wildcards, input: os.path.dirname(input.mlflow),
    shell:
        # tee: the summary (where every file is, what has no data yet, timing) shows in the console too
        "OMP_NUM_THREADS={threads} python -m tcm_core tables --preset {wildcards.preset}"
        ' --results {params.results} --tracking-uri "$TCM_MLFLOW_URI" --mlflow-parent {input.mlflow}'
        " --out {params.results} 2>&1 | tee {log}"


rule paper_tables:
    """Everything the paper's tables and figures need, then the tables, figures and claims check."""
    input:
        expand(
            "results/{preset}/tables/{name}.{ext}",
            preset=PRESET,
            name=list(PAPER_TABLES),
            ext=("md", "csv"),
        ),
        f"{RESULTS}/tables/crosscheck.csv",
        expand("results/{preset}/figures/{name}.png", preset=PRESET, name=list(PAPER_FIGURES)),
    localrule: True
