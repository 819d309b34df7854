"""Helpers for the data / metrics / evaluation tests: small real-MNIST sets, a micro network, CLI runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# The `tiny` preset made smaller, so generation on CPU costs milliseconds per image.
MICRO_ARCH_OVERRIDES = {"model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [],
                        "dropout": 0.0}


def write_mnist_subset(path: Path, count: int, resolution: int = 16, offset: int = 0) -> Path:
    """Real mnist5k digits ``offset .. offset + count`` as an EDM-layout zip."""
    from tcm_core.data import load_mnist5k, mnist_to_resolution, write_dataset_zip

    images, labels = load_mnist5k()
    sel = range(offset, offset + count)
    write_dataset_zip(path, [mnist_to_resolution(images[i], resolution) for i in sel], labels[offset:offset + count])
    return path


def micro_network(seed: int = 0) -> torch.nn.Module:
    from tcm_core.networks import arch_preset, build_precond

    torch.manual_seed(seed)
    return build_precond(arch_preset("tiny", **MICRO_ARCH_OVERRIDES)).eval()


def uint8_features_input(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, C, H, W) -> the float [0, 255] tensor the extractors take."""
    return torch.from_numpy(np.ascontiguousarray(images)).float()


def run_cli(args: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m tcm_core ARGS`` in a real subprocess; fails the test with its output on error."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONPATH": str(REPO),
                **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "tcm_core", *args], cwd=REPO, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(args[:2])} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc
