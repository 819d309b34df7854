# The paper's tables, figures and claims check for the chosen preset (tcm_core.report; no science
# here). `paper_tables` builds whatever is missing first: every main and ablation run with its
# evaluations. The tables rule reads the declared result files (its inputs, so it reruns when any of
# them changes) and the MLflow store (filled in where files are absent, and cross-checked).
#
# Inputs: every evaluation JSON and each training run's config.json, the extra training seeds' included
# (training_seeds). A run's metrics.jsonl is rewritten together with its config.json whenever the run
# reruns, but is not a declared output of the training rules, so config.json stands in for it here.


rule tables:
    """Paper tables 1-6, the claims check and figures 1b, 2, 3, 4a-c, 7, 8 of one preset (K of paper_tables)."""
    input:
        results=report_inputs("paper_tables"),
        mlflow=ancient("results/{preset}/mlflow.json"),
    output:
        **report_outputs("results/{preset}", "Paper tables", "Paper figures"),
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
        out=lambda wildcards, input: os.path.dirname(input.mlflow),
        seeds=presets.training_seeds(P, "paper_tables"),
    shell:
        # tee: the summary (where every file is, what has no data yet, timing) shows in the console too
        "OMP_NUM_THREADS={threads} python -m tcm_core tables --preset {wildcards.preset}"
        ' --results {params.results} --tracking-uri "$TCM_MLFLOW_URI" --mlflow-parent {input.mlflow}'
        " --out {params.out} --training-seeds {params.seeds} 2>&1 | tee {log}"


# The powered study: the same tables from K = training_seeds.study seeds of every seeded arm, in results/P/study.
use rule tables as study_tables with:
    input:
        results=report_inputs("study"),
        mlflow=ancient("results/{preset}/mlflow.json"),
    output:
        **report_outputs("results/{preset}/study", "Study tables", "Study figures"),
    log:
        "results/{preset}/logs/study_tables.log",
    params:
        results=lambda wildcards, input: os.path.dirname(input.mlflow),
        out=lambda wildcards, input: os.path.join(os.path.dirname(input.mlflow), "study"),
        seeds=presets.training_seeds(P, "study"),


rule paper_tables:
    """Everything the paper's tables and figures need, then the tables, figures and claims check."""
    input:
        report_files(RESULTS),
    localrule: True


rule study:
    """paper_tables with training_seeds.study seeds (the powered verdicts): results/<preset>/study/."""
    input:
        report_files(f"{RESULTS}/study"),
    localrule: True
