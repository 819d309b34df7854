"""Helpers for the training tests: a small real-MNIST dataset, micro networks, CLI subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# The `tiny` preset made smaller still, so CPU tests take seconds; dropout on to exercise mask replay.
MICRO_ARCH: dict[str, Any] = {"preset": "tiny", "model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1,
                              "attn_resolutions": [], "dropout": 0.1}


def make_small_mnist(path: Path, count: int = 64, resolution: int = 16) -> Path:
    """``count`` real mnist5k digits (all classes) as an EDM-layout zip (what prepare-dataset makes, only smaller)."""
    from tcm_core.data import load_mnist5k, mnist_to_resolution, write_dataset_zip

    images, labels = load_mnist5k()
    picked = range(0, len(images), len(images) // count)[:count]  # spread out: the file is sorted by class
    digits = [mnist_to_resolution(images[i], resolution) for i in picked]
    write_dataset_zip(path, digits, [int(labels[i]) for i in picked])
    return path


def micro_network(seed: int = 0) -> torch.nn.Module:
    from tcm_core.networks import arch_preset, build_precond

    spec = dict(MICRO_ARCH)
    torch.manual_seed(seed)
    return build_precond(arch_preset(spec.pop("preset"), **spec))


def perturbed_micro_net(*, dropout: float, seed: int = 0, label_dim: int = 0) -> torch.nn.Module:
    """A few-thousand-parameter DDPM++ on 16x16 (train mode) with weights perturbed away from EDM's zero-init,
    so that every layer, every input and dropout visibly change the output."""
    from tcm_core.networks import arch_preset, build_precond

    torch.manual_seed(seed)
    arch = arch_preset("tiny", model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8],
                       dropout=dropout, label_dim=label_dim)
    net = build_precond(arch)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net.train()


def save_micro_checkpoint(path: Path, iteration: int, seed: int = 0) -> Path:
    from tcm_core.io.network_files import save_network

    save_network(micro_network(seed), path, iteration=iteration, provenance={"note": "test"})
    return path


def cli_env() -> dict[str, str]:
    # one thread per process: reproducible float reductions, and two ranks share the CI's two cores
    return {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONPATH": str(REPO)}


def cli_command(args: list[str], torchrun: int = 0) -> list[str]:
    if torchrun:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
                "-m", "tcm_core", *args]
    return [sys.executable, "-m", "tcm_core", *args]


def run_cli(args: list[str], *, torchrun: int = 0, timeout: float = 300, check: bool = True
            ) -> subprocess.CompletedProcess:
    """``python -m tcm_core ARGS`` (or under ``torchrun --nproc_per_node N``) in a real subprocess."""
    proc = subprocess.run(cli_command(args, torchrun), cwd=REPO, env=cli_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(args[:3])} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def train_args(mode: str, data: Path, out: Path, *overrides: str, init: Path | None = None,
               boundary: Path | None = None, extra: list[str] | None = None) -> list[str]:
    args = ["train", "--mode", mode, "--data", str(data), "--out", str(out), "--device", "cpu", "--no-progress"]
    if init:
        args += ["--init", str(init)]
    if boundary:
        args += ["--boundary-model", str(boundary)]
    return args + list(extra or []) + list(overrides)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


class CallRecorder:
    """Forward hooks recording every call of a network: inputs x, sigma (as passed, float64 times) and outputs."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.calls: list[dict[str, torch.Tensor]] = []
        self.handle = net.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        sigma = torch.as_tensor(args[1]).detach().clone().reshape(-1)
        self.calls.append({"x": args[0].detach().clone(), "sigma": sigma, "out": output.detach().clone(),
                           "grad": torch.is_grad_enabled()})

    def clear(self) -> None:
        self.calls.clear()

    def remove(self) -> None:
        self.handle.remove()


def save_foreign_state_dict(path: Path, seed: int = 0) -> Path:
    """A plain state dict (``.pt``) with a sibling ``.json`` giving only its arch: a checkpoint with no iteration."""
    import json

    net = micro_network(seed)
    torch.save(net.state_dict(), path)
    path.with_suffix(".json").write_text(json.dumps({"arch": net.arch}))
    return path
