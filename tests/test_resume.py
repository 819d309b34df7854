"""kill -9 in the middle of a run, restart with the same command: the result is bit-identical."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from training_helpers import (
    MICRO_ARCH,
    REPO,
    cli_command,
    cli_env,
    load_weights,
    make_small_mnist,
    run_cli,
    save_micro_checkpoint,
    train_args,
)

from tcm_core.training.state import list_states


def test_fp16_grad_scaler_resumes_bit_identically(tmp_path):
    """fp16's GradScaler (scale and growth tracker) is part of the training state: a Stage-2 run stopped and
    rebuilt from its saved state goes on exactly as the uninterrupted run, through backoffs and growths of the
    scale (CPU autocast, as the GPU check's dry run runs it). Where the micro net overflows depends on the CPU's
    fp16 arithmetic (AVX-512 FP16 / AMX or emulated), so the cut is read off the uninterrupted run: the first
    step after which the growth tracker is mid-count and the scale still both grows and backs off."""
    from tcm_core.gpu import bench
    from tcm_core.training.setup import cpu_autocast_allowed
    from tcm_core.training.state import save_state, state_of
    from tcm_core.training.step import train_step

    arch = {k: v for k, v in MICRO_ARCH.items() if k != "preset"}
    inputs = bench.write_synthetic_inputs(tmp_path / "inputs", "tiny", arch)
    cfg = bench.bench_config("stage2", 4, "fp16", loss_scale=1024, loss_scale_growth=2, lr=1e-3)
    total = 14

    def build(name: str):
        with cpu_autocast_allowed():
            return bench.build_run(inputs, "stage2", cfg, "cpu", tmp_path / name)

    def steps(run, count: int) -> list[tuple[float, int]]:
        """(loss scale, growth tracker) after each of ``count`` training steps."""
        out = []
        for _ in range(count):
            train_step(run)
            out.append((float(run.scaler.get_scale()), int(run.scaler.state_dict()["_growth_tracker"])))
        return out

    whole = build("whole")
    trajectory = steps(whole, total)
    scales = [s for s, _ in trajectory]
    moves = [b / a for a, b in zip(scales, scales[1:])]  # moves[i]: from step i + 1 to step i + 2
    cuts = [c for c in range(2, total - 1) if trajectory[c - 1][1] > 0 and {2.0, 0.5} <= set(moves[c - 1:])]
    assert cuts, f"no step with the growth tracker mid-count before a growth and a backoff: {trajectory}"
    cut_at = cuts[0]
    cut = build("cut")
    assert steps(cut, cut_at) == trajectory[:cut_at]
    save_state(cut.paths.state_folder, state_of(cut))
    resumed = build("cut")
    assert resumed.resumed_from == cut.iteration and resumed.scaler.get_scale() == scales[cut_at - 1]
    assert resumed.scaler.state_dict()["_growth_tracker"] == trajectory[cut_at - 1][1] > 0
    assert steps(resumed, total - cut_at) == trajectory[cut_at:]
    for name in ("net", "ema"):
        for key, value in getattr(whole, name).state_dict().items():
            assert torch.equal(value, getattr(resumed, name).state_dict()[key]), (name, key)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_kill_and_resume_is_bit_identical(tmp_path):
    data = make_small_mnist(tmp_path / "mnist16.zip", count=40)  # 40 is not a multiple of the batch: epochs wrap
    # Stage 2 carries on the init's global counter (100), so the resume lands mid-stage at 100 + k; it exercises
    # the frozen model, the global boundary draw and dropout replay.
    init = save_micro_checkpoint(tmp_path / "stage1-init.safetensors", iteration=100, seed=3)
    overrides = ["iterations=24", "batch=6", "batch_gpu=3", "state_every=3", "log_every=2", "lr=1e-3",
                 "ema=power", "deterministic=true", "seed=7"]
    paths = dict(init=init, boundary=init)

    reference = tmp_path / "reference"
    run_cli(train_args("stage2", data, reference, *overrides, **paths))

    run = tmp_path / "interrupted"
    state_dir = tmp_path / "state"  # outside the run folder, as the workflow passes it
    args = train_args("stage2", data, run, *overrides, **paths, extra=["--state-dir", str(state_dir)])
    proc = subprocess.Popen(cli_command(args), cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not list_states(state_dir) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    _, stderr = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    killed_at = list_states(state_dir)[0][0]
    assert 100 < killed_at < 124 and not (run / "network.safetensors").exists(), "the run ended before the kill"

    resumed = run_cli(args)  # the very same command
    assert f"resumed from {killed_at}" in resumed.stderr

    expected, actual = load_weights(reference / "network.safetensors"), load_weights(run / "network.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    ref_metrics, run_metrics = _metrics(reference), _metrics(run)
    assert [r["step"] for r in run_metrics] == list(range(102, 125, 2))  # no step twice, none missing
    assert run_metrics == ref_metrics
    assert json.loads((run / "network.json").read_text())["iteration"] == 124
    assert [it for it, _ in list_states(state_dir)] == [124, 123]
