"""tcm_core: a small PyTorch library for Truncated Consistency Models (Lee et al., ICLR 2025).

The formulas, each in one place, sit at the top: ``precond`` (EDM preconditioning), ``schedules`` (time
distributions and the Δt curriculum), ``losses`` (EDM, CT and TCM objectives), ``sampling`` (1- and few-step
generation) and ``distillation`` (the teacher's PF-ODE step). Beside them: ``presets`` (config.yaml's presets and
every check the schema cannot express), ``releases`` (the released checkpoints a preset evaluates), ``data``
(EDM-layout datasets), ``errors`` (the one error path) and ``cli`` (``python -m tcm_core --help`` lists the
commands the workflow calls).

Subpackages, one concept each: ``networks`` (DDPM++ SongUNet, EDM2 UNet), ``training`` (config, setup, step,
state, outputs, the loop, distributed, optim), ``evaluation`` (features, FID/dFID, grids), ``io`` (downloads,
checkpoint formats, safe unpickling, hashing, atomic writes), ``tracking`` (metrics.jsonl, MLflow, progress),
``gpu`` (the GPU check and the step benchmark) and ``report`` (the paper's tables, figures and claims).
"""

__version__ = "0.1.0"
