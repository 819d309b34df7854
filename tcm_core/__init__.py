"""tcm_core: a small PyTorch library for Truncated Consistency Models (Lee et al., ICLR 2025).

One concept per module: ``precond`` (EDM preconditioning), ``networks`` (DDPM++ SongUNet, EDM2 UNet),
``schedules`` (time distributions and the Δt curriculum), ``losses`` (EDM, CT and TCM objectives),
``sampling``, ``downloads`` (registry, fetch), ``foreign_checkpoints`` (EDM/EDM2 import),
``network_files`` (our format, load_network), ``data``, ``presets`` (config.yaml's presets), ``train_config``,
``training`` and its parts (``train_setup``, ``train_step``, ``train_outputs``, ``train_state``, ``optim``,
``global_batch``, ``distributed``), ``features`` and ``metrics`` (FID, dFID), ``evaluation`` (evaluation
commands), ``tracking`` (a job's metrics.jsonl and its MLflow run), ``mlflow_store`` (the MLflow experiment,
study parent and store lock) and ``report`` (paper tables, figures and claims; a package,
one module per concept). ``python -m tcm_core --help`` lists the commands the workflow calls.
"""

__version__ = "0.1.0"
