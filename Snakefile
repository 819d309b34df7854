# Truncated Consistency Models (ICLR 2025): reproduction workflow.
#   snakemake --cores 2                                    # the tiny preset's `all` (CPU, ~11 min)
#   snakemake --cores 2 all_ablations --config preset=ci   # every grid point, seconds-scale settings
#   snakemake --profile profiles/slurm all_ablations --config preset=cifar10
#   snakemake --cores 2 paper_tables                       # every table (incl. Table 5: the distillation arm)
#   snakemake --cores 1 released_tables --config preset=cifar10   # the released checkpoints vs the paper
# Targets go before --config (Snakemake reads every word after --config as a key=value).
# Settings: config.yaml (validated by workflow/schemas/config.schema.yaml before any job runs); check
# overlays with `python -m tcm_core check-config config.yaml OVERLAY.yaml` (file and line of each problem).
import json
import os
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version

from tcm_core.errors import TcmError
from tcm_core.presets import read_yaml
from tcm_core.tracking.mlflow_store import compare_view_url

min_version("9.0")

# MLflow must never phone home (offline clusters); set before any job or helper imports it.
os.environ.update(MLFLOW_DISABLE_TELEMETRY="true")
# `python` in the rules is the interpreter running Snakemake (e.g. .venv/bin/snakemake without an
# activated venv); with --sdm conda the rule's env is activated in front of it.
os.environ.update(
    PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
)

# Snakemake's own message for a YAML syntax error names neither the file nor the line: read it first.
# (--configfile overlays are parsed before this file runs; check-config reports their file and line.)
try:
    read_yaml("config.yaml")
except TcmError as error:
    raise WorkflowError(error.line()) from None


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/jobs.smk"
include: "workflow/rules/init.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/training.smk"
include: "workflow/rules/distillation.smk"
include: "workflow/rules/evaluation.smk"
include: "workflow/rules/reporting.smk"
include: "workflow/rules/releases.smk"


# Stage 1, the Stage-1 control, Stage 2, their FIDs (1 and 2 steps), dFID sweeps and sample grids.
rule all:
    default_target: True
    input:
        main_targets(),
    localrule: True


# `all` plus every ablation grid point (t', rho x w_b, (sigma, nu), stages) with its FIDs, and the intermediate-stage
# arm (App. B): the fine-tuned boundary's dFID_t' and its two Stage-2 variants' FIDs.
rule all_ablations:
    input:
        main_targets(),
        ablation_targets(),
        intermediate_targets("all"),
    localrule: True


# The consistency-distillation arm (presets with a `distill` block): CD Stage 1, control, Stage 2, FIDs.
rule all_distillation:
    input:
        distill_targets(),
    localrule: True


# The preset's released checkpoints (`releases`), evaluated with the paper's protocol, beside the paper's values.
rule released_tables:
    input:
        released_tables_input,
    localrule: True


# Creates the preset's MLflow experiment and the study parent run once, before any job logs.
rule mlflow_init:
    output:
        record="results/{preset}/mlflow.json",
    log:
        "results/{preset}/logs/mlflow_init.log",
    retries: 2
    localrule: True
    conda:
        "envs/tcm.yaml"
    params:
        uri=TRACKING_URI,
        experiment=EXPERIMENT,
        study=STUDY,
    shell:
        "python -m tcm_core mlflow-init --tracking-uri {params.uri:q} --experiment {params.experiment:q}"
        " --study {params.study:q} --out {output.record} > {log} 2>&1"


onsuccess:
    where = os.path.abspath(RESULTS)
    print(f"\nTCM workflow finished. Results: {where}")
    print(f"MLflow runs: experiment {EXPERIMENT!r}, parent run {STUDY!r} in {TRACKING_URI}")
    record = Path(RESULTS) / "mlflow.json"
    server = "http://127.0.0.1:5000" if TRACKING_URI.startswith("sqlite:///") else TRACKING_URI
    if TRACKING_URI.startswith("sqlite:///"):
        print(
            f"Open the UI: mlflow ui --backend-store-uri {TRACKING_URI} "
            "--host 127.0.0.1 --port 5000 --workers 1"
        )
    if record.exists():
        experiment_id = json.loads(record.read_text())["experiment_id"]
        print(
            f"Training runs with their FIDs (docs/MLFLOW.md): {compare_view_url(server, experiment_id)}"
        )
    from tcm_core.report.headline import headline_lines

    print("\n".join(headline_lines(RESULTS)))
