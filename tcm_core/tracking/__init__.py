"""What a job records: its metrics, its MLflow run and the progress lines of its log.

``tracker`` (``metrics.jsonl``, the source of truth, mirrored to the job's MLflow run), ``mlflow_store`` (the
experiment, the study's parent run, the store lock) and ``progress`` (log lines a person can read).
"""
