"""Training: one loop for every mode (pretrain, stage1, stage1_continued, intermediate, stage2, stage3).

``config`` (the TrainConfig keys and their checks), ``setup`` (a run from its config and input files),
``global_batch`` (how one iteration's batch is cut into loss calls), ``step`` (one iteration), ``optim``
(optimiser, LR schedule, EMA), ``state`` (mid-run state files and resume), ``outputs`` (what a run writes),
``distributed`` (torchrun process group, devices) and ``loop`` (the ``train`` command).
"""
