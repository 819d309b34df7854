"""Evaluation: FID feature extractors, FID and dFID, reference statistics, sample grids.

``features`` (TF-Inception with offline weights, LeNet), ``metrics`` (feature statistics, Fréchet distance,
FID of a generator, dFID), ``commands`` (``reference-stats``, ``evaluate fid|dfid|grid`` and the periodic
evaluation of training runs) and ``tv_compat`` (torchvision beside a CPU-only torch, for clean-fid).
"""
