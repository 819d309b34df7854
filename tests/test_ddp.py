"""torchrun with 2 gloo processes gives the same run as 1 process at the same global batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from training_helpers import load_weights, make_small_mnist, run_cli, save_micro_checkpoint, train_args


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process(tmp_path):
    data = make_small_mnist(tmp_path / "mnist16.zip", count=32)
    stage1 = save_micro_checkpoint(tmp_path / "stage1.safetensors", iteration=10, seed=4)  # dropout 0.1 in it
    # Stage 2: exercises the global boundary draw, the frozen model and dropout replay on every rank. With
    # batch_gpu=2 and rho=0.25 a per-call count would give floor(2 * 0.25) = 0 boundary samples; the global batch
    # has floor(8 * 0.25) = 2, placed by the iteration's seed, the same for 1 process and 2 ranks.
    # ema_beta=0 makes the saved EMA the trained weights themselves, so the comparison is not diluted.
    overrides = ["iterations=3", "batch=8", "batch_gpu=2", "rho=0.25", "lr=1e-3", "ema_beta=0", "log_every=1",
                 "state_every=2"]
    single, double = tmp_path / "one", tmp_path / "two"
    run_cli(train_args("stage2", data, single, *overrides, init=stage1, boundary=stage1))
    run_cli(train_args("stage2", data, double, *overrides, init=stage1, boundary=stage1), torchrun=2)

    initial = load_weights(stage1)
    one, two = load_weights(single / "network.safetensors"), load_weights(double / "network.safetensors")
    moved = max((one[k] - initial[k]).abs().max().item() for k in one)
    assert moved > 1e-3  # the runs did train
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-5, msg=name)
    m1, m2 = _metrics(single), _metrics(double)
    assert [r["step"] for r in m2] == [11, 12, 13]  # rank 0 alone writes metrics
    for a, b in zip(m1, m2):
        for key in ("loss", "loss_regular", "loss_boundary", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    config = json.loads((double / "config.json").read_text())
    assert (config["world_size"], config["rho_effective"]) == (2, 0.25)
    assert all(r["loss_boundary"] > 0 for r in m2)
