"""Paper tables, figures and the claims check: ``python -m tcm_core tables``.

Numbers come from two places and are cross-checked:

* the declared result files under ``results/<preset>/`` (the source of truth, and the inputs of the Snakemake
  rule, so the rule reruns when they change): every training run folder (``metrics.jsonl`` + ``config.json``)
  and every evaluation JSON (``evaluate fid`` / ``evaluate dfid``);
* the MLflow store (``mlflow.search_runs`` filtered by the ``tcm.*`` tags, and
  ``MlflowClient.get_metric_history``), which fills in runs whose files are absent and is compared with the files
  value by value (``tables/crosscheck.csv``).

A cell with no measurement is written as "—", never estimated. Paper numbers come only from
``tcm_core/report/paper_values.csv`` (transcribed once, with the table or figure each number is printed in).

Modules, each importing only those above it:

``values``         reading, comparing and writing numbers ("—" for none)
``results``        the result model: TrainingRun, Evaluation, Measured, Results
``result_files``   loading the declared result files
``mlflow_source``  loading the runs of a preset from MLflow
``merge``          files first, MLflow second, and the files-vs-MLflow cross-check (``collect``)
``paper``          the paper's values (``paper_values.csv``) and its default Stage-2 setting
``measurements``   which measured numbers a table, figure or claim uses: final FIDs, curves, ablation slices
``confidence``     paired comparisons over training seeds: mean difference, 95 % t interval, verdict
``paired``         two arms' final 1-step FIDs paired by training seed (claims S1 and S5, Table 5)
``tables``         Tables 1-5 and their Markdown/CSV
``claims``         claims S1-S5 (paired by training seed) and the claims table
``figures``        Figs. 1b, 2, 3, 4a-c, 7, 8
``cli``            ``build_report``, the summary and the ``tables`` command
"""
