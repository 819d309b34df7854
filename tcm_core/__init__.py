"""tcm_core: a small PyTorch library for Truncated Consistency Models (Lee et al., ICLR 2025).

One concept per module: ``precond`` (EDM preconditioning), ``networks`` (DDPM++ SongUNet, EDM2 UNet),
``schedules`` (time distributions and the Δt curriculum), ``losses`` (EDM, CT and TCM objectives),
``sampling``, ``checkpoints``, ``data``, ``training``, ``features`` and ``metrics`` (FID, dFID),
``evaluation`` (evaluation commands), ``tracking`` (metrics.jsonl and MLflow) and ``report`` (paper tables,
figures and claims; a package, one module per concept). ``python -m tcm_core --help`` lists the commands the
workflow calls.
"""

__version__ = "0.1.0"
